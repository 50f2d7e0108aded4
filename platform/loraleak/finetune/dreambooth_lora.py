"""DreamBooth-LoRA fine-tuning of a Stable Diffusion pipeline: the victim of the threat model.

The recipe is diffusers' `examples/dreambooth/train_dreambooth_lora.py` with the paper's settings
(see FinetuneConfig), written out for one process and one pipeline:

  1. freeze the base; add a gaussian-initialised LoRA to the UNet's `targets` (and optionally to the
     text encoder), seeded so the initial LoRA θ_0 is reproducible;
  2. each step, take `batch_size` instance images ("A face of {trigger}.") and as many class images
     ("A human face.", sampled from the base), encode them with the frozen VAE, noise them at random
     DDPM timesteps, and run instance + class through the UNet in one pass;
  3. loss = MSE(ε or v) on the instance half + prior_loss_weight * MSE on the class half; AdamW on
     the LoRA parameters only, gradient norm clipped;
  4. save the LoRA in diffusers format at every snapshot step (the trajectory θ_r the attack is
     trained on) and at the end, then take the adapter out so the pipeline is the base again.

A training-time defense (`cfg.defense`) changes step 3 only:
  - dp_sgd (loraleak.defenses.dp_sgd): the private photo rows of a step are drawn as the accounting
    assumes (Poisson by default), each record's LoRA gradient is clipped and Gaussian noise added
    (Opacus), the public class rows' gradient is added as is, then the batch clip and AdamW;
  - dpgm (loraleak.defenses.dpgm): the paper's noisy kernel-MMD loss replaces both MSE terms, and
    the defense's max_grad_norm is the batch clip.
Its noise multiplier, the ε spent, δ, the clip norm and the accounting unit go into finetune.json
(`privacy`) and into every snapshot file's metadata (`loraleak_defenses`, `loraleak_dp`).

Everything random (LoRA init, data order, flips, VAE sampling, noise, timesteps) is drawn from
`cfg.seed`, on the CPU, so one seed gives the same LoRA on any device.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import diffusers
import peft
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDPMScheduler
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from tqdm.auto import tqdm

from ..base.loading import base_fingerprint as fingerprint_of_base
from ..config import to_dict
from ..defenses import DP_METADATA_KEY, DefenseConfig, save_defended_lora
from ..errors import ConfigError, InputError, LoraleakError
from ..identities.base import image_sha256
from ..imaging import center_crop_resize, to_tensor
from .class_images import load_or_sample_class_images, pipeline_fingerprint, pipeline_resolution
from .config import FinetuneConfig
from ..lora.io import LORA_WEIGHT_NAME, loaded_adapters, read_lora
from .prior_prompts import PromptEmbeddings, prior_prompt, prior_prompt_indices

ADAPTER_NAME = "default"  # the name `add_adapter` gives; what `get_peft_model_state_dict` reads
RECORD_NAME = "finetune.json"
AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FinetuneResult:
    trigger: str
    instance_prompt: str
    snapshots: list[tuple[int, Path]]  # (step r, path of its pytorch_lora_weights.safetensors)
    losses: list[float]  # total loss of every step, in order (NaN for a DP step that drew no rows at all)
    final_loss: float  # mean loss over the last tenth of the steps (one step's loss is noise)
    wall_time_s: float
    settings: dict[str, Any]  # everything written to finetune.json


def snapshot_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------
# Data: images -> latent distributions, prompts -> token ids / embeddings


@torch.no_grad()
def _latent_distributions(vae: Any, pixels: torch.Tensor, device: torch.device,
                          chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of every image, computed once: the VAE is frozen, so sampling
    mean + std * ε each step is exactly `vae.encode(x).latent_dist.sample()`, without re-encoding."""
    means, stds = [], []
    for part in pixels.split(chunk):
        dist = vae.encode(part.to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class _LatentBank:
    """Posterior parameters of a set of images (and of their mirror images when flips are on)."""

    def __init__(self, vae: Any, images: list[Image.Image], resolution: int, device: torch.device,
                 hflip: bool) -> None:
        pixels = to_tensor([center_crop_resize(im, resolution) for im in images])
        views = [pixels, pixels.flip(-1)] if hflip else [pixels]
        stats = [_latent_distributions(vae, v, device) for v in views]
        self.mean = torch.stack([m for m, _ in stats])  # (views, N, C, h, w)
        self.std = torch.stack([s for _, s in stats])
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.shift, self.scale = float(shift), float(vae.config.scaling_factor)

    def __len__(self) -> int:
        return self.mean.shape[1]

    def sample(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of images `indices` (each mirrored with probability 1/2 when flips are on)."""
        views = torch.randint(0, self.mean.shape[0], (len(indices),), generator=generator)
        idx = torch.tensor(indices)
        mean, std = self.mean[views, idx], self.std[views, idx]
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + std * eps - self.shift) * self.scale


def _token_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _encode_tokens(text_encoder: Any, ids: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings exactly as StableDiffusionPipeline.encode_prompt makes them (no clip skip)."""
    ids = ids.to(text_encoder.device)
    mask = torch.ones_like(ids) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(ids, attention_mask=mask)[0]


def _shuffled_indices(length: int, generator: torch.Generator) -> Iterator[int]:
    """Epoch after epoch of a random permutation of range(length), like a shuffling DataLoader."""
    while True:
        yield from torch.randperm(length, generator=generator).tolist()


# ---------------------------------------------------------------------------------------------
# The pipeline's state around a fine-tune


class _FrozenBase:
    """Freeze every base weight for the fine-tune and put the pipeline back as it was afterwards."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.modules = [m for m in (pipe.unet, pipe.vae, pipe.text_encoder) if m is not None]
        self.requires_grad = [[p.requires_grad for p in m.parameters()] for m in self.modules]
        self.training = [m.training for m in self.modules]

    def __enter__(self) -> "_FrozenBase":
        for m in self.modules:
            m.requires_grad_(False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.pipe.unload_lora_weights()  # replaces every LoRA-wrapped layer by its base layer
        for m, flags, training in zip(self.modules, self.requires_grad, self.training):
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)
            m.train(training)


def _add_loras(pipe: Any, cfg: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Add the LoRA adapters (initialised from cfg.seed) and return their parameters, in fp32."""
    unet_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                             target_modules=list(cfg.targets))
    text_config = LoraConfig(r=cfg.text_rank, lora_alpha=cfg.text_alpha, init_lora_weights="gaussian",
                             target_modules=list(cfg.text_targets))
    with torch.random.fork_rng(devices=[]):  # peft initialises on the CPU, before moving to the device
        torch.manual_seed(cfg.seed)
        try:
            pipe.unet.add_adapter(unet_config)
            if cfg.train_text_encoder:
                # What `text_encoder.add_adapter` does, called directly: transformers 5.24's wrapper
                # demands peft >= 0.22, which does not exist yet (0.21.2 is pinned).
                inject_adapter_in_model(text_config, pipe.text_encoder, ADAPTER_NAME)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise ConfigError(f"LoRA targets do not fit this base model: {e}") from None
    models = [pipe.unet] + ([pipe.text_encoder] if cfg.train_text_encoder else [])
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    for p in params:  # a half-precision base gets half-precision adapters; AdamW needs fp32
        p.data = p.data.float()
    return params


def training_noise_scheduler(pipe) -> DDPMScheduler:
    """DDPM over the pipeline's own training noise schedule (the sampler's config holds it)."""
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(f"cannot fine-tune a base that predicts {prediction_type!r} (only epsilon or v)")
    return noise_scheduler


def _adapter_metadata(model) -> dict:
    """The adapter's LoraConfig as file metadata, with sets sorted: peft keeps target_modules as a
    set, whose order changes per process, and identical LoRAs should be identical bytes."""
    meta = model.peft_config[ADAPTER_NAME].to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in meta.items()}


