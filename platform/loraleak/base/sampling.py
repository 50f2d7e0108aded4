"""Draw images from a Stable Diffusion pipeline reproducibly (the paper: DPM-Solver, 25 steps)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 3.0  # classifier-free guidance; 3 served the tiny bases best (real-faces-on-cpu.md)


@torch.no_grad()
def sample_images(pipe: StableDiffusionPipeline, prompt: str, n: int, seed: int,
                  steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE) -> list[Image.Image]:
    """`n` PIL images for `prompt`; the same seed gives the same images."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    # Noise drawn on the CPU: identical images whatever device the pipeline runs on.
    latents = torch.randn(shape, generator=generator).to(pipe.device, pipe.unet.dtype)
    return pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance_scale,
                latents=latents, output_type="pil").images

