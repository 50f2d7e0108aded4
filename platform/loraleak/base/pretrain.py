"""Pretrain the tiny base on public faces, on a CPU, resumably.

Two phases, like Stable Diffusion itself:
  (a) the autoencoder (`AutoencoderKL`): reconstruction (L1 + L2) plus a small KL term; then its
      `scaling_factor` is set to 1/std of the latents so the UNet sees unit-variance inputs;
  (b) the UNet: every image (and its mirror image) is encoded once into a latent cache holding the
      posterior mean and std, and the UNet learns DDPM ε-prediction on fresh latent samples from
      it, conditioned on the text features of its caption (dropped to "" 10% of the time so
      classifier-free guidance works), with AdamW, linear warm-up and an EMA copy.

Captions. `captions: prompt` (the first shipped bases) captions every image "A human face.", so
the UNet never learns to read its text: every unfamiliar word then looks alike to it, and a victim's
LoRA learns the template "A face of X." rather than its trigger. `captions: names` gives each public
identity a name (a random word drawn like the victims' triggers) and captions its images "A face of
<name>." (`named_fraction` of draws; "A human face." otherwise), optionally training the text encoder
with the UNet, so that the base might tell names apart as SD 1.4 does from captions full of names and a
DreamBooth trigger would be one more name for the LoRA to teach. An experiment: 2,400 steps on 2 cores
did not teach the base names (configs/pretrain-synthetic-names.yaml has the measurement).
`init_from` continues from a pretrained pipeline (its VAE is kept as is).

Everything lives in `out_dir`: the decoded image set, checkpoints written every few minutes (a
killed run resumes where it stopped, losing at most that much), sample grids, and at the end the EMA
pipeline in `out_dir/pipeline` (diffusers format, safetensors) with `training.json`. Each step
draws its batch and noise from a generator seeded by (seed, step), so a resumed run takes the
same steps as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import diffusers
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import ExistingPath, from_dict, read_yaml, to_dict
from ..errors import ConfigError, LoraleakError
from ..finetune.triggers import random_trigger
from ..identities.folder import FolderIdentities
from ..identities.synthetic import PUBLIC_IMAGES_PER_IDENTITY, public_images
from ..imaging import save_grid
from .loading import PIPELINE_SUBDIR, base_fingerprint, load_base_pipeline
from .sampling import sample_images
from .tiny import TinyBaseConfig, build_tiny_pipeline

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
IMAGES_FILE = "images.safetensors"
LATENTS_FILE = "latents.safetensors"
PSNR_IMAGES = 256  # images whose reconstruction PSNR is reported after the VAE phase
SAMPLE_IMAGES = 16
# Settings that define what a run in `out_dir` is; the rest (steps, lr, limits) may change on resume.
RUN_IDENTITY = ("images", "num_images", "crop_fraction", "images_per_identity", "tiny", "seed", "hflip", "prompt",
                "captions", "named_prompt", "named_fraction", "train_text_encoder", "init_from")
NAMES_GRID_IDENTITIES = 8  # identities in the names grid: their first photo above, "A face of <name>." below


@dataclass(frozen=True)
class PretrainConfig:
    out_dir: Path
    images: ExistingPath | None = None  # ROOT/<id>/*.jpg of public photos; None = synthetic faces
    num_images: int = 8000  # at most this many (a folder may hold fewer)
    crop_fraction: float = 0.48  # centre crop of folder photos (LFW: the face is the centre ~120 px)
    # Synthetic faces only: photos per public identity (more photos per name teach names faster).
    images_per_identity: int = PUBLIC_IMAGES_PER_IDENTITY
    tiny: TinyBaseConfig = TinyBaseConfig()
    vae_steps: int = 1500
    vae_batch_size: int = 8  # the VAE learns about as much per step at 8 as at 32, 3x faster
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-6  # per latent element; just enough to keep the latent space tidy
    unet_steps: int = 2500
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    hflip: bool = True
    prompt: str = "A human face."
    prompt_dropout: float = 0.1
    captions: Literal["prompt", "names"] = "prompt"
    named_prompt: str = "A face of {name}."  # the victims' instance prompt, with a public name
    named_fraction: float = 0.75  # of captioned draws (after dropout) that name the identity
    train_text_encoder: bool = False  # the text encoder learns with the UNet (and is frozen after)
    text_encoder_lr: float = 5e-4
    init_from: ExistingPath | None = None  # a pretrained pipeline to continue from (VAE kept)
    seed: int = 0
    sample_every: int = 250  # UNet steps between sample grids; 0 = only at the end
    sample_steps: int = 25  # DPM-Solver steps per sample grid
    checkpoint_every_min: float = 2.0
    # Total time (summed across resumes) after which the UNet phase stops and the run finishes early.
    time_limit_min: float | None = None
    threads: int | None = None  # torch CPU threads; None = torch's default

    def __post_init__(self) -> None:
        for name in ("num_images", "images_per_identity", "batch_size", "vae_batch_size", "vae_steps", "unet_steps"):
            if getattr(self, name) < (0 if name.endswith("steps") else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if not 0.0 <= self.named_fraction <= 1.0:
            raise ValueError(f"named_fraction must be in [0, 1], got {self.named_fraction}")
        if self.captions == "names" and "{name}" not in self.named_prompt:
            raise ValueError(f"named_prompt must contain {{name}}, got {self.named_prompt!r}")


def public_name(seed: int, identity: int) -> str:
    """The name of public identity number `identity`: a random word like a trigger, fixed by (seed, identity)."""
    digest = hashlib.sha256(f"base-public-name:{seed}:{identity}".encode()).digest()
    return random_trigger(random.Random(digest))


# ---------------------------------------------------------------------------------------------
# Data


def _public_images(cfg: PretrainConfig) -> Iterator[tuple[Image.Image, int]]:
    """(image, identity number) of the public photos, identity by identity."""
    size = cfg.tiny.resolution
    if cfg.images is None:
        per = cfg.images_per_identity
        for k, image in enumerate(public_images(cfg.num_images, size, seed=cfg.seed, images_per_identity=per)):
            yield image, k // per
        return
    source = FolderIdentities(cfg.images, min_images=1, crop_fraction=cfg.crop_fraction)
    for number, identity in enumerate(source.identities()):
        for image in identity.load(size):
            yield image, number


def load_image_set(cfg: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretraining images as uint8 (N, 3, R, R) and their identity numbers (N,), cached in `out_dir`."""
    cache = cfg.out_dir / IMAGES_FILE
    if cache.is_file():
        cached = load_file(cache)
        if "identities" not in cached:  # a cache written before identities were recorded
            if cfg.captions == "names":
                raise LoraleakError(f"{cache} has no identity numbers: delete it to decode the images again")
            cached["identities"] = torch.zeros(len(cached["images"]), dtype=torch.int64)
        return cached["images"], cached["identities"]
    arrays, numbers = [], []
    for image, number in tqdm(_public_images(cfg), desc="loading images", total=cfg.num_images, unit="img"):
        arrays.append(torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8))
        numbers.append(number)
        if len(arrays) == cfg.num_images:
            break
    if not arrays:
        raise LoraleakError(f"no images to pretrain on in {cfg.images}")
    size = cfg.tiny.resolution
    images = torch.stack(arrays).view(-1, size, size, 3).permute(0, 3, 1, 2).contiguous()
    identities = torch.tensor(numbers, dtype=torch.int64)
    _atomic_save_tensors({"images": images, "identities": identities}, cache)
    return images, identities


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


