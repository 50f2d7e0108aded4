"""Prior-preservation class images: sampled once per base model, cached, shared by every fine-tune.

DreamBooth's prior loss needs images of the class ("A human face.") from the *base* model. They
depend only on the base and the sampling settings, not on the person being fine-tuned, so they are
sampled once and kept as PNGs in a directory named by a key over (base fingerprint, prompt, count,
seed, sampler settings, resolution). The directory appears by an atomic rename only when complete:
a killed run leaves a temporary directory behind, never a half cache that looks finished, and two
workers racing to fill the same cache both end up using one complete copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import InputError
from ..generate import generate_images
from ..identities.base import image_sha256
from ..imaging import open_rgb
from ..keys import content_key

MANIFEST = "manifest.json"
PROGRESS_DESC = "class images"  # the bar of their sampling (once per zoo: loraleak.zoo.build)


def pipeline_resolution(pipe: Any) -> int:
    """Image side length the pipeline's UNet was built for (64 latent px * 8 = 512 for SD 1.4)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def pipeline_fingerprint(pipe: Any) -> str:
    """sha256 over the weights of the UNet, VAE and text encoder (and the tokenizer's vocabulary).

    The fallback when no base reference is known; hashing SD 1.4 this way takes a few seconds.
    """
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder"):
        for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
            h.update(f"{name}.{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(pipe.tokenizer.get_vocab(), sort_keys=True).encode())
    return h.hexdigest()


def class_images_settings(base_fingerprint: str, prompt: str, count: int, seed: int,
                          num_inference_steps: int, guidance_scale: float, resolution: int) -> dict[str, Any]:
    return {"base_fingerprint": base_fingerprint, "prompt": prompt, "count": count, "seed": seed,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            "resolution": resolution}


def class_images_dir(root: Path, settings: dict[str, Any]) -> Path:
    """`root/<prompt-slug>-<count>-<key>`: readable at a glance, unique by the key."""
    key = content_key(settings, 16)
    slug = re.sub(r"[^a-z0-9]+", "-", settings["prompt"].lower()).strip("-")[:40] or "class"
    return root / f"{slug}-{settings['count']}-{key}"


def _read_cache(directory: Path, settings: dict[str, Any]) -> list[Image.Image]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        raise InputError(f"class image cache {directory} has no readable {MANIFEST}; delete the directory "
                         "to sample it again") from None
    if manifest.get("settings") != settings or len(manifest.get("files", [])) != settings["count"]:
        raise InputError(f"class image cache {directory} does not match its settings; delete it to sample again")
    try:
        images = [open_rgb(directory / name) for name in manifest["files"]]
    except InputError as e:
        raise InputError(f"class image cache {directory} is damaged ({e}); delete it to sample it again") from None
    if [image_sha256(im) for im in images] != manifest["sha256"]:
        raise InputError(f"class image cache {directory} was modified; delete it to sample it again")
    return images


def _write_cache(directory: Path, images: list[Image.Image], settings: dict[str, Any]) -> None:
    """Write into a private temporary directory, then rename it into place in one step."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = [f"{i:05d}.png" for i in range(len(images))]
        for name, image in zip(files, images):
            image.save(tmp / name)
        manifest = {"settings": settings, "files": files, "sha256": [image_sha256(im) for im in images]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            tmp.rename(directory)
        except OSError:
            if not (directory / MANIFEST).is_file():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_sample_class_images(pipe: Any, cache_root: Path | None, *, prompt: str, count: int, seed: int,
                                num_inference_steps: int, guidance_scale: float,
                                base_fingerprint: str | None = None,
                                show_progress: bool = True) -> tuple[list[Image.Image], Path | None]:
    """The class images for this base and settings, from the cache when present (else sampled, with a
    "class images" bar when `show_progress`).

    With `cache_root` None nothing is cached. Returns the images and the cache directory used.
    """
    if cache_root is None:
        images = generate_images(pipe, prompt, n=count, seed=seed, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, show_progress=show_progress,
                                 progress_desc=PROGRESS_DESC)
        return images, None
    fingerprint = base_fingerprint or pipeline_fingerprint(pipe)
    settings = class_images_settings(fingerprint, prompt, count, seed, num_inference_steps, guidance_scale,
                                     pipeline_resolution(pipe))
    directory = class_images_dir(Path(cache_root), settings)
    if not directory.is_dir():
        images = generate_images(pipe, prompt, n=count, seed=seed, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, show_progress=show_progress,
                                 progress_desc=PROGRESS_DESC)
        _write_cache(directory, images, settings)
    return _read_cache(directory, settings), directory
