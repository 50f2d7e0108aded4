"""Looking at a zoo: a summary of what it holds (`zoo_info`) and a full check of its files
(`verify_zoo`: every listed LoRA exists, is intact, loads, and is the LoRA the manifest describes)."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..errors import InputError
from .manifest import DONE, read_manifest
from .storage import LORAS_DIR, ZooStore


def _load_manifest(store: ZooStore):
    table = read_manifest(store)
    if table.num_rows == 0:
        raise InputError(f"no zoo at {store.uri}: it has no manifest.parquet and no parts/")
    return table


def _counts(values) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items(), key=lambda kv: str(kv[0]))}


def zoo_info(root: str) -> dict[str, Any]:
    """Counts of a zoo's fine-tunes by status, split, rank, steps, base and defense, and its loss range."""
    store = ZooStore(root)
    table = _load_manifest(store)
    columns = ["lora_id", "identity_id", "split", "status", "rank", "steps", "base_id", "base_hash", "defense",
               "final_loss", "error", "snapshot_step"]
    fine_tunes: dict[str, dict[str, Any]] = {}
    snapshots: Counter[str] = Counter()
    for row in table.select(columns).to_pylist():
        fine_tunes.setdefault(row["lora_id"], row)
        if row["status"] == DONE:
            snapshots[row["lora_id"]] += 1
    rows = list(fine_tunes.values())
    done = [r for r in rows if r["status"] == DONE]
    losses = [r["final_loss"] for r in done if r["final_loss"] is not None]
    return {
        "root": store.uri,
        "fine_tunes": len(rows),
        "identities": len({r["identity_id"] for r in rows}),
        "snapshot_files": sum(snapshots.values()),
        "status": _counts(r["status"] for r in rows),
        "split": _counts(r["split"] for r in done),
        "rank": _counts(r["rank"] for r in done),
        "steps": _counts(r["steps"] for r in done),
        "snapshots_per_fine_tune": _counts(snapshots.values()),
        "base": _counts(f"{r['base_id']} ({r['base_hash']})" for r in done),
        "defense": _counts(r["defense"] for r in done),
        "final_loss": {"mean": sum(losses) / len(losses), "min": min(losses), "max": max(losses)} if losses else None,
        "failures": [{"lora_id": r["lora_id"], "identity_id": r["identity_id"], "error": r["error"]}
                     for r in rows if r["status"] != DONE][:10],
    }


@dataclass(frozen=True)
class Problem:
    lora_id: str
    snapshot_step: int | None
    path: str
    message: str

    def __str__(self) -> str:
        step = "" if self.snapshot_step is None else f" step {self.snapshot_step}"
        return f"{self.lora_id}{step}: {self.path}: {self.message}"


@dataclass
class VerifyReport:
    root: str
    fine_tunes: int = 0
    files_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _targets_problem(modules: list[str], targets: list[str]) -> str | None:
    """Whether the adapted modules are exactly those the configured target names select."""
    def matches(module: str, target: str) -> bool:
        return module == target or module.endswith(f".{target}")

    unused = [t for t in targets if not any(matches(m, t) for m in modules)]
    extra = [m for m in modules if not any(matches(m, t) for t in targets)]
    if unused or extra:
        return f"adapts other modules than the manifest's targets {targets} (unmatched: {unused or extra[:1]})"
    return None


def _check_file(store: ZooStore, row: dict[str, Any], size: int | None, pipe: Any = None) -> str | None:
    """Why one snapshot file is not what its manifest row says or does not pass the LoRA gate (`read_lora`:
    dtypes, finite values, factor shapes and ranks, metadata; with `pipe`, the base's layer shapes), or None."""
    from ..lora.io import check_lora_fits, lora_summary, read_lora  # torch: only verify needs it

    if size is None:
        return "missing"
    if size != row["lora_bytes"]:
        kind = "truncated" if size < row["lora_bytes"] else "size differs"
        return f"{kind}: {size} bytes, the manifest says {row['lora_bytes']}"
    with store.local_file(row["lora_path"]) as local:
        if hashlib.sha256(local.read_bytes()).hexdigest() != row["lora_sha256"]:
            return "content differs from the manifest (sha256)"
        try:
            state_dict, metadata = read_lora(local)
            summary = lora_summary(state_dict, metadata)
            if pipe is not None:
                check_lora_fits(state_dict, pipe)
        except InputError as e:
            return f"does not load: {e}"
    if summary["rank"] != row["rank"]:
        return f"rank {summary['rank']}, the manifest says {row['rank']}"
    if summary["alpha"] is not None and not math.isclose(summary["alpha"], row["alpha"], rel_tol=1e-9):
        return f"alpha {summary['alpha']}, the manifest says {row['alpha']}"
    return _targets_problem(summary["unet_modules"], row["targets"])


def _check_record(store: ZooStore, lora_id: str, base_hash: str) -> str | None:
    """Whether the fine-tune's finetune.json exists and names the manifest's base."""
    from ..finetune.record import RECORD_NAME  # torch, diffusers: only verify needs them

    try:
        record = json.loads(store.read_bytes(f"{store.lora_relative_dir(lora_id)}/{RECORD_NAME}"))
    except (FileNotFoundError, OSError, json.JSONDecodeError) as e:
        return f"{RECORD_NAME} is missing or unreadable ({type(e).__name__})"
    recorded = (record.get("base") or {}).get("fingerprint")
    if recorded != base_hash:
        return f"trained on base {recorded}, the manifest says {base_hash}"
    return None


def verify_zoo(root: str, show_progress: bool = True, base: str | None = "zoo") -> VerifyReport:
    """Check every "done" row's LoRA file: present, intact (size, sha256), passes the LoRA gate every command
    reads through, and has the manifest's rank, alpha, targets and base; with `base` ("zoo": the base the zoo
    records; None: no base), also that its factors fit that base's layers."""
    store = ZooStore(root)
    table = _load_manifest(store)
    pipe = None
    if base == "zoo":
        from .config import read_zoo_config  # torch (finetune settings): only verify needs it

        base = read_zoo_config(store).base if store.exists(store.config_path) else None
    if base is not None:
        from ..base.loading import load_base_pipeline  # torch, diffusers: only verify needs them

        pipe = load_base_pipeline(base)
    rows = [r for r in table.to_pylist() if r["status"] == DONE]
    sizes = store.file_sizes(LORAS_DIR)
    report = VerifyReport(store.uri, fine_tunes=len({r["lora_id"] for r in rows}))
    checked_records: set[str] = set()
    for row in tqdm(rows, desc="verify zoo", unit="file", disable=not show_progress):
        lora_id = row["lora_id"]
        if lora_id not in checked_records:
            checked_records.add(lora_id)
            why = _check_record(store, lora_id, row["base_hash"])
            if why:
                report.problems.append(Problem(lora_id, None, store.lora_relative_dir(lora_id), why))
        report.files_checked += 1
        why = _check_file(store, row, sizes.get(row["lora_path"]), pipe)
        if why:
            report.problems.append(Problem(lora_id, row["snapshot_step"], row["lora_path"], why))
    return report