def _record_defense(path: Path, defense: DefenseConfig, privacy: dict[str, Any]) -> None:
    """Add a training-time defense to a LoRA file's metadata: its settings to the defenses applied
    (`loraleak_defenses`, as post-hoc defenses record theirs) and what it cost so far (`loraleak_dp`)."""
    state_dict, metadata = read_lora(path)
    save_defended_lora(state_dict, {**metadata, DP_METADATA_KEY: json.dumps(privacy)}, defense, path)


def _save_snapshot(pipe: Any, out_dir: Path, step: int, with_text_encoder: bool,
                   privacy: tuple[DefenseConfig, dict[str, Any]] | None = None) -> Path:
    """Write the current LoRA to out_dir/step-{step:06d}/ in diffusers format, atomically; with
    `privacy` (the defense and its record at this step) recorded in the file's metadata."""
    final = snapshot_dir(out_dir, step)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    text_encoder = pipe.text_encoder if with_text_encoder else None
    try:
        type(pipe).save_lora_weights(
            tmp,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
            text_encoder_lora_layers=(convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
                                      if text_encoder is not None else None),
            # The LoraConfig travels in the file's metadata: without it a loader assumes alpha = rank.
            unet_lora_adapter_metadata=_adapter_metadata(pipe.unet),
            text_encoder_lora_adapter_metadata=(_adapter_metadata(text_encoder)
                                                if text_encoder is not None else None),
        )
        if privacy is not None:
            _record_defense(tmp / LORA_WEIGHT_NAME, *privacy)
        if final.exists():  # a rerun into the same directory replaces its snapshot
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / LORA_WEIGHT_NAME


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__}


