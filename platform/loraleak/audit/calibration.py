"""Calibrating `loraleak audit`'s leakage score on a zoo: does it tell fine-tunes that learned their
person from LoRAs that learned nothing?

Positives are the zoo's fine-tunes (the final snapshot of each held-out victim). Negatives are
"LoRAs" of the base alone with the same layout (keys, rank, alpha, shapes), built from a positive:

- zero update: the up factor B = 0 and the down factor A drawn as PEFT's gaussian init (std 1/r), a
  fine-tune's step 0; ΔW = 0, so the audit scores it exactly 0 (the floor of the score);
- random update: A, B random (seeded) and scaled so that every module's ΔW = (alpha/r)·B·A has the
  Frobenius norm of that positive's own final ΔW. It moves the weights as far as the fine-tune did,
  in no learned direction: a score that only measured "how much the LoRA changes the model" would
  rate it like a positive.

Both are written through `lora.io.save_lora_file` with the positive's metadata (its provenance
relabelled), so they pass the same loading gate as any shared file. The score is compared by ROC
AUC (Mann-Whitney, ties half) with a stratified bootstrap interval that resamples files, and the
threshold that keeps TPR >= 0.9 is stated as the audit's `--fail-above` value with its FPR.
`benchmarks/audit_calibration.py` runs it on a zoo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..errors import InputError
from ..lora.batched import lora_scale
from ..lora.io import lora_provenance
from ..zoo.manifest import done_rows, read_manifest

# Down-factor key suffix -> its up-factor suffix, for every key form `lora.io` reads.
_UP_OF_DOWN = {".lora.down.weight": ".lora.up.weight", ".lora_linear_layer.down.weight": ".lora_linear_layer.up.weight",
               ".lora_A.weight": ".lora_B.weight"}
NEGATIVE_KINDS = ("zero", "random")


@dataclass(frozen=True)
class ZooVictim:
    """One fine-tune of a zoo as a positive: its final snapshot's file."""

    lora_id: str
    identity_id: str
    split: str
    step: int
    path: Path


def zoo_victims(root: str | Path, splits: Sequence[str] = ("heldout",)) -> list[ZooVictim]:
    """The final snapshot (snapshot_step == steps) of every done fine-tune of `splits`, by lora_id.
    A fine-tune still training (no final row yet) is left out. Local zoos only: the files are read in place."""
    root = Path(root)
    table = done_rows(read_manifest(str(root)))
    table = table.filter(pc.and_(pc.is_in(table["split"], value_set=pa.array(list(splits), pa.string())),
                                 pc.equal(table["snapshot_step"], table["steps"])))
    rows = sorted(table.select(["lora_id", "identity_id", "split", "snapshot_step", "lora_path"]).to_pylist(),
                  key=lambda r: r["lora_id"])
    if not rows:
        raise InputError(f"zoo {root} has no finished fine-tunes of split {'/'.join(splits)}")
    return [ZooVictim(r["lora_id"], r["identity_id"], r["split"], r["snapshot_step"], root / r["lora_path"])
            for r in rows]


