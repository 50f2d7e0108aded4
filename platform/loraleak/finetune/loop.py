"""The one fine-tune loop: K >= 1 DreamBooth-LoRA fine-tunes on one frozen base, step by step.

`run_finetunes` is what `finetune_lora` (K = 1, dreambooth_lora.py) and `finetune_lora_batched` (K per
UNet pass, batched.py) both run. What differs between them is a *trainer*, the step of the UNet
and the optimiser:

    trainer_class.cpu_banks              # latents kept on the CPU (K move in one copy) or on the device
    with trainer_class(pipe, cfgs, defenses, options).installed() as trainer:   # adds the LoRAs
        losses = trainer.step(step, draws, noise_scheduler)   # K losses (a tensor on the device), or None
        trainer.lora(k)                                        # LoRA k for a snapshot (record.LoraLayers)
        trainer.trainable_parameters                           # of one fine-tune

Everything else — the checks, class images, each fine-tune's random draws (data.FinetuneStream),
its training-time defense's hooks (defenses.training), the snapshots and finetune.json (record.py),
a diverged fine-tune's error — is here, once.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import DDPMScheduler
from PIL import Image
from tqdm.auto import tqdm

from ..base.loading import base_fingerprint as fingerprint_of_base
from ..base.precision import warn_if_emulated_bf16
from ..defenses.training import training_defense
from ..errors import ConfigError, LoraleakError
from ..lora.io import LoraProvenance, loaded_adapters
from .class_images import pipeline_resolution
from .config import FinetuneConfig
from .data import class_image_sets, finetune_streams
from .record import RECORD_NAME, FinetuneResult, finetune_settings, save_snapshot, write_json_atomically

AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_NAME = "default"  # the name `add_adapter` gives; what `get_peft_model_state_dict` reads


class FrozenBase:
    """Freeze every base weight for the fine-tune and put the pipeline back as it was afterwards."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.modules = [m for m in (pipe.unet, pipe.vae, pipe.text_encoder) if m is not None]
        self.requires_grad = [[p.requires_grad for p in m.parameters()] for m in self.modules]
        self.training = [m.training for m in self.modules]

    def __enter__(self) -> "FrozenBase":
        for m in self.modules:
            m.requires_grad_(False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.pipe.unload_lora_weights()  # replaces every LoRA-wrapped layer by its base layer
        for m, flags, training in zip(self.modules, self.requires_grad, self.training):
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)
            m.train(training)


def training_noise_scheduler(pipe) -> DDPMScheduler:
    """DDPM over the pipeline's own training noise schedule (the sampler's config holds it)."""
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(f"cannot fine-tune a base that predicts {prediction_type!r} (only epsilon or v)")
    return noise_scheduler


