"""A LoRA of another rank or target set, re-factorised to the one a learned attack reads.

A learned attack has one token per matrix of its zoo's layout: the zoo's rank r_z and target modules.
A shared LoRA of rank r, scale s = alpha / r, is brought to that layout through its update, which
is all that matters to the model:

    ΔW = s · B · A = U S Vᵀ  (thin SVD)        ->      s_z · B' · A' = U_k S_k V_kᵀ,   k = r_z
    B' = U_k · (S_k / s_z)^½        A' = (S_k / s_z)^½ · V_kᵀ

the top r_z singular values kept and √S split into both factors (each singular pair's sign fixed so
that the largest-|.| entry of U's column is positive), scaled for the zoo's alpha (s_z = alpha_z / r_z).
With r <= r_z nothing is lost: the factors are zero-padded and ΔW is unchanged; with r > r_z the
error ‖ΔW − ΔW'‖²_F is exactly the discarded singular values' energy Σ_{i>r_z} S_i² (Eckart–Young).
A target module of the zoo that the LoRA lacks gets a zero block (ΔW = 0: the base weight, as the LoRA
leaves it); a module of the LoRA the zoo lacks is dropped, named in a warning line. A module whose
shape differs from the zoo's is a LoRA of another base: one InputError line, nothing adapted.

`refactor_lora` is the pure function (factors in, factors out); ΔW is never formed: QR of B and Aᵀ
reduce the SVD to an r x r core. `adapt_lora` does the same to a file's state dict and metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import InputError
from .batched import lora_scale
from .io import ADAPTER_METADATA_KEY, _target_name, adapter_metadata, lora_factors, module_order_key

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (down A: r x in, up B: out x r)


@dataclass(frozen=True)
class TargetShape:
    """One module of the zoo's layout: its LoRA rank and the Linear's sides."""

    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdaptedLora:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # every target module, in module order, float32
    dropped: tuple[str, ...]  # modules of the LoRA the zoo does not adapt
    zeroed: tuple[str, ...]  # modules of the zoo the LoRA does not adapt (zero blocks)
    truncated: tuple[str, ...]  # modules whose ΔW had more than r_z nonzero singular values
    discarded_energy: float  # Σ over modules of the discarded singular values² of ΔW: ‖ΔW − ΔW'‖²_F
    total_energy: float  # Σ over the kept modules of ‖ΔW‖²_F

    @property
    def changed(self) -> bool:
        return bool(self.dropped or self.zeroed or self.truncated)

    def notes(self, rank: int | None = None) -> list[str]:
        """Warning lines: what the adaptation dropped, zeroed and truncated."""
        lines = []
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} module(s) the attack's zoo does not adapt: "
                         f"{', '.join(self.dropped)}")
        if self.zeroed:
            lines.append(f"zero blocks for {len(self.zeroed)} module(s) of the zoo the LoRA does not adapt: "
                         f"{', '.join(self.zeroed)}")
        if self.truncated:
            share = self.discarded_energy / self.total_energy if self.total_energy > 0 else 0.0
            lines.append(f"truncated {len(self.truncated)} module(s) to the zoo's rank"
                         f"{f' {rank}' if rank is not None else ''} by SVD, discarding {share:.2%} of ΔW's energy")
        return lines


def _top_factors(down: torch.Tensor, up: torch.Tensor, scale: float, rank: int, target_scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, float, float, bool]:
    """(A', B') of rank `rank` with target_scale·B'A' the best rank-`rank` approximation of scale·B·A,
    the discarded and the total energy, and whether anything nonzero was discarded."""
    shape_down, shape_up = down.shape, up.shape
    a, b = down.double().flatten(1), up.double().flatten(1)  # (r, in), (out, r); convolutions flattened
    q_b, r_b = torch.linalg.qr(b)  # (out, k_b), (k_b, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, k_a), (k_a, r)
    core_u, s, core_vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    u, v = q_b @ core_u, q_a @ core_vh.T  # (out, k), (in, k)
    columns = torch.arange(u.shape[1])
    signs = torch.sign(u[u.abs().argmax(dim=0), columns])
    signs[signs == 0] = 1.0
    u = u * signs
    v = v * signs
    singular = s * abs(scale)  # of ΔW
    total = float((singular ** 2).sum())
    k = min(rank, singular.shape[0])
    discarded = float((singular[k:] ** 2).sum())
    ratio = scale / target_scale
    root = (s[:k] * abs(ratio)).sqrt()
    new_up = u[:, :k] * (root * (1.0 if ratio > 0 else -1.0))
    new_down = (v[:, :k] * root).T
    if k < rank:
        new_up = torch.cat([new_up, new_up.new_zeros(new_up.shape[0], rank - k)], dim=1)
        new_down = torch.cat([new_down, new_down.new_zeros(rank - k, new_down.shape[1])], dim=0)
    new_down = new_down.reshape(rank, *shape_down[1:]).float()
    new_up = new_up.reshape(shape_up[0], rank, *shape_up[2:]).float()
    # "Truncated" when a discarded singular value is not rounding noise.
    lost = k < singular.shape[0] and float(singular[k]) > 1e-6 * float(singular[0])
    return new_down, new_up, discarded, total, lost


def refactor_lora(factors: Factors, scale: float, target: Mapping[str, TargetShape], target_scale: float,
                  what: str = "the LoRA") -> AdaptedLora:
    """The LoRA `factors` (applied with `scale`) re-factorised to `target`'s modules and ranks, applied
    with `target_scale` (see the module doc). InputError (one line, naming `what`) when a shared module's
    shape differs from the target's (another base), when the two share no module, or a scale is 0."""
    if scale == 0 or target_scale == 0:
        raise InputError(f"{what}: a LoRA scale of 0 cannot be re-factorised")
    shared = [m for m in target if m in factors]
    for module in shared:
        down, up = factors[module]
        want = target[module]
        got_in, got_out = down.flatten(1).shape[1], up.shape[0]
        if (got_in, got_out) != (want.in_features, want.out_features):
            raise InputError(f"{what} does not fit the attack: module {module!r} is {got_out} x {got_in}, the "
                             f"attack's zoo has {want.out_features} x {want.in_features} (a LoRA of another base)")
    if not shared:
        raise InputError(f"{what} shares no LoRA module with the attack's zoo (e.g. it adapts "
                         f"{next(iter(sorted(factors, key=module_order_key)), 'nothing')!r}, the zoo "
                         f"{next(iter(sorted(target, key=module_order_key)))!r}): nothing to adapt")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    discarded = total = 0.0
    truncated, zeroed = [], []
    for module in sorted(target, key=module_order_key):
        want = target[module]
        if module not in factors:
            out[module] = (torch.zeros(want.rank, want.in_features), torch.zeros(want.out_features, want.rank))
            zeroed.append(module)
            continue
        down, up = factors[module]
        new_down, new_up, lost_energy, energy, lost = _top_factors(down, up, scale, want.rank, target_scale)
        out[module] = (new_down, new_up)
        discarded += lost_energy
        total += energy
        if lost:
            truncated.append(module)
    dropped = tuple(sorted((m for m in factors if m not in target), key=module_order_key))
    return AdaptedLora(out, dropped, tuple(zeroed), tuple(truncated), discarded, total)


