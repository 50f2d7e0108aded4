"""Small image utilities shared by every stage: grids, tensors <-> PIL, safe image decoding."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile equally sized images row by row into one RGB image."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), background)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im.convert("RGB").resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def save_grid(images: Sequence[Image.Image], path: str | Path, ncols: int | None = None,
              scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, ncols)
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(path)
    return path


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> float tensor (N, 3, H, W) in [-1, 1], the diffusers convention."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully (so truncation is caught here), as RGB; InputError if unusable."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"unreadable image {path}: {e}") from None


def center_crop_resize(image: Image.Image, size: int, crop_fraction: float = 1.0) -> Image.Image:
    """Centre square crop of `crop_fraction` of the short side, resized to `size` (bicubic)."""
    w, h = image.size
    side = int(round(min(w, h) * crop_fraction))
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
