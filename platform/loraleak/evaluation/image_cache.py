"""The images of one evaluation condition, kept by content and shared by every evaluation that asks again.

Sweeps that vary only the attack evaluate the same victims under the same conditions trial after trial:
org, the controls, base and the baselines come out the same each time, only rec differs. An entry is
one condition's images for one victim, under a key over everything that decides them (`condition_key`):

    the pipeline    its weights (UNet, VAE, text encoder, tokenizer), scheduler, dtype and device kind,
                    the versions of the packages that sample, and the source of loraleak's sampling code
    the sampling    n_images, the victim's seed, sample steps, guidance scale, resolution
    the condition   the victim's LoRA file (sha256) and the prompt text; or, for an attack, its saved
                    folder's content hash, the LoRA file and snapshot step (and the attacks' source code)

Only images are kept (PNG bytes, lossless); scores are recomputed, since the scorer and the candidates
may differ between evaluations. A hit gives back exactly the bytes that were generated and written.

On disk: `<root>/<key[:2]>/<key>/000.png ...` and `entry.json` (the files' sha256, what the key was
made of), written into a private folder `.<key>.tmp-<pid>-<id>` (entry.json last) and renamed into
place in one step, so a reader sees a whole entry or none. Several Ray workers and trials may write at
once: the first rename wins and the others drop their copy. An entry that does not read back as
written (a file missing, a hash that differs) is a miss: logged, generated again and replaced.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..attack.api import LeakageAttack
from ..base.loading import load_base_pipeline
from ..finetune.class_images import pipeline_fingerprint, pipeline_resolution
from ..generate import generate_images
from ..keys import content_key

logger = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"  # written last: an entry folder without it is not one
KEY_CHARS = 32
STALE_S = 3600  # a private folder this old is what a killed writer left (a write takes milliseconds)
# The packages whose code turns settings into pixels (another version may draw other pixels) and into PNG
# bytes (pillow: another zlib setting, other bytes for the same pixels).
SAMPLING_PACKAGES = ("torch", "diffusers", "transformers", "peft", "safetensors", "numpy", "pillow")


@dataclass(frozen=True)
class CachedImages:
    images: list[bytes]  # PNG bytes, as generated
    prompt: str  # what the evaluation records as the condition's prompt


def _source_digest(*roots: Path) -> str:
    """sha256 over loraleak's own Python files that sample (or answer an attack): an edit to them is a miss,
    never a stale image."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def generation_context(pipe: Any, autocast: torch.dtype | None = None) -> dict[str, Any]:
    """What every condition's images depend on besides the condition: the loaded pipeline and the code
    (`autocast`: the dtype it samples under autocast, None for none). Computed once per worker (hashing SD
    1.4's weights takes seconds)."""
    device = pipe.device
    # Only when set: the keys of images sampled without autocast stay those they had before it existed.
    precision = {} if autocast is None else {
        "autocast": str(autocast), "attention": type(next(iter(pipe.unet.attn_processors.values()))).__name__}
    return {**precision, "pipeline": pipeline_fingerprint(pipe), "resolution": pipeline_resolution(pipe),
            "scheduler": {"class": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)},
            "dtype": str(pipe.unet.dtype),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "packages": {name: _version(name) for name in SAMPLING_PACKAGES},
            "sampling_code": _source_digest(Path(inspect.getfile(generate_images)),
                                            Path(inspect.getfile(load_base_pipeline)))}


def attack_code() -> str:
    """The digest of loraleak's attack code (loraleak/attack): part of the keys of the attacks' conditions only."""
    return _source_digest(Path(inspect.getfile(LeakageAttack)).parent)  # loraleak/attack and its baselines


def condition_key(context: Mapping[str, Any], sample: Mapping[str, Any], **condition: Any) -> str:
    """The key of one condition's images: the pipeline and code (`generation_context`), the sampling settings
    (`sample`: n, seed, steps, guidance scale) and the condition's own inputs (lora, prompt, attack...)."""
    return content_key({"context": dict(context), "sample": dict(sample), "condition": condition}, KEY_CHARS)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ImageCache:
    """Condition images by key under `root` (see the module's docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> CachedImages | None:
        """The entry's images, or None when there is none or it does not read back as written."""
        folder = self.folder(key)
        if not (folder / ENTRY_FILE).is_file():
            return None
        try:
            return self._read(key)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("image cache: entry %s is unreadable (%s); generating it again", folder, e)
            return None

    def _read(self, key: str) -> CachedImages:
        folder = self.folder(key)
        entry = json.loads((folder / ENTRY_FILE).read_text())
        images = [(folder / name).read_bytes() for name in entry["files"]]
        if entry["key"] != key or [hashlib.sha256(b).hexdigest() for b in images] != entry["sha256"]:
            raise ValueError("its files differ from those it recorded")
        return CachedImages(images, entry["prompt"])

    def _readable(self, key: str) -> bool:
        try:
            self._read(key)
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def put(self, key: str, images: Sequence[bytes], prompt: str, inputs: Mapping[str, Any]) -> None:
        """Keep `images` under `key` (`inputs`: what the key was made of, for a reader of the folder). A failure to
        write is logged, never raised: the evaluation has its images either way."""
        folder = self.folder(key)
        stage = folder.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            stage.mkdir()
            files = [f"{i:03d}.png" for i in range(len(images))]
            for name, data in zip(files, images):
                (stage / name).write_bytes(data)
            entry = {"key": key, "files": files, "sha256": [hashlib.sha256(b).hexdigest() for b in images],
                     "prompt": prompt, "inputs": dict(inputs)}
            (stage / ENTRY_FILE).write_text(json.dumps(entry, indent=1, default=str))
            try:
                os.replace(stage, folder)  # onto nothing (or an empty folder): the entry appears whole
            except OSError:
                if self._readable(key):
                    return  # another writer's entry, the same images: keep it
                shutil.rmtree(folder, ignore_errors=True)  # a damaged entry: ours replaces it
                os.replace(stage, folder)
        except OSError as e:
            logger.warning("image cache: could not write %s (%s); the evaluation goes on without it", folder, e)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def remove_stale(self) -> list[Path]:
        """Remove private folders that killed writers left (older than STALE_S: a live writer's are seconds old)."""
        now, removed = time.time(), []
        for stage in self.root.glob("*/.*.tmp-*"):
            try:
                if now - stage.stat().st_mtime > STALE_S:
                    shutil.rmtree(stage, ignore_errors=True)
                    removed.append(stage)
            except OSError:
                continue  # removed by another evaluation meanwhile
        return removed
