"""The zoo's defense: a post-hoc defense applied to every snapshot file before it is published.

(A training-time defense — dp_sgd, dpgm — is not applied here: the plan puts it into every
fine-tune's config and the fine-tune records it in each snapshot file itself.)

A zoo with `defense` set holds its LoRAs as their owners would share them, defended; the manifest's
`defense` column says which defense (`DefenseConfig.to_manifest()`), each file's metadata records
the one applied to it. Every snapshot is defended, step 0 included, so that θ_r and θ_0 keep one
layout and Δθ_r = θ_r - θ_0 stays defined (rank truncation of θ_0, whose up factor is zero, gives
zeros: Δθ_r is then the shared θ_r itself).

Output noise draws each file's noise from its own seed, derived from the configured seed, the
fine-tune and the step: one seed for every file would add the same noise direction to the whole
zoo, which an attack trained on the zoo could learn to cancel.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Sequence

from ..defenses import DefenseConfig
from ..defenses.post_hoc import apply_post_hoc
from ..finetune.config import FinetuneConfig


def snapshot_defense(defense: DefenseConfig, lora_id: str, step: int) -> DefenseConfig:
    """The defense as applied to one snapshot file of one fine-tune."""
    if defense.kind != "output_noise":
        return defense
    digest = hashlib.sha256(f"{defense.seed}:{lora_id}:{step}".encode()).hexdigest()
    return dataclasses.replace(defense, seed=int(digest[:8], 16) & 0x7FFFFFFF)


def defend_snapshots(defense: DefenseConfig, lora_id: str, snapshots: Sequence[tuple[int, Path]]) -> None:
    """Replace each (step, file) of a fine-tune by its defended version, in place (each file atomically).
    Nothing to do for an undefended zoo, or a training-time defense (the files hold it already)."""
    if not defense.post_hoc:
        return
    for step, path in snapshots:
        apply_post_hoc(snapshot_defense(defense, lora_id, step), path, path)


def stored_rank_alpha(ft: FinetuneConfig, defense: DefenseConfig) -> tuple[int, float]:
    """The UNet LoRA's rank and alpha in the stored files: the trained ones, or after rank truncation
    to k the rank min(k, r) with alpha scaled to keep alpha / r (computed as rank_truncation does)."""
    if defense.kind != "rank_truncation":
        return ft.rank, float(ft.alpha)
    rank = min(defense.rank, ft.rank)
    return rank, float(ft.alpha * (rank / ft.rank))
