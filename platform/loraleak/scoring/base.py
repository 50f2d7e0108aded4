"""The face-identity scorer interface and the helpers every stage uses to compare faces.

A scorer answers "is this generated image the same person as these private photos?" in two steps:
`embed` turns each image into an identity embedding, or None when it finds no face, and
`distance` / `similarity` compare two embeddings. "No face found" is a result that callers count
(a found-rate), never a score: the helpers here return None for it instead of a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from ..errors import LoraleakError

Embedding = np.ndarray

class Scorer(Protocol):
    """A face-identity model.

    name: short id recorded in run params ("dlib", "synthetic").
    threshold: the distance at or below which two faces are judged the same person.
    embed(images): one embedding per image, None where no face was found.
    distance(a, b): the scorer's own metric (Euclidean for dlib, 1 - cosine for synthetic).
    similarity(a, b): a score in [0, 1], higher = more alike; each scorer documents its mapping
        from distance and where its threshold lands on it.
    """

    name: str
    threshold: float

    def embed(self, images: Sequence[Image.Image]) -> list[Embedding | None]: ...

    def distance(self, a: Embedding, b: Embedding) -> float: ...

    def similarity(self, a: Embedding, b: Embedding) -> float: ...


@dataclass(frozen=True)
class Match:
    """How close one candidate face is to a set of reference faces (means over the references)."""

    distance: float
    similarity: float
    verified_rate: float  # fraction of references within the scorer's threshold


def verify(scorer: Scorer, emb_a: Embedding | None, emb_b: Embedding | None) -> bool | None:
    """Same person? None when either image had no face."""
    if emb_a is None or emb_b is None:
        return None
    return scorer.distance(emb_a, emb_b) <= scorer.threshold


def match_against(scorer: Scorer, candidate_embs: Sequence[Embedding | None],
                  reference_embs: Sequence[Embedding | None]) -> list[Match | None]:
    """Per candidate, its mean distance/similarity to the reference faces; None if it has no face.

    References without a face are left out; if none has a face there is nothing to compare with,
    which is an input problem (the private photos are unusable), so it raises.
    """
    references = [r for r in reference_embs if r is not None]
    if not references:
        raise LoraleakError(
            f"{scorer.name} scorer found no face in any of the {len(reference_embs)} reference images")
    matches: list[Match | None] = []
    for cand in candidate_embs:
        if cand is None:
            matches.append(None)
            continue
        dists = np.array([scorer.distance(cand, r) for r in references])
        sims = np.array([scorer.similarity(cand, r) for r in references])
        matches.append(Match(distance=float(dists.mean()), similarity=float(sims.mean()),
                             verified_rate=float((dists <= scorer.threshold).mean())))
    return matches
