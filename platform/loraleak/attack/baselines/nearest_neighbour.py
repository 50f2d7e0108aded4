"""Baseline: nearest neighbour in weight space.

The adversary holds attack-train fine-tunes together with the photos they were trained on. For a
shared LoRA it finds the attack-train LoRA whose merged update ΔW is most similar (cosine of the
GL(r)-invariant features of `features.py`) and answers with that identity's photos. It leaks only
if identities close in weight space look alike; on a held-out person it can at best return a
look-alike, which is the point of the comparison: a learned attack should beat it.

The photos travel inside the saved directory (uint8 tensors in baseline.safetensors), so the
attack needs neither the zoo nor the identity source once fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ...errors import InputError
from ..api import AttackOutput, LoraInput
from ..lora_inputs import LoraLayout
from .common import TrainingLora, check_lora, layout_from_json, layout_to_json, load_baseline, require_tensors, \
    save_baseline
from .features import SKETCH_PREFIX, delta_w_features, sketch_matrices
from .registry import FitInputs, register_baseline

KIND = "nearest_neighbour"


@dataclass(frozen=True)
class NearestNeighbourConfig:
    # cosine: of the ΔW features (scale-free: a longer fine-tune of the same person stays close);
    # euclidean: of the raw scaled ΔW features.
    metric: Literal["cosine", "euclidean"] = "cosine"
    sketch_size: int | None = 64  # matrix sides longer than this are sketched to it (features.py)
    sketch_seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {self.metric!r}")
        if self.sketch_size is not None and self.sketch_size < 1:
            raise ValueError(f"sketch_size must be >= 1 (or null), got {self.sketch_size}")


@dataclass(frozen=True)
class Neighbour:
    lora_id: str
    identity_id: str
    similarity: float  # cosine, or minus the euclidean distance


def _to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise InputError(f"private photos of different sizes {sorted(sizes)}: load them at one resolution")
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]))


class NearestNeighbourAttack:
    kind = KIND

    def __init__(self, config: NearestNeighbourConfig, layout: LoraLayout, features: torch.Tensor,
                 lora_identity: torch.Tensor, lora_ids: list[str], identity_ids: list[str], photos: torch.Tensor,
                 photo_counts: torch.Tensor, sketches: Mapping[str, torch.Tensor],
                 record: Mapping[str, Any] | None = None) -> None:
        self.config, self.layout, self.features = config, layout, features  # features: (N, D)
        self.lora_identity, self.lora_ids, self.identity_ids = lora_identity, lora_ids, identity_ids
        self.photos, self.photo_counts = photos, photo_counts  # (M, H, W, 3) uint8; (I,) per identity
        self.photo_starts = torch.cumsum(photo_counts, 0) - photo_counts
        self.sketches = dict(sketches)
        self.record = dict(record or {})

    # --- fitting -----------------------------------------------------------------------------

    @classmethod
    def fit(cls, config: NearestNeighbourConfig, layout: LoraLayout, loras: Sequence[TrainingLora],
            photos: Mapping[str, Sequence[Image.Image]], show_progress: bool = False) -> "NearestNeighbourAttack":
        """Index `loras` (final snapshots of attack-train fine-tunes); `photos`: identity -> its private photos."""
        if not loras:
            raise InputError("the nearest-neighbour baseline needs at least one attack-train LoRA")
        sketches = sketch_matrices(layout, config.sketch_size, config.sketch_seed)
        features = []
        for lora in tqdm(loras, desc="nearest neighbour: features", disable=not show_progress):
            check_lora(LoraInput(lora.state_dict, lora.metadata), layout, KIND)
            features.append(delta_w_features(lora.state_dict, lora.metadata, layout, sketches,
                                             normalise=config.metric == "cosine"))
        identity_ids = sorted({lora.identity_id for lora in loras})
        missing = [i for i in identity_ids if not photos.get(i)]
        if missing:
            raise InputError(f"no private photos given for attack-train identity {missing[0]!r}")
        stacked = _to_uint8([im for i in identity_ids for im in photos[i]])
        counts = torch.tensor([len(photos[i]) for i in identity_ids])
        index = {identity: k for k, identity in enumerate(identity_ids)}
        return cls(config, layout, torch.stack(features), torch.tensor([index[l.identity_id] for l in loras]),
                   [lora.lora_id for lora in loras], identity_ids, stacked, counts, sketches)

    # --- the attack ------------------------------------------------------------------------------

    def _features(self, lora: LoraInput) -> torch.Tensor:
        check_lora(lora, self.layout, KIND)
        return delta_w_features(lora.state_dict, lora.metadata, self.layout, self.sketches,
                                normalise=self.config.metric == "cosine")

    def similarities(self, lora: LoraInput) -> torch.Tensor:
        """(N,) similarity of the LoRA to every indexed attack-train LoRA (higher is closer)."""
        query = self._features(lora).double()
        bank = self.features.double()
        if self.config.metric == "cosine":
            return (bank @ query).float()
        return -(bank - query).norm(dim=1).float()

    def nearest(self, lora: LoraInput) -> Neighbour:
        similarities = self.similarities(lora)
        best = int(similarities.argmax())
        return Neighbour(self.lora_ids[best], self.identity_ids[int(self.lora_identity[best])],
                         float(similarities[best]))

    def identity_photos(self, identity_id: str) -> list[Image.Image]:
        k = self.identity_ids.index(identity_id)
        start, count = int(self.photo_starts[k]), int(self.photo_counts[k])
        return [Image.fromarray(p.numpy()) for p in self.photos[start:start + count]]

    def reconstruct(self, lora: LoraInput, n: int = 1, seed: int = 0) -> AttackOutput:
        """The nearest identity's photos, cycled to n images (from photo `seed` mod their number on)."""
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        photos = self.identity_photos(self.nearest(lora).identity_id)
        return AttackOutput(images=[photos[(seed + i) % len(photos)] for i in range(n)])

    # --- persistence -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        record = {**self.record, "layout": layout_to_json(self.layout), "lora_ids": self.lora_ids,
                  "identity_ids": self.identity_ids}
        tensors = {"features": self.features, "lora_identity": self.lora_identity, "photos": self.photos,
                   "photo_counts": self.photo_counts, **self.sketches}
        return save_baseline(directory, KIND, self.config, record, tensors)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "NearestNeighbourAttack":
        directory = Path(directory)
        config, record, tensors = load_baseline(directory, KIND, NearestNeighbourConfig)
        require_tensors(tensors, ["features", "lora_identity", "photos", "photo_counts"], directory)
        layout = layout_from_json(record.get("layout"))
        lora_ids, identity_ids = list(record.get("lora_ids", [])), list(record.get("identity_ids", []))
        n, photos, counts = tensors["features"].shape[0], tensors["photos"], tensors["photo_counts"]
        if layout is None or len(lora_ids) != n or tensors["lora_identity"].shape != (n,) \
                or len(identity_ids) != counts.shape[0] or int(counts.sum()) != photos.shape[0] \
                or photos.dtype != torch.uint8:
            raise InputError(f"{directory} is an inconsistent nearest-neighbour baseline (config.json and "
                             "baseline.safetensors disagree)")
        sketches = {k: v for k, v in tensors.items() if k.startswith(SKETCH_PREFIX)}
        extra = {k: v for k, v in record.items()
                 if k not in ("kind", "format_version", "config", "layout", "lora_ids", "identity_ids")}
        return cls(config, layout, tensors["features"], tensors["lora_identity"], lora_ids, identity_ids, photos,
                   counts, sketches, extra)


def load(directory: Path, pipe: Any = None) -> NearestNeighbourAttack:
    del pipe  # photos are returned as they are: no model needed
    return NearestNeighbourAttack.from_pretrained(directory)


def build(settings: NearestNeighbourConfig, inputs: FitInputs) -> NearestNeighbourAttack:
    """Fitted on the attack_train LoRAs' updates and their owners' photos."""
    loras = inputs.loras()
    return NearestNeighbourAttack.fit(settings, inputs.layout, loras, inputs.photos(), inputs.show_progress)


register_baseline(KIND, NearestNeighbourConfig, build, load)