def _factor_pairs(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(down key, up key) of every LoRA module, in key order; InputError when a key is not a factor."""
    pairs, used = [], set()
    for key in sorted(state_dict):
        for down, up in _UP_OF_DOWN.items():
            if key.endswith(down):
                up_key = key[: -len(down)] + up
                if up_key not in state_dict:
                    raise InputError(f"LoRA module of {key!r} has no up factor {up_key!r}")
                pairs.append((key, up_key))
                used |= {key, up_key}
                break
    rest = sorted(set(state_dict) - used)
    if rest:
        raise InputError(f"LoRA key {rest[0]!r} is not a down/up factor: cannot build a negative of this layout")
    return pairs


def delta_norms(state_dict: Mapping[str, torch.Tensor], scale: float) -> dict[str, float]:
    """Frobenius norm of each module's update ΔW = scale·B·A, keyed by its down-factor key."""
    return {down: float(scale * torch.linalg.matrix_norm(state_dict[up].double() @ state_dict[down].double()))
            for down, up in _factor_pairs(state_dict)}


def zero_update_lora(template: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The template's layout at a fine-tune's step 0: A ~ N(0, 1/r²) (PEFT's gaussian init), B = 0."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for down, up in _factor_pairs(template):
        a = template[down]
        out[down] = (torch.randn(a.shape, generator=g, dtype=torch.float64) / a.shape[0]).to(a.dtype)
        out[up] = torch.zeros_like(template[up])
    return out


def random_update_lora(template: Mapping[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Random A, B (seeded) scaled per module so that ‖scale·B·A‖_F equals the template's own: the
    fine-tune's update norm, in a random direction. A module the template left at ΔW = 0 stays at 0."""
    g = torch.Generator().manual_seed(seed)
    target = delta_norms(template, scale)
    out: dict[str, torch.Tensor] = {}
    for down, up in _factor_pairs(template):
        a = torch.randn(template[down].shape, generator=g, dtype=torch.float64)
        b = torch.randn(template[up].shape, generator=g, dtype=torch.float64)
        norm = float(scale * torch.linalg.matrix_norm(b @ a))
        c = (target[down] / norm) ** 0.5 if norm > 0 else 0.0  # c² on the product: the norm is matched exactly
        out[down] = (c * a).to(template[down].dtype)
        out[up] = (c * b).to(template[up].dtype)
    return out


def negative_metadata(metadata: Mapping[str, str], label: str, step: int, path: str | Path = "LoRA") -> dict[str, str]:
    """The positive's metadata (adapter config: rank, alpha, targets) with its provenance relabelled:
    the trigger becomes `label` (no person) and the step `step`."""
    out = dict(metadata)
    provenance = lora_provenance(out, path)
    if provenance is not None:
        out["loraleak_trigger"] = label
        out["loraleak_instance_prompt"] = provenance.instance_prompt.replace(provenance.trigger, label)
        out["loraleak_step"] = str(int(step))
    return out


def scale_of(metadata: Mapping[str, str]) -> float:
    """alpha / r as the audit's pipeline applies it (the diffusers adapter metadata, else the provenance)."""
    provenance = lora_provenance(dict(metadata))
    if provenance is not None:
        return lora_scale(metadata, provenance.alpha, provenance.rank)
    return lora_scale(metadata)


# --- the numbers --------------------------------------------------------------------------------

def _finite(scores: Sequence[float | None]) -> np.ndarray:
    """Scores as an array; an unscored file (None: the scorer found < 2 faces) is -inf, never flagged."""
    return np.array([-np.inf if s is None else float(s) for s in scores], dtype=float)


def roc_auc(positives: Sequence[float | None], negatives: Sequence[float | None]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney AUC)."""
    pos, neg = _finite(positives), _finite(negatives)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("roc_auc needs at least one positive and one negative")
    greater = pos[:, None] > neg[None, :]
    ties = pos[:, None] == neg[None, :]  # two unscored files (-inf == -inf) tie
    return float(greater.mean() + 0.5 * ties.mean())


def bootstrap_auc(positives: Sequence[float | None], negatives: Sequence[float | None], n_boot: int = 2000,
                  seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUC over resampled files, positives and negatives resampled apart
    (each resample keeps both groups' sizes)."""
    pos, neg = list(positives), list(negatives)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for i in range(n_boot):
        p = [pos[j] for j in rng.integers(0, len(pos), len(pos))]
        n = [neg[j] for j in rng.integers(0, len(neg), len(neg))]
        values[i] = roc_auc(p, n)
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


@dataclass(frozen=True)
class OperatingPoint:
    fail_above: float  # the audit's --fail-above: a file scoring above it is flagged
    tpr: float
    fpr: float


def threshold_for_tpr(positives: Sequence[float | None], negatives: Sequence[float | None],
                      min_tpr: float = 0.9) -> OperatingPoint:
    """The highest `--fail-above` that still flags at least `min_tpr` of the positives, and its FPR.
    It sits halfway between the lowest positive that must be flagged and the next lower score of any file."""
    pos, neg = _finite(positives), _finite(negatives)
    ordered = np.sort(pos)[::-1]
    must = ordered[int(np.ceil(min_tpr * len(pos))) - 1]  # the k-th highest positive, k = ⌈min_tpr·n⌉
    if np.isneginf(must):
        raise ValueError(f"fewer than {min_tpr:.0%} of the positives have a score: no threshold reaches that TPR")
    everything = np.concatenate([pos, neg])
    below = everything[everything < must]
    lower = below.max() if below.size and np.isfinite(below.max()) else must - 1e-3
    fail_above = float((must + lower) / 2)
    return OperatingPoint(fail_above, float((pos > fail_above).mean()), float((neg > fail_above).mean()))


def describe(scores: Sequence[float | None]) -> dict[str, float | int | None]:
    """n, how many went unscored, min / median / max of the scored ones."""
    values = np.array([s for s in scores if s is not None], dtype=float)
    if values.size == 0:
        return {"n": len(scores), "unscored": len(scores), "min": None, "median": None, "max": None}
    return {"n": len(scores), "unscored": len(scores) - int(values.size), "min": float(values.min()),
            "median": float(np.median(values)), "max": float(values.max())}


def auc_summary(positives: Sequence[float | None], negatives: Sequence[float | None], n_boot: int,
                seed: int) -> dict[str, float]:
    low, high = bootstrap_auc(positives, negatives, n_boot, seed)
    return {"auc": roc_auc(positives, negatives), "low": low, "high": high}
