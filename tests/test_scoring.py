"""Identity scorers: dlib on real faces, the synthetic-face embedder, pair accounting, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraleak.config import from_dict
from loraleak.errors import ConfigError, InputError, LoraleakError
from loraleak.imaging import center_crop_resize, open_rgb
from loraleak.scoring.base import match_against, verify
from loraleak.scoring.registry import make_scorer
from loraleak.scoring.dlib_scorer import DlibScorer
from loraleak.scoring.pairs import (Pair, balanced_subset, best_threshold, read_lfw_pairs,
                                    verification_accuracy)
from loraleak.scoring.synthetic_scorer import (FaceEmbedder, SyntheticFaceScorer, SyntheticScorerConfig,
                                               synthetic_pairs, train_synthetic_scorer)

LFW = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "lfw"
needs_lfw = pytest.mark.skipif(not (LFW / "pairs.tsv").is_file(),
                               reason=f"real LFW faces not found at {LFW} (../shared beside the repository)")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def tiny_synthetic_scorer() -> SyntheticFaceScorer:
    cfg = SyntheticScorerConfig(widths=(4, 4, 4, 4), embedding_dim=8)
    torch.manual_seed(0)
    return SyntheticFaceScorer(FaceEmbedder(cfg.widths, cfg.embedding_dim, cfg.image_size), cfg, threshold=0.4)


# --- distance / similarity mappings on hand-made embeddings ---

def test_dlib_distance_and_similarity_mapping():
    scorer = DlibScorer()
    origin = np.zeros(128, np.float32)
    at = lambda d: np.eye(128, dtype=np.float32)[0] * d  # noqa: E731 - a point at distance d
    assert scorer.distance(origin, at(0.3)) == pytest.approx(0.3)
    assert scorer.similarity(origin, origin) == 1.0
    assert scorer.similarity(origin, at(0.6)) == pytest.approx(0.5)  # threshold <-> 0.5
    assert scorer.similarity(origin, at(0.9)) == pytest.approx(0.25)
    assert scorer.similarity(origin, at(2.0)) == 0.0  # clipped
    assert verify(scorer, origin, at(0.59)) is True
    assert verify(scorer, origin, at(0.61)) is False
    assert verify(scorer, origin, None) is None


def test_synthetic_distance_is_one_minus_cosine_and_similarity_the_papers_mapping():
    scorer = tiny_synthetic_scorer()
    a = np.array([1.0, 0.0], np.float32)
    assert scorer.distance(a, a) == pytest.approx(0.0)
    assert scorer.distance(a, np.array([0.0, 3.0])) == pytest.approx(1.0)  # orthogonal, any length
    assert scorer.similarity(a, a) == pytest.approx(1.0)
    assert scorer.similarity(a, np.array([0.0, 1.0])) == pytest.approx(0.5)
    assert scorer.similarity(a, -a) == pytest.approx(0.0)
    cos = np.cos(np.pi / 3)
    assert scorer.similarity(a, np.array([cos, np.sin(np.pi / 3)])) == pytest.approx(cos * 0.5 + 0.5)


def test_match_against_averages_over_references_with_faces():
    scorer = DlibScorer()
    e = np.eye(4, dtype=np.float32)
    refs = [np.zeros(4, np.float32), None, e[0] * 0.4]
    matches = match_against(scorer, [e[0] * 0.2, None, e[1] * 1.0], refs)
    assert matches[1] is None
    assert matches[0].distance == pytest.approx(0.2)  # (0.2 + 0.2) / 2
    assert matches[0].similarity == pytest.approx(1 - 0.2 / 1.2)
    assert matches[0].verified_rate == 1.0
    far = matches[2]
    assert far.distance == pytest.approx((1.0 + np.hypot(1.0, 0.4)) / 2)
    assert far.verified_rate == 0.0
    with pytest.raises(LoraleakError, match="no face in any of the 2 reference"):
        match_against(scorer, [e[0]], [None, None])


# --- factory ---

def test_make_scorer_rejects_unknown_names_and_dlib_paths(tmp_path):
    with pytest.raises(ConfigError, match="unknown scorer 'arcface'"):
        make_scorer("arcface")
    with pytest.raises(ConfigError, match="takes no path"):
        make_scorer("dlib", tmp_path)


# --- pairs ---

def write_tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(["path_a\tpath_b\tsame_person", *rows]) + "\n")
    return path


def test_read_lfw_pairs_resolves_paths_against_the_tsv_folder(tmp_path):
    tsv = write_tsv(tmp_path / "pairs.tsv", ["a/1.jpg\ta/2.jpg\t1", "a/1.jpg\tb/1.jpg\t0"])
    pairs = read_lfw_pairs(tsv)
    assert pairs == [Pair(tmp_path / "a/1.jpg", tmp_path / "a/2.jpg", True),
                     Pair(tmp_path / "a/1.jpg", tmp_path / "b/1.jpg", False)]
    assert read_lfw_pairs(tsv, root="/data")[0].a == Path("/data/a/1.jpg")


@pytest.mark.parametrize("header, row, message", [
    ("a\tb\tc", "x\ty\t1", "expected a header"),
    ("path_a\tpath_b\tsame_person", "x\ty\tyes", ":2: expected"),
    ("path_a\tpath_b\tsame_person", "x\ty", ":2: expected"),
])
def test_read_lfw_pairs_rejects_malformed_files(tmp_path, header, row, message):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text(f"{header}\n{row}\n")
    with pytest.raises(InputError, match=message):
        read_lfw_pairs(tsv)
    with pytest.raises(InputError, match="not found"):
        read_lfw_pairs(tmp_path / "missing.tsv")


def test_balanced_subset_takes_half_of_each_kind():
    pairs = [Pair(k, k + 1, k % 3 == 0) for k in range(30)]
    subset = balanced_subset(pairs, 6)
    assert [p.same for p in subset] == [True] * 3 + [False] * 3
    assert [p.a for p in subset] == [0, 3, 6, 1, 2, 4]


class MeanColourScorer:
    """A transparent scorer for the accounting: embedding = mean colour, black = no face."""

    name = "mean-colour"
    threshold = 10.0

    def embed(self, images):
        means = [np.asarray(im, np.float32).mean(axis=(0, 1)) for im in images]
        return [None if m.sum() == 0 else m for m in means]

    def distance(self, a, b):
        return float(np.linalg.norm(a - b))

    def similarity(self, a, b):
        return 1.0 - self.distance(a, b) / 20


def test_verification_accuracy_counts_missing_faces_as_different():
    colours = {"red": (200, 0, 0), "red2": (205, 0, 0), "blue": (0, 0, 200), "black": (0, 0, 0)}
    pairs = [Pair("red", "red2", True),      # correct
             Pair("red", "blue", False),     # correct
             Pair("red", "blue", True),      # wrong (labelled same, far apart)
             Pair("black", "red", True),     # no face: judged different -> wrong
             Pair("black", "blue", False)]   # no face: judged different -> right
    result = verification_accuracy(MeanColourScorer(), pairs,
                                   lambda k: Image.new("RGB", (8, 8), colours[k]), progress=False)
    assert result.found_rate == pytest.approx(3 / 4)
    assert result.n_found_pairs == 3
    assert result.accuracy_all == pytest.approx(3 / 5)
    assert result.accuracy_found == pytest.approx(2 / 3)
    assert result.mean_distance_same == pytest.approx((5 + np.hypot(200, 200)) / 2)


def test_best_threshold_separates_and_picks_best_accuracy():
    t, acc = best_threshold([0.1, 0.2, 0.3, 0.7, 0.8], [True, True, True, False, False])
    assert acc == 1.0 and 0.3 < t < 0.7
    t, acc = best_threshold([0.1, 0.5, 0.4, 0.9], [True, True, False, False])
    assert acc == pytest.approx(0.75)
    with pytest.raises(InputError):
        best_threshold([], [])


# --- dlib ---

def test_dlib_finds_no_face_in_blank_or_noise_images():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert DlibScorer().embed([Image.new("RGB", (32, 32), (128, 128, 128)), noise]) == [None, None]


@needs_lfw
def test_dlib_verifies_real_lfw_faces_at_32px():
    pairs = read_lfw_pairs(LFW / "pairs.tsv")
    same = next(p for p in pairs if p.same and p.a.name == "Abel_Pacheco_0001.jpg")
    different = next(p for p in pairs if not p.same)

    def small(path):  # the benchmark's preprocessing: 120 px face box -> 32 px
        return center_crop_resize(open_rgb(path), 32, crop_fraction=120 / 250)

    scorer = make_scorer("dlib")
    emb = scorer.embed([small(same.a), small(same.b), small(different.a), small(different.b)])
    assert all(e is not None and e.shape == (128,) for e in emb)
    assert verify(scorer, emb[0], emb[1]) is True
    assert verify(scorer, emb[2], emb[3]) is False
    match_same, match_other = match_against(scorer, [emb[1], emb[3]], [emb[0]])
    assert match_same.similarity > 0.5 > match_other.similarity


# --- synthetic scorer ---

TINY_TRAINING = SyntheticScorerConfig(num_identities=60, images_per_identity=6, calibration_identities=20,
                                      epochs=8, batch_size=64, widths=(8, 16, 32, 32), eval_pairs=200)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic-scorer")
    return train_synthetic_scorer(TINY_TRAINING, out), out


def test_tiny_synthetic_training_beats_chance_on_unseen_private_identities(tiny_trained):
    metrics, out = tiny_trained
    assert metrics["calibration_accuracy"] > 0.7
    assert metrics["private_accuracy"] > 0.65  # chance is 0.5 on balanced pairs
    saved = json.loads((out / "config.json").read_text())
    assert saved["threshold"] == pytest.approx(metrics["threshold"])
    assert saved["config"]["num_identities"] == 60


def test_synthetic_scorer_save_load_round_trip_gives_identical_embeddings(tiny_trained):
    _, out = tiny_trained
    scorer = make_scorer("synthetic", out)
    images = [synthetic_pairs(4, seed=1)[1]((i, 0)) for i in range(3)]
    before, _ = scorer.embed_with_face_probability(images)
    again = SyntheticFaceScorer.load(scorer.save(out.parent / "copy"))
    after, _ = again.embed_with_face_probability(images)
    np.testing.assert_array_equal(before, after)
    assert again.threshold == scorer.threshold and again.config == scorer.config


def test_synthetic_scorer_refuses_pickle_files(tmp_path):
    scorer = tiny_synthetic_scorer()
    torch.save(scorer.model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(InputError, match="pickle files are never loaded"):
        SyntheticFaceScorer.load(tmp_path / "model.pt")
    out = scorer.save(tmp_path / "scorer")
    torch.save(scorer.model.state_dict(), out / "model.safetensors")  # a pickle under the right name
    with pytest.raises(InputError, match="not a safetensors file"):
        SyntheticFaceScorer.load(out)


def test_synthetic_scorer_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="divisible"):
        from_dict(SyntheticScorerConfig, {"image_size": 30})
    with pytest.raises(ConfigError, match="unknown key 'depth'"):
        from_dict(SyntheticScorerConfig, {"depth": 3})
    out = tiny_synthetic_scorer().save(tmp_path / "scorer")
    (out / "config.json").write_text(json.dumps({"config": {"widths": [4, 4]}, "threshold": 0.4}))
    with pytest.raises(InputError, match="do not match"):
        SyntheticFaceScorer.load(out)


def test_shipped_synthetic_scorer_verifies_private_identities():
    scorer = make_scorer("synthetic")
    pairs, render = synthetic_pairs(300, seed=7)
    result = verification_accuracy(scorer, pairs, render, progress=False)
    assert result.found_rate > 0.98
    assert result.accuracy_all >= 0.95


def test_shipped_synthetic_scorer_says_no_face_for_non_faces():
    rng = np.random.default_rng(0)
    non_faces = [Image.new("RGB", (32, 32), (200, 180, 160)),
                 Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                 Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((32, 32), Image.BICUBIC)]
    face = synthetic_pairs(2)[1]((0, 0))
    embeddings = make_scorer("synthetic").embed([*non_faces, face.resize((64, 64))])
    assert embeddings[:3] == [None, None, None]
    assert embeddings[3] is not None and np.linalg.norm(embeddings[3]) == pytest.approx(1.0, abs=1e-5)
