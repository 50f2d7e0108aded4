"""An identity embedder for the project's synthetic faces, trained on identities never evaluated.

dlib does not see the procedural cartoon faces as faces, so synthetic runs are scored by a small
CNN trained here: 4 conv blocks (conv + BatchNorm + ReLU, max-pool between) at 32 px, global
average pool, a linear map to a 64-d L2-normalised embedding, trained with a CosFace margin
softmax over `namespace="scorer"` identities. Those are disjoint from the "private" identities
that victims fine-tune on, so the scorer never saw anyone it is asked about.

Distance is 1 - cosine; the threshold is the best-accuracy threshold on pairs of further scorer
identities held out of training. similarity = cos * 0.5 + 0.5 (the paper's mapping of facenet
cosine), i.e. 1 - distance / 2.

"No face": every synthetic render has a face, so "far from every training identity" says
nothing. Instead a second head, a linear classifier on the last conv feature map (which keeps the
spatial layout), is trained jointly to tell faces (label 1) from non-faces (label 0): uniform
noise, blank colours, smooth random colour fields like the renderer's backgrounds, and face
images cut into 4x4 patches and shuffled (right colours, wrong layout). An image whose face
probability is below 0.5 is "no face". It is a face-likeness check for the renderer's style, not
a general face detector.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..config import from_dict, to_dict
from ..errors import InputError, LoraleakError
from ..identities.synthetic import SyntheticFaces
from ..imaging import to_tensor
from .base import Embedding
from .pairs import Pair, best_threshold, verification_accuracy

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHIPPED_DIR = "synthetic-scorer"
FACE_PROBABILITY_THRESHOLD = 0.5
FaceIndex = tuple[int, int]  # (identity, image) of a SyntheticFaces source


@dataclass(frozen=True)
class SyntheticScorerConfig:
    num_identities: int = 800          # scorer-namespace identities to train on
    images_per_identity: int = 10
    calibration_identities: int = 100  # further scorer identities, held out, to set the threshold
    calibration_images: int = 4
    image_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64, 128)
    embedding_dim: int = 64
    epochs: int = 12
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    cosface_scale: float = 16.0
    cosface_margin: float = 0.3
    nonface_fraction: float = 0.25     # non-face images added per face image in a batch
    face_loss_weight: float = 1.0
    eval_pairs: int = 1000             # private-namespace pairs for the final verification accuracy
    seed: int = 0                      # data order / init / augmentation; renders are seeded apart
    num_threads: int = 1

    def __post_init__(self):
        if self.image_size % 2 ** (len(self.widths) - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^{len(self.widths) - 1}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if self.num_identities < 2 or self.calibration_identities < 2:
            raise ValueError("num_identities and calibration_identities must be >= 2")
        if self.images_per_identity < 2 or self.calibration_images < 2:
            raise ValueError("images_per_identity and calibration_images must be >= 2")


class FaceEmbedder(nn.Module):
    """Image in [-1, 1] -> (unit-length identity embedding, face-likeness logit)."""

    def __init__(self, widths: Sequence[int], embedding_dim: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for k, width in enumerate(widths):
            if k:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.to_embedding = nn.Linear(channels, embedding_dim)
        side = image_size // 2 ** (len(widths) - 1)
        self.face_head = nn.Linear(channels * side * side, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        embedding = F.normalize(self.to_embedding(f.mean(dim=(2, 3))), dim=1)
        return embedding, self.face_head(f.flatten(1)).squeeze(1)


class SyntheticFaceScorer:
    """Scorer for synthetic faces: 1 - cosine distance, calibrated threshold, face-likeness check."""

    name = "synthetic"

    def __init__(self, model: FaceEmbedder, config: SyntheticScorerConfig, threshold: float):
        self.model = model.eval()
        self.config = config
        self.threshold = threshold

    @torch.inference_mode()
    def embed_with_face_probability(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """All embeddings (N, D) and face probabilities (N,), without the no-face cut."""
        if not images:
            return np.zeros((0, self.config.embedding_dim), np.float32), np.zeros(0, np.float32)
        size = self.config.image_size
        batch = to_tensor([im.convert("RGB").resize((size, size), Image.BICUBIC) for im in images])
        embeddings, face_logits = self.model(batch)
        return embeddings.numpy(), torch.sigmoid(face_logits).numpy()

    def embed(self, images: Sequence[Image.Image]) -> list[Embedding | None]:
        embeddings, face_prob = self.embed_with_face_probability(images)
        return [e if p >= FACE_PROBABILITY_THRESHOLD else None for e, p in zip(embeddings, face_prob)]

    def distance(self, a: Embedding, b: Embedding) -> float:
        return float(1.0 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    def similarity(self, a: Embedding, b: Embedding) -> float:
        """cos * 0.5 + 0.5 = 1 - distance / 2, in [0, 1]."""
        return float(np.clip(1.0 - self.distance(a, b) / 2, 0.0, 1.0))

    # --- persistence: a directory with config.json + model.safetensors (never pickle) ---

    def save(self, out_dir: str | Path, metrics: dict | None = None) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
        meta = {"config": to_dict(self.config), "threshold": self.threshold, "metrics": metrics or {}}
        (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out_dir

    @classmethod
    def load(cls, path: str | Path) -> SyntheticFaceScorer:
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"synthetic scorer must be a directory with {CONFIG_FILE} and {WEIGHTS_FILE} "
                             f"(pickle files are never loaded): {path}")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise InputError(f"synthetic scorer directory {path} has no {name}")
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
            config = from_dict(SyntheticScorerConfig, meta["config"], where=str(path / CONFIG_FILE))
            threshold = float(meta["threshold"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path / CONFIG_FILE}: not a synthetic scorer config ({e})") from None
        try:
            state = load_file(str(path / WEIGHTS_FILE))
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path / WEIGHTS_FILE}: not a safetensors file ({e}); pickle is never loaded") from None
        model = FaceEmbedder(config.widths, config.embedding_dim, config.image_size)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(f"{path / WEIGHTS_FILE}: weights do not match {CONFIG_FILE}: "
                             f"{str(e).splitlines()[0]}") from None
        return cls(model, config, threshold)

    @classmethod
    def load_shipped(cls) -> SyntheticFaceScorer:
        path = shipped_path()
        if not (path / WEIGHTS_FILE).is_file():
            raise LoraleakError(f"no shipped synthetic scorer at {path}; train one with `loraleak scorer train`")
        return cls.load(path)


def shipped_path() -> Path:
    return Path(str(files("loraleak") / "assets" / SHIPPED_DIR))


# --- pairs of synthetic faces ---

def synthetic_pairs(n_pairs: int, size: int = 32, seed: int = 0, namespace: str = "private",
                    num_identities: int | None = None, images_per_identity: int = 10,
                    faces_seed: int = 0) -> tuple[list[Pair[FaceIndex]], Callable[[FaceIndex], Image.Image]]:
    """Half same-person, half different-person pairs of (identity, image) indices, and a renderer.

    Identities are drawn from the first `num_identities` (default n_pairs // 2) of
    `SyntheticFaces(seed=faces_seed, namespace=namespace)`; `seed` only picks the pairs.
    """
    num_identities = num_identities or max(2, n_pairs // 2)
    faces = SyntheticFaces(num_identities, images_per_identity, seed=faces_seed, namespace=namespace)
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(n_pairs):
        if k < n_pairs // 2:
            i = int(rng.integers(num_identities))
            j1, j2 = (int(j) for j in rng.choice(images_per_identity, 2, replace=False))
            pairs.append(Pair((i, j1), (i, j2), True))
        else:
            i1, i2 = (int(i) for i in rng.choice(num_identities, 2, replace=False))
            j1, j2 = (int(j) for j in rng.integers(images_per_identity, size=2))
            pairs.append(Pair((i1, j1), (i2, j2), False))
    return pairs, lambda item: faces.render(item[0], item[1], size)


# --- training ---

def _render(faces: SyntheticFaces, identities: range, images: int, size: int, desc: str) -> torch.Tensor:
    """uint8 (N, 3, size, size), identity-major."""
    out = torch.empty(len(identities) * images, 3, size, size, dtype=torch.uint8)
    k = 0
    for i in tqdm(identities, desc=desc, unit="id"):
        for j in range(images):
            out[k] = torch.from_numpy(np.array(faces.render(i, j, size))).permute(2, 0, 1)
            k += 1
    return out


def _blur(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light augmentation of images in [-1, 1]: flip, +-2 px shift, colour jitter, blur, noise.

    Colour jitter is kept small because skin and hair colour are identity here. Blur and noise
    make the face check judge layout, not sharpness (generated faces are soft).
    """
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2, n), generator=g).tolist()
    x = torch.stack([padded[k, :, dy[k]:dy[k] + h, dx[k]:dx[k] + w] for k in range(n)])
    brightness = 0.1 * (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1)
    gain = 1 + brightness + 0.05 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    x = (x + 1) * gain - 1
    blurred = torch.rand(n, generator=g) < 0.3
    x = torch.where(blurred[:, None, None, None], _blur(x), x)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.08
    return x.clamp(-1, 1)


