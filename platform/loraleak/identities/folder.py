"""Identities from a folder of photos: `ROOT/<identity>/*.jpg|png` (LFW, CelebA-HQ by identity,
VGGFace2, ORL, a user's own photos).

Every file is decoded when the identities are listed, so a corrupt or truncated image is skipped
once, with a logged reason, rather than failing a fine-tune hours later; an identity left with
fewer than `min_images` readable photos is skipped the same way.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from PIL import Image

from ..errors import InputError
from ..imaging import center_crop_resize, open_rgb
from .base import Identity

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm")


def _load_images(paths: tuple[Path, ...], crop_fraction: float, size: int) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            image = open_rgb(path)
        except InputError as e:  # the file changed since it was listed
            logger.warning("skipping %s: %s", path, e)
            continue
        images.append(center_crop_resize(image, size, crop_fraction))
    return images


class FolderIdentities:
    """One identity per subfolder of `root` (sorted; the id is the folder name).

    `crop_fraction` is the centre square kept, as a fraction of the short side, before resizing:
    LFW's 250 px images hold the face in the centre ~120 px, so 0.48 suits LFW.
    `max_images` keeps the first readable images in file-name order.
    """

    name = "folder"

    def __init__(self, root: str | Path, min_images: int = 5, max_images: int | None = None,
                 crop_fraction: float = 1.0, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        if min_images < 1:
            raise ValueError(f"min_images must be >= 1, got {min_images}")
        if max_images is not None and max_images < min_images:
            raise ValueError(f"max_images ({max_images}) must be >= min_images ({min_images})")
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.root = Path(root).expanduser()
        self.min_images = min_images
        self.max_images = max_images
        self.crop_fraction = crop_fraction
        self.extensions = tuple(e.lower() for e in extensions)
        self._identities: list[Identity] | None = None

    def _readable_images(self, folder: Path) -> list[Path]:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in self.extensions)
        readable = []
        for path in files:
            if self.max_images is not None and len(readable) >= self.max_images:
                break
            try:
                open_rgb(path)
            except InputError as e:
                logger.warning("skipping image %s: %s", path, e)
                continue
            readable.append(path)
        return readable

    def identities(self) -> list[Identity]:
        if self._identities is None:
            self._identities = self._scan()
        return self._identities

    def _scan(self) -> list[Identity]:
        if not self.root.is_dir():
            raise InputError(f"identity folder not found: {self.root}")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise InputError(f"no identity subfolders in {self.root} (expected ROOT/<identity>/<images>)")
        found, too_few = [], []
        for folder in folders:
            paths = self._readable_images(folder)
            if len(paths) < self.min_images:
                logger.debug("skipping identity %s: %d readable image(s), need at least %d",
                             folder.name, len(paths), self.min_images)
                too_few.append(f"{folder.name} ({len(paths)})")
                continue
            keys = tuple(f"{folder.name}/{p.name}" for p in paths)
            loader = functools.partial(_load_images, tuple(paths), self.crop_fraction)
            found.append(Identity(folder.name, keys, loader))
        if too_few:  # one line: on LFW most folders are too small, and every stage lists the identities
            logger.warning("skipping %d of %d identities in %s with fewer than %d readable images: %s%s",
                           len(too_few), len(folders), self.root, self.min_images, ", ".join(too_few[:5]),
                           ", ..." if len(too_few) > 5 else "")
        if not found:
            raise InputError(f"no identity in {self.root} has at least {self.min_images} readable images")
        return found
