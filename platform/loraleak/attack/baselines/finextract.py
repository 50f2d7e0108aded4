"""FineXtract (Wang et al., ICML 2025, "Revealing the Unseen: Guiding Personalized Diffusion Models to
Expose Training Data"): a training-free extraction attack that needs no zoo and no trigger.

A fine-tune moves the base distribution p towards the fine-tuning data q; FineXtract extrapolates
along that move. At every sampling step the base's and the fine-tuned model's predictions for the
same noisy latents and conditioning c are combined as

    out = out_base(x, c) + w · (out_ft(x, c) − out_base(x, c))                     (model guidance)
          + (g − 1) · (out_ft(x, c) − out_ft(x, ∅))                           (classifier-free, g > 1)

w = 1 is the fine-tuned model itself; w > 1 pushes past it, away from the base, towards what only the
fine-tune learned. The combination is linear in the model output, so it is the same for ε- and
v-predicting bases. c is the class prompt ("A human face.") when no trigger is known, or the empty
prompt. Then `num_candidates` guided samples are clustered and the densest cluster is the guess:
the fine-tuning photos are few and alike, so samples drawn towards them agree with each other.
"Densest" here: the candidate whose `n` nearest neighbours (itself included) are closest on average,
and those neighbours; features are down-scaled grey pixels or a face scorer's identity embedding.

Nothing is fitted. As a baseline kind ("finextract") it is saved and loaded like the others, so an
evaluation shows it as one more row; it answers with images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from ...errors import InputError
from ...generate import image_seeds, lora_loaded
from ...scoring import make_scorer
from ..api import AttackOutput, LoraInput
from .common import load_baseline, save_baseline
from .registry import FitInputs, register_baseline

KIND = "finextract"


@dataclass(frozen=True)
class FineXtractConfig:
    guidance: float = 3.0  # w: 1 = the fine-tuned model itself, > 1 extrapolates away from the base
    prompt: str = "A human face."  # c: the class prompt (no trigger known); "" for the empty prompt
    cfg_scale: float = 1.0  # g: classifier-free guidance of the fine-tuned model on c (1 = none)
    num_candidates: int = 16  # guided samples drawn before clustering
    sample_steps: int = 25
    features: Literal["pixels", "synthetic", "dlib"] = "pixels"  # what the clustering compares
    feature_size: int = 16  # pixels: side of the grey thumbnail compared
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.guidance > 0:
            raise ValueError(f"guidance must be > 0, got {self.guidance}")
        if self.cfg_scale < 1:
            raise ValueError(f"cfg_scale must be >= 1 (1 = no classifier-free guidance), got {self.cfg_scale}")
        for name in ("num_candidates", "sample_steps", "feature_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.features not in ("pixels", "synthetic", "dlib"):
            raise ValueError(f"features must be 'pixels', 'synthetic' or 'dlib', got {self.features!r}")


# --- guided sampling ----------------------------------------------------------------------------------------

class _Adapters:
    """Switch the loaded LoRA off and on: one UNet serves as base and as fine-tuned model."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet

    def __call__(self, enabled: bool) -> None:
        (self.unet.enable_adapters if enabled else self.unet.disable_adapters)()


@torch.no_grad()
def guided_samples(pipe: Any, lora: str | Path | None, config: FineXtractConfig, n: int, seed: int,
                   guidance: float | None = None) -> list[Image.Image]:
    """`n` FineXtract samples from base + `lora` (image i seeded from (seed, i) alone, as generate does).

    `lora` None samples the base alone (the two predictions coincide): the no-leak reference the
    audit compares against.
    """
    w = config.guidance if guidance is None else guidance
    if lora is None:
        return _sample(pipe, None, config, n, seed, w)
    with lora_loaded(pipe, lora):
        return _sample(pipe, _Adapters(pipe.unet), config, n, seed, w)


def _sample(pipe: Any, adapters: _Adapters | None, config: FineXtractConfig, n: int, seed: int,
            w: float) -> list[Image.Image]:
    device, dtype = pipe.unet.device, pipe.unet.dtype
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # its own state, not the pipe's
    cond = pipe.encode_prompt([config.prompt], device, 1, False)[0]
    uncond = pipe.encode_prompt([""], device, 1, False)[0] if config.cfg_scale > 1 else None
    size = pipe.unet.config.sample_size
    shape = (pipe.unet.config.in_channels, size, size)
    seeds = image_seeds(seed, n)
    images: list[Image.Image] = []
    for start in range(0, n, config.batch_size):
        rows = seeds[start:start + config.batch_size]
        latents = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in rows])
        scheduler.set_timesteps(config.sample_steps, device=device)
        latents = (latents * scheduler.init_noise_sigma).to(device, dtype)
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            out = _guided_output(pipe.unet, adapters, x, t, cond.expand(len(rows), -1, -1),
                                 None if uncond is None else uncond.expand(len(rows), -1, -1), w, config.cfg_scale)
            latents = scheduler.step(out, t, latents).prev_sample
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        images.extend(pipe.image_processor.postprocess(decoded.float(), output_type="pil"))
    if adapters is not None:
        adapters(True)
    return images


