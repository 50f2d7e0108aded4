"""Identities: the private photo sets, one per person, and their attack-train / held-out split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from .base import Identity, IdentitySource, image_sha256
from .folder import FolderIdentities
from .split import split_identities
from .synthetic import FaceParams, SyntheticFaces, public_images


@dataclass(frozen=True)
class IdentitiesConfig:
    """Where the private identities come from and how they are split.

    `synthetic` uses num_identities / images_per_identity / seed / namespace;
    `folder` uses root / min_images / max_images / crop_fraction (0.48 for LFW's 250 px images).
    """

    kind: Literal["synthetic", "folder"] = "synthetic"
    num_identities: int = 8
    images_per_identity: int = 5
    seed: int = 0
    namespace: str = "private"
    root: Path | None = None
    min_images: int = 5
    max_images: int | None = None
    crop_fraction: float = 1.0
    heldout_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self):
        if self.num_identities < 1:
            raise ValueError(f"num_identities must be >= 1, got {self.num_identities}")
        if self.images_per_identity < 1:
            raise ValueError(f"images_per_identity must be >= 1, got {self.images_per_identity}")
        if not self.namespace:
            raise ValueError("namespace must not be empty")
        if self.min_images < 1:
            raise ValueError(f"min_images must be >= 1, got {self.min_images}")
        if self.max_images is not None and self.max_images < self.min_images:
            raise ValueError(f"max_images ({self.max_images}) must be >= min_images ({self.min_images})")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


def make_source(cfg: IdentitiesConfig) -> IdentitySource:
    if cfg.kind == "synthetic":
        return SyntheticFaces(cfg.num_identities, cfg.images_per_identity, cfg.seed, cfg.namespace)
    if cfg.root is None:
        raise ConfigError("identities.root is required when identities.kind is 'folder'")
    return FolderIdentities(cfg.root, cfg.min_images, cfg.max_images, cfg.crop_fraction)


__all__ = [
    "FaceParams",
    "FolderIdentities",
    "IdentitiesConfig",
    "Identity",
    "IdentitySource",
    "SyntheticFaces",
    "image_sha256",
    "make_source",
    "public_images",
    "split_identities",
]
