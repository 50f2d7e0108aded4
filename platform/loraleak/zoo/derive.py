"""A post-hoc-defended zoo derived from its undefended twin instead of trained again.

A post-hoc defense (output noise, rank truncation) changes a fine-tune's files after its training, never
the training: a fine-tune of the defended zoo is the fine-tune of the same base, images, settings and
variant in the undefended zoo (its *twin*, the same config with `defense: none`), its files defended. When
the twin zoo has finished that fine-tune, its files are copied, defended by the same `defend_snapshots`
and published as a trained fine-tune's are (zoo.publish): the same files and rows a training would give,
in a second instead of minutes. Fine-tunes the twin lacks are trained as usual.

Kill-safe like a training: the copy is staged (a dot folder, which the next build removes), published whole,
and only then is its part written; a killed derivation leaves the fine-tune pending, derived again by the
rerun. The twin is only read, and every copied file is checked against the twin's manifest row (size and
sha256): a twin rebuilt or damaged meanwhile gives a fine-tune to train, never a wrong copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ..config import from_dict
from ..finetune.config import FinetuneConfig
from .config import ZooConfig
from .manifest import delete_part, finished_lora_ids, lora_id_for, read_parts
from .plan import PlannedFineTune, ZooPlan, id_settings
from .publish import publish_snapshots, write_fine_tune_part
from .storage import ZooStore

logger = logging.getLogger(__name__)


class _StaleTwin(Exception):
    """The twin's files are not those its manifest lists (rebuilt or damaged since it was read)."""


def twin_lora_id(base_hash: str, ft: PlannedFineTune) -> str:
    """The id of the same fine-tune in the undefended zoo: a post-hoc defense leaves the fine-tune's settings
    as they are (zoo.plan.finetune_for), so only the id's defense differs (none: left out of the key)."""
    return lora_id_for(base_hash, ft.image_hashes, id_settings(ft.finetune), ft.finetune.trigger_word, ft.variant)


def _copy_into(twin: ZooStore, twin_dir: str, stage: Path) -> None:
    """Every file of the twin's fine-tune folder (snapshots, finetune.json) into `stage`, same layout."""
    for relative in sorted(twin.file_sizes(twin_dir)):
        dest = stage / relative.removeprefix(twin_dir + "/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(twin.read_bytes(relative))


def derive_fine_tune(store: ZooStore, cfg: ZooConfig, base_hash: str, ft: PlannedFineTune, twin: ZooStore,
                     twin_rows: list[dict[str, Any]]) -> None:
    """Publish `ft` (a fine-tune of the post-hoc-defended zoo `cfg`) as its twin's files, defended; write its part."""
    twin_dir = twin.lora_relative_dir(twin_rows[0]["lora_id"])
    # As a training does: no row lists the files while they are replaced.
    delete_part(store, ft.lora_id)
    with store.staging_dir(ft.lora_id) as stage:
        _copy_into(twin, twin_dir, stage)
        snapshots = []
        for row in twin_rows:
            path = stage / row["lora_path"].removeprefix(twin_dir + "/")
            data = path.read_bytes() if path.is_file() else b""
            if len(data) != row["lora_bytes"] or hashlib.sha256(data).hexdigest() != row["lora_sha256"]:
                raise _StaleTwin(f"{row['lora_path']} differs from the twin's manifest")
            snapshots.append((row["snapshot_step"], path))
        snapshot_rows = publish_snapshots(store, cfg, ft.lora_id, stage, snapshots,
                                          {row["snapshot_step"]: row["loss_at_snapshot"] for row in twin_rows},
                                          twin_rows[0]["final_loss"])
    first = twin_rows[0]
    # The fine-tune's config, start, wall time and worker are those of the training that made the files.
    planned = {"lora_id": ft.lora_id, "identity_id": ft.identity_id, "split": ft.split, "variant": ft.variant,
               "image_keys": ft.image_keys, "image_hashes": ft.image_hashes}
    trained = from_dict(FinetuneConfig, json.loads(first["finetune_config"]), where=f"{twin.uri} finetune_config")
    write_fine_tune_part(store, cfg, base_hash, planned, trained, snapshot_rows, None, first["started_at"],
                         first["wall_time_s"], first["worker"])


def derive_from_twin(cfg: ZooConfig, plan: ZooPlan, pending: list[PlannedFineTune],
                     twin_root: str) -> tuple[list[PlannedFineTune], int]:
    """Derive every pending fine-tune of the post-hoc-defended zoo `cfg` that the undefended zoo at `twin_root`
    has finished; return the fine-tunes left to train and how many were derived. Call it while holding the
    build's root (after its leftovers are removed)."""
    store, twin = ZooStore(cfg.root), ZooStore(twin_root)
    if not cfg.defense.post_hoc or twin.path == store.path:
        return pending, 0
    finished = finished_lora_ids(twin) if twin.exists(twin.parts_dir) else set()
    wanted = {twin_lora_id(plan.base_hash, ft): ft for ft in pending}
    rows: dict[str, list[dict[str, Any]]] = {}
    if finished & wanted.keys():
        for row in read_parts(twin).to_pylist():
            if row["lora_id"] in wanted and row["lora_id"] in finished:
                rows.setdefault(row["lora_id"], []).append(row)
    left: list[PlannedFineTune] = []
    for twin_id, ft in wanted.items():
        if twin_id not in rows:
            left.append(ft)
            continue
        try:
            derive_fine_tune(store, cfg, plan.base_hash, ft, twin,
                             sorted(rows[twin_id], key=lambda r: r["snapshot_step"]))
        except Exception as e:  # anything wrong with the copy: train it instead, as if the twin lacked it
            logger.warning("zoo %s: cannot derive %s from %s (%s: %s); training it", store.uri, ft.lora_id,
                           twin.uri, type(e).__name__, e)
            left.append(ft)
    derived = len(pending) - len(left)
    logger.info("zoo %s: derived from the undefended zoo %s: %d fine-tune(s) copied and defended, %d to train",
                store.uri, twin.uri, derived, len(left))
    return left, derived
