"""A zoo's prior-preservation class images: sampled once per build, before any worker starts.

Every fine-tune of a zoo with prior preservation needs the same class images of the base. The
build's driver samples them once, with their own progress bar, into the cache the workers read
(without this each worker sampled the same images at start, silently, side by side).

A zoo on a local root keeps that cache inside the root. A zoo on remote storage (`s3://`, `gs://`)
has workers on other nodes, each with its own disk: the driver samples into its node's cache and
uploads the finished folder to ROOT/class_images/<name>/ (the PNGs first, the manifest last, so a
folder with a manifest is complete); a worker whose node lacks the folder downloads it into its
node's cache before reading it. No worker samples what the driver already did.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..base.loading import load_base_pipeline
from ..finetune.class_images import (MANIFEST, class_images_dir, class_images_settings, load_or_sample_class_images,
                                     pipeline_resolution)
from .config import ZooConfig
from .plan import ZooPlan
from .storage import ZooStore

logger = logging.getLogger(__name__)

SHARED_DIR = "class_images"  # under a remote zoo root


def class_images_cache(cfg: ZooConfig, store: ZooStore) -> Path:
    """Where this node caches a zoo's prior-preservation images (keyed inside by base and settings)."""
    return cfg.finetune.class_images_dir or (Path(store.path) / SHARED_DIR if store.is_local
                                             else Path.home() / ".cache" / "loraleak" / SHARED_DIR)


def _shares(cfg: ZooConfig, store: ZooStore) -> bool:
    """Whether the node caches must be filled through the root: remote storage, no cache folder given."""
    return not store.is_local and cfg.finetune.class_images_dir is None


def _settings_key(ft: Any) -> tuple:
    return (ft.class_prompt, ft.num_class_images, ft.class_images_seed, ft.class_inference_steps,
            ft.class_guidance_scale)


def sample_class_images_once(cfg: ZooConfig, plan: ZooPlan, pending: list, show_progress: bool) -> None:
    """Sample the pending fine-tunes' class images in the driver, once each, into the cache the workers read
    (and, for a zoo on remote storage, into the root for the other nodes)."""
    store = ZooStore(cfg.root)
    settings = sorted({_settings_key(ft.finetune) for ft in pending if ft.finetune.prior_preservation})
    if not settings:
        return
    pipe = load_base_pipeline(cfg.base)
    for prompt, count, seed, steps, guidance in settings:
        logger.info("zoo %s: %d class images of %r, sampled once for every worker", store.uri, count, prompt)
        _, directory = load_or_sample_class_images(
            pipe, class_images_cache(cfg, store), prompt=prompt, count=count, seed=seed, num_inference_steps=steps,
            guidance_scale=guidance, base_fingerprint=plan.base_hash, show_progress=show_progress)
        if _shares(cfg, store):
            share_class_images(store, directory)
    del pipe


def node_class_images(cfg: ZooConfig, store: ZooStore, pipe: Any, base_hash: str, ft: Any) -> list:
    """A worker's class images for fine-tune settings `ft`: its node's cache, filled from the root when the
    driver shared them there, sampled only when neither has them (a build whose driver did not sample)."""
    cache = class_images_cache(cfg, store)
    if _shares(cfg, store):
        settings = class_images_settings(base_hash, ft.class_prompt, ft.num_class_images, ft.class_images_seed,
                                         ft.class_inference_steps, ft.class_guidance_scale, pipeline_resolution(pipe))
        fetch_class_images(store, class_images_dir(cache, settings))
    images, _ = load_or_sample_class_images(
        pipe, cache, prompt=ft.class_prompt, count=ft.num_class_images, seed=ft.class_images_seed,
        num_inference_steps=ft.class_inference_steps, guidance_scale=ft.class_guidance_scale,
        base_fingerprint=base_hash, show_progress=False)
    return images


def share_class_images(store: ZooStore, directory: Path) -> None:
    """Upload a finished cache folder to ROOT/class_images/<its name>/ unless it is there: the images first,
    the manifest last (an object store shows each object whole, so a manifest means a complete folder)."""
    relative = f"{SHARED_DIR}/{directory.name}"
    if store.exists(store.abs(f"{relative}/{MANIFEST}")):
        return
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    for path in [*files, directory / MANIFEST]:
        store.write_bytes(f"{relative}/{path.name}", path.read_bytes())


def fetch_class_images(store: ZooStore, directory: Path) -> bool:
    """Fill this node's cache folder `directory` from the root's shared copy; True when it was downloaded.
    The folder appears by one rename when complete, as the cache's own writes do."""
    relative = f"{SHARED_DIR}/{directory.name}"
    if (directory / MANIFEST).is_file() or not store.exists(store.abs(f"{relative}/{MANIFEST}")):
        return False
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name in store.file_sizes(relative):
            (tmp / Path(name).name).write_bytes(store.read_bytes(name))
        try:
            tmp.rename(directory)
        except OSError:
            if not (directory / MANIFEST).is_file():  # not another worker of this node that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
