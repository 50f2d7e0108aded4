"""Reading a zoo back for attack training: one sample per stored snapshot r > 0 of a done fine-tune.

A sample is (Δθ_r, r, identity, split, image keys), where Δθ_r = θ_r - θ_0 for every LoRA matrix
of the file (the update the fine-tune made; θ_0 is the snapshot at step 0, stored by every zoo
fine-tune). Samples are read lazily, one LoRA file at a time: a zoo never has to fit in memory.

- `iter_zoo_samples(root)`: a plain iterator of `ZooSample` (tensors as a dict keyed like the file);
- `zoo_dataset(root)`: a Ray Dataset, one row per sample, each LoRA matrix in its own column
  `delta/<key>` (fixed-shape tensors, so `iter_torch_batches` stacks them); `delta_from_row`
  turns a row back into the dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from .manifest import done_rows, read_manifest
from .storage import ZooStore

DELTA_PREFIX = "delta/"
SAMPLE_COLUMNS = ["lora_id", "identity_id", "split", "snapshot_step", "steps", "rank", "targets", "base_hash",
                  "instance_prompt", "image_keys", "image_hashes", "lora_path"]


@dataclass(frozen=True)
class ZooSample:
    lora_id: str
    identity_id: str
    split: str
    step: int  # r, the fine-tuning step of this snapshot
    steps: int  # the fine-tune's total steps
    rank: int
    delta: dict[str, Any]  # LoRA key -> torch.Tensor θ_r - θ_0
    image_keys: list[str]
    image_hashes: list[str]
    instance_prompt: str


def sample_rows(root: str | ZooStore, split: str | None = None, rank: int | None = None) -> pa.Table:
    """The manifest rows that become samples: done, r > 0, with the path of their θ_0 beside them."""
    store = root if isinstance(root, ZooStore) else ZooStore(root)
    table = done_rows(read_manifest(store))
    if table.num_rows == 0:
        raise InputError(f"zoo {store.uri} has no finished fine-tunes to read")
    initial = dict(zip(*table.filter(pc.equal(table["snapshot_step"], 0)).select(["lora_id", "lora_path"])
                       .to_pydict().values()))
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    if rank is not None:
        table = table.filter(pc.equal(table["rank"], rank))
    table = table.filter(pc.greater(table["snapshot_step"], 0)).select(SAMPLE_COLUMNS)
    missing = sorted(set(table["lora_id"].to_pylist()) - set(initial))
    if missing:
        raise InputError(f"zoo {store.uri}: fine-tune {missing[0]} has no step-0 snapshot, so its Δθ cannot be "
                         "formed")
    table = table.append_column("initial_path", pa.array([initial[i] for i in table["lora_id"].to_pylist()],
                                                         pa.string()))
    return table.sort_by([("lora_id", "ascending"), ("snapshot_step", "ascending")])


def _read_state(store: ZooStore, relative: str) -> dict[str, Any]:
    from ..lora.io import read_lora  # torch: only reading the tensors needs it (the package imports none)

    with store.local_file(relative) as local:
        return read_lora(local)[0]


def _delta(theta: dict[str, Any], theta0: dict[str, Any], where: str) -> dict[str, Any]:
    if theta.keys() != theta0.keys():
        raise InputError(f"{where}: the snapshot's LoRA matrices differ from its step-0 snapshot's")
    return {k: theta[k] - theta0[k] for k in theta}


def iter_zoo_samples(root: str, split: str | None = None, rank: int | None = None) -> Iterator[ZooSample]:
    """Samples in manifest order (by fine-tune, then r); θ_0 is read once per fine-tune."""
    store = ZooStore(root)
    rows = sample_rows(store, split, rank)
    cached_path, theta0 = None, None
    for batch in rows.to_batches(max_chunksize=64):
        for row in batch.to_pylist():
            if row["initial_path"] != cached_path:
                cached_path, theta0 = row["initial_path"], _read_state(store, row["initial_path"])
            delta = _delta(_read_state(store, row["lora_path"]), theta0, row["lora_path"])
            yield ZooSample(row["lora_id"], row["identity_id"], row["split"], row["snapshot_step"], row["steps"],
                            row["rank"], delta, row["image_keys"], row["image_hashes"], row["instance_prompt"])


def _load_delta_columns(row: dict[str, Any], root: str) -> dict[str, Any]:
    store = ZooStore(root)
    delta = _delta(_read_state(store, row["lora_path"]), _read_state(store, row["initial_path"]), row["lora_path"])
    return {**row, **{f"{DELTA_PREFIX}{k}": v.float().numpy() for k, v in delta.items()}}


def zoo_dataset(root: str, split: str | None = None, rank: int | None = None):
    """A Ray Dataset of samples; the selection must share one LoRA shape (pass `rank` to pick one)."""
    import ray.data

    rows = sample_rows(root, split, rank)
    if rows.num_rows == 0:
        raise InputError(f"zoo {root} has no samples for split={split!r} rank={rank!r}")
    shapes = {(r["rank"], tuple(r["targets"]), r["base_hash"])
              for r in rows.select(["rank", "targets", "base_hash"]).to_pylist()}
    if len(shapes) > 1:
        raise InputError(f"zoo {root} mixes LoRA shapes {sorted(shapes)} (rank, targets, base); select one "
                         "(rank=...): a dataset's tensor columns need one shape")
    return ray.data.from_arrow(rows).map(_load_delta_columns, fn_kwargs={"root": root})


def delta_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A `zoo_dataset` row's (or batch's) Δθ columns back as {LoRA key: tensor}."""
    import numpy as np
    import torch

    # A copy: the columns may be read-only views of Ray's object store.
    return {k[len(DELTA_PREFIX):]: torch.tensor(np.asarray(v)) for k, v in row.items() if k.startswith(DELTA_PREFIX)}
