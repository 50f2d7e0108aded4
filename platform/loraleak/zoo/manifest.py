"""The zoo's Parquet manifest: one row per stored snapshot, or one row for a fine-tune that failed.

Every fine-tune writes its rows as a small part file, `parts/<lora_id>.parquet`, after its LoRA
files are in place, so a row that is listed always points at complete files. The manifest is the
union of the parts; a finished build compacts it into `manifest.parquet` (and removes that file
before it starts writing new parts, so a reader never sees a stale compaction next to newer parts).
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..keys import content_key
from .storage import LORAS_DIR, ZooStore

# 2: alpha became float64 (rank truncation rescales it), `defense` holds DefenseConfig.to_manifest().
# Parts written as version 1 (alpha int32) still read: the dataset casts them to this schema.
SCHEMA_VERSION = "2"
DONE, FAILED = "done", "failed"
NO_DEFENSE = "none"  # loraleak.defenses.DefenseConfig().to_manifest(): an undefended fine-tune
LORA_ID_CHARS = 16

# Parquet names a list's item "element": the schema says so too, so it survives a round trip exactly.
STRINGS = pa.list_(pa.field("element", pa.string()))

SCHEMA = pa.schema(
    [
        ("lora_id", pa.string()),
        ("identity_id", pa.string()),
        ("split", pa.string()),  # "attack_train" | "heldout"
        ("variant", pa.int32()),  # index of this fine-tune among its identity's
        ("base_id", pa.string()),  # the base reference as configured ("tiny", a path, a hub id)
        ("base_hash", pa.string()),  # loraleak.base.loading.base_fingerprint
        ("rank", pa.int32()),  # of the stored files, after the defense (the trained one: finetune_config)
        ("alpha", pa.float64()),  # likewise; fractional after rank truncation (alpha · k / r)
        ("targets", STRINGS),
        ("lr", pa.float64()),
        ("seed", pa.int64()),
        ("steps", pa.int32()),  # the fine-tune's total steps
        ("snapshot_step", pa.int32()),  # r of this row's LoRA; null for a failed fine-tune
        ("trigger", pa.string()),
        ("instance_prompt", pa.string()),
        ("class_prompt", pa.string()),
        ("defense", pa.string()),  # DefenseConfig.to_manifest(): "none" or its settings as JSON
        ("final_loss", pa.float64()),
        ("loss_at_snapshot", pa.float64()),  # mean loss of the last tenth of the steps up to r
        ("num_images", pa.int32()),
        ("image_keys", STRINGS),
        ("image_hashes", STRINGS),  # loraleak.identities.image_sha256 of each image
        ("lora_path", pa.string()),  # relative to the zoo root
        ("lora_bytes", pa.int64()),
        ("lora_sha256", pa.string()),
        ("finetune_config", pa.string()),  # the complete FinetuneConfig as JSON
        ("status", pa.string()),  # "done" | "failed"
        ("error", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("wall_time_s", pa.float64()),
        ("worker", pa.string()),  # host:pid that ran the fine-tune
    ],
    metadata={"loraleak.manifest.version": SCHEMA_VERSION},
)


def lora_id_for(base_hash: str, image_hashes: Iterable[str], finetune_settings: dict[str, Any],
                trigger: str, variant: int, defense: str = NO_DEFENSE) -> str:
    """Short sha256 over everything that decides what a fine-tune's stored LoRA files hold.

    `finetune_settings` should leave out what does not change the LoRA (device, cache paths); the
    trigger is passed resolved because a config without one draws it from the seed. `defense` is
    the manifest's defense value; an undefended fine-tune's key leaves it out, so its id is the one
    it had before zoos applied defenses.
    """
    key = {"base": base_hash, "images": list(image_hashes), "finetune": finetune_settings,
           "trigger": trigger, "variant": variant}
    if defense != NO_DEFENSE:
        key["defense"] = defense
    return content_key(key, LORA_ID_CHARS)


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by SCHEMA's names; missing keys are null) as a table of SCHEMA."""
    unknown = {k for row in rows for k in row} - set(SCHEMA.names)
    if unknown:
        raise ValueError(f"manifest rows have unknown columns: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


def write_part(store: ZooStore, lora_id: str, rows: list[dict[str, Any]]) -> None:
    store.write_table(store.part_path(lora_id), to_table(rows))


def delete_part(store: ZooStore, lora_id: str) -> None:
    store.delete_file(store.part_path(lora_id))


def read_parts(store: ZooStore, columns: list[str] | None = None) -> pa.Table:
    """The union of all part files (in-progress `.tmp` files are ignored)."""
    if not store.exists(store.parts_dir):
        return empty_table().select(columns) if columns else empty_table()
    dataset = pads.dataset(store.parts_dir, schema=SCHEMA, format="parquet", filesystem=store.fs)
    return dataset.to_table(columns=columns)


def sort_rows(table: pa.Table) -> pa.Table:
    return table.sort_by([("lora_id", "ascending"), ("snapshot_step", "ascending")])


def read_manifest(root: str | ZooStore) -> pa.Table:
    """All rows of a zoo: the compacted manifest.parquet when present, else the union of its parts."""
    store = root if isinstance(root, ZooStore) else ZooStore(root)
    if store.exists(store.manifest_path):
        return pads.dataset(store.manifest_path, schema=SCHEMA, format="parquet",
                            filesystem=store.fs).to_table()
    return sort_rows(read_parts(store))


def compact_manifest(store: ZooStore) -> pa.Table:
    """Write the union of the parts, sorted, to manifest.parquet (atomically) and return it."""
    table = sort_rows(read_parts(store))
    store.write_table(store.manifest_path, table)
    return table


def finished_lora_ids(store: ZooStore) -> set[str]:
    """Fine-tunes whose part is all "done" rows and whose files exist with the recorded sizes.

    One listing of the LoRA files answers for the whole zoo; a missing or truncated file makes
    its fine-tune pending again.
    """
    parts = read_parts(store, ["lora_id", "status", "lora_path", "lora_bytes"]).to_pylist()
    sizes = store.file_sizes(LORAS_DIR) if parts else {}
    ok: dict[str, bool] = {}
    for row in parts:
        good = row["status"] == DONE and row["lora_path"] is not None \
            and sizes.get(row["lora_path"]) == row["lora_bytes"]
        ok[row["lora_id"]] = ok.get(row["lora_id"], True) and good
    return {lora_id for lora_id, good in ok.items() if good}


def done_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["status"], DONE))
