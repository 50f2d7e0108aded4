"""Evaluation metrics against hand-computed cases: per-image scores, ties, per-victim and bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from loraleak.errors import InputError
from loraleak.evaluation.metrics import (ImageScores, score_embeddings, score_images, similarity_mapping,
                                         summarise, summarise_victim)


class EuclideanScorer:
    """A small implementation of the Scorer protocol: an image's embedding is its mean colour
    (a black image has "no face"); Euclidean distance; similarity clip(1 - d / 2, 0, 1)."""

    name = "euclidean-test"

    def __init__(self, threshold: float = 1.2):
        self.threshold = threshold

    def embed(self, images):
        out = []
        for im in images:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
            out.append(None if not pixels.any() else pixels.mean(axis=(0, 1)) / 25.5)  # 255 -> 10.0
        return out

    def distance(self, a, b):
        return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))

    def similarity(self, a, b):
        return float(np.clip(1.0 - self.distance(a, b) / 2.0, 0.0, 1.0))


def v(*xs):
    return np.array(xs, dtype=np.float64)


SCORER = EuclideanScorer()
# Victim A has two reference photos, B and C one each (1-D embeddings).
REFS = {"A": [v(0.0), v(2.0)], "B": [v(3.0)], "C": [v(10.0)]}
# Four images: near A / nearer B than A / no face / near A again.
EMBS = [v(1.0), v(2.5), None, v(1.5)]


def test_per_image_scores_by_hand():
    s = score_embeddings(SCORER, EMBS, REFS, "A")
    assert s.candidate_ids == ("A", "B", "C") and s.victim_index == 0 and s.n_images == 4
    assert s.face_found.tolist() == [True, True, False, True]
    # mean distance to A's two photos: (1+1)/2, (2.5+0.5)/2, -, (1.5+0.5)/2
    np.testing.assert_allclose(s.distance, [1.0, 1.5, np.nan, 1.0])
    np.testing.assert_allclose(s.distances[:, 1], [2.0, 0.5, np.nan, 1.5])
    # similarity is the mean of per-photo similarities (clipped), not the mapping of the mean
    # distance: image 2 -> (clip(1 - 2.5/2), 1 - 0.5/2) = (0, 0.75) -> 0.375
    np.testing.assert_allclose(s.similarity, [0.5, 0.375, np.nan, 0.5])
    assert s.verified.tolist() == [True, False, False, True]  # threshold 1.2
    np.testing.assert_allclose(s.rank, [1, 2, np.nan, 1])
    assert s.topk(1).tolist() == [1, 0, 0, 1]
    assert s.topk(5).tolist() == [1, 1, 0, 1]  # K = 3 < 5: any image with a face is in the top 5


def test_victim_summary_by_hand():
    v_ = summarise_victim(score_embeddings(SCORER, EMBS, REFS, "A"))
    assert v_.n_images == 4 and v_.n_candidates == 3
    assert v_.face_found == 0.75
    assert v_.similarity == pytest.approx((0.5 + 0.375 + 0.5) / 3)
    assert v_.distance == pytest.approx((1.0 + 1.5 + 1.0) / 3)
    assert v_.verified == 0.5 and v_.top1_image == 0.5 and v_.top5_image == 0.75  # no face counts as a miss
    # victim level: mean distances over the 3 faces A 1.167, B 1.333, C 8.33 -> A ranked first
    assert v_.rank == 1 and v_.top1_victim == 1.0 and v_.top5_victim == 1.0


def test_victim_level_identification_can_differ_from_per_image():
    # Two images prefer B (slightly), one prefers A strongly: per image top-1 is 1/3, but the
    # victim's mean distance is smallest to A.
    refs = {"A": [v(0.0)], "B": [v(4.0)]}
    s = score_embeddings(SCORER, [v(2.1), v(2.1), v(0.0)], refs, "A")
    summary = summarise_victim(s)
    assert summary.top1_image == pytest.approx(1 / 3)
    assert summary.rank == 1 and summary.top1_victim == 1.0


def test_score_images_embeds_with_the_scorer_and_counts_no_face():
    # mean colour 25.5 -> embedding 1.0; black -> no face
    grey = Image.new("RGB", (8, 8), (int(25.5 * 1.0),) * 3)
    black = Image.new("RGB", (8, 8), (0, 0, 0))
    refs = {"A": [np.full(3, 1.0)], "B": [np.full(3, 5.0)]}
    s = score_images(SCORER, [grey, black], refs, "A")
    assert s.face_found.tolist() == [True, False]
    assert s.distance[0] == pytest.approx(0.0, abs=0.1)
    assert s.verified.tolist() == [True, False]


def test_ties_are_broken_at_random_in_expectation():
    # Image at the origin, four candidates at distance 1 each: every candidate ties.
    refs = {"A": [v(1, 0)], "B": [v(-1, 0)], "C": [v(0, 1)], "D": [v(0, -1)]}
    s = score_embeddings(SCORER, [v(0, 0)], refs, "A")
    assert s.topk(1)[0] == pytest.approx(0.25)  # = chance 1/K
    assert s.topk(5)[0] == 1.0
    assert s.rank[0] == pytest.approx(2.5)
    assert summarise_victim(s).top1_victim == pytest.approx(0.25)


def test_partial_tie_at_the_top5_boundary():
    # Image at 0; victim photo at distance 5; three candidates nearer (1, 2, 3), two tie at 5,
    # one farther: the victim's rank is uniform over 4..6, so P(rank <= 5) = 2/3.
    refs = {"V": [v(5.0)], "n1": [v(1.0)], "n2": [v(2.0)], "n3": [v(-3.0)],
            "t1": [v(-5.0)], "t2": [v(5.0)], "far": [v(9.0)]}
    s = score_embeddings(SCORER, [v(0.0)], refs, "V")
    assert s.rank[0] == pytest.approx(5.0)
    assert s.topk(1)[0] == 0.0
    assert s.topk(5)[0] == pytest.approx(2 / 3)


def test_a_scorer_that_sees_no_difference_scores_exactly_chance():
    refs = {f"id{i}": [v(0.0)] for i in range(8)}
    m = summarise([score_embeddings(SCORER, [v(0.0)] * 3, refs, f"id{i}") for i in range(8)], n_boot=50)
    assert m.top1_image.value == pytest.approx(m.chance_top1) == pytest.approx(1 / 8)
    assert m.top5_image.value == pytest.approx(m.chance_top5) == pytest.approx(5 / 8)
    assert m.top1_victim.value == pytest.approx(1 / 8)


def test_chance_levels_with_fewer_than_five_candidates():
    m = summarise([score_embeddings(SCORER, EMBS, REFS, "A")], n_boot=20)
    assert m.n_candidates == 3
    assert m.chance_top1 == pytest.approx(1 / 3) and m.chance_top5 == 1.0


def test_summarise_averages_per_victim_then_over_victims():
    refs = {"A": [v(0.0)], "B": [v(10.0)]}
    # Victim A: 1 image, verified. Victim B: 9 images, none verified (all near A).
    a = score_embeddings(SCORER, [v(0.0)], refs, "A")
    b = score_embeddings(SCORER, [v(0.5)] * 9, refs, "B")
    m = summarise([a, b], n_boot=200)
    assert m.verified.value == pytest.approx(0.5)  # not 1/10 pooled over images
    assert m.similarity.value == pytest.approx((1.0 + 0.0) / 2)  # A: sim 1; B: clip(1 - 9.5/2) = 0
    assert m.n_victims == 2 and m.n_images == 10
    assert [x.victim_id for x in m.victims] == ["A", "B"]


def test_victims_without_any_face_leave_similarity_but_count_in_rates():
    refs = {"A": [v(0.0)], "B": [v(10.0)]}
    seen = score_embeddings(SCORER, [v(0.0), v(0.0)], refs, "A")
    unseen = score_embeddings(SCORER, [None, None], refs, "B")
    m = summarise([seen, unseen], n_boot=200)
    assert m.n_victims_with_face == 1
    assert m.similarity.value == pytest.approx(1.0)  # only the victim with a face
    assert m.face_found.value == 0.5 and m.verified.value == 0.5 and m.top1_victim.value == 0.5
    assert m.victims[1].rank is None and m.victims[1].similarity is None

    nothing = summarise([unseen], n_boot=20)
    assert nothing.similarity.value is None and nothing.distance.value is None
    assert nothing.verified.value == 0.0
    flat = nothing.flat("rec/")
    assert "rec/similarity" not in flat and flat["rec/verified"] == 0.0


def test_bootstrap_resamples_victims_not_images():
    # 20 victims x 10 images; 10 victims entirely verified, 10 entirely not. Resampling victims
    # gives an interval about +-0.22 wide; resampling images would give about +-0.07.
    refs = {"near": [v(0.0)], "far": [v(10.0)]}
    scores = [score_embeddings(SCORER, [v(0.0 if i % 2 else 5.0)] * 10, refs, "near") for i in range(20)]
    m = summarise(scores, n_boot=1000, seed=0)
    assert m.verified.value == 0.5
    assert m.verified.low < 0.5 < m.verified.high
    assert 0.2 < m.verified.low < 0.35 and 0.65 < m.verified.high < 0.8


def test_intervals_contain_the_estimate_and_collapse_when_victims_agree():
    rng = np.random.default_rng(3)
    refs = {f"id{i}": [rng.normal(size=4)] for i in range(6)}
    scores = [score_embeddings(SCORER, [refs[f"id{i}"][0] + rng.normal(scale=0.7, size=4) for _ in range(5)],
                               refs, f"id{i}") for i in range(6)]
    m = summarise(scores, n_boot=500)
    for name, est in m.estimates().items():
        assert est.low <= est.value <= est.high, name
    same = summarise([score_embeddings(SCORER, [v(0.0)], {"A": [v(0.0)], "B": [v(5.0)]}, "A")] * 5, n_boot=100)
    assert same.verified.low == same.verified.value == same.verified.high == 1.0


def test_summarise_is_deterministic_from_the_seed():
    rng = np.random.default_rng(0)
    refs = {f"id{i}": [rng.normal(size=3)] for i in range(5)}
    scores = [score_embeddings(SCORER, list(rng.normal(size=(4, 3))), refs, f"id{i}") for i in range(5)]
    assert summarise(scores, seed=7) == summarise(scores, seed=7)
    assert summarise(scores, seed=7).similarity != summarise(scores, seed=8).similarity


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="not among"):
        score_embeddings(SCORER, [v(0.0)], {"B": [v(1.0)]}, "A")
    with pytest.raises(InputError, match="no reference face"):
        score_embeddings(SCORER, [v(0.0)], {"A": [v(0.0)], "B": [None]}, "A")
    with pytest.raises(ValueError, match="at least one victim"):
        summarise([])
    k3 = score_embeddings(SCORER, [v(0.0)], REFS, "A")
    k2 = score_embeddings(SCORER, [v(0.0)], {"A": [v(0.0)], "B": [v(1.0)]}, "A")
    with pytest.raises(ValueError, match="different numbers of candidates"):
        summarise([k3, k2])


def test_scores_and_metrics_round_trip_through_json():
    s = score_embeddings(SCORER, EMBS, REFS, "A")
    back = ImageScores.from_dict(json.loads(json.dumps(s.to_dict())))
    np.testing.assert_array_equal(back.distances, s.distances)  # NaN rows included
    np.testing.assert_array_equal(back.similarity, s.similarity)
    assert summarise_victim(back) == summarise_victim(s)
    m = summarise([s], n_boot=10)
    assert json.loads(json.dumps(m.to_dict()))["verified"]["value"] == 0.5
    flat = m.flat("rec/")
    assert flat["rec/verified"] == 0.5 and {"rec/verified_lo", "rec/verified_hi", "rec/chance_top1"} <= set(flat)


def test_similarity_mappings_are_documented_per_scorer():
    assert "cos * 0.5 + 0.5" in similarity_mapping("facenet")
    assert "cos * 0.5 + 0.5" in similarity_mapping("synthetic")
    assert "1 - d / 1.2" in similarity_mapping("dlib")
