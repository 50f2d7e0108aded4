"""The attack on one shared LoRA file: its weights in, the victim's face out.

    z = μ(encoder(LoRA matrices, r))        r = the LoRA's fine-tuning steps
    images = victim's model (base + that LoRA) sampled with prompt_embeds = z

The LoRA (diffusers, PEFT folder or kohya, `lora.formats`) is read from safetensors only. Its own
metadata, when a project fine-tune wrote it, names its trigger, base and step (`lora.io.lora_provenance`):
a LoRA of another base than `base` is refused in one line. A LoRA of another rank or target set than
the attack's zoo is adapted to the zoo's layout by SVD re-factorisation (`lora.adapt`, warnings say
what changed); one whose module shapes cannot match (another base) is refused in one line. Classifier-free guidance contrasts z with the empty prompt's
embedding, which the pipeline computes itself when given `prompt_embeds` without negatives: the
same unconditional branch the victim's own prompts get.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..base.loading import base_fingerprint, load_base_pipeline
from ..errors import InputError
from ..generate import generate_images
from ..imaging import save_grid
from ..lora.formats import PEFT_WEIGHT_NAME, read_shared_lora
from ..lora.io import LoraProvenance, lora_provenance, read_lora
from .lora_inputs import MatrixSpec, collate_lora_matrices, fit_to_layout, lora_matrices
from .model import CONFIG_NAME, NetworkAutoencoder
from .train import TRAINING_RECORD

logger = logging.getLogger(__name__)

SNAPSHOT_DIR = re.compile(r"step-(\d+)")  # how fine-tunes and zoos name a snapshot's folder
FINETUNE_RECORD = "finetune.json"
INITIAL_SNAPSHOT = "step-000000"


@dataclass
class Reconstruction:
    out_dir: Path
    grid: Path
    images: list[Path]
    z: Path  # the recovered prompt embedding (safetensors), for evaluation without re-encoding
    step: int
    step_source: str  # where r came from
    trigger: str | None = None  # the LoRA's trigger word, when its file states it
    notes: tuple[str, ...] = ()  # how the LoRA was read or adapted to the attack's layout


def read_attack_record(attack_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved model's config.json and (when trained by `train_attack`) its training record."""
    try:
        config = json.loads((attack_dir / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{attack_dir} is not a saved attack model: cannot read {CONFIG_NAME} ({e})") from None
    record_path = attack_dir / TRAINING_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    return config, record


def _finetune_record(lora_path: Path) -> dict[str, Any] | None:
    """finetune.json of the fine-tune that wrote this file: in its snapshot folder's parent, or beside it."""
    for folder in (lora_path.parent, lora_path.parent.parent):
        record = folder / FINETUNE_RECORD
        if record.is_file():
            try:
                return json.loads(record.read_text())
            except json.JSONDecodeError:
                raise InputError(f"{record} is not valid JSON") from None
    return None


def lora_step(lora_path: Path, default: int | None, provenance: LoraProvenance | None = None) -> tuple[int, str]:
    """The fine-tuning step r of a LoRA file: its snapshot folder, its metadata (`provenance`), its
    finetune.json, else `default`."""
    match = SNAPSHOT_DIR.fullmatch(lora_path.parent.name)
    if match:
        return int(match.group(1)), f"snapshot folder {lora_path.parent.name}"
    if provenance is not None:
        return provenance.step, "the LoRA file's metadata"
    record = _finetune_record(lora_path)
    if record is not None and isinstance(record.get("config", {}).get("steps"), int):
        return record["config"]["steps"], FINETUNE_RECORD
    if default is None:
        raise InputError(f"cannot tell how many steps {lora_path} was fine-tuned for; pass the step")
    return default, "the attack's zoo (its usual fine-tune length)"


def _initial_lora(lora_path: Path) -> dict[str, torch.Tensor] | None:
    """θ_0 of the fine-tune, when its step-0 snapshot sits beside this one (a zoo or fine-tune folder)."""
    candidate = lora_path.parent.parent / INITIAL_SNAPSHOT / lora_path.name
    return read_lora(candidate)[0] if SNAPSHOT_DIR.fullmatch(lora_path.parent.name) and candidate.is_file() else None


def check_lora_base(lora_path: Path, provenance: LoraProvenance | None, fingerprint: str, base: str) -> None:
    """Refuse, in one line, a LoRA whose own metadata (else its fine-tune's finetune.json) names another
    base than `base` (fingerprint `fingerprint`)."""
    if provenance is not None and provenance.base_fingerprint is not None:
        lora_base, where = provenance.base_fingerprint, "its metadata"
    else:
        lora_base, where = ((_finetune_record(lora_path) or {}).get("base") or {}).get("fingerprint"), FINETUNE_RECORD
    if lora_base not in (None, fingerprint):
        raise InputError(f"LoRA {lora_path} was fine-tuned from another base (fingerprint {lora_base}, from "
                         f"{where}) than {base!r} ({fingerprint})")


@torch.no_grad()
def reconstruct(attack_dir: str | Path, lora_file: str | Path, base: str | None = None,
                out_dir: str | Path = "runs/reconstruct", n: int = 8, seed: int = 0, step: int | None = None,
                guidance_scale: float = 3.0, num_inference_steps: int = 25, device: str = "cpu",
                scale: int = 4) -> Reconstruction:
    """Images of the person a shared LoRA was fine-tuned on, from the LoRA's weights alone.

    `base` defaults to the base the attack was trained with; `step` to the LoRA's own step count
    (its snapshot folder, metadata or finetune.json), else the attack zoo's usual fine-tune length.
    """
    attack_dir, out_dir = Path(attack_dir), Path(out_dir)
    config, record = read_attack_record(attack_dir)
    base = base or record.get("base")
    if base is None:
        raise InputError(f"{attack_dir} does not record its base model; pass the base")
    shared = read_shared_lora(lora_file)
    source = Path(shared.source or lora_file)
    lora_path = source / PEFT_WEIGHT_NAME if shared.source_format == "peft" else source
    provenance = lora_provenance(shared.metadata, lora_path)

    # Refuse before loading any model: decoding needs the base the LoRA was fine-tuned from, and the
    # encoder has one token per matrix of the layout it was trained on (another one is adapted to it).
    layout = tuple(MatrixSpec.from_dict(spec) for spec in config["layout"])
    fingerprint = base_fingerprint(base)
    if config.get("base_fingerprint") not in (None, fingerprint):
        raise InputError(f"the attack in {attack_dir} was trained on another base (fingerprint "
                         f"{config['base_fingerprint']}) than {base!r} ({fingerprint})")
    check_lora_base(lora_path, provenance, fingerprint, base)
    state_dict, _, adapted = fit_to_layout(shared.state_dict, shared.metadata, layout, record.get("lora_alpha"),
                                           what=f"LoRA {lora_path}")
    notes = list(shared.notes) + adapted
    for note in notes:
        logger.warning("%s", note)
    r, step_source = (step, "given") if step is not None else lora_step(lora_path, record.get("lora_steps"), provenance)

    pipe = load_base_pipeline(base, device=device)
    model = NetworkAutoencoder.from_pretrained(attack_dir, pipe.text_encoder).to(device).eval()
    initial = None
    if model.config.input_mode == "delta" and record.get("use_initial_lora") and not adapted:
        initial = _initial_lora(lora_path)
        if initial is None:
            logger.warning("the attack was trained on Δθ = θ_r - θ_0, but %s comes without its θ_0: feeding A raw",
                           lora_path)
    matrices = collate_lora_matrices([lora_matrices(state_dict, model.config.input_mode, initial, layout)])
    z = model.encode_mean(matrices, torch.tensor([r]) if model.config.step_embedding else None)[0]

    out_dir.mkdir(parents=True, exist_ok=True)
    # The victim's model is base + the LoRA as shared; another tool's file is decoded in the project's form.
    decode_with = lora_path if shared.source_format == "diffusers" else shared.save(out_dir / "lora.safetensors")
    images = generate_images(pipe, prompt_embeds=z, n=n, seed=seed, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, lora=decode_with, show_progress=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(out_dir / f"rec_{i:03d}.png")
        image.save(paths[-1])
    grid = save_grid(images, out_dir / "grid.png", scale=scale)
    z_path = out_dir / "z.safetensors"
    save_file({"z": z.detach().float().cpu().contiguous()}, str(z_path))
    (out_dir / "reconstruct.json").write_text(json.dumps({
        "attack": str(attack_dir), "lora": str(lora_path), "format": shared.source_format,
        "trigger": provenance.trigger if provenance else None, "notes": notes,
        "base": base, "base_fingerprint": fingerprint, "step": r, "step_source": step_source, "n": n, "seed": seed, "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps, "images": [p.name for p in paths]}, indent=1))
    return Reconstruction(out_dir, grid, paths, z_path, r, step_source,
                          provenance.trigger if provenance else None, tuple(notes))
