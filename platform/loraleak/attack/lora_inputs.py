"""A LoRA state dict -> the ordered per-matrix inputs the attack's encoder reads.

Every UNet LoRA module contributes two matrices, A (down, rank x in) and B (up, out x rank), in a
stable order (modules in natural order of their paths, A before B): one encoder token each, as in
the paper. Each is laid out with the rank as channels and its long side as sequence: A as is
(rank x in), B transposed (rank x out).

Input modes (what the matrices hold):
  - "raw":          θ_r, the factors as stored.
  - "delta":        Δθ = θ_r − θ_0, the factors minus their initial values (the paper). θ_0 comes
                    from the fine-tune's step-0 snapshot; without it, B_0 is taken as zero (exact:
                    peft initialises B to zero) and A is fed raw, because A_0 is a seeded random
                    matrix that cannot be recovered from θ_r. A shared LoRA comes without θ_0, so
                    at attack time A is what it is — train on the same footing you attack on.
  - "gl_invariant": canonical factors of the merged update ΔW = B A. The LoRA symmetry
                    (B, A) -> (B G⁻¹, G A) for any invertible r x r G leaves ΔW unchanged, so the
                    encoder should not see G. With the thin SVD ΔW = U S Vᵀ the canonical pair is
                    B' = U S^½, A' = S^½ Vᵀ, each singular pair's sign fixed so that the largest-|.|
                    entry of U's column is positive. ΔW (out x in) is never formed: QR of B and Aᵀ
                    reduce the SVD to an r x r core. ΔW = B A is already a change of the base
                    weight (B_0 = 0 at init), so this mode needs no θ_0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch

from ..errors import InputError
from ..lora.adapt import TargetShape, adapt_lora
from ..lora.io import lora_factors, module_order_key

InputMode = Literal["delta", "raw", "gl_invariant"]
INPUT_MODES: tuple[str, ...] = ("delta", "raw", "gl_invariant")


@dataclass(frozen=True)
class MatrixSpec:
    """One LoRA matrix as the encoder sees it: `rank` channels by `length` positions."""

    module: str  # UNet module path, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    factor: Literal["A", "B"]  # A = down (rank x in), B = up (out x rank), fed as Bᵀ
    rank: int
    length: int  # the long side: in_features for A, out_features for B

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "factor": self.factor, "rank": self.rank, "length": self.length}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MatrixSpec":
        return cls(module=str(data["module"]), factor=data["factor"], rank=int(data["rank"]),
                   length=int(data["length"]))


LoraLayout = tuple[MatrixSpec, ...]


def _ordered_factors(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module, A, B) of every UNet LoRA module, in natural module order; Linear LoRAs only."""
    factors = lora_factors(dict(state_dict), "unet")
    if not factors:
        raise InputError("the LoRA holds no UNet LoRA matrices")
    ordered = []
    for module in sorted(factors, key=module_order_key):
        down, up = factors[module]
        if down.ndim != 2 or up.ndim != 2:
            raise InputError(f"LoRA module {module!r} is a convolution LoRA ({tuple(down.shape)}); "
                             "the attack reads Linear LoRA matrices only")
        if up.shape[1] != down.shape[0]:
            raise InputError(f"LoRA module {module!r} has factors of different ranks: "
                             f"down {tuple(down.shape)}, up {tuple(up.shape)}")
        ordered.append((module, down, up))
    return ordered


def lora_layout(state_dict: Mapping[str, torch.Tensor]) -> LoraLayout:
    """The ordered matrix specs of a LoRA: what an encoder built for it expects."""
    layout = []
    for module, down, up in _ordered_factors(state_dict):
        rank = down.shape[0]
        layout.append(MatrixSpec(module, "A", rank, down.shape[1]))
        layout.append(MatrixSpec(module, "B", rank, up.shape[0]))
    return tuple(layout)


def check_layout(found: LoraLayout, expected: LoraLayout, what: str = "the LoRA") -> None:
    """Raise InputError naming the first difference when `found` is not `expected`."""
    if found == expected:
        return
    if len(found) != len(expected):
        raise InputError(f"{what} has {len(found)} LoRA matrices, the attack expects {len(expected)} "
                         "(other LoRA targets or another base model)")
    for got, want in zip(found, expected):
        if got != want:
            raise InputError(f"{what} does not fit the attack: matrix {got.factor} of {got.module!r} is "
                             f"rank {got.rank} x {got.length}, expected {want.factor} of {want.module!r} "
                             f"rank {want.rank} x {want.length}")


def layout_targets(layout: LoraLayout) -> dict[str, TargetShape]:
    """Module -> its rank and sides, as `lora.adapt` takes a zoo's layout."""
    sides: dict[str, dict[str, int]] = {}
    for spec in layout:
        entry = sides.setdefault(spec.module, {"rank": spec.rank})
        entry["in" if spec.factor == "A" else "out"] = spec.length
    return {m: TargetShape(e["rank"], e["in"], e["out"]) for m, e in sides.items()}


