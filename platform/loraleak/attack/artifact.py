"""A saved attack — the network autoencoder or a fitted baseline — as a diffusers-like directory:
`config.json` (what it is, its format version, its settings) + one safetensors file of tensors.

Nothing is pickled, so an attack can be shared and loaded like a LoRA. config.json is written last
and atomically: its presence means the directory is complete (a crash mid-save leaves no half-artifact
that a later run would take for finished).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import InputError

CONFIG_NAME = "config.json"


def save_artifact(directory: str | Path, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                  weights_name: str, metadata: Mapping[str, str] | None = None) -> Path:
    """`tensors` -> directory/weights_name, then `record` -> directory/config.json (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / weights_name),
              metadata={"format": "pt", **(metadata or {})})
    tmp = directory / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(dict(record), indent=1) + "\n")
    os.replace(tmp, directory / CONFIG_NAME)
    return directory


def read_record(directory: str | Path, marker: tuple[str, str], version: int, what: str) -> dict[str, Any]:
    """config.json of a saved `what`, checked to carry `marker` (key, value) and format `version`."""
    directory = Path(directory)
    try:
        record = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{directory} is not a saved {what}: cannot read {CONFIG_NAME} ({e})") from None
    key, value = marker
    if not isinstance(record, dict) or record.get(key) != value:
        found = record.get(key) if isinstance(record, dict) else None
        raise InputError(f"{directory / CONFIG_NAME} is not a saved {what} ({key} {found!r}, expected {value!r})")
    if record.get("format_version") != version:
        raise InputError(f"{directory} has {what} format version {record.get('format_version')}, this code reads "
                         f"version {version}")
    return record


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or one line of InputError."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
