"""What a fine-tune leaves behind: snapshot files (the LoRA at step r) and finetune.json, its record.

One writer for both fine-tune paths: `save_snapshot` (diffusers' LoRA format, atomically, with a
training-time defense's record in the file's metadata) and `finetune_settings` (finetune.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
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
from ..defenses import DP_METADATA_KEY, DefenseConfig, save_defended_lora
from ..identities.base import image_sha256
from ..lora.io import LORA_WEIGHT_NAME, read_lora
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


def _record_defense(path: Path, defense: DefenseConfig, privacy: dict[str, Any]) -> None:
    """Add a training-time defense to a LoRA file's metadata: its settings to the defenses applied
    (`loraleak_defenses`, as post-hoc defenses record theirs) and what it cost so far (`loraleak_dp`)."""
    state_dict, metadata = read_lora(path)
    save_defended_lora(state_dict, {**metadata, DP_METADATA_KEY: json.dumps(privacy)}, defense, path)


def save_snapshot(pipe: Any, out_dir: Path, step: int, lora: LoraLayers,
                  privacy: tuple[DefenseConfig, dict[str, Any]] | None = None) -> Path:
    """Write `lora` to out_dir/step-{step:06d}/ in diffusers format, atomically; with `privacy` (a
    training-time defense and its record at this step) in the file's metadata."""
    final = snapshot_dir(out_dir, step)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    text = lora.text_encoder
    try:
        type(pipe).save_lora_weights(
            tmp, unet_lora_layers=diffusers_lora_layers(lora.unet, "unet"),
            text_encoder_lora_layers=diffusers_lora_layers(text, "text_encoder") if text is not None else None,
            unet_lora_adapter_metadata=lora.unet_metadata,
            text_encoder_lora_adapter_metadata=lora.text_encoder_metadata)
        if privacy is not None:
            _record_defense(tmp / LORA_WEIGHT_NAME, *privacy)
        if final.exists():  # a rerun into the same directory replaces its snapshot
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / LORA_WEIGHT_NAME


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