def fit_to_layout(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], layout: LoraLayout,
                  zoo_alpha: float | None = None, what: str = "the LoRA"
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """A shared LoRA as an attack of `layout` reads it: unchanged when its layout is the attack's, else
    re-factorised by SVD to the zoo's rank and `zoo_alpha` with zero blocks for missing targets
    (`lora.adapt`), plus the warning lines saying what changed. `metadata` must state the LoRA's
    alpha (`lora.formats.read_shared_lora` gives such metadata for any file). InputError (one line)
    when the shapes cannot match: a LoRA of another base."""
    try:
        if lora_layout(state_dict) == layout:
            return dict(state_dict), dict(metadata), []
    except InputError:  # e.g. a convolution LoRA module: dropped by the adaptation when the zoo lacks it
        pass
    out, new_metadata, adapted = adapt_lora(dict(state_dict), dict(metadata), layout_targets(layout), zoo_alpha, what)
    rank = layout[0].rank
    alpha = "its own scale kept (the attack does not record its zoo's alpha)" if zoo_alpha is None \
        else f"alpha {zoo_alpha:g}"
    notes = [f"{what} adapted to the attack's zoo by SVD: rank {rank}, {len(adapted.factors)} modules, {alpha}"]
    return out, new_metadata, notes + adapted.notes(rank)


def canonical_factors(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GL(r)-invariant factors (A' = S^½ Vᵀ, B' = U S^½) of ΔW = up @ down, without forming ΔW.

    Computed in float64 (the result is returned in float32): B = Q_B R_B and Aᵀ = Q_A R_A give
    ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the SVD of the small core R_B R_Aᵀ is the SVD of ΔW.
    Rank-deficient directions get zero singular values, hence zero rows/columns; if the rank
    exceeds a side of ΔW the missing components are zero-padded so that shapes stay (r x in, out x r).
    """
    rank = down.shape[0]
    q_b, r_b = torch.linalg.qr(up.double())  # (out, k_b), (k_b, r)
    q_a, r_a = torch.linalg.qr(down.double().T)  # (in, k_a), (k_a, r)
    core_u, s, core_vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    u = q_b @ core_u  # (out, k)
    v = q_a @ core_vh.T  # (in, k)
    # Each singular pair is defined up to a joint sign flip: fix it by U's largest-|.| entry.
    columns = torch.arange(u.shape[1])
    signs = torch.sign(u[u.abs().argmax(dim=0), columns])
    signs[signs == 0] = 1.0
    root = s.sqrt()
    new_up = u * (signs * root)
    new_down = (v * (signs * root)).T
    missing = rank - s.shape[0]
    if missing > 0:
        new_up = torch.cat([new_up, new_up.new_zeros(new_up.shape[0], missing)], dim=1)
        new_down = torch.cat([new_down, new_down.new_zeros(missing, new_down.shape[1])], dim=0)
    return new_down.float(), new_up.float()


def lora_matrices(state_dict: Mapping[str, torch.Tensor], mode: InputMode,
                  init_state_dict: Mapping[str, torch.Tensor] | None = None,
                  layout: LoraLayout | None = None) -> list[torch.Tensor]:
    """The encoder's inputs for one LoRA: float32 (rank, length) matrices in layout order.

    `init_state_dict` is θ_0 (the step-0 snapshot), used by mode "delta" only. With `layout`, the
    LoRA must match it exactly (InputError otherwise): the encoder has one token per spec.
    """
    if mode not in INPUT_MODES:
        raise InputError(f"unknown input mode {mode!r} (choose from {', '.join(INPUT_MODES)})")
    ordered = _ordered_factors(state_dict)
    if layout is not None:
        check_layout(lora_layout(state_dict), layout)
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if mode == "delta" and init_state_dict is not None:
        check_layout(lora_layout(init_state_dict), lora_layout(state_dict), "the initial LoRA θ_0")
        initial = {module: (down, up) for module, down, up in _ordered_factors(init_state_dict)}
    matrices = []
    for module, down, up in ordered:
        down, up = down.float(), up.float()
        if mode == "gl_invariant":
            down, up = canonical_factors(down, up)
        elif mode == "delta":
            if module in initial:
                down0, up0 = initial[module]
                down, up = down - down0.float(), up - up0.float()
            # Without θ_0: B_0 = 0 (peft's init), so B is already ΔB; A_0 is unknown, A stays raw.
        matrices.append(down.contiguous())  # A: rank x in
        matrices.append(up.T.contiguous())  # Bᵀ: rank x out
    return matrices


def collate_lora_matrices(samples: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Stack per-LoRA matrix lists (same layout) into per-matrix batches of shape (batch, rank, length)."""
    if not samples:
        raise InputError("no LoRAs to collate")
    counts = {len(sample) for sample in samples}
    if len(counts) != 1:
        raise InputError(f"LoRAs of different layouts in one batch: matrix counts {sorted(counts)}")
    try:
        return [torch.stack(column) for column in zip(*samples)]
    except RuntimeError:
        raise InputError("LoRAs of different layouts in one batch: matrix shapes differ") from None