class StepRandom:
    """Per-step random draws seeded by (seed, step): a resumed run repeats the same batches."""

    def __init__(self, seed: int, num_items: int, batch_size: int):
        self.seed, self.num_items, self.batch_size = seed, num_items, batch_size
        self._perms: dict[int, torch.Tensor] = {}

    def generator(self, phase: int, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + phase) * 10_000_019 + step) % 2**63)

    def batch(self, phase: int, step: int) -> torch.Tensor:
        """Indices of batch `step`: epochs walk through a fresh permutation of all items."""
        positions = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = positions // self.num_items, positions % self.num_items
        return torch.stack([self._perm(phase, int(e))[o] for e, o in zip(epochs, offsets)])

    def _perm(self, phase: int, epoch: int) -> torch.Tensor:
        key = phase * 1_000_000 + epoch
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= key - 1}  # keep memory flat
            self._perms[key] = torch.randperm(self.num_items, generator=self.generator(phase + 7, -epoch - 1))
        return self._perms[key]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def _save_checkpoint(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    # weights_only: tensors and plain containers only, never arbitrary pickled objects.
    return torch.load(path, weights_only=True) if path.is_file() else None


def _check_same_run(cfg: PretrainConfig) -> None:
    """Refuse to resume a run in `out_dir` that was started with different data or model."""
    path = cfg.out_dir / CHECKPOINT_DIR / "run.json"
    identity = {k: v for k, v in to_dict(cfg).items() if k in RUN_IDENTITY}
    if path.is_file():
        previous = json.loads(path.read_text())
        # A key missing from an older run.json had its default then.
        defaults = to_dict(PretrainConfig(out_dir=cfg.out_dir))
        changed = sorted(k for k in RUN_IDENTITY if previous.get(k, defaults.get(k)) != identity.get(k))
        if changed:
            raise ConfigError(f"{cfg.out_dir} holds a pretraining run with different {', '.join(changed)}:"
                              " use a new out_dir (or delete that one)")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=2))


