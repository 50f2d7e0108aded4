"""One way to load any Stable Diffusion base: built-in `tiny`, a local folder, or a hub id.

Everything downstream receives a `diffusers.StableDiffusionPipeline` from `load_base_pipeline`,
so the tiny base and SD 1.4 run through the same code. Weights are only ever read from
safetensors (never unpickled), and every pipeline samples with DPM-Solver++ (the paper's sampler)
over its own training noise schedule.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import Attention

from ..errors import LoraleakError

# Built-in bases shipped inside the package (`loraleak/assets/<folder>`), by reference name.
BUILTIN_BASES = {"tiny": "tiny-base", "tiny-lfw": "tiny-base-lfw"}
PIPELINE_SUBDIR = "pipeline"  # `pretrain_base` writes its pipeline here inside its output folder
FINGERPRINT_CHARS = 16


def builtin_dir(name: str) -> Path:
    """Where built-in base `name` ("tiny", "tiny-lfw") lives in the installed package."""
    return Path(str(files("loraleak") / "assets" / BUILTIN_BASES[name]))


def _pipeline_dir(directory: Path) -> Path | None:
    """`directory` itself if it is a diffusers pipeline folder, or its `pipeline/` (a pretrain run)."""
    for candidate in (directory, directory / PIPELINE_SUBDIR):
        if (candidate / "model_index.json").is_file():
            return candidate
    return None


def resolve_local(ref: str | Path) -> Path | None:
    """The local pipeline folder `ref` names, or None when `ref` must be a hub id.

    Raises LoraleakError for a built-in name whose files are missing or a folder that is not a
    pipeline: both are local mistakes a download cannot fix.
    """
    if isinstance(ref, str) and ref in BUILTIN_BASES:
        directory = builtin_dir(ref)
        found = _pipeline_dir(directory)
        if found is None:
            raise LoraleakError(
                f"cannot load base model {ref!r}: the built-in weights are not installed at {directory}"
                " (pretrain them with `loraleak base pretrain` and copy the result's pipeline/ there)"
            )
        return found
    path = Path(ref).expanduser()
    if path.is_dir():
        found = _pipeline_dir(path)
        if found is None:
            raise LoraleakError(
                f"cannot load base model {str(ref)!r}: the folder has no model_index.json"
                " (not a diffusers pipeline, nor a pretrain output with pipeline/)"
            )
        return found
    return None


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_base_pipeline(ref: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load base `ref` ("tiny", "tiny-lfw", a pipeline folder, or a hub id such as SD 1.4)."""
    local = resolve_local(ref)
    source = str(local) if local is not None else str(ref)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, use_safetensors=True,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    except (OSError, ValueError) as e:
        where = f"the folder {local} is not a loadable pipeline" if local is not None else \
            "not a local directory and not downloadable here"
        raise LoraleakError(f"cannot load base model {str(ref)!r}: {where} ({_first_line(e)})") from None
    # The paper samples with DPM-Solver multistep; keep each base's own noise schedule.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe.to(device)


def _unet_weight_files(unet_dir: Path) -> list[Path]:
    """The UNet weights `from_pretrained` reads by default: one safetensors file or its shards."""
    single = unet_dir / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    return sorted(unet_dir.glob("diffusion_pytorch_model-*-of-*.safetensors"))


@lru_cache(maxsize=16)
def _fingerprint_files(unet_dir: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    del stamp  # part of the cache key only: a rewritten file gets hashed again
    config = json.loads((unet_dir / "config.json").read_text())
    # Keys starting with "_" (diffusers version, class name) do not change the model.
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in _unet_weight_files(unet_dir):
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def _hub_snapshot(ref: str) -> Path | None:
    """The locally cached hub snapshot holding `ref`'s UNet, or None (no download is attempted)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(ref, local_files_only=True,
                                 allow_patterns=["unet/config.json", "unet/*.safetensors*"])
    except (OSError, ValueError):
        return None
    return Path(path)


def base_fingerprint(ref_or_dir: str | Path) -> str:
    """Short sha256 of the base's UNet (config without "_" keys + weight file bytes).

    The same base gives the same fingerprint wherever it is stored or loaded from; a LoRA records
    it so that applying the LoRA to another base can be refused.
    """
    directory = resolve_local(ref_or_dir)
    if directory is None:
        directory = _hub_snapshot(str(ref_or_dir))
    if directory is None:
        raise LoraleakError(f"cannot fingerprint base model {str(ref_or_dir)!r}: not a local directory"
                            " and not in the local hub cache")
    unet_dir = directory / "unet"
    weights = _unet_weight_files(unet_dir)
    if not (unet_dir / "config.json").is_file() or not weights:
        raise LoraleakError(f"cannot fingerprint base model {str(ref_or_dir)!r}: {unet_dir} has no"
                            " config.json and diffusion_pytorch_model safetensors weights")
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in [unet_dir / "config.json", *weights])
    return _fingerprint_files(unet_dir.resolve(), stamp)


def base_info(pipe: StableDiffusionPipeline) -> dict[str, Any]:
    """What later stages need to know about a base: image size, text width, attention modules."""
    unet = pipe.unet
    return {
        "resolution": unet.config.sample_size * pipe.vae_scale_factor,
        "latent_size": unet.config.sample_size,
        "latent_channels": unet.config.in_channels,
        "vae_scale_factor": pipe.vae_scale_factor,
        "text_width": pipe.text_encoder.config.hidden_size,
        "cross_attention_dim": unet.config.cross_attention_dim,
        "max_prompt_tokens": pipe.tokenizer.model_max_length,
        "prediction_type": pipe.scheduler.config.prediction_type,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "attention_modules": [name for name, m in unet.named_modules() if isinstance(m, Attention)],
    }
