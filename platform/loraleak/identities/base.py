"""What every identity source yields: a person and a way to load their private photos."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from PIL import Image


@dataclass(frozen=True)
class Identity:
    """One person: a stable id and a loader for their photos as RGB `size`x`size` images.

    `load(size)` returns a list of PIL RGB images; it may skip unreadable files (logging why).
    `image_keys` names each photo stably (file path or generator index) so that fine-tune ids and
    manifests can hash what a fine-tune saw without decoding images.
    """

    identity_id: str
    image_keys: tuple[str, ...]
    _loader: Callable[[int], list[Image.Image]] = field(repr=False, compare=False)

    def load(self, size: int) -> list[Image.Image]:
        return self._loader(size)


class IdentitySource(Protocol):
    """A collection of identities (synthetic generator, folder of photos...)."""

    name: str

    def identities(self) -> Sequence[Identity]: ...


def image_sha256(image: Image.Image) -> str:
    """Content hash of a decoded image (mode, size and pixels), independent of file format."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()

