"""Output perturbation: Gaussian noise on a LoRA before it is shared, scaled to each matrix's size.

Every LoRA factor matrix M (UNet and text encoder, down and up) gets i.i.d. Gaussian noise with
std = relative_noise · ‖M‖_F / sqrt(numel(M)), i.e. relative_noise times M's RMS entry, so the noise's
expected Frobenius norm is relative_noise · ‖M‖_F: 0.1 buries each matrix under 10% noise.

A heuristic, not differential privacy: the noise follows the weights' own norm, so nothing bounds
how much one photo moves the LoRA relative to it. Its strength is measured, not proven: what the
attack still recovers against what the owner still gets.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import from_dict
from ..errors import ConfigError, InputError
from ..lora.io import COMPONENTS, lora_factors, read_lora
from . import DefenseConfig, save_defended_lora


def _factor_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The keys holding LoRA factors, sorted (kohya-style `.alpha` scalars are not factors)."""
    if not any(lora_factors(state_dict, c) for c in COMPONENTS):  # raises on a non-LoRA key
        raise InputError("the LoRA holds no UNet or text-encoder LoRA matrices")
    return sorted(k for k in state_dict if not k.endswith(".alpha"))


def perturb_lora(state_dict: dict[str, torch.Tensor], relative_noise: float,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """A copy of the LoRA with N(0, (relative_noise · RMS(M))²) noise added to each factor M.

    Deterministic in `seed`: the noise is drawn key by key in sorted order from one generator.
    """
    if not 0 <= relative_noise < math.inf:
        raise ConfigError(f"relative_noise must be finite and >= 0, got {relative_noise}")
    generator = torch.Generator().manual_seed(seed)
    perturbed = dict(state_dict)
    for key in _factor_keys(state_dict):
        matrix = state_dict[key].float()
        std = relative_noise * matrix.norm().item() / math.sqrt(matrix.numel())
        noise = torch.randn(matrix.shape, generator=generator) * std
        perturbed[key] = (matrix + noise).to(state_dict[key].dtype)
    return perturbed


def apply_to_file(in_path: str | Path, out_path: str | Path, relative_noise: float, seed: int = 0) -> Path:
    """Perturb the LoRA file (or directory) `in_path` and write it to `out_path` (a `.safetensors`
    file or a directory), recording the defense in the file's metadata. Returns the written file."""
    defense = from_dict(DefenseConfig, {"kind": "output_noise", "relative_noise": relative_noise, "seed": seed})
    state_dict, metadata = read_lora(in_path)
    return save_defended_lora(perturb_lora(state_dict, relative_noise, seed), metadata, defense, out_path)
