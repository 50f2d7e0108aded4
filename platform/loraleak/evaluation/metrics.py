"""Identity-leak metrics: how well a set of generated images shows each victim, with intervals.

Two steps, kept apart so embedding (slow, parallel) and summarising (fast, pure numpy) can run in
different places:

1. `score_images` / `score_embeddings`, per victim and condition: for every image, whether a face
   was found, its mean distance to each candidate identity's reference photos (the victim is one
   of the candidates), its mean similarity to the victim's photos, the victim's rank among the
   candidates, and whether it is verified as the victim (mean distance <= the scorer's threshold).
2. `summarise`, per condition over all victims: rates and means with clustered bootstrap 95%
   intervals. Victims are the unit of analysis: every metric is computed per victim first, then
   averaged over victims (the paper averages similarity per victim, then over victims), and the
   bootstrap resamples victims, never single images, because images of one victim are not
   independent. The resampling indices depend only on (seed, number of victims), so conditions
   summarised with the same seed over the same victims are resampled *paired*.

Conventions:
- "No face" is a result, not a score: such an image is left out of similarity/distance means,
  and counts as not verified and not identified in the rates over all images.
- Identification ranks the victim among the K candidates by mean distance. Ties are broken
  uniformly at random *in expectation*: an image tied with t other candidates right at the
  boundary gets fractional top-k credit, so a scorer that cannot tell anyone apart scores exactly
  chance (min(k, K) / K) instead of 0 or 1.
- Victim-level identification uses the mean distance of all the victim's images that have a face
  to each candidate; a victim with no face in any image is not identified.
- Similarity is each scorer's mapping of its distance into [0, 1] (see `SIMILARITY_MAPPINGS`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import InputError
from ..scoring.base import Embedding, Scorer

# How each scorer maps a pair of embeddings to the similarity reported as "identity similarity".
SIMILARITY_MAPPINGS = {
    "facenet": "cos * 0.5 + 0.5 (the paper's metric; InceptionResnetV1 vggface2 cosine)",
    "synthetic": "cos * 0.5 + 0.5 = 1 - distance / 2 (distance = 1 - cosine)",
    "dlib": "clip(1 - d / 1.2, 0, 1), d = Euclidean distance; threshold 0.6 maps to 0.5",
}

# Relative tolerance under which two mean distances count as a tie (they are means of the same
# float operations, so true ties agree to the last few bits).
TIE_RTOL = 1e-9

# The rates and means `summarise` estimates, in report order, with a short label each.
METRIC_LABELS = {
    "face_found": "face found",
    "similarity": "identity similarity",
    "distance": "distance",
    "verified": "verified",
    "top1_image": "top-1 (image)",
    "top5_image": "top-5 (image)",
    "top1_victim": "top-1 (victim)",
    "top5_victim": "top-5 (victim)",
}


def similarity_mapping(scorer_name: str) -> str:
    return SIMILARITY_MAPPINGS.get(scorer_name, "the scorer's own similarity in [0, 1]")


@dataclass(frozen=True, eq=False)  # holds arrays: compare summaries, not these
class ImageScores:
    """One victim's images under one condition, scored against every candidate identity.

    distances[i, j]: mean distance of image i to candidate j's reference embeddings (NaN row when
    image i has no face). similarity[i]: mean similarity of image i to the victim's references
    (NaN when no face). The victim is `candidate_ids[victim_index]`.
    """

    victim_id: str
    candidate_ids: tuple[str, ...]
    threshold: float
    distances: np.ndarray
    similarity: np.ndarray

    def __post_init__(self):
        if self.victim_id not in self.candidate_ids:
            raise ValueError(f"victim {self.victim_id!r} is not among the candidates")
        if self.distances.shape != (len(self.similarity), len(self.candidate_ids)):
            raise ValueError(f"distances shape {self.distances.shape} does not match "
                             f"{len(self.similarity)} images x {len(self.candidate_ids)} candidates")

    @property
    def victim_index(self) -> int:
        return self.candidate_ids.index(self.victim_id)

    @property
    def n_images(self) -> int:
        return len(self.similarity)

    @property
    def n_candidates(self) -> int:
        return len(self.candidate_ids)

    @property
    def face_found(self) -> np.ndarray:
        return ~np.isnan(self.similarity)

    @property
    def distance(self) -> np.ndarray:
        """Mean distance of each image to the victim's references (NaN: no face)."""
        return self.distances[:, self.victim_index]

    @property
    def verified(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.face_found & (self.distance <= self.threshold)

    @property
    def rank(self) -> np.ndarray:
        """Expected rank (1 = nearest) of the victim among the candidates, per image (NaN: no face)."""
        closer, tied = _closer_and_tied(self.distances, self.victim_index)
        return np.where(self.face_found, closer + 1 + tied / 2, np.nan)

    def topk(self, k: int) -> np.ndarray:
        """Per image, the probability that the victim is among the k nearest candidates (0: no face)."""
        closer, tied = _closer_and_tied(self.distances, self.victim_index)
        return np.where(self.face_found, _topk_credit(closer, tied, k), 0.0)

    def to_dict(self) -> dict:
        """JSON-ready (NaN as None), for storing scores so an evaluation can resume."""
        nan_to_none = lambda a: [None if math.isnan(x) else float(x) for x in np.ravel(a)]  # noqa: E731
        return {"victim_id": self.victim_id, "candidate_ids": list(self.candidate_ids),
                "threshold": self.threshold, "n_images": self.n_images,
                "distances": nan_to_none(self.distances), "similarity": nan_to_none(self.similarity)}

    @classmethod
    def from_dict(cls, d: Mapping) -> ImageScores:
        as_array = lambda xs: np.array([np.nan if x is None else x for x in xs], dtype=np.float64)  # noqa: E731
        k = len(d["candidate_ids"])
        return cls(victim_id=d["victim_id"], candidate_ids=tuple(d["candidate_ids"]),
                   threshold=float(d["threshold"]),
                   distances=as_array(d["distances"]).reshape(d["n_images"], k),
                   similarity=as_array(d["similarity"]))


def _closer_and_tied(distances: np.ndarray, victim_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, how many other candidates are strictly nearer than the victim, and how many tie it."""
    victim = distances[:, victim_index:victim_index + 1]
    others = np.delete(distances, victim_index, axis=1)
    with np.errstate(invalid="ignore"):
        tied = np.isclose(others, victim, rtol=TIE_RTOL, atol=0.0)
        closer = (others < victim) & ~tied
    return closer.sum(axis=1), tied.sum(axis=1)


def _topk_credit(closer: np.ndarray, tied: np.ndarray, k: int) -> np.ndarray:
    # The victim's rank is uniform over closer+1 .. closer+tied+1; credit = P(rank <= k).
    return np.clip(k - closer, 0, tied + 1) / (tied + 1)


def score_embeddings(scorer: Scorer, embeddings: Sequence[Embedding | None],
                     references: Mapping[str, Sequence[Embedding | None]], victim_id: str) -> ImageScores:
    """Score already-embedded images (None = no face) against each candidate's reference embeddings.

    `references` maps every candidate identity (the victim included) to its reference embeddings;
    references without a face (None) are left out, and a candidate left with none is an error
    (it could never be ranked).
    """
    refs = {cid: [r for r in embs if r is not None] for cid, embs in references.items()}
    if victim_id not in refs:
        raise InputError(f"victim {victim_id!r} is not among the {len(refs)} candidate identities")
    empty = [cid for cid, embs in refs.items() if not embs]
    if empty:
        raise InputError(f"no reference face for {len(empty)} candidate identities (first: {empty[0]!r}); "
                         "drop them from the candidates")
    candidate_ids = tuple(refs)
    distances = np.full((len(embeddings), len(candidate_ids)), np.nan)
    similarity = np.full(len(embeddings), np.nan)
    for i, emb in enumerate(embeddings):
        if emb is None:
            continue
        for j, cid in enumerate(candidate_ids):
            distances[i, j] = np.mean([scorer.distance(emb, r) for r in refs[cid]])
        similarity[i] = np.mean([scorer.similarity(emb, r) for r in refs[victim_id]])
    return ImageScores(victim_id, candidate_ids, float(scorer.threshold), distances, similarity)


def score_images(scorer: Scorer, images: Sequence[Image.Image],
                 references: Mapping[str, Sequence[Embedding | None]], victim_id: str) -> ImageScores:
    """Embed generated images with `scorer` and score them (see `score_embeddings`)."""
    return score_embeddings(scorer, scorer.embed(list(images)), references, victim_id)


@dataclass(frozen=True)
class VictimSummary:
    """One victim under one condition. Rates are over all its images; means over images with a face.

    rank / top1_victim / top5_victim: identification of the victim from the mean distance of all
    its images with a face to each candidate (rank None and credit 0 when no image has a face).
    """

    victim_id: str
    n_images: int
    n_candidates: int
    face_found: float
    similarity: float | None
    distance: float | None
    verified: float
    top1_image: float
    top5_image: float
    rank: float | None
    top1_victim: float
    top5_victim: float


def summarise_victim(scores: ImageScores) -> VictimSummary:
    found = scores.face_found
    if found.any():
        mean_distances = scores.distances[found].mean(axis=0, keepdims=True)
        closer, tied = _closer_and_tied(mean_distances, scores.victim_index)
        rank = float(closer[0] + 1 + tied[0] / 2)
        top1_victim, top5_victim = (float(_topk_credit(closer, tied, k)[0]) for k in (1, 5))
    else:
        rank, top1_victim, top5_victim = None, 0.0, 0.0
    return VictimSummary(
        victim_id=scores.victim_id,
        n_images=scores.n_images,
        n_candidates=scores.n_candidates,
        face_found=float(found.mean()),
        similarity=float(scores.similarity[found].mean()) if found.any() else None,
        distance=float(scores.distance[found].mean()) if found.any() else None,
        verified=float(scores.verified.mean()),
        top1_image=float(scores.topk(1).mean()),
        top5_image=float(scores.topk(5).mean()),
        rank=rank,
        top1_victim=top1_victim,
        top5_victim=top5_victim,
    )


@dataclass(frozen=True)
class Estimate:
    """A mean over victims with its bootstrap 95% interval; None where nothing could be measured."""

    value: float | None
    low: float | None
    high: float | None

    def __str__(self) -> str:
        if self.value is None:
            return "-"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class ConditionMetrics:
    """All victims under one condition (e.g. "rec"): the report's and MLflow's numbers."""

    n_victims: int
    n_images: int
    n_candidates: int
    chance_top1: float
    chance_top5: float
    face_found: Estimate
    similarity: Estimate         # over victims with at least one face
    distance: Estimate           # idem
    verified: Estimate
    top1_image: Estimate
    top5_image: Estimate
    top1_victim: Estimate
    top5_victim: Estimate
    n_victims_with_face: int
    n_boot: int
    seed: int
    victims: tuple[VictimSummary, ...]

    def estimates(self) -> dict[str, Estimate]:
        return {name: getattr(self, name) for name in METRIC_LABELS}

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Numbers as MLflow metrics: `{prefix}{name}`, `{prefix}{name}_lo`, `{prefix}{name}_hi`;
        unmeasurable ones are left out."""
        out = {f"{prefix}chance_top1": self.chance_top1, f"{prefix}chance_top5": self.chance_top5,
               f"{prefix}n_victims": float(self.n_victims),
               f"{prefix}n_victims_with_face": float(self.n_victims_with_face)}
        for name, est in self.estimates().items():
            if est.value is not None:
                out[f"{prefix}{name}"] = est.value
                out[f"{prefix}{name}_lo"] = est.low
                out[f"{prefix}{name}_hi"] = est.high
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def summarise(per_victim: Sequence[ImageScores], n_boot: int = 1000, seed: int = 0) -> ConditionMetrics:
    """Summarise one condition over its victims, with clustered (by victim) bootstrap 95% intervals."""
    if not per_victim:
        raise ValueError("summarise needs the scores of at least one victim")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    ks = {s.n_candidates for s in per_victim}
    if len(ks) != 1:
        # Identification rates over different candidate pools have different chance levels.
        raise ValueError(f"victims were ranked among different numbers of candidates: {sorted(ks)}")
    n_candidates = ks.pop()
    victims = tuple(summarise_victim(s) for s in per_victim)
    n = len(victims)
    boot_index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))

    def estimate(values: Sequence[float | None]) -> Estimate:
        x = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        measured = ~np.isnan(x)
        if not measured.any():
            return Estimate(None, None, None)
        # Mean over the measured victims of each resample; a resample without any is skipped.
        counts = measured[boot_index].sum(axis=1)
        sums = np.where(measured, x, 0.0)[boot_index].sum(axis=1)
        boot = sums[counts > 0] / counts[counts > 0]
        low, high = np.percentile(boot, [2.5, 97.5])
        return Estimate(float(x[measured].mean()), float(low), float(high))

    return ConditionMetrics(
        n_victims=n,
        n_images=sum(v.n_images for v in victims),
        n_candidates=n_candidates,
        chance_top1=1.0 / n_candidates,
        chance_top5=min(5, n_candidates) / n_candidates,
        **{name: estimate([getattr(v, name) for v in victims]) for name in METRIC_LABELS},
        n_victims_with_face=sum(v.similarity is not None for v in victims),
        n_boot=n_boot,
        seed=seed,
        victims=victims,
    )
