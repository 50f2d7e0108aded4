"""Planning a zoo: every fine-tune a config asks for, with its deterministic id, before any runs.

The plan decodes each identity's images once at the base's resolution to hash them: the id of a
fine-tune covers what it will see, so a rerun with the same config finds the same ids (and
skips what is finished), while a changed photo, base, setting or defense gives a new id.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from ..base.loading import base_fingerprint, resolve_local
from ..config import from_dict, to_dict
from ..defenses import DP_KINDS
from ..errors import LoraleakError
from ..finetune.config import FinetuneConfig
from ..identities import Identity, assign_splits, image_sha256, make_source
from .config import ZooConfig
from .manifest import lora_id_for

logger = logging.getLogger(__name__)

# FinetuneConfig fields left out of a fine-tune's id: the device and class-image cache do not change
# what it learns; its defense is the zoo's, which is in the id already (as the manifest's `defense`),
# and leaving it out keeps the ids of undefended fine-tunes what they were before fine-tunes had one.
NOT_IN_ID = ("device", "class_images_dir", "defense")


@dataclass(frozen=True)
class PlannedFineTune:
    lora_id: str
    identity_id: str
    split: str
    variant: int
    finetune: FinetuneConfig
    image_keys: tuple[str, ...]
    image_hashes: tuple[str, ...]
    identity: Identity  # loads the images again on the worker (checked against image_hashes)


@dataclass(frozen=True)
class ZooPlan:
    base_hash: str
    resolution: int
    fine_tunes: list[PlannedFineTune]
    skipped_identities: list[tuple[str, str]]  # (identity, reason): no fine-tune planned for it


def base_resolution(ref: str) -> int:
    """The image size a base is trained at, from its UNet and VAE configs (no weights loaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    local = resolve_local(ref)
    source = str(local) if local is not None else ref
    try:
        unet = UNet2DConditionModel.load_config(source, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.load_config(source, subfolder="vae", local_files_only=True)
    except (OSError, ValueError) as e:
        raise LoraleakError(f"cannot read the configs of base model {ref!r}: {str(e).splitlines()[0]}") from None
    # As StableDiffusionPipeline computes vae_scale_factor.
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def snapshot_steps(steps: int, num_snapshots: int | None, requested: tuple[int, ...]) -> tuple[int, ...]:
    """Step 0 (θ_0, the reference of every Δθ_r), then the snapshot steps (the last step included)."""
    if num_snapshots is None:
        chosen = set(requested)
    else:
        chosen = {round(steps * i / num_snapshots) for i in range(1, num_snapshots + 1)}
    return tuple(sorted(chosen | {0, steps}))


def fine_tune_seed(base_seed: int, identity_id: str, variant: int) -> int:
    """Each fine-tune's own seed: its LoRA init, data order and (unless fixed) trigger word."""
    digest = hashlib.sha256(f"{base_seed}:{identity_id}:{variant}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def variant_overrides(cfg: ZooConfig, identity_id: str) -> list[dict[str, Any]]:
    """The `vary` values of each of an identity's fine-tunes, in variant order."""
    names = sorted(cfg.vary)
    if cfg.vary_mode == "grid":
        points = [dict(zip(names, combo)) for combo in itertools.product(*(cfg.vary[n] for n in names))]
        return [point for point in points for _ in range(cfg.fine_tunes_per_identity)]
    # Seeded by the identity alone: adding identities never changes another one's draws.
    rng = random.Random(f"{cfg.finetune.seed}:{identity_id}")
    return [{n: rng.choice(cfg.vary[n]) for n in names} for _ in range(cfg.fine_tunes_per_identity)]


def finetune_for(cfg: ZooConfig, identity_id: str, variant: int, overrides: dict[str, Any]) -> FinetuneConfig:
    settings = {**to_dict(cfg.finetune), **overrides,
                "seed": fine_tune_seed(cfg.finetune.seed, identity_id, variant)}
    if cfg.defense.kind in DP_KINDS:  # a training-time defense: every fine-tune trains under it
        settings["defense"] = to_dict(cfg.defense)
    settings["snapshot_steps"] = list(snapshot_steps(settings["steps"], cfg.num_snapshots,
                                                     cfg.finetune.snapshot_steps))
    return from_dict(FinetuneConfig, settings, where=f"finetune for {identity_id} variant {variant}")


def id_settings(finetune: FinetuneConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(finetune).items() if k not in NOT_IN_ID}


def _skipped_folders(cfg: ZooConfig, kept: set[str]) -> list[tuple[str, str]]:
    """Subfolders the folder source dropped (it logs each unreadable file and why)."""
    if cfg.identities.kind != "folder" or cfg.identities.root is None:
        return []
    names = sorted(p.name for p in cfg.identities.root.iterdir() if p.is_dir())
    reason = f"fewer than {cfg.identities.fewest_images} readable images"
    return [(name, reason) for name in names if name not in kept]


def plan_zoo(cfg: ZooConfig, show_progress: bool = True) -> ZooPlan:
    base_hash = base_fingerprint(cfg.base)
    resolution = base_resolution(cfg.base)
    identities = list(make_source(cfg.identities).identities())
    splits = assign_splits(cfg.identities, identities)
    skipped = _skipped_folders(cfg, {i.identity_id for i in identities})
    identities = sorted(identities, key=lambda i: i.identity_id)[: cfg.max_identities]
    fine_tunes: list[PlannedFineTune] = []
    for identity in tqdm(identities, desc="plan zoo (hash images)", unit="identity", disable=not show_progress):
        hashes = tuple(image_sha256(im) for im in identity.load(resolution))
        if not hashes:
            skipped.append((identity.identity_id, "no image could be loaded"))
            continue
        for variant, overrides in enumerate(variant_overrides(cfg, identity.identity_id)):
            finetune = finetune_for(cfg, identity.identity_id, variant, overrides)
            lora_id = lora_id_for(base_hash, hashes, id_settings(finetune), finetune.trigger_word, variant,
                                  cfg.defense.to_manifest())
            fine_tunes.append(PlannedFineTune(lora_id, identity.identity_id, splits[identity.identity_id],
                                              variant, finetune, identity.image_keys, hashes, identity))
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:  # one line per reason: LFW alone drops hundreds of small folders
        logger.debug("zoo: skipping identity %s: %s", name, reason)
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        logger.warning("zoo: skipping %d identities (%s): %s%s", len(names), reason, ", ".join(names[:5]),
                       ", ..." if len(names) > 5 else "")
    return ZooPlan(base_hash, resolution, fine_tunes, skipped)

