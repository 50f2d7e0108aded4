"""What a fine-tune leaves behind: snapshot files (the LoRA at step r) and finetune.json, its record.

One writer for both fine-tune paths: `save_snapshot` (diffusers' LoRA format, atomically, with the
LoRA's provenance and a training-time defense's record in the file's metadata, the same bytes for
the same LoRA in any process) and `finetune_settings` (finetune.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import peft
import torch
import transformers
from diffusers.utils import convert_state_dict_to_diffusers
from PIL import Image

from ..config import to_dict
from ..defenses import DP_METADATA_KEY, DefenseConfig, defended_metadata
from ..identities.base import image_sha256
from ..lora.io import ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME, LoraProvenance, save_lora_file
from .config import FinetuneConfig

RECORD_NAME = "finetune.json"
# diffusers' names of a LoRA's down / up factors, per model: what `convert_state_dict_to_diffusers`
# gives the attention projections (to_q.lora.down, q_proj.lora_linear_layer.down).
_DIFFUSERS_FACTOR_NAMES = {"unet": (".lora.down.", ".lora.up."),
                           "text_encoder": (".lora_linear_layer.down.", ".lora_linear_layer.up.")}


@dataclass
class FinetuneResult:
    trigger: str
    instance_prompt: str
    snapshots: list[tuple[int, Path]]  # (step r, path of its pytorch_lora_weights.safetensors)
    losses: list[float]  # total loss of every step, in order (NaN for a DP step that drew no rows at all)
    final_loss: float  # mean loss over the last tenth of the steps (one step's loss is noise)
    wall_time_s: float
    settings: dict[str, Any]  # everything written to finetune.json


@dataclass
class LoraLayers:
    """One fine-tune's LoRA as peft state dicts (keys `<module>.lora_A.weight`, on any device) and the
    LoraConfig of each model, which diffusers stores in the file (without it a loader assumes alpha = rank)."""

    unet: dict[str, torch.Tensor]
    unet_metadata: dict[str, Any]
    text_encoder: dict[str, torch.Tensor] | None = None
    text_encoder_metadata: dict[str, Any] | None = None


def snapshot_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step-{step:06d}"


def diffusers_lora_layers(peft_state: dict[str, torch.Tensor], model: str) -> dict[str, torch.Tensor]:
    """A peft LoRA state dict in diffusers' key form, every key alike.

    `convert_state_dict_to_diffusers` renames the attention projections' factors only; a LoRA on
    other modules (proj_in, ff.net.2, a convolution) would keep `lora_A` there beside `lora.down`, and
    diffusers' loader decides the form of the whole file from its first key: it would silently drop
    one kind. The rest are renamed the same way here (the attention projections' keys are unchanged)."""
    down, up = _DIFFUSERS_FACTOR_NAMES[model]
    converted = convert_state_dict_to_diffusers(peft_state)
    return {key.replace(".lora_A.", down).replace(".lora_B.", up): value for key, value in converted.items()}


def _config_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """A LoraConfig dict with every set (peft keeps target_modules as one, in per-process order) and
    the target list sorted: identical LoRAs give identical bytes."""
    out = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}
    if isinstance(out.get("target_modules"), list):
        out["target_modules"] = sorted(out["target_modules"])
    return out


def snapshot_contents(lora: LoraLayers, provenance: LoraProvenance | None = None,
                      privacy: tuple[DefenseConfig, dict[str, Any]] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a snapshot file: what diffusers' `save_lora_weights` writes
    (`unet.` / `text_encoder.` keys, `format`, the LoraConfigs under `lora_adapter_metadata`), plus the
    provenance and a training-time defense's settings (`loraleak_defenses`) and its record at this
    step (`loraleak_dp`)."""
    state_dict = {f"unet.{k}": v for k, v in diffusers_lora_layers(lora.unet, "unet").items()}
    adapter = {f"unet.{k}": v for k, v in _config_metadata(lora.unet_metadata).items()}
    if lora.text_encoder is not None:
        state_dict.update({f"text_encoder.{k}": v
                           for k, v in diffusers_lora_layers(lora.text_encoder, "text_encoder").items()})
        adapter.update({f"text_encoder.{k}": v for k, v in _config_metadata(lora.text_encoder_metadata or {}).items()})
    metadata = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, indent=2, sort_keys=True)}
    if provenance is not None:
        metadata.update(provenance.metadata())
    if privacy is not None:
        defense, record = privacy
        metadata = defended_metadata({**metadata, DP_METADATA_KEY: json.dumps(record, sort_keys=True)}, defense)
    return state_dict, metadata


def save_snapshot(out_dir: Path, step: int, lora: LoraLayers, provenance: LoraProvenance | None = None,
                  privacy: tuple[DefenseConfig, dict[str, Any]] | None = None) -> Path:
    """Write `lora` to out_dir/step-{step:06d}/pytorch_lora_weights.safetensors in diffusers format,
    atomically (`lora.io.save_lora_file`; a rerun replaces it), with its provenance and `privacy` (a
    training-time defense and its record at this step) in the file's metadata."""
    state_dict, metadata = snapshot_contents(lora, provenance, privacy)
    return save_lora_file(state_dict, metadata, snapshot_dir(out_dir, step) / LORA_WEIGHT_NAME)


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__}


def finetune_settings(cfg: FinetuneConfig, *, pipe: Any, resolution: int, base: dict[str, Any],
                      noise_scheduler: Any, trainable: int, privacy: dict[str, Any] | None,
                      images: list[Image.Image], class_images: list[Image.Image] | None, class_dir: Path | None,
                      out_dir: Path, snapshots: list[tuple[int, Path]], losses: list[float], final_loss: float,
                      timings: dict[str, Any], batched: dict[str, Any] | None, device: torch.device
                      ) -> dict[str, Any]:
    """finetune.json: everything about one fine-tune, written last (it marks the snapshots complete)."""
    config = noise_scheduler.config
    settings = {
        "config": to_dict(cfg),
        "trigger": cfg.trigger_word,
        "instance_prompt": cfg.instance_prompt_text,
        "class_prompt": cfg.class_prompt,
        "resolution": resolution,
        "base": {**base, "pipeline": type(pipe).__name__},
        "noise_scheduler": {"class": type(noise_scheduler).__name__, "prediction_type": config.prediction_type,
                            "num_train_timesteps": config.num_train_timesteps,
                            "beta_schedule": config.beta_schedule},
        "lora": {"init": "gaussian", "trainable_parameters": trainable},
        # The training-time defense as run: σ, ε spent, δ, clip norm, accounting unit (None: none).
        "privacy": privacy,
        "instance_images": {"count": len(images), "sha256": [image_sha256(im) for im in images]},
        "class_images": None if not class_images else {
            "count": len(class_images), "cache_dir": str(class_dir) if class_dir else None,
            "sha256_of_all": hashlib.sha256("".join(image_sha256(im) for im in class_images).encode()).hexdigest()},
        "snapshots": [{"step": r, "path": str(p.relative_to(out_dir))} for r, p in snapshots],
        "losses": losses,
        "final_loss": final_loss,
        "timings": timings,
    }
    if batched is not None:  # K fine-tunes in one pass: how many, which one, the device options
        settings["batched"] = batched
    settings.update({"device": str(device), "versions": versions()})
    return settings