class Clock:
    """Training time summed across resumes; tells when to checkpoint and when to stop."""

    def __init__(self, cfg: PretrainConfig, elapsed: float):
        self.cfg, self.base, self.start = cfg, elapsed, time.monotonic()
        self.last_checkpoint = self.start

    @property
    def elapsed(self) -> float:
        return self.base + time.monotonic() - self.start

    def checkpoint_due(self) -> bool:
        if time.monotonic() - self.last_checkpoint >= self.cfg.checkpoint_every_min * 60:
            self.last_checkpoint = time.monotonic()
            return True
        return False

    def out_of_time(self) -> bool:
        limit = self.cfg.time_limit_min
        return limit is not None and self.elapsed >= limit * 60


# ---------------------------------------------------------------------------------------------
# Phase (a): the autoencoder


def _vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
    return F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + kl_weight * kl


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor, batch_size: int = 64) -> float:
    """Mean PSNR (dB, images in [0, 1]) of decoding each image's posterior mean."""
    psnrs = []
    for chunk in images.split(batch_size):
        x = _as_float(chunk)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)
        psnrs.append(-10 * torch.log10(mse.clamp_min(1e-10)))
    return float(torch.cat(psnrs).mean())


def train_vae(cfg: PretrainConfig, pipe: StableDiffusionPipeline, images: torch.Tensor, clock: Clock) -> dict:
    path = cfg.out_dir / CHECKPOINT_DIR / "vae.pt"
    vae = pipe.vae
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    state = _load_checkpoint(path) or {"step": 0, "losses": [], "done": False}
    if "vae" in state:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
    if state["done"]:
        return state
    rand = StepRandom(cfg.seed, len(images), cfg.vae_batch_size)

    def save() -> None:
        state.update(vae=vae.state_dict(), optimizer=optimizer.state_dict(), elapsed=clock.elapsed)
        _save_checkpoint(state, path)

    vae.train().requires_grad_(True)
    bar = tqdm(range(state["step"], cfg.vae_steps), desc="VAE", initial=state["step"], total=cfg.vae_steps)
    try:
        for step in bar:
            g = rand.generator(0, step)
            x = _as_float(images[rand.batch(0, step)])
            if cfg.hflip:
                x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
            loss = _vae_loss(vae, x, cfg.vae_kl_weight, g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.max_grad_norm)
            optimizer.step()
            state["losses"].append(round(loss.item(), 5))
            state["step"] = step + 1
            bar.set_postfix(loss=f"{_recent_mean(state['losses']):.4f}")
            if clock.checkpoint_due():
                save()
    except KeyboardInterrupt:
        save()
        raise
    vae.eval().requires_grad_(False)
    state["psnr"] = reconstruction_psnr(vae, images[:PSNR_IMAGES])
    state["done"] = True
    save()
    logger.info("VAE: %d steps, reconstruction PSNR %.2f dB", state["step"], state["psnr"])
    return state


