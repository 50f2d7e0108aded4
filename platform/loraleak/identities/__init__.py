"""Identities: the private photo sets, one per person, and their attack-train / held-out split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from ..errors import ConfigError
from .base import Identity, IdentitySource, image_sha256
from .folder import FolderIdentities
from .split import Split, split_identities
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
    # Folder sources: identities with at least train_min_images (but fewer than min_images) readable photos
    # join the attack's training side only. Victims keep min_images, and the held-out split is drawn among
    # the identities with min_images exactly as without this setting, so a study's victims do not change
    # when the attacker's zoo grows (LFW: 90 identities have 12+ photos, 300 have 5+). None: all need min_images.
    train_min_images: int | None = None

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
        if self.train_min_images is not None:
            if self.kind != "folder":
                raise ValueError("train_min_images applies to folder sources (kind: folder) only")
            if not 1 <= self.train_min_images <= self.min_images:
                raise ValueError(f"train_min_images must be in [1, min_images={self.min_images}], "
                                 f"got {self.train_min_images}")

    @property
    def fewest_images(self) -> int:
        """The fewest readable photos an identity needs to be used at all (as a victim or to train on)."""
        return self.min_images if self.train_min_images is None else self.train_min_images


def make_source(cfg: IdentitiesConfig) -> IdentitySource:
    if cfg.kind == "synthetic":
        return SyntheticFaces(cfg.num_identities, cfg.images_per_identity, cfg.seed, cfg.namespace)
    if cfg.root is None:
        raise ConfigError("identities.root is required when identities.kind is 'folder'")
    return FolderIdentities(cfg.root, cfg.fewest_images, cfg.max_images, cfg.crop_fraction)


def assign_splits(cfg: IdentitiesConfig, identities: Sequence[Identity]) -> dict[str, Split]:
    """Each identity's role: the held-out split is drawn among the identities with min_images photos; those
    with fewer (kept by train_min_images) only ever train the attack."""
    ids = [i.identity_id for i in identities]
    if cfg.train_min_images is None:
        return split_identities(ids, cfg.heldout_fraction, cfg.split_seed)
    eligible = [i.identity_id for i in identities if len(i.image_keys) >= cfg.min_images]
    split = split_identities(eligible, cfg.heldout_fraction, cfg.split_seed)
    return {i: split.get(i, "attack_train") for i in ids}


__all__ = [
    "FaceParams",
    "FolderIdentities",
    "IdentitiesConfig",
    "Identity",
    "IdentitySource",
    "Split",
    "assign_splits",
    "SyntheticFaces",
    "image_sha256",
    "make_source",
    "public_images",
    "split_identities",
]
