"""Sampling images from an SD pipeline, optionally through a LoRA file, reproducibly.

Image i of a call starts from noise of its own generator, seeded from (seed, i) alone, so the same
image comes back whatever `n` is asked for, and on any device (the noise is drawn on the CPU). A
different `batch_size` can move a pixel by one level (floating-point summation order), no more.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import InputError, LoraleakError
from .lora.io import check_lora_fits, loaded_adapters, read_lora, resolve_lora_file

GENERATE_ADAPTER_NAME = "loraleak_generate"


def image_seeds(seed: int, n: int) -> list[int]:
    """Independent per-image seeds: image i's seed depends on (seed, i) only, never on n."""
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(n)]


@contextmanager
def lora_loaded(pipe: Any, lora: str | Path, scale: float = 1.0) -> Iterator[None]:
    """Load a LoRA (after checking it is safetensors and fits this base), unload it on exit."""
    path = resolve_lora_file(lora)
    state_dict, _ = read_lora(path)
    check_lora_fits(state_dict, pipe, path)
    already = loaded_adapters(pipe)
    if already:
        raise LoraleakError(f"the pipeline already has LoRA adapters loaded ({', '.join(already)}); "
                            "generate through one LoRA at a time")
    # From the file, not the state dict: only the file carries the adapter metadata (lora_alpha).
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=GENERATE_ADAPTER_NAME)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        # `read_lora` and `check_lora_fits` refuse every bad file we know of; whatever diffusers still finds
        # is a problem of the file too: one line, and the pipeline left without a half-loaded adapter.
        if GENERATE_ADAPTER_NAME in loaded_adapters(pipe):
            pipe.unload_lora_weights()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InputError(f"{path}: diffusers cannot load this LoRA: {first}") from None
    try:
        pipe.set_adapters(GENERATE_ADAPTER_NAME, adapter_weights=scale)
        yield
    finally:
        pipe.unload_lora_weights()


@torch.no_grad()
def generate_images(pipe: Any, prompt: str | None = None, prompt_embeds: torch.Tensor | None = None,
                    n: int = 8, seed: int = 0, num_inference_steps: int = 25, guidance_scale: float = 1.0,
                    lora: str | Path | None = None, lora_scale: float = 1.0, batch_size: int = 8,
                    show_progress: bool = False, progress_desc: str = "generating") -> list[Image.Image]:
    """`n` images for a text prompt or for ready prompt embeddings (1 or n rows), optionally via a LoRA.
    With `show_progress`, one bar over the images (`progress_desc`: what it is labelled), with its ETA.

    guidance_scale 1 means no classifier-free guidance (what the attack's decoder uses by default).
    """
    if (prompt is None) == (prompt_embeds is None):
        raise LoraleakError("generate_images needs exactly one of prompt or prompt_embeds")
    if n < 1 or batch_size < 1:
        raise LoraleakError(f"n and batch_size must be >= 1, got n={n} batch_size={batch_size}")
    if prompt_embeds is not None:
        if prompt_embeds.ndim == 2:
            prompt_embeds = prompt_embeds[None]
        if prompt_embeds.shape[0] not in (1, n):
            raise LoraleakError(f"prompt_embeds has {prompt_embeds.shape[0]} rows; expected 1 or n={n}")
        prompt_embeds = prompt_embeds.expand(n, *prompt_embeds.shape[1:])
        prompt_embeds = prompt_embeds.to(pipe.device, pipe.unet.dtype)
    seeds = image_seeds(seed, n)
    pipe.set_progress_bar_config(disable=True)  # one bar over all images instead of one per batch

    def sample() -> list[Image.Image]:
        images: list[Image.Image] = []
        progress = tqdm(total=n, desc=progress_desc, unit="image", disable=not show_progress)
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[rows]]
            text = {"prompt": [prompt] * len(generators)} if prompt is not None \
                else {"prompt_embeds": prompt_embeds[rows]}
            out = pipe(**text, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       generator=generators, output_type="pil")
            images.extend(out.images)
            progress.update(len(out.images))
        progress.close()
        return images

    if lora is None:
        return sample()
    with lora_loaded(pipe, lora, lora_scale):
        return sample()