@torch.no_grad()
def encode_latents(cfg: PretrainConfig, vae, images: torch.Tensor, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Posterior mean/std of every image (and its mirror), cached; sets the VAE's scaling_factor."""
    cache = cfg.out_dir / LATENTS_FILE
    if cache.is_file():
        latents = load_file(cache)
    else:
        means, stds = [], []
        flips = (False, True) if cfg.hflip else (False,)
        chunks = [(c, f) for f in flips for c in images.split(batch_size)]
        for chunk, flip in tqdm(chunks, desc="encoding latents"):
            x = _as_float(chunk)
            posterior = vae.encode(x.flip(-1) if flip else x).latent_dist
            means.append(posterior.mean.half().contiguous())
            stds.append(posterior.std.half().contiguous())
        mean, std = torch.cat(means), torch.cat(stds)
        sample = mean.float() + std.float() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed))
        # SD's recipe: scale latents to unit variance (SD 1.x: 0.18215).
        scaling = torch.tensor([1.0 / sample.std().item()]) if cfg.init_from is None else \
            torch.tensor([float(vae.config.scaling_factor)])  # the UNet being continued was trained with it
        latents = {"mean": mean, "std": std, "scaling_factor": scaling}
        _atomic_save_tensors(latents, cache)
    vae.register_to_config(scaling_factor=float(latents["scaling_factor"]))
    return latents


# ---------------------------------------------------------------------------------------------
# Phase (b): the UNet


@torch.no_grad()
def _prompt_features(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    return _encode(pipe, pipe.text_encoder, prompts)


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)


def _recent_mean(losses: list[float], window: int = 50) -> float:
    recent = losses[-window:]
    return sum(recent) / max(1, len(recent))


