"""The paper's identity metric: facenet-pytorch's InceptionResnetV1 (VGGFace2), similarity (cos + 1) / 2.

Weights come from a local file, never a download: facenet-pytorch's own checkpoint
`20180402-114759-vggface2.pt` (a plain state dict, read with `torch.load(weights_only=True)`, so
no pickled code runs) or the same tensors as `.safetensors`. The classifier head the VGGFace2
checkpoint carries (`logits.*`, 8631 training identities) is dropped: only embeddings are used.
A file that is missing, unreadable as plain tensors, or not a state dict of this network is one
line of error naming the file.

Pre-processing is facenet-pytorch's for a face crop: RGB, resized to 160 px (bilinear, as its
`extract_face`), `(pixel - 127.5) / 128` (its `fixed_image_standardization`). There is no face
detector: MTCNN (facenet-pytorch's) needs torchvision, which this project cannot install. The
images the platform scores are face crops already (samples at the base's framing, private photos
centre-cropped by the identity source), so every image gets an embedding and the found-rate is 1.

Distance is 1 - cosine; similarity = cos * 0.5 + 0.5 = 1 - distance / 2, the paper's mapping.
The default threshold 0.6 (cos >= 0.4, i.e. L2 distance <= 1.10 between unit embeddings, FaceNet's
usual operating point) is not calibrated here: no pretrained weights could be obtained offline.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import InputError, LoraleakError
from .base import Embedding
from .facenet_net import INPUT_SIZE, InceptionResnetV1

VGGFACE2_FILE = "20180402-114759-vggface2.pt"
CLASSIFIER_PREFIX = "logits."  # the VGGFace2 checkpoint's identity classifier, unused for embeddings
DEFAULT_THRESHOLD = 0.6
BATCH = 16  # images per forward pass (a 160 px batch of 16 is ~0.3 GB of activations on a CPU)


def facenet_weights_path() -> Path:
    """Where facenet-pytorch caches its VGGFace2 weights: `$TORCH_HOME/checkpoints/20180402-114759-vggface2.pt`."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(torch_home).expanduser() / "checkpoints" / VGGFACE2_FILE


def _read_tensors(path: Path) -> Mapping[str, object]:
    """The file's tensors by name, without unpickling code; InputError when it is not that."""
    not_plain = f"{path}: not a state dict of facenet-pytorch's InceptionResnetV1"
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise InputError(f"{not_plain} (unreadable safetensors: {e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        # weights_only refuses pickled modules and code: a whole saved model lands here too.
        reason = " ".join(str(e).split())[:160]
        raise InputError(f"{not_plain} (not plain tensors: {reason})") from None
    if not isinstance(state, Mapping):
        raise InputError(f"{not_plain} (holds a {type(state).__name__}, not a dict of tensors)")
    return state


def load_facenet(path: str | Path) -> InceptionResnetV1:
    """InceptionResnetV1 in eval mode with the weights of `path` (strict: every key, every shape)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoraleakError(
            f"facenet scorer needs the InceptionResnetV1 vggface2 weights at {path} (not found): copy "
            f"facenet-pytorch's {VGGFACE2_FILE} there or give its path (evaluation.scorer_path); "
            "or use --scorer dlib for real faces")
    state = {k: v for k, v in _read_tensors(path).items() if not str(k).startswith(CLASSIFIER_PREFIX)}
    model = InceptionResnetV1().eval()
    expected = model.state_dict()
    for key, counter in expected.items():
        # BatchNorm's step counter is unused in eval mode; checkpoints from older torch lack it.
        if key.endswith(".num_batches_tracked"):
            state.setdefault(key, counter)
    not_ours = f"{path}: not a state dict of facenet-pytorch's InceptionResnetV1"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise InputError(f"{not_ours} ({len(missing)} of its {len(expected)} keys missing"
                         + (f", e.g. {missing[0]}" if missing else "")
                         + f"; {len(unexpected)} unexpected" + (f", e.g. {unexpected[0]}" if unexpected else "") + ")")
    for key, ref in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != ref.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"{not_ours} ({key}: {shape}, the network's is {tuple(ref.shape)})")
        if ref.is_floating_point() and not (value.is_floating_point() and torch.isfinite(value).all()):
            raise InputError(f"{not_ours} ({key}: not finite floats)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.requires_grad_(False)


def preprocess(images: Sequence[Image.Image], size: int = INPUT_SIZE) -> torch.Tensor:
    """facenet-pytorch's input for face crops: (N, 3, size, size), (pixel - 127.5) / 128."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
              for im in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (batch - 127.5) / 128.0


class FacenetScorer:
    """facenet-pytorch InceptionResnetV1 embeddings (512-d, unit length): distance 1 - cos, similarity (cos + 1) / 2."""

    name = "facenet"

    def __init__(self, model: InceptionResnetV1, threshold: float = DEFAULT_THRESHOLD):
        self.model = model.eval()
        self.threshold = threshold

    @classmethod
    def load(cls, path: str | Path | None = None, threshold: float = DEFAULT_THRESHOLD) -> "FacenetScorer":
        """From a weights file; None: facenet-pytorch's cache path (`facenet_weights_path()`)."""
        return cls(load_facenet(path if path is not None else facenet_weights_path()), threshold)

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> list[Embedding | None]:
        out: list[Embedding | None] = []
        for start in range(0, len(images), BATCH):
            out.extend(self.model(preprocess(images[start:start + BATCH])).numpy())
        return out

    def distance(self, a: Embedding, b: Embedding) -> float:
        return float(1.0 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    def similarity(self, a: Embedding, b: Embedding) -> float:
        """(cos + 1) / 2 = 1 - distance / 2, in [0, 1]: the paper's metric."""
        return float(np.clip(1.0 - self.distance(a, b) / 2, 0.0, 1.0))
