"""Rank truncation: share only the best rank-k approximation of each LoRA update.

For a LoRA pair (down A: r x n, up B: m x r) the update is ΔW = B A. Truncation keeps its top k
singular directions, ΔW_k = U_k S_k V_kᵀ (the best rank-k approximation, Eckart–Young), stored as
B' = U_k S_k^½ and A' = S_k^½ V_kᵀ. The SVD never forms the m x n ΔW: with B = Q_B R_B and
Aᵀ = Q_A R_A, ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ, so only the r x r core is decomposed.

The file keeps its diffusers keys. The LoraConfig in its metadata gets r = k and an alpha scaled so
that the effective scale alpha / r (alpha / sqrt(r) with rsLoRA) is unchanged: the loaded model
applies exactly ΔW_k where it applied ΔW.

k >= r keeps every product B A (up to float error) but still rewrites the factors in this balanced
SVD form: the gauge (B G⁻¹, G A) the owner's training left in them is gone. Sweeping k = r beside the
undefended LoRA therefore measures what an attack reading raw factors drew from that gauge alone.
A rank above a layer's width has fewer singular values than k; the rest are zero columns, so every
matrix of a component keeps the one rank its LoraConfig states.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import from_dict
from ..errors import ConfigError, InputError
from ..lora.io import ADAPTER_METADATA_KEY, COMPONENTS, adapter_metadata, lora_factors, read_lora
from . import DefenseConfig, save_defended_lora

# The diffusers / PEFT names of a LoRA's down (A) factor, and of its up (B) partner.
_DOWN_TO_UP = {
    ".lora.down.weight": ".lora.up.weight",
    ".lora_linear_layer.down.weight": ".lora_linear_layer.up.weight",
    ".lora_A.weight": ".lora_B.weight",
}


def truncate_pair(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank min(rank, r) with B' A' the best rank-`rank` approximation of B A.

    Linear factors (A: r x n, B: m x r) and conv factors (A: r x c x kh x kw, B: m x r x 1 x 1) alike.
    """
    r, m = down.shape[0], up.shape[0]
    if up.shape[1] != r or any(d != 1 for d in up.shape[2:]):
        raise InputError(f"LoRA factors of shapes {tuple(down.shape)} and {tuple(up.shape)} do not form a pair")
    a, b = down.reshape(r, -1).double(), up.reshape(m, r).double()
    q_b, r_b = torch.linalg.qr(b)  # b = q_b r_b
    q_a, r_a = torch.linalg.qr(a.T)  # a = r_aᵀ q_aᵀ
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    new_rank = min(rank, r)
    keep = min(new_rank, s.numel())
    root = s[:keep].sqrt()
    new_up = torch.zeros(m, new_rank, dtype=torch.float64)
    new_down = torch.zeros(new_rank, a.shape[1], dtype=torch.float64)
    new_up[:, :keep] = (q_b @ u[:, :keep]) * root
    new_down[:keep] = root[:, None] * (vh[:keep] @ q_a.T)
    return (new_down.reshape(new_rank, *down.shape[1:]).to(down.dtype),
            new_up.reshape(m, new_rank, *up.shape[2:]).to(up.dtype))


def truncate_lora(state_dict: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """A copy of the LoRA with every (down, up) pair truncated to rank `rank`, keys unchanged."""
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    if not any(lora_factors(state_dict, c) for c in COMPONENTS):  # raises on a non-LoRA key
        raise InputError("the LoRA holds no UNet or text-encoder LoRA matrices")
    truncated = dict(state_dict)
    for key in sorted(state_dict):
        suffix = next((s for s in _DOWN_TO_UP if key.endswith(s)), None)
        if suffix is None:
            continue
        up_key = key[: -len(suffix)] + _DOWN_TO_UP[suffix]
        if up_key not in state_dict:
            raise InputError(f"LoRA key {key!r} has no partner {up_key!r}")
        truncated[key], truncated[up_key] = truncate_pair(state_dict[key], state_dict[up_key], rank)
    return truncated


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def truncate_metadata(metadata: dict[str, str], state_dict: dict[str, torch.Tensor], rank: int) -> dict[str, str]:
    """The file metadata with each component's LoraConfig at r = min(rank, r) and alpha rescaled so
    that the effective scale is unchanged. `state_dict` is the LoRA before truncation.

    Without a stored LoraConfig a loader takes alpha = r (scale 1) before and after: nothing to do.
    """
    stored = adapter_metadata(metadata)
    if not stored:
        return dict(metadata)
    for component in COMPONENTS:
        r = stored.get(f"{component}.r")
        if r is None:
            continue
        if stored.get(f"{component}.rank_pattern") or stored.get(f"{component}.alpha_pattern"):
            raise InputError(f"the {component} LoRA has per-module ranks or alphas (rank_pattern / "
                             "alpha_pattern); rank truncation needs one rank per component")
        ranks = {down.shape[0] for down, _ in lora_factors(state_dict, component).values()}
        if ranks - {r}:
            raise InputError(f"the {component} LoRA's metadata says r={r} but its matrices have ranks {sorted(ranks)}")
        new_r = min(rank, r)
        alpha = stored.get(f"{component}.lora_alpha", r)
        ratio = math.sqrt(new_r / r) if stored.get(f"{component}.use_rslora") else new_r / r
        stored[f"{component}.r"] = new_r
        stored[f"{component}.lora_alpha"] = _plain_number(alpha * ratio)
    return {**metadata, ADAPTER_METADATA_KEY: json.dumps(stored, indent=2, sort_keys=True)}


def apply_to_file(in_path: str | Path, out_path: str | Path, rank: int) -> Path:
    """Truncate the LoRA file (or directory) `in_path` to rank `rank` and write it to `out_path`
    (a `.safetensors` file or a directory), recording the defense. Returns the written file."""
    defense = from_dict(DefenseConfig, {"kind": "rank_truncation", "rank": rank})
    state_dict, metadata = read_lora(in_path)
    new_metadata = truncate_metadata(metadata, state_dict, rank)
    return save_defended_lora(truncate_lora(state_dict, rank), new_metadata, defense, out_path)