def _sampling_pipeline(pipe: StableDiffusionPipeline, unet, text_encoder=None) -> StableDiffusionPipeline:
    components = {**pipe.components, "unet": unet, **({"text_encoder": text_encoder} if text_encoder else {})}
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def save_samples(cfg: PretrainConfig, pipe: StableDiffusionPipeline, unet, step: int, text_encoder=None,
                 captions: Captions | None = None) -> Path:
    sampler = _sampling_pipeline(pipe, unet, text_encoder)
    sampler.set_progress_bar_config(disable=True)
    images = sample_images(sampler, cfg.prompt, SAMPLE_IMAGES, seed=cfg.seed, steps=cfg.sample_steps)
    scale = max(1, 128 // cfg.tiny.resolution)  # 32 px faces are hard to judge at 1:1
    path = save_grid(images, cfg.out_dir / "samples" / f"step_{step:06d}.png", scale=scale)
    if cfg.captions == "names" and captions is not None:
        # Does the base tell names apart? Row 1: an identity's first photo; row 2: "A face of <its name>.".
        drawn = [sample_images(sampler, cfg.named_prompt.format(name=captions.name(i)), 1, seed=cfg.seed + i,
                               steps=cfg.sample_steps)[0] for i in captions.grid_photos]
        save_grid([*captions.grid_photos.values(), *drawn], cfg.out_dir / "samples" / f"step_{step:06d}-names.png",
                  ncols=len(drawn), scale=scale)
    return path


class Captions:
    """The caption of each training row: "", the prompt, or the named prompt with the identity's name."""

    def __init__(self, cfg: PretrainConfig, images: torch.Tensor, identities: torch.Tensor):
        self.cfg, self.identities = cfg, identities
        self.names: dict[int, str] = {}
        # The first photo of the first few identities, shown in the names grid beside what their names draw.
        shown = identities.unique()[:NAMES_GRID_IDENTITIES].tolist()
        self.grid_photos = {i: Image.fromarray(images[int((identities == i).nonzero()[0])].permute(1, 2, 0).numpy())
                            for i in shown}

    def name(self, identity: int) -> str:
        if identity not in self.names:
            self.names[identity] = public_name(self.cfg.seed, identity)
        return self.names[identity]

    def for_rows(self, latent_index: torch.Tensor, dropped: torch.Tensor, named: torch.Tensor) -> list[str]:
        # Latent j is image j % N (the second half of the cache holds the mirror images).
        numbers = self.identities[latent_index % len(self.identities)]
        return ["" if d else self.cfg.named_prompt.format(name=self.name(int(i))) if n else self.cfg.prompt
                for i, d, n in zip(numbers.tolist(), dropped.tolist(), named.tolist())]


def _encode(pipe: StableDiffusionPipeline, text_encoder, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return text_encoder(tok.input_ids)[0]  # with gradients where the caller enables them


def train_unet(cfg: PretrainConfig, pipe: StableDiffusionPipeline, latents: dict[str, torch.Tensor],
               captions: Captions, clock: Clock) -> dict:
    """Phase (b): denoise the cached latents, resuming from unet.pt; the EMA weights become the pipeline's."""
    path = cfg.out_dir / CHECKPOINT_DIR / "unet.pt"
    models = _UnetModels(cfg, pipe)
    state = _load_checkpoint(path) or {"step": 0, "losses": []}
    if "unet" in state:
        models.load(state)
    # After the load: with train_text_encoder, the fixed prompt features come from the resumed text encoder.
    objective = _Denoising(cfg, pipe, latents, captions)

    def save() -> None:
        _save_checkpoint(models.checkpoint(state, clock.elapsed), path)

    state["stopped_by_time_limit"] = False  # a resumed run may go on past an earlier limit
    models.train()
    bar = tqdm(range(state["step"], cfg.unet_steps), desc="UNet", initial=state["step"], total=cfg.unet_steps)
    try:
        for step in bar:
            if clock.out_of_time():
                logger.warning("time limit of %s min reached after %d UNet steps", cfg.time_limit_min, step)
                state["stopped_by_time_limit"] = True
                break
            loss = objective.loss(models.unet, models.text_encoder, step)
            models.step(loss, lr_scale=min(1.0, (step + 1) / max(1, cfg.warmup_steps)))  # linear warm-up
            # EMA warm-up: early on, average over the steps taken so far, not over random weights.
            models.update_ema(min(cfg.ema_decay, (1 + step) / (10 + step)))
            state["losses"].append(round(loss.item(), 5))
            state["step"] = step + 1
            bar.set_postfix(loss=f"{_recent_mean(state['losses']):.4f}")
            if cfg.sample_every and state["step"] % cfg.sample_every == 0:
                save_samples(cfg, pipe, models.ema, state["step"], models.ema_text, captions)
            if clock.checkpoint_due():
                save()
    except KeyboardInterrupt:
        save()
        raise
    save()
    models.hand_over(pipe)
    return state


class _UnetModels:
    """What phase (b) trains, averages and checkpoints: the UNet (with train_text_encoder, the text encoder
    too), an EMA copy of each (what the phase hands on), and one AdamW over both."""

    def __init__(self, cfg: PretrainConfig, pipe: StableDiffusionPipeline):
        self.cfg = cfg
        self.unet, self.text_encoder = pipe.unet, pipe.text_encoder
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.ema_text = None
        groups = [{"params": list(self.unet.parameters()), "lr": cfg.lr}]
        if cfg.train_text_encoder:
            self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False).eval()
            groups.append({"params": list(self.text_encoder.parameters()), "lr": cfg.text_encoder_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.peak_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.params = [p for group in groups for p in group["params"]]  # one gradient norm over both

    def load(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.cfg.train_text_encoder:
            self.text_encoder.load_state_dict(state["text_encoder"])
            self.ema_text.load_state_dict(state["ema_text_encoder"])

    def checkpoint(self, state: dict[str, Any], elapsed: float) -> dict[str, Any]:
        """`state` (step, losses) with the weights, the optimiser and the time spent so far."""
        state.update(unet=self.unet.state_dict(), ema=self.ema.state_dict(), optimizer=self.optimizer.state_dict(),
                     elapsed=elapsed)
        if self.cfg.train_text_encoder:
            state.update(text_encoder=self.text_encoder.state_dict(), ema_text_encoder=self.ema_text.state_dict())
        return state

    def train(self) -> None:
        self.unet.train().requires_grad_(True)
        self.text_encoder.train(self.cfg.train_text_encoder).requires_grad_(self.cfg.train_text_encoder)

    def step(self, loss: torch.Tensor, lr_scale: float) -> None:
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * lr_scale
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()

    def update_ema(self, decay: float) -> None:
        _update_ema(self.ema, self.unet, decay)
        if self.cfg.train_text_encoder:
            _update_ema(self.ema_text, self.text_encoder, decay)

    def hand_over(self, pipe: StableDiffusionPipeline) -> None:
        """The EMA weights become the pipeline's; the trained text encoder is frozen (or replaced)."""
        pipe.unet = self.ema
        if self.cfg.train_text_encoder:
            pipe.text_encoder = self.ema_text
        self.text_encoder.eval().requires_grad_(False)


class _Denoising:
    """The UNet's objective: noise added to a batch of latents at random timesteps, predicted back.

    Every draw of step `step` comes from one generator seeded by (seed, step), in a fixed order, so a
    resumed run repeats the uninterrupted run's batches exactly."""

    def __init__(self, cfg: PretrainConfig, pipe: StableDiffusionPipeline, latents: dict[str, torch.Tensor],
                 captions: Captions):
        self.cfg, self.pipe, self.captions = cfg, pipe, captions
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.scaling = float(latents["scaling_factor"])
        self.mean, self.std = latents["mean"], latents["std"]
        self.features = _prompt_features(pipe, [cfg.prompt, ""])
        self.rand = StepRandom(cfg.seed, len(self.mean), cfg.batch_size)

    def loss(self, unet, text_encoder, step: int) -> torch.Tensor:
        g = self.rand.generator(1, step)
        idx = self.rand.batch(1, step)
        # A fresh draw from each image's latent posterior (the cached mean and std), as encoding it would give.
        x0 = (self.mean[idx].float() + self.std[idx].float() * torch.randn(self.mean[idx].shape, generator=g)) \
            * self.scaling
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        cond = self._conditioning(text_encoder, idx, g)
        pred = unet(self.scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        target = noise if self.scheduler.config.prediction_type == "epsilon" else \
            self.scheduler.get_velocity(x0, noise, t)
        return F.mse_loss(pred, target)

    def _conditioning(self, text_encoder, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Each row's prompt embedding: "" for the dropped rows (what guidance compares against), else the
        prompt or (captions: names) the identity's named prompt."""
        cfg = self.cfg
        dropped = torch.rand(len(idx), generator=g) < cfg.prompt_dropout
        if cfg.captions == "names" or cfg.train_text_encoder:
            named = torch.rand(len(idx), generator=g) < (cfg.named_fraction if cfg.captions == "names" else 0.0)
            with torch.set_grad_enabled(cfg.train_text_encoder):
                return _encode(self.pipe, text_encoder, self.captions.for_rows(idx, dropped, named))
        return self.features[dropped.long()]  # row 0: the prompt, row 1: ""


# ---------------------------------------------------------------------------------------------
# The whole run


def _save_pipeline_atomically(pipe: StableDiffusionPipeline, target: Path, record: dict) -> str:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    fingerprint = base_fingerprint(tmp)
    (tmp / "training.json").write_text(json.dumps({**record, "fingerprint": fingerprint}, indent=2))
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return fingerprint


def pretrain_base(cfg: PretrainConfig, command: str | None = None) -> Path:
    """Run (or resume) both phases; returns the folder of the finished pipeline.

    `command` is recorded in training.json as what reproduces the run (default: this process's argv).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    _check_same_run(cfg)
    previous = [_load_checkpoint(cfg.out_dir / CHECKPOINT_DIR / f"{p}.pt") for p in ("unet", "vae")]
    clock = Clock(cfg, elapsed=next((s["elapsed"] for s in previous if s), 0.0))

    if cfg.init_from is not None:
        pipe = load_base_pipeline(cfg.init_from)
    else:
        pipe = build_tiny_pipeline(cfg.tiny, seed=cfg.seed)
    pipe.set_progress_bar_config(disable=True)
    images, identities = load_image_set(cfg)
    if cfg.init_from is not None:  # the VAE (and its scaling factor) come with the pipeline
        pipe.vae.eval().requires_grad_(False)
        vae_state = {"step": 0, "losses": [], "psnr": reconstruction_psnr(pipe.vae, images[:PSNR_IMAGES])}
    else:
        vae_state = train_vae(cfg, pipe, images, clock)
    latents = encode_latents(cfg, pipe.vae, images)
    captions = Captions(cfg, images, identities)
    unet_state = train_unet(cfg, pipe, latents, captions, clock)
    save_samples(cfg, pipe, pipe.unet, unet_state["step"], pipe.text_encoder, captions)

    record = {
        "config": to_dict(cfg),
        "seed": cfg.seed,
        "command": command or shlex.join(sys.argv),
        "num_images": len(images),
        "num_identities": int(identities.unique().numel()),
        "vae_steps": vae_state["step"],
        "vae_final_loss": _recent_mean(vae_state["losses"]),
        "vae_psnr_db": vae_state["psnr"],
        "scaling_factor": pipe.vae.config.scaling_factor,
        "unet_steps": unet_state["step"],
        "unet_final_loss": _recent_mean(unet_state["losses"]),
        "stopped_by_time_limit": unet_state["stopped_by_time_limit"],
        "wall_time_s": round(clock.elapsed, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "vae_losses": vae_state["losses"],
        "unet_losses": unet_state["losses"],
    }
    target = cfg.out_dir / PIPELINE_SUBDIR
    record["fingerprint"] = _save_pipeline_atomically(pipe, target, record)
    (cfg.out_dir / "training.json").write_text(json.dumps(record, indent=2))
    return target


# ---------------------------------------------------------------------------------------------
# Command line: python -m loraleak.base.pretrain --out-dir runs/base --unet-steps 2500 ...

PROG = "python -m loraleak.base.pretrain"


def parse_args(argv: Iterable[str] | None = None) -> PretrainConfig:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file of PretrainConfig settings (flags override it)")
    for f in dataclasses.fields(PretrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, metavar="VALUE",
                            help="YAML value, e.g. --tiny '{resolution: 64}'" if f.name == "tiny" else None)
    args = parser.parse_args(list(argv) if argv is not None else None)
    data = read_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(PretrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            data[f.name] = value if f.name in ("out_dir", "images", "prompt") else yaml.safe_load(value)
    return from_dict(PretrainConfig, data, where="pretrain")


def main(argv: Iterable[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        path = pretrain_base(parse_args(argv), command=shlex.join([*PROG.split(), *argv]))
    except LoraleakError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