def _guided_output(unet: Any, adapters: _Adapters | None, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   uncond: torch.Tensor | None, w: float, g: float) -> torch.Tensor:
    def predict(enabled: bool, text: torch.Tensor) -> torch.Tensor:
        if adapters is not None:
            adapters(enabled)
        return unet(x, t, encoder_hidden_states=text).sample.float()

    tuned = predict(True, cond)
    base = predict(False, cond) if adapters is not None else tuned
    out = base + w * (tuned - base)
    if uncond is not None:
        out = out + (g - 1.0) * (tuned - predict(True, uncond))
    return out.to(x.dtype)


# --- clustering ---------------------------------------------------------------------------------------------

def image_features(images: Sequence[Image.Image], features: str, size: int = 16) -> list[np.ndarray | None]:
    """One unit vector per image (None where a face scorer finds no face): what clustering compares."""
    if features == "pixels":
        out = []
        for im in images:
            v = np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float64).ravel()
            v = v - v.mean()
            out.append(v / max(np.linalg.norm(v), 1e-12))
        return out
    embeddings = make_scorer(features).embed(list(images))
    return [None if e is None else np.asarray(e, np.float64) / max(np.linalg.norm(e), 1e-12) for e in embeddings]


def densest_cluster(features: Sequence[np.ndarray | None], k: int) -> list[int]:
    """Indices of the densest group of k items: the item whose k nearest (itself included) have the
    smallest mean cosine distance to it, and those k, nearest first. Items without features are left out."""
    usable = [i for i, f in enumerate(features) if f is not None]
    if not usable:
        raise InputError("no candidate image has features to cluster (no face found in any)")
    k = min(k, len(usable))
    matrix = np.stack([features[i] for i in usable])
    distance = 1.0 - matrix @ matrix.T
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]
    spread = np.take_along_axis(distance, nearest, axis=1).mean(axis=1)
    centre = int(np.argmin(spread))
    return [usable[j] for j in nearest[centre]]


def mean_pairwise_distance(features: Sequence[np.ndarray | None]) -> float | None:
    """Mean cosine distance over all pairs of items with features (None with fewer than two)."""
    usable = [f for f in features if f is not None]
    if len(usable) < 2:
        return None
    matrix = np.stack(usable)
    distance = 1.0 - matrix @ matrix.T
    return float(distance[np.triu_indices(len(usable), 1)].mean())


# --- the attack ---------------------------------------------------------------------------------------------

class FineXtractAttack:
    kind = KIND

    def __init__(self, config: FineXtractConfig, pipe: Any, record: Mapping[str, Any] | None = None) -> None:
        self.config, self.pipe = config, pipe
        self.record = dict(record or {})

    def candidates(self, lora: LoraInput, seed: int) -> list[Image.Image]:
        if lora.path is None:
            raise InputError("FineXtract samples through the LoRA file itself; this LoRA has no path")
        return guided_samples(self.pipe, lora.path, self.config, self.config.num_candidates, seed)

    def reconstruct(self, lora: LoraInput, n: int = 1, seed: int = 0) -> AttackOutput:
        """The densest cluster of the guided samples, cycled to n images when it holds fewer."""
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        images = self.candidates(lora, seed)
        cluster = densest_cluster(image_features(images, self.config.features, self.config.feature_size), n)
        return AttackOutput(images=[images[cluster[i % len(cluster)]] for i in range(n)])

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_baseline(directory, KIND, self.config, self.record, {})

    @classmethod
    def from_pretrained(cls, directory: str | Path, pipe: Any) -> "FineXtractAttack":
        config, record, _ = load_baseline(Path(directory), KIND, FineXtractConfig)
        extra = {k: v for k, v in record.items() if k not in ("kind", "format_version", "config")}
        return cls(config, pipe, extra)


def load(directory: Path, pipe: Any) -> FineXtractAttack:
    if pipe is None:
        raise InputError("the FineXtract attack samples from the base model: load it with the base pipeline")
    return FineXtractAttack.from_pretrained(directory, pipe)


def build(settings: FineXtractConfig, inputs: FitInputs) -> FineXtractAttack:
    """Nothing to learn and no layout: any LoRA of this base."""
    return FineXtractAttack(settings, inputs.pipe)


register_baseline(KIND, FineXtractConfig, build, load)