def diffusion_inputs(noise_scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy latents the UNet sees and what it should predict (ε, or v for a v-prediction base)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        return noisy, noise
    return noisy, noise_scheduler.get_velocity(latents, noise, timesteps)


class _Losses:
    """Each fine-tune's losses, read back from the device every few steps; a diverged fine-tune's error."""

    def __init__(self, cfgs: Sequence[FinetuneConfig], out_dirs: Sequence[Path], return_exceptions: bool) -> None:
        self.cfgs, self.out_dirs, self.return_exceptions = cfgs, out_dirs, return_exceptions
        self.values: list[list[float]] = [[] for _ in cfgs]
        self.errors: list[LoraleakError | None] = [None] * len(cfgs)
        self.pending: list[torch.Tensor | None] = []  # per step: K losses on the device; None: a step with no rows

    def read(self) -> None:
        """Read the pending steps back; a fine-tune whose loss is not finite fails (alone, with return_exceptions)."""
        stacked = [p for p in self.pending if p is not None]
        rows = iter(torch.stack(stacked).cpu().tolist() if stacked else [])
        bad: dict[int, tuple[float, int]] = {}  # fine-tune -> its first non-finite loss and that step
        for losses in self.pending:
            row = next(rows) if losses is not None else [math.nan] * len(self.cfgs)  # no rows: no loss
            for k, value in enumerate(row):
                self.values[k].append(value)
                if losses is not None and not math.isfinite(value):
                    bad.setdefault(k, (value, len(self.values[k])))
        self.pending.clear()
        for k in sorted(bad):
            if self.errors[k] is None:
                self._diverged(k, *bad[k])

    def _diverged(self, k: int, value: float, step: int) -> None:
        cfg = self.cfgs[k]
        self.errors[k] = LoraleakError(
            f"fine-tune {k} of the batch ({cfg.trigger_word}, {self.out_dirs[k]}) diverged: loss is {value} "
            f"at step {step} of {cfg.steps} (lr={cfg.lr}, mixed_precision={cfg.mixed_precision})")
        if not self.return_exceptions:
            raise self.errors[k]

    def last_mean(self) -> str:
        alive = [self.values[k][-1] for k in range(len(self.cfgs)) if self.errors[k] is None]
        return f"{sum(alive) / len(alive):.4f}" if alive else "-"

    def final(self, k: int) -> float:
        """Mean loss over the last tenth of the steps (one step's loss is noise); steps without rows left out."""
        losses = self.values[k]
        tail = [x for x in losses[-max(1, len(losses) // 10):] if not math.isnan(x)] or [math.nan]
        return sum(tail) / len(tail)


def run_finetunes(pipe: Any, image_sets: Sequence[list[Image.Image]], cfgs: Sequence[FinetuneConfig],
                  out_dirs: Sequence[Path], trainer_class: Any, *, options: Any = None, sync_every: int = 1,
                  base_ref: str | None = None, base_fingerprint: str | None = None,
                  class_images: Sequence[list[Image.Image] | None] | None = None, return_exceptions: bool = False,
                  show_progress: bool = True, description: str = "fine-tune",
                  batched_options: dict[str, Any] | None = None,
                  on_step: Callable[[int], None] | None = None) -> list[FinetuneResult | LoraleakError]:
    """Fine-tune image_sets[k] with cfgs[k] into out_dirs[k], for every k, with `trainer_class`'s steps.

    Losses are read back from the device every `sync_every` steps and at every snapshot step;
    `batched_options` (the device options as a dict) adds finetune.json's `batched` entry; `on_step(step)`
    is called after each step (a zoo's progress across its workers)."""
    if loaded_adapters(pipe):
        raise LoraleakError(f"the pipeline already carries LoRA adapters {loaded_adapters(pipe)}; "
                            "fine-tune from a clean base")
    defenses = [training_defense(c, len(im)) for c, im in zip(cfgs, image_sets)]  # an unreachable ε fails first
    started = time.perf_counter()
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfgs[0].device)
    warn_if_emulated_bf16(device, AMP_DTYPES[cfgs[0].mixed_precision], "fine-tune")
    pipe.to(device)
    resolution = pipeline_resolution(pipe)
    if base_fingerprint is None and base_ref is not None:
        base_fingerprint = fingerprint_of_base(base_ref)
    lora_base = base_fingerprint  # in each LoRA file: the base's fingerprint (not the pipeline hash below)
    class_sets, class_dirs, base_fingerprint = class_image_sets(pipe, cfgs, class_images, base_fingerprint,
                                                                show_progress)
    class_images_s = time.perf_counter() - started
    noise_scheduler = training_noise_scheduler(pipe)
    streams = finetune_streams(pipe.vae, cfgs, image_sets, class_sets, defenses, resolution, device,
                               noise_scheduler.config.num_train_timesteps, on_cpu=trainer_class.cpu_banks)
    losses = _Losses(cfgs, out_dirs, return_exceptions)
    snapshots: list[list[tuple[int, Path]]] = [[] for _ in cfgs]
    sync_steps = set().union(*(cfg.save_steps for cfg in cfgs)) | {cfgs[0].steps}

    def save(step: int) -> None:
        for k, cfg in enumerate(cfgs):
            if step in cfg.save_steps and losses.errors[k] is None:
                record = defenses[k].account(step)
                privacy = (defenses[k].config, record) if record is not None else None
                provenance = LoraProvenance(trigger=cfg.trigger_word, instance_prompt=cfg.instance_prompt_text,
                                            base_fingerprint=lora_base, rank=cfg.rank, alpha=cfg.alpha,
                                            targets=tuple(cfg.targets), step=step)
                snapshots[k].append((step, save_snapshot(out_dirs[k], step, trainer.lora(k), provenance, privacy)))

    with FrozenBase(pipe), trainer_class(pipe, cfgs, defenses, options).installed() as trainer:
        save(0)
        train_started = time.perf_counter()
        progress = tqdm(range(1, cfgs[0].steps + 1), desc=description, disable=not show_progress)
        for step in progress:
            losses.pending.append(trainer.step(step, [stream.draw() for stream in streams], noise_scheduler))
            if step % sync_every == 0 or step in sync_steps:
                losses.read()
                progress.set_postfix(loss=losses.last_mean())
                save(step)
            if on_step is not None:
                on_step(step)
        train_s = time.perf_counter() - train_started
        trainable = trainer.trainable_parameters

    timings = {"wall_time_s": time.perf_counter() - started, "class_images_s": class_images_s, "train_s": train_s,
               "seconds_per_step": train_s / cfgs[0].steps, "torch_threads": torch.get_num_threads()}
    run = dict(pipe=pipe, resolution=resolution, base={"ref": base_ref, "fingerprint": base_fingerprint},
               noise_scheduler=noise_scheduler, trainable=trainable, timings=timings, device=device)
    return [losses.errors[k] or _result(k, cfgs[k], image_sets[k], class_sets[k], class_dirs[k], out_dirs[k],
                                        snapshots[k], losses, defenses[k], batched_options, len(cfgs), run)
            for k in range(len(cfgs))]


def _result(k: int, cfg: FinetuneConfig, images: list[Image.Image], class_images: list[Image.Image] | None,
            class_dir: Path | None, out_dir: Path, snapshots: list[tuple[int, Path]], losses: _Losses,
            defense: Any, batched_options: dict[str, Any] | None, k_count: int, run: dict[str, Any]) -> FinetuneResult:
    """Fine-tune k's finetune.json, written last (it marks the snapshots complete), and its result."""
    final_loss = losses.final(k)
    batched = None if batched_options is None else {"fine_tunes": k_count, "index": k, "options": batched_options}
    settings = finetune_settings(cfg, **run, privacy=defense.account(cfg.steps), images=images,
                                 class_images=class_images, class_dir=class_dir, out_dir=out_dir,
                                 snapshots=snapshots, losses=losses.values[k], final_loss=final_loss,
                                 batched=batched)
    write_json_atomically(out_dir / RECORD_NAME, settings)
    return FinetuneResult(trigger=cfg.trigger_word, instance_prompt=cfg.instance_prompt_text, snapshots=snapshots,
                          losses=losses.values[k], final_loss=final_loss,
                          wall_time_s=run["timings"]["wall_time_s"], settings=settings)