# ---------------------------------------------------------------------------------------------
# The fine-tune


def defense_noise_seed(seed: int) -> int:
    """The seed of a fine-tune's DP noise: its own stream, apart from the data's (`seed` itself), so
    that the noise never shifts the batches, flips, timesteps or diffusion noise the recipe draws."""
    return int(hashlib.sha256(f"dp-noise:{seed}".encode()).hexdigest()[:15], 16)


class _TrainingDefense:
    """The fine-tune's training-time defense: a DP-SGD privacy engine, a DPGM loss, or neither."""

    def __init__(self, cfg: FinetuneConfig, num_images: int) -> None:
        self.config = cfg.defense
        self.engine = self.dpgm = None
        self.grad_clip = cfg.grad_clip  # the batch clip of a step without DP-SGD
        planned = dict(num_images=num_images, batch_size=cfg.batch_size, steps=cfg.steps,
                       noise_seed=defense_noise_seed(cfg.seed))
        if cfg.defense.kind == "dp_sgd":
            from ..defenses.dp_sgd import LoraPrivacyEngine

            self.engine = LoraPrivacyEngine.for_defense(cfg.defense, **planned)
        elif cfg.defense.kind == "dpgm":
            from ..defenses.dpgm import DPGMLoss

            self.dpgm = DPGMLoss.for_defense(cfg.defense, **planned)
            self.grad_clip = cfg.defense.max_grad_norm  # the paper's DPGM run clips the batch at this norm

    @property
    def active(self) -> bool:
        return self.engine is not None or self.dpgm is not None

    def at(self, step: int) -> tuple[DefenseConfig, dict[str, Any]] | None:
        """The defense and its record after `step` steps (for a snapshot's metadata), or None."""
        if self.engine is not None:
            return self.config, self.engine.record(step)
        if self.dpgm is not None:
            return self.config, self.dpgm.record(step)
        return None


