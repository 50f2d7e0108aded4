"""What every baseline attack shares: its saved directory, and refusing a LoRA it was not built for.

A baseline directory is an attack artifact (see ..artifact): `config.json` (with `"kind"`, the
baseline's settings, the LoRA layout it reads and what it was fitted on) and `baseline.safetensors`
(every tensor it needs: features, maps, photos).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ...config import from_dict, to_dict
from ...errors import InputError
from ..api import LoraInput
from ..artifact import CONFIG_NAME, read_record, read_tensors, save_artifact
from ..lora_inputs import LoraLayout, MatrixSpec, check_layout, lora_layout

WEIGHTS_NAME = "baseline.safetensors"
FORMAT_VERSION = 1


def layout_to_json(layout: LoraLayout | None) -> list[dict[str, Any]] | None:
    return None if layout is None else [spec.to_dict() for spec in layout]


def layout_from_json(data: list[dict[str, Any]] | None) -> LoraLayout | None:
    return None if data is None else tuple(MatrixSpec.from_dict(spec) for spec in data)


def check_lora(lora: LoraInput, layout: LoraLayout, kind: str) -> None:
    """One line of InputError when the LoRA's matrices are not the ones this baseline was fitted on."""
    what = f"LoRA {lora.path}" if lora.path is not None else "the LoRA"
    try:
        check_layout(lora_layout(lora.state_dict), layout, what=what)
    except InputError as e:
        raise InputError(f"{e} (the {kind} baseline reads one LoRA layout: another rank, targets or base)") from None


def save_baseline(directory: str | Path, kind: str, config: Any, record: Mapping[str, Any],
                  tensors: Mapping[str, torch.Tensor]) -> Path:
    """config.json ({"kind", "format_version", "config", **record}) + baseline.safetensors."""
    data = {"kind": kind, "format_version": FORMAT_VERSION, "config": to_dict(config), **record}
    return save_artifact(directory, data, tensors, WEIGHTS_NAME, metadata={"kind": kind})


def load_baseline(directory: str | Path, kind: str, config_class: type) -> tuple[Any, dict[str, Any],
                                                                                 dict[str, torch.Tensor]]:
    """(typed config, the rest of config.json, tensors) of a saved baseline of `kind`."""
    directory = Path(directory)
    record = read_record(directory, ("kind", kind), FORMAT_VERSION, f"{kind} baseline")
    config = from_dict(config_class, record.get("config", {}), where=f"{directory / CONFIG_NAME}: config")
    return config, record, read_tensors(directory / WEIGHTS_NAME)


def require_tensors(tensors: Mapping[str, torch.Tensor], names: list[str], directory: Path) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise InputError(f"{directory / WEIGHTS_NAME} lacks tensor {missing[0]!r}: not written by this baseline")


@dataclass(frozen=True)
class TrainingLora:
    """One attack-train fine-tune as a baseline is fitted on it: its final LoRA and whose it is."""

    lora_id: str
    identity_id: str
    instance_prompt: str  # "A face of {trigger}."; the adversary's training data knows it
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
