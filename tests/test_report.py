"""The HTML evaluation report: self-contained, every victim and condition, decodable images, figures."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from loraleak.evaluation.metrics import score_embeddings, summarise
from loraleak.evaluation.report import HISTOGRAM_FILE, RATES_FILE, write_report
from loraleak.identities import SyntheticFaces

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


class CosineScorer:
    """Scorer protocol on given embeddings: 1 - cosine distance, similarity cos * 0.5 + 0.5."""

    name = "cosine-test"
    threshold = 0.5

    def distance(self, a, b):
        return float(1 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    def similarity(self, a, b):
        return 1 - self.distance(a, b) / 2


@pytest.fixture(scope="module")
def study():
    """3 synthetic victims x conditions: org/rec near the victim, base anywhere, one empty baseline."""
    faces = SyntheticFaces(3, 7, seed=0)
    strangers = SyntheticFaces(12, 1, seed=0, namespace="public")
    rng = np.random.default_rng(0)
    centres = {i.identity_id: rng.normal(size=8) for i in faces.identities()}
    refs = {k: [c + rng.normal(scale=0.1, size=8) for _ in range(3)] for k, c in centres.items()}
    victims, scores = [], {"org": [], "rec": [], "base": [], "nn_baseline": []}
    for n, identity in enumerate(faces.identities()):
        photos = identity.load(32)
        vid = identity.identity_id
        images = {"org": photos[3:7], "rec": photos[3:6],
                  "base": [strangers.render(4 * n + j, 0, 32) for j in range(4)], "nn_baseline": []}
        victims.append({"identity_id": vid, "private": photos[:3], **images})
        near = lambda k: [centres[vid] + rng.normal(scale=0.3, size=8) for _ in range(k)]  # noqa: E731
        scores["org"].append(score_embeddings(CosineScorer(), near(4), refs, vid))
        scores["rec"].append(score_embeddings(CosineScorer(), near(2) + [None], refs, vid))
        scores["base"].append(score_embeddings(CosineScorer(), list(rng.normal(size=(4, 8))), refs, vid))
        scores["nn_baseline"].append(score_embeddings(CosineScorer(), [None], refs, vid))  # never a face
    metrics = {name: summarise(s, n_boot=200) for name, s in scores.items()}
    return victims, metrics


def test_report_is_self_contained_and_shows_every_victim_and_condition(tmp_path, study):
    victims, metrics = study
    path = write_report(tmp_path / "report", "Leak <check> & more", metrics, victims,
                        notes={"scorer": "cosine-test", "similarity": "cos * 0.5 + 0.5"})
    text = path.read_text(encoding="utf-8")
    assert path.name == "report.html" and path.parent == tmp_path / "report"
    assert "Leak &lt;check&gt; &amp; more" in text  # escaped, not markup
    for victim in victims:
        assert f"<h3>{victim['identity_id']}</h3>" in text
    for name in ["private", "org", "rec", "base", "nn_baseline"]:
        assert f"<b>{name}</b>" in text
    for name in metrics:
        assert f"<tr><th>{name}</th>" in text  # a metrics row per condition
    assert "cos * 0.5 + 0.5" in text
    # nothing fetched from elsewhere
    assert not re.search(r"<script|<link|https?://|src=\"(?!data:)", text)
    # rows appear in the given order within each victim
    first = text[text.index(victims[0]["identity_id"]):text.index(victims[1]["identity_id"])]
    positions = [first.index(f"<b>{name}</b>") for name in ["private", "org", "rec", "base", "nn_baseline"]]
    assert positions == sorted(positions)
    # the empty baseline is shown as such, and a condition with no face at all as "-"
    assert text.count("(no images)") == len(victims)
    nn_row = text[text.index("<tr><th>nn_baseline</th>"):]
    assert nn_row.split("</tr>")[0].count(">-</td>") == 2  # similarity and distance


def test_report_images_are_valid_pngs_of_each_row(tmp_path, study):
    victims, metrics = study
    text = write_report(tmp_path, "t", metrics, victims).read_text()
    blobs = DATA_URI.findall(text)
    rows = sum(1 for v in victims for k, ims in v.items() if k != "identity_id" and ims)
    # Per victim an at-a-glance strip (private | org | rec | base, 2 x 2 images each; no regime: no best
    # control), then one strip per non-empty row; plus the two figures.
    glance = sum(1 for v in victims for k in ("private", "org", "rec", "base") if v.get(k))
    assert len(blobs) == glance + rows + 2
    decoded = [Image.open(io.BytesIO(base64.b64decode(b, validate=True))) for b in blobs]
    for im in decoded:
        im.verify()
    strips = [Image.open(io.BytesIO(base64.b64decode(b))) for b in blobs[2:]]
    # each row strip is its images side by side (32 px + 2 px padding); each glance cell two columns
    sizes = sorted({im.size for im in strips})
    assert [s for s in sizes if s[1] == 36] == [(3 * 34 + 2, 36), (4 * 34 + 2, 36)]
    assert all(s[0] == 2 * 34 + 2 for s in sizes if s[1] != 36)


def test_figures_are_written_beside_the_report(tmp_path, study):
    victims, metrics = study
    write_report(tmp_path, "t", metrics, victims, per_victim_similarity={"rec": [0.7, 0.8, 0.9], "base": [0.5]})
    for name in [HISTOGRAM_FILE, RATES_FILE]:
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 300
            pixels = np.asarray(im.convert("L"))
            assert pixels.std() > 10  # something is drawn, not a blank canvas
    # the figures embedded in the HTML are the same files
    text = (tmp_path / "report.html").read_text()
    embedded = DATA_URI.findall(text)[:2]
    assert base64.b64decode(embedded[0]) == (tmp_path / HISTOGRAM_FILE).read_bytes()
    assert base64.b64decode(embedded[1]) == (tmp_path / RATES_FILE).read_bytes()


def test_histogram_defaults_to_every_condition_and_survives_no_faces(tmp_path, study):
    victims, metrics = study
    write_report(tmp_path / "a", "t", metrics, victims)
    write_report(tmp_path / "b", "t", {"nn_baseline": metrics["nn_baseline"]}, victims[:1])
    with Image.open(tmp_path / "b" / HISTOGRAM_FILE) as im:
        assert im.format == "PNG"
    assert (tmp_path / "a" / HISTOGRAM_FILE).read_bytes() != (tmp_path / "b" / HISTOGRAM_FILE).read_bytes()