def finetune_lora(pipe: Any, images: list[Image.Image], cfg: FinetuneConfig, out_dir: str | Path, *,
                  base_ref: str | None = None, base_fingerprint: str | None = None,
                  class_images: list[Image.Image] | None = None,
                  show_progress: bool = True) -> FinetuneResult:
    """DreamBooth-LoRA fine-tune `pipe` on `images` of one person; snapshots and finetune.json in out_dir.

    `base_ref` / `base_fingerprint` name the base for the record and the class-image cache key (else
    the pipeline's weights are hashed). `class_images` skips sampling/loading them (e.g. a zoo that
    holds them in memory). The pipeline is moved to cfg.device and left without any LoRA.
    """
    if not images:
        raise InputError("finetune_lora needs at least one instance image")
    if loaded_adapters(pipe):
        raise LoraleakError(f"the pipeline already carries LoRA adapters {loaded_adapters(pipe)}; "
                            "fine-tune from a clean base")
    defense = _TrainingDefense(cfg, len(images))  # first: a budget out of reach fails before any work
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    pipe.to(device)
    resolution = pipeline_resolution(pipe)
    trigger, instance_prompt = cfg.trigger_word, cfg.instance_prompt_text
    if base_fingerprint is None and base_ref is not None:
        base_fingerprint = fingerprint_of_base(base_ref)

    # Prior-preservation images of the class, from the base before any LoRA is added.
    class_dir = None
    if cfg.prior_preservation and class_images is None:
        if cfg.class_images_dir is not None and base_fingerprint is None:
            base_fingerprint = pipeline_fingerprint(pipe)
        class_images, class_dir = load_or_sample_class_images(
            pipe, cfg.class_images_dir, prompt=cfg.class_prompt, count=cfg.num_class_images,
            seed=cfg.class_images_seed, num_inference_steps=cfg.class_inference_steps,
            guidance_scale=cfg.class_guidance_scale, base_fingerprint=base_fingerprint,
            show_progress=show_progress)
    class_images = class_images if cfg.prior_preservation else None
    class_images_s = time.perf_counter() - started

    noise_scheduler = training_noise_scheduler(pipe)
    prediction_type = noise_scheduler.config.prediction_type
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    instance_bank = _LatentBank(pipe.vae, images, resolution, device, cfg.hflip)
    class_bank = _LatentBank(pipe.vae, class_images, resolution, device, cfg.hflip) if class_images else None
    dataset_len = max(len(instance_bank), len(class_bank)) if class_bank else len(instance_bank)
    order = _shuffled_indices(dataset_len, generator)
    amp_dtype = AMP_DTYPES[cfg.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")

    losses: list[float] = []
    snapshots: list[tuple[int, Path]] = []
    with _FrozenBase(pipe), ExitStack() as private:
        params = _add_loras(pipe, cfg)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
        if defense.engine is not None:  # per-sample gradient hooks on the LoRA layers, removed on exit
            private.enter_context(defense.engine.attach(pipe.unet, optimizer))
        if not cfg.train_text_encoder:  # a frozen text encoder: embed the fixed prompts once
            embeddings = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, cfg, _token_ids, _encode_tokens)
        pipe.unet.train()
        if cfg.train_text_encoder:
            pipe.text_encoder.train()
        if 0 in cfg.save_steps:
            snapshots.append((0, _save_snapshot(pipe, out_dir, 0, cfg.train_text_encoder, defense.at(0))))

        train_started = time.perf_counter()
        progress = tqdm(range(1, cfg.steps + 1), desc=f"fine-tune {trigger}", disable=not show_progress)
        for step in progress:
            rows = [next(order) for _ in range(cfg.batch_size)]
            instance_rows = [i % len(instance_bank) for i in rows]
            if defense.engine is not None:  # DP-SGD draws its private batch as its accounting assumes
                instance_rows = defense.engine.private_rows(instance_rows, len(instance_bank), generator)
            b = len(instance_rows)  # private rows first, then the class rows (as many as batch_size)
            parts = [instance_bank.sample(instance_rows, generator)] if b else []
            if class_bank is not None:  # instance and class in one UNet pass, as the example does
                parts.append(class_bank.sample([i % len(class_bank) for i in rows], generator))
            if not parts:  # a DP step whose Poisson draw took no photo, without class rows: noise only
                defense.engine.backward(torch.zeros(0, device=device), 0, 0.0)
                defense.engine.step(batch_clip=cfg.grad_clip)
                losses.append(math.nan)
                if step in cfg.save_steps:
                    snapshots.append((step, _save_snapshot(pipe, out_dir, step, cfg.train_text_encoder,
                                                           defense.at(step))))
                continue
            latents = torch.cat(parts)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)

            # b instance rows, then the class rows with this step's prior prompts (prior_prompts.py).
            class_rows = cfg.batch_size if class_bank is not None else 0
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if cfg.train_text_encoder:
                    prompts = [instance_prompt] * b + [prior_prompt(cfg, i)
                                                       for i in prior_prompt_indices(cfg, step, class_rows)]
                    hidden = _encode_tokens(pipe.text_encoder,
                                            torch.cat([_token_ids(pipe.tokenizer, p) for p in prompts]))
                else:
                    hidden = embeddings.step_rows(step, b)
                pred = pipe.unet(noisy, timesteps, hidden, return_dict=False)[0]
            pred, target = pred.float(), target.float()
            if defense.engine is not None:  # each row's own loss: the engine needs per-row gradients
                row_losses = (pred - target).pow(2).flatten(1).mean(1)
                loss = (row_losses[:b].mean() if b else 0.0) + \
                    (cfg.prior_loss_weight * row_losses[b:].mean() if class_bank is not None else 0.0)
            elif defense.dpgm is not None:  # the paper's DPGM loss in place of both MSE terms
                loss = defense.dpgm(pred[:b], target[:b])
                if class_bank is not None:
                    loss = loss + cfg.prior_loss_weight * defense.dpgm(pred[b:], target[b:])
            elif class_bank is not None:
                loss = F.mse_loss(pred[:b], target[:b]) + cfg.prior_loss_weight * F.mse_loss(pred[b:], target[b:])
            else:
                loss = F.mse_loss(pred, target)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise LoraleakError(f"fine-tune diverged: loss is {loss_value} at step {step} of {cfg.steps} "
                                    f"(lr={cfg.lr}, mixed_precision={cfg.mixed_precision})")

            if defense.engine is not None:
                class_rows = row_losses.shape[0] - b
                defense.engine.backward(row_losses, b, cfg.prior_loss_weight / class_rows if class_rows else 0.0)
                defense.engine.step(batch_clip=cfg.grad_clip)
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, defense.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss_value)
            progress.set_postfix(loss=f"{loss_value:.4f}")
            if step in cfg.save_steps:
                snapshots.append((step, _save_snapshot(pipe, out_dir, step, cfg.train_text_encoder,
                                                       defense.at(step))))
        train_s = time.perf_counter() - train_started
        trainable = sum(p.numel() for p in params)

    wall_time_s = time.perf_counter() - started
    tail = [x for x in losses[-max(1, len(losses) // 10):] if not math.isnan(x)] or [math.nan]
    final_loss = sum(tail) / len(tail)
    settings = {
        "config": to_dict(cfg),
        "trigger": trigger,
        "instance_prompt": instance_prompt,
        "class_prompt": cfg.class_prompt,
        "resolution": resolution,
        "base": {"ref": base_ref, "fingerprint": base_fingerprint, "pipeline": type(pipe).__name__},
        "noise_scheduler": {"class": type(noise_scheduler).__name__, "prediction_type": prediction_type,
                            "num_train_timesteps": num_train_timesteps,
                            "beta_schedule": noise_scheduler.config.beta_schedule},
        "lora": {"init": "gaussian", "trainable_parameters": trainable},
        # The training-time defense as run: σ, ε spent, δ, clip norm, accounting unit (None: none).
        "privacy": defense.at(cfg.steps)[1] if defense.active else None,
        "instance_images": {"count": len(images), "sha256": [image_sha256(im) for im in images]},
        "class_images": None if not class_images else {
            "count": len(class_images), "cache_dir": str(class_dir) if class_dir else None,
            "sha256_of_all": hashlib.sha256("".join(image_sha256(im) for im in class_images).encode()).hexdigest()},
        "snapshots": [{"step": r, "path": str(p.relative_to(out_dir))} for r, p in snapshots],
        "losses": losses,
        "final_loss": final_loss,
        "timings": {"wall_time_s": wall_time_s, "class_images_s": class_images_s, "train_s": train_s,
                    "seconds_per_step": train_s / cfg.steps, "torch_threads": torch.get_num_threads()},
        "device": str(device),
        "versions": _versions(),
    }
    # Written last: a finetune.json means every snapshot before it is complete.
    _write_json_atomically(out_dir / RECORD_NAME, settings)
    return FinetuneResult(trigger=trigger, instance_prompt=instance_prompt, snapshots=snapshots,
                          losses=losses, final_loss=final_loss, wall_time_s=wall_time_s, settings=settings)