def make_nonfaces(faces: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """`n` images in [-1, 1] that are not faces: noise, blank, smooth colour fields, shuffled patches."""
    size = faces.shape[-1]
    kinds = torch.arange(n) % 4
    noise = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    blank = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1).expand(n, 3, size, size)
    smooth = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bicubic",
                           align_corners=True).clamp(-1, 1)
    grid, patch = 4, size // 4
    source = faces[torch.randint(0, len(faces), (n,), generator=g)]
    patches = source.unfold(2, patch, patch).unfold(3, patch, patch).reshape(n, 3, grid * grid, patch, patch)
    patches = patches[:, :, torch.randperm(grid * grid, generator=g)]
    shuffled = patches.reshape(n, 3, grid, grid, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, 3, size, size)
    out = torch.stack([noise, blank, smooth, shuffled])  # (4, n, 3, S, S)
    return out[kinds, torch.arange(n)]


def _cosface_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                  scale: float, margin: float) -> torch.Tensor:
    cos = embeddings @ F.normalize(weight, dim=1).T
    logits = scale * (cos - margin * F.one_hot(labels, weight.shape[0]))
    return F.cross_entropy(logits, labels)


def _calibration_pairs(n_identities: int, images: int, g: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every same-identity pair of the calibration set and as many random different-identity pairs."""
    idx_a, idx_b = [], []
    for i in range(n_identities):
        for j1 in range(images):
            for j2 in range(j1 + 1, images):
                idx_a.append(i * images + j1)
                idx_b.append(i * images + j2)
    n_same = len(idx_a)
    ids = torch.randint(0, n_identities, (n_same, 2), generator=g)
    ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, n_identities - 1, (n_same,), generator=g)) % n_identities
    js = torch.randint(0, images, (n_same, 2), generator=g)
    idx_a += (ids[:, 0] * images + js[:, 0]).tolist()
    idx_b += (ids[:, 1] * images + js[:, 1]).tolist()
    return np.array(idx_a), np.array(idx_b), np.array([True] * n_same + [False] * n_same)


@torch.inference_mode()
def _embed_tensor(model: FaceEmbedder, images: torch.Tensor,
                  batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> (embeddings, face probabilities)."""
    embs, probs = [], []
    for start in range(0, len(images), batch_size):
        e, logit = model(images[start:start + batch_size].float() / 127.5 - 1)
        embs.append(e)
        probs.append(torch.sigmoid(logit))
    return torch.cat(embs), torch.cat(probs)


def train_synthetic_scorer(cfg: SyntheticScorerConfig, out_dir: str | Path | None = None) -> dict[str, float]:
    """Train on scorer-namespace identities, calibrate, evaluate on private pairs, save to `out_dir`.

    Returns metrics: final losses, calibration threshold and accuracy (held-out scorer identities),
    face check rates, and verification accuracy on `cfg.eval_pairs` private-namespace pairs.
    """
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()

    faces = SyntheticFaces(cfg.num_identities + cfg.calibration_identities, cfg.images_per_identity,
                           seed=0, namespace="scorer")
    train_images = _render(faces, range(cfg.num_identities), cfg.images_per_identity, cfg.image_size,
                           "rendering scorer identities")
    train_labels = torch.arange(cfg.num_identities).repeat_interleave(cfg.images_per_identity)
    calib_images = _render(faces, range(cfg.num_identities, cfg.num_identities + cfg.calibration_identities),
                           cfg.calibration_images, cfg.image_size, "rendering calibration identities")

    model = FaceEmbedder(cfg.widths, cfg.embedding_dim, cfg.image_size)
    class_weight = nn.Parameter(torch.randn(cfg.num_identities, cfg.embedding_dim) * 0.01)
    optimizer = torch.optim.AdamW([*model.parameters(), class_weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_images) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                   pct_start=0.15)
    n_nonface = max(1, round(cfg.batch_size * cfg.nonface_fraction))
    metrics: dict[str, float] = {}
    model.train()
    with tqdm(total=cfg.epochs * steps_per_epoch, desc="training synthetic scorer", unit="step") as bar:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(train_images), generator=g)
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                face_batch = train_images[idx].float() / 127.5 - 1
                batch = augment(torch.cat([face_batch, make_nonfaces(face_batch, n_nonface, g)]), g)
                is_face = torch.cat([torch.ones(len(idx)), torch.zeros(n_nonface)])
                embeddings, face_logits = model(batch)
                id_loss = _cosface_loss(embeddings[:len(idx)], train_labels[idx], class_weight,
                                        cfg.cosface_scale, cfg.cosface_margin)
                face_loss = F.binary_cross_entropy_with_logits(face_logits, is_face)
                loss = id_loss + cfg.face_loss_weight * face_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(epoch=epoch, id_loss=f"{id_loss.item():.3f}", face_loss=f"{face_loss.item():.3f}")
    metrics.update(train_id_loss=id_loss.item(), train_face_loss=face_loss.item(),
                   train_seconds=time.perf_counter() - start)
    model.eval()

    # Threshold: best accuracy on pairs of held-out scorer identities.
    calib_emb, calib_prob = _embed_tensor(model, calib_images)
    a, b, same = _calibration_pairs(cfg.calibration_identities, cfg.calibration_images, g)
    distances = 1 - (calib_emb[a] * calib_emb[b]).sum(1)
    threshold, calib_accuracy = best_threshold(distances.tolist(), same.tolist())
    nonfaces = (make_nonfaces(calib_images.float() / 127.5 - 1, 400, g) + 1) * 127.5
    _, nonface_prob = _embed_tensor(model, nonfaces)
    metrics.update(threshold=threshold, calibration_accuracy=calib_accuracy,
                   calibration_face_found_rate=float((calib_prob >= FACE_PROBABILITY_THRESHOLD).float().mean()),
                   nonface_rejected_rate=float((nonface_prob < FACE_PROBABILITY_THRESHOLD).float().mean()))

    scorer = SyntheticFaceScorer(model, cfg, threshold)
    if cfg.eval_pairs:
        pairs, render = synthetic_pairs(cfg.eval_pairs, size=cfg.image_size, seed=cfg.seed)
        result = verification_accuracy(scorer, pairs, render)
        metrics.update(private_pairs=result.n_pairs, private_found_rate=result.found_rate,
                       private_accuracy=result.accuracy_all, private_accuracy_found=result.accuracy_found)
    metrics["total_seconds"] = time.perf_counter() - start
    if out_dir is not None:
        scorer.save(out_dir, metrics)
    return metrics
