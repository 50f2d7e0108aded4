"""A GL(r)-invariant feature vector of a LoRA: its merged updates ΔW = (alpha/r) B A, flattened.

The LoRA symmetry (B, A) -> (B G⁻¹, G A) leaves every ΔW unchanged, so features built from the
products cannot tell two factorisations of the same update apart (raw factors could). ΔW itself is
large for real bases (SD 1.4's to_q/to_v updates are ~47M numbers per LoRA), so a module whose
side exceeds `sketch_size` is sketched: ΔW -> P_out ΔW P_inᵀ with seeded Gaussian P (k x side,
entries N(0, 1/k)). E[PᵀP] = I, so inner products (hence cosines) of the features estimate those of
the full ΔW (Johnson-Lindenstrauss), and the product is formed from the factors without ever
building ΔW: (P_out B)(A P_inᵀ). Sides up to `sketch_size` are kept exactly. The sketch matrices are
saved with the baseline, so fitting and attacking use the very same ones.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ...lora.io import lora_factors
from ...lora.batched import lora_scale
from ..lora_inputs import LoraLayout

SKETCH_PREFIX = "sketch."


def sketch_matrices(layout: LoraLayout, size: int | None, seed: int) -> dict[str, torch.Tensor]:
    """`sketch.<side>` -> (size, side) Gaussian for every matrix side of `layout` longer than `size`."""
    if size is None:
        return {}
    sides = sorted({spec.length for spec in layout if spec.length > size})
    generator = torch.Generator().manual_seed(seed)
    return {f"{SKETCH_PREFIX}{side}": torch.randn(size, side, generator=generator) / size ** 0.5 for side in sides}


def _sketched(matrix_side: torch.Tensor, side: int, sketches: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """P @ matrix_side (side x r -> k x r) when that side is sketched, else the matrix as it is."""
    sketch = sketches.get(f"{SKETCH_PREFIX}{side}")
    return matrix_side if sketch is None else sketch.to(matrix_side) @ matrix_side


def delta_w_features(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                     layout: LoraLayout, sketches: Mapping[str, torch.Tensor], normalise: bool) -> torch.Tensor:
    """(D,) float32: the (sketched) scaled ΔW of every module in `layout` order, optionally unit-norm.

    The caller has checked that the LoRA has `layout` (`common.check_lora`).
    """
    factors = lora_factors(dict(state_dict), "unet")
    scale = lora_scale(metadata)
    parts = []
    for spec in layout:
        if spec.factor != "A":
            continue
        down, up = factors[spec.module]  # A: r x in, B: out x r
        down, up = down.double(), up.double()
        left = _sketched(up, up.shape[0], sketches)  # (k_out or out) x r
        right = _sketched(down.T, down.shape[1], sketches)  # (k_in or in) x r
        parts.append((scale * left @ right.T).reshape(-1))
    features = torch.cat(parts)
    if normalise:
        features = features / features.norm().clamp_min(1e-30)
    return features.float()
