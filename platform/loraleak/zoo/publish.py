"""Publishing one fine-tune into a zoo: its staged snapshot files defended and moved into place whole,
then its manifest part.

One writer for the two ways a fine-tune enters a zoo: trained by a build's worker (zoo.build), or
derived from the same fine-tune in the undefended twin zoo (zoo.derive). Both must give the same
files and the same rows, so both go through here.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import to_dict
from ..finetune.config import FinetuneConfig
from .config import ZooConfig
from .defense import defend_snapshots, stored_rank_alpha
from .manifest import DONE, FAILED, write_part
from .storage import ZooStore


def loss_before(losses: list[float], step: int) -> float | None:
    """Mean loss over the last tenth of the steps up to `step` (one step's loss is noise); a DP step
    that drew no rows has no loss (NaN) and is left out."""
    if step < 1 or not losses:
        return None
    window = [x for x in losses[max(0, step - max(1, step // 10)):step] if not math.isnan(x)]
    return sum(window) / len(window) if window else None


def publish_snapshots(store: ZooStore, cfg: ZooConfig, lora_id: str, stage: Path,
                      snapshots: Sequence[tuple[int, Path]], loss_at: Mapping[int, float | None],
                      final_loss: float | None) -> list[dict[str, Any]]:
    """Defend the staged snapshots (the zoo's post-hoc defense, if any), publish the staged folder whole as
    the fine-tune's folder, and return each snapshot's row (the fields besides the fine-tune's common ones).
    `loss_at` is the loss at each snapshot step (`loss_before`)."""
    defend_snapshots(cfg.defense, lora_id, snapshots)
    relative_dir = store.lora_relative_dir(lora_id)
    rows = []
    for step, path in snapshots:
        data = path.read_bytes()
        rows.append({"snapshot_step": step, "lora_path": f"{relative_dir}/{path.relative_to(stage).as_posix()}",
                     "lora_bytes": len(data), "lora_sha256": hashlib.sha256(data).hexdigest(),
                     "loss_at_snapshot": loss_at.get(step), "final_loss": final_loss})
    store.publish_dir(stage, relative_dir)
    return rows


def write_fine_tune_part(store: ZooStore, cfg: ZooConfig, base_hash: str, planned: Mapping[str, Any],
                         ft: FinetuneConfig, snapshot_rows: list[dict[str, Any]], error: str | None,
                         started_at: datetime, wall_time_s: float, worker: str) -> dict[str, Any]:
    """Write a fine-tune's part (one row per snapshot, or one failed row) and return the fields its rows share.

    `planned` holds the plan's fields of the fine-tune (a `build.fine_tune_record`: lora_id, identity_id,
    split, variant, image_keys, image_hashes); `ft` is its config as it trained."""
    rank, alpha = stored_rank_alpha(ft, cfg.defense)
    common = {
        "lora_id": planned["lora_id"], "identity_id": planned["identity_id"], "split": planned["split"],
        "variant": planned["variant"], "base_id": cfg.base, "base_hash": base_hash, "rank": rank,
        "alpha": alpha, "targets": list(ft.targets), "lr": ft.lr, "seed": ft.seed, "steps": ft.steps,
        "trigger": ft.trigger_word, "instance_prompt": ft.instance_prompt_text, "class_prompt": ft.class_prompt,
        "defense": cfg.defense.to_manifest(), "num_images": len(planned["image_hashes"]),
        "image_keys": list(planned["image_keys"]), "image_hashes": list(planned["image_hashes"]),
        "finetune_config": json.dumps(to_dict(ft)), "status": FAILED if error else DONE, "error": error,
        "started_at": started_at, "wall_time_s": wall_time_s, "worker": worker,
    }
    write_part(store, planned["lora_id"], [{**common, **r} for r in snapshot_rows])
    return common