def adapt_lora(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], target: Mapping[str, TargetShape],
               target_alpha: float | None = None, what: str = "the LoRA"
               ) -> tuple[dict[str, torch.Tensor], dict[str, str], AdaptedLora]:
    """A LoRA file's UNet part (state dict and metadata, as `read_lora` or `lora.formats` give them)
    re-factorised to `target` (`refactor_lora`): `unet.<module>.lora_A/B.weight` keys and a LoraConfig
    of the target's rank and `target_alpha` (None: the zoo's alpha is unknown, the LoRA's own scale is
    kept). The text encoder's factors, which the attacks do not read, are left out."""
    ranks = {shape.rank for shape in target.values()}
    if len(ranks) != 1:
        raise InputError(f"the attack's layout has several ranks {sorted(ranks)}; one rank is adapted to")
    (rank,) = ranks
    scale = lora_scale(metadata)
    target_scale = scale if target_alpha is None else float(target_alpha) / rank
    adapted = refactor_lora(lora_factors(state_dict, "unet"), scale, target, target_scale, what)
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in adapted.factors.items():
        out[f"unet.{module}.lora_A.weight"], out[f"unet.{module}.lora_B.weight"] = down, up
    stored = {k: v for k, v in adapter_metadata(metadata).items() if k.startswith("unet.")}
    alpha = target_scale * rank
    stored.update({"unet.r": rank, "unet.lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
                   "unet.use_rslora": False, "unet.rank_pattern": {}, "unet.alpha_pattern": {},
                   "unet.target_modules": sorted({_target_name(m) for m in target})})
    return out, {**metadata, ADAPTER_METADATA_KEY: json.dumps(stored, indent=2, sort_keys=True)}, adapted
