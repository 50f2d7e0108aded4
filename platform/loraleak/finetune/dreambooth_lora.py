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

A training-time defense (`cfg.defense`, a `defenses.training` object whose hooks the loop calls)
changes step 3 only:
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

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image

from ..defenses.training import NoDefense, Update
from ..errors import ConfigError, InputError, LoraleakError
from .config import FinetuneConfig
from .data import Draw, encode_tokens, token_ids
from .loop import ADAPTER_NAME, AMP_DTYPES, diffusion_inputs, run_finetunes, training_noise_scheduler
from .prior_prompts import PromptEmbeddings, prior_prompt, prior_prompt_indices
from .record import RECORD_NAME, FinetuneResult, LoraLayers, snapshot_dir

__all__ = ["ADAPTER_NAME", "RECORD_NAME", "FinetuneResult", "finetune_lora", "snapshot_dir",
           "training_noise_scheduler"]

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


def _adapter_metadata(model) -> dict:
    """The adapter's LoraConfig as file metadata, with sets sorted: peft keeps target_modules as a
    set, whose order changes per process, and identical LoRAs should be identical bytes."""
    meta = model.peft_config[ADAPTER_NAME].to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in meta.items()}


class _PeftTrainer:
    """One fine-tune (K = 1) through peft's own LoRA layers and torch's AdamW: any training-time
    defense, a text-encoder LoRA, fp16 with its loss scaler. The step the `loop` calls."""

    cpu_banks = False  # one fine-tune: its latents stay on the device

    def __init__(self, pipe: Any, cfgs: Sequence[FinetuneConfig], defenses: Sequence[NoDefense],
                 options: Any = None) -> None:
        (self.cfg,), (self.defense,) = cfgs, defenses
        self.pipe, self.device = pipe, torch.device(self.cfg.device)
        self.amp_dtype = AMP_DTYPES[self.cfg.mixed_precision]

    @contextmanager
    def installed(self) -> Iterator["_PeftTrainer"]:
        """The LoRA added (from cfg.seed), its AdamW, the defense prepared, the models in training mode."""
        cfg, pipe = self.cfg, self.pipe
        params = _add_loras(pipe, cfg)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
        self.update = Update(optimizer, params, torch.amp.GradScaler(self.device.type,
                                                                     enabled=cfg.mixed_precision == "fp16"))
        self.trainable_parameters = sum(p.numel() for p in params)
        with self.defense.prepare(pipe.unet, self.update):
            # A frozen text encoder: the fixed prompts are embedded once.
            self.embeddings = None if cfg.train_text_encoder else \
                PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, cfg, token_ids, encode_tokens)
            pipe.unet.train()
            if cfg.train_text_encoder:
                pipe.text_encoder.train()
            yield self

    def _hidden(self, step: int, b: int, class_rows: int) -> torch.Tensor:
        """The prompt embeddings of the step's b instance rows, then its class rows (prior_prompts.py)."""
        if self.embeddings is not None:
            return self.embeddings.step_rows(step, b)
        prompts = [self.cfg.instance_prompt_text] * b + [prior_prompt(self.cfg, i)
                                                         for i in prior_prompt_indices(self.cfg, step, class_rows)]
        return encode_tokens(self.pipe.text_encoder, torch.cat([token_ids(self.pipe.tokenizer, p) for p in prompts]))

    def step(self, step: int, draws: list[Draw], noise_scheduler: Any) -> torch.Tensor | None:
        (draw,) = draws
        cfg, device = self.cfg, self.device
        if draw.latents is None:  # a DP step whose Poisson draw took no photo, without class rows: noise only
            self.defense.after_step(None, self.update)
            return None
        timesteps = draw.timesteps.to(device)
        noisy, target = diffusion_inputs(noise_scheduler, draw.latents, draw.noise.to(device), timesteps)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            hidden = self._hidden(step, draw.private_rows, draw.class_rows)
            pred = self.pipe.unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = self.defense.loss(pred.float(), target.float(), draw.private_rows, cfg.prior_loss_weight,
                                 draw.class_rows)
        value = loss.item()
        if not math.isfinite(value):
            raise LoraleakError(f"fine-tune diverged: loss is {value} at step {step} of {cfg.steps} "
                                f"(lr={cfg.lr}, mixed_precision={cfg.mixed_precision})")
        self.defense.after_step(loss, self.update)
        return torch.tensor([value])

    def lora(self, k: int) -> LoraLayers:
        text_encoder = self.pipe.text_encoder if self.cfg.train_text_encoder else None
        return LoraLayers(
            unet=get_peft_model_state_dict(self.pipe.unet), unet_metadata=_adapter_metadata(self.pipe.unet),
            text_encoder=get_peft_model_state_dict(text_encoder) if text_encoder is not None else None,
            text_encoder_metadata=_adapter_metadata(text_encoder) if text_encoder is not None else None)


def finetune_lora(pipe: Any, images: list[Image.Image], cfg: FinetuneConfig, out_dir: str | Path, *,
                  base_ref: str | None = None, base_fingerprint: str | None = None,
                  class_images: list[Image.Image] | None = None,
                  show_progress: bool = True, on_step: Callable[[int], None] | None = None) -> FinetuneResult:
    """DreamBooth-LoRA fine-tune `pipe` on `images` of one person; snapshots and finetune.json in out_dir.

    `base_ref` / `base_fingerprint` name the base for the record and the class-image cache key (else
    the pipeline's weights are hashed). `class_images` skips sampling/loading them (e.g. a zoo that
    holds them in memory). `on_step(step)` is called after each step (loop.run_finetunes). The pipeline is
    moved to cfg.device and left without any LoRA.
    """
    if not images:
        raise InputError("finetune_lora needs at least one instance image")
    (result,) = run_finetunes(pipe, [images], [cfg], [Path(out_dir)], _PeftTrainer, base_ref=base_ref,
                              base_fingerprint=base_fingerprint,
                              class_images=[class_images] if class_images is not None else None,
                              show_progress=show_progress, description=f"fine-tune {cfg.trigger_word}",
                              on_step=on_step)
    return result
