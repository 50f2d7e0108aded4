"""What a fine-tune is shown, step by step: latents of its photos and class images, prompts, random draws.

Everything random (data order, flips, VAE sampling, noise, timesteps; DP-SGD's Poisson rows) is
drawn from the fine-tune's own CPU generator seeded with `cfg.seed`, in one fixed order
(`FinetuneStream.draw`), so one seed gives the same data on any device, one fine-tune at a time or K
side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from PIL import Image

from ..errors import InputError
from ..imaging import center_crop_resize, to_tensor
from .class_images import load_or_sample_class_images, pipeline_fingerprint
from .config import FinetuneConfig


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


class LatentBank:
    """Posterior parameters of a set of images (and of their mirror images when flips are on).

    Encoded on `device`; `on_cpu` keeps them on the CPU afterwards (K fine-tunes' latents then move
    to the device in one copy per step, instead of one small blocking copy per draw)."""

    def __init__(self, vae: Any, images: list[Image.Image], resolution: int, device: torch.device,
                 hflip: bool, on_cpu: bool = False) -> None:
        pixels = to_tensor([center_crop_resize(im, resolution) for im in images])
        views = [pixels, pixels.flip(-1)] if hflip else [pixels]
        stats = [_latent_distributions(vae, v, device) for v in views]
        self.mean = torch.stack([m for m, _ in stats])  # (views, N, C, h, w)
        self.std = torch.stack([s for _, s in stats])
        if on_cpu:
            self.mean, self.std = self.mean.cpu(), self.std.cpu()
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


def token_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_tokens(text_encoder: Any, ids: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings exactly as StableDiffusionPipeline.encode_prompt makes them (no clip skip)."""
    ids = ids.to(text_encoder.device)
    mask = torch.ones_like(ids) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(ids, attention_mask=mask)[0]


def shuffled_indices(length: int, generator: torch.Generator) -> Iterator[int]:
    """Epoch after epoch of a random permutation of range(length), like a shuffling DataLoader."""
    while True:
        yield from torch.randperm(length, generator=generator).tolist()


class Draw(NamedTuple):
    """One step's data of one fine-tune: `private_rows` photo rows, then `class_rows` class rows.
    latents None: a step with no row at all (a DP-SGD Poisson draw that took no photo, no class rows)."""

    latents: torch.Tensor | None
    noise: torch.Tensor | None
    timesteps: torch.Tensor | None
    private_rows: int
    class_rows: int


class FinetuneStream:
    """The random draws of one fine-tune, from its own generator; `defense.before_step` picks the
    private rows of each step (the plain recipe: the next batch_size photos of the shuffled order)."""

    def __init__(self, cfg: FinetuneConfig, instance_bank: LatentBank, class_bank: LatentBank | None,
                 num_train_timesteps: int, defense: Any) -> None:
        self.cfg, self.instance_bank, self.class_bank = cfg, instance_bank, class_bank
        self.num_train_timesteps, self.defense = num_train_timesteps, defense
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed)
        dataset_len = max(len(instance_bank), len(class_bank)) if class_bank else len(instance_bank)
        self.order = shuffled_indices(dataset_len, self.generator)

    def draw(self) -> Draw:
        """Latents (private rows, then class rows), noise and timesteps of the next step, where the banks are."""
        g = self.generator
        rows = [next(self.order) for _ in range(self.cfg.batch_size)]
        instance_rows = self.defense.before_step([i % len(self.instance_bank) for i in rows],
                                                 len(self.instance_bank), g)
        parts = [self.instance_bank.sample(instance_rows, g)] if instance_rows else []
        if self.class_bank is not None:  # instance and class in one UNet pass, as diffusers' example does
            parts.append(self.class_bank.sample([i % len(self.class_bank) for i in rows], g))
        class_rows = len(rows) if self.class_bank is not None else 0
        if not parts:
            return Draw(None, None, None, 0, 0)
        latents = torch.cat(parts)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), generator=g)
        return Draw(latents, noise, timesteps, len(instance_rows), class_rows)


def finetune_streams(vae: Any, cfgs: Sequence[FinetuneConfig], image_sets: Sequence[list[Image.Image]],
                     class_sets: Sequence[list[Image.Image] | None], defenses: Sequence[Any], resolution: int,
                     device: torch.device, num_train_timesteps: int, on_cpu: bool) -> list[FinetuneStream]:
    """One stream per fine-tune; fine-tunes given the same class image list (and flips) share its bank."""
    class_banks: dict[tuple[int, bool], LatentBank] = {}  # by (id of the image list, flips)
    streams = []
    for cfg, images, class_set, defense in zip(cfgs, image_sets, class_sets, defenses):
        class_bank = None
        if class_set is not None:
            key = (id(class_set), cfg.hflip)
            if key not in class_banks:
                class_banks[key] = LatentBank(vae, class_set, resolution, device, cfg.hflip, on_cpu)
            class_bank = class_banks[key]
        instance_bank = LatentBank(vae, images, resolution, device, cfg.hflip, on_cpu)
        streams.append(FinetuneStream(cfg, instance_bank, class_bank, num_train_timesteps, defense))
    return streams


def class_image_sets(pipe: Any, cfgs: Sequence[FinetuneConfig], given: Sequence[list[Image.Image] | None] | None,
                     base_fingerprint: str | None, show_progress: bool
                     ) -> tuple[list[list[Image.Image] | None], list[Path | None], str | None]:
    """Each fine-tune's prior-preservation images (given, else loaded or sampled once per distinct
    setting), the cache directories they came from, and the base fingerprint (hashed if a cache needs it)."""
    k_count = len(cfgs)
    if not cfgs[0].prior_preservation:
        return [None] * k_count, [None] * k_count, base_fingerprint
    sets: list[list[Image.Image] | None] = list(given) if given is not None else [None] * k_count
    dirs: list[Path | None] = [None] * k_count
    sampled: dict[tuple, tuple[list[Image.Image], Path | None]] = {}
    for k, cfg in enumerate(cfgs):
        if sets[k] is not None:
            continue
        if cfg.class_images_dir is not None and base_fingerprint is None:
            base_fingerprint = pipeline_fingerprint(pipe)
        key = (cfg.class_images_dir, cfg.class_prompt, cfg.num_class_images, cfg.class_images_seed,
               cfg.class_inference_steps, cfg.class_guidance_scale)
        if key not in sampled:
            sampled[key] = load_or_sample_class_images(
                pipe, cfg.class_images_dir, prompt=cfg.class_prompt, count=cfg.num_class_images,
                seed=cfg.class_images_seed, num_inference_steps=cfg.class_inference_steps,
                guidance_scale=cfg.class_guidance_scale, base_fingerprint=base_fingerprint,
                show_progress=show_progress)
        sets[k], dirs[k] = sampled[key]
    if any(not images for images in sets):
        raise InputError("prior preservation needs class images for every fine-tune")
    return sets, dirs, base_fingerprint
