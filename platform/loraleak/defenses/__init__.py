"""Defenses against LoRA leakage, and the one record of which defense a LoRA went through.

Two families:
- training-time: `dp_sgd` (Opacus DP-SGD on the LoRA parameters) and `dpgm` (kernel-MMD loss with
  Gaussian noise, as the paper's code); their noise is planned by `dp_accounting.DPPlan`. Each runs in
  a fine-tune as a `training.NoDefense` subclass whose hooks the fine-tune loop calls (`training.py`).
- post-hoc, on the LoRA the owner is about to share: `output_noise` (output_perturbation.py) and
  `rank_truncation` (rank_truncation.py). `post_hoc.apply_post_hoc` runs either on a LoRA file.

`DefenseConfig` is what the zoo manifest's `defense` column holds (`to_manifest` /
`from_manifest`), and what a defended LoRA file records in its safetensors metadata under
`loraleak_defenses` (a JSON list, oldest first, so defenses applied in turn stay traceable); a
DP-trained file adds `loraleak_dp`, what its training cost (`dp_record`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import InfFloat, from_dict, to_dict
from ..errors import ConfigError, InputError
from ..lora.io import LORA_WEIGHT_NAME, save_lora_file

DefenseKind = Literal["none", "dp_sgd", "dpgm", "output_noise", "rank_truncation"]
AccountingUnit = Literal["image", "user"]
# How a DP-SGD step draws its private batch: "poisson" (each record joins with probability q, what
# the RDP accountant assumes, so ε is exact) or "shuffle" (the plain recipe's fixed-size batches from
# a shuffled order; ε is then the usual approximation). See dp_sgd.py.
Sampling = Literal["poisson", "shuffle"]
DP_KINDS = ("dp_sgd", "dpgm")
POST_HOC_KINDS = ("output_noise", "rank_truncation")
DEFENSES_METADATA_KEY = "loraleak_defenses"
# A DP-trained LoRA file also records what its training cost up to that snapshot (noise multiplier,
# ε spent, δ, clip norm, accounting unit...): the JSON of dp_sgd/dpgm `record()`.
DP_METADATA_KEY = "loraleak_dp"
NO_DEFENSE = "none"  # the manifest value of an undefended fine-tune

# The settings each kind takes, and the defaults it fills in; any other setting is an error.
_SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    # The paper's code: δ = 1e-5, max grad norm 1.0, per-image accounting.
    "dp_sgd": {"epsilon": None, "noise_multiplier": None, "delta": 1e-5, "max_grad_norm": 1.0,
               "accounting": "image", "sampling": "poisson"},
    "dpgm": {"epsilon": None, "noise_multiplier": None, "delta": 1e-5, "max_grad_norm": 1.0,
             "accounting": "image"},
    "output_noise": {"relative_noise": None, "seed": 0},
    "rank_truncation": {"rank": None},
}
_SETTING_NAMES = ("epsilon", "noise_multiplier", "delta", "max_grad_norm", "accounting", "sampling",
                  "relative_noise", "seed", "rank")


@dataclass(frozen=True)
class DefenseConfig:
    """One defense and its strength. Settings that do not apply to `kind` must stay unset.

    - dp_sgd / dpgm: exactly one of `epsilon` (target ε; `.inf` = clip only, no noise) or
      `noise_multiplier` (a fixed σ, as the paper's DPGM runs use 0.6 / 0.975 / 16 for ε 10 / 2 / 0.1;
      the ε it buys is then computed, not assumed); `delta`, `max_grad_norm` (the clip norm) and
      `accounting` ("image" or "user", see dp_accounting.py for what ε means in each).
      dp_sgd also takes `sampling` ("poisson", the default, or "shuffle"; see dp_sgd.py). For dpgm,
      `max_grad_norm` is the batch gradient clip of the paper's code, not a per-record clip (dpgm.py).
    - output_noise: `relative_noise` (noise std as a fraction of each matrix's RMS), `seed`.
    - rank_truncation: `rank` (the rank k the shared LoRA is cut to).
    """

    kind: DefenseKind = "none"
    epsilon: InfFloat | None = None  # .inf is meant: clip only, no noise
    noise_multiplier: float | None = None
    delta: float | None = None
    max_grad_norm: float | None = None
    accounting: AccountingUnit | None = None
    sampling: Sampling | None = None
    relative_noise: float | None = None
    seed: int | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        allowed = _SETTINGS[self.kind]
        for name in _SETTING_NAMES:
            value = getattr(self, name)
            if value is None and allowed.get(name) is not None:
                object.__setattr__(self, name, allowed[name])  # the kind's default
            elif value is not None and name not in allowed:
                raise ValueError(f"{name} does not apply to a {self.kind!r} defense")
        if self.kind in DP_KINDS:
            if (self.epsilon is None) == (self.noise_multiplier is None):
                raise ValueError(f"a {self.kind!r} defense needs exactly one of epsilon or noise_multiplier")
            if self.epsilon is not None and not (self.epsilon > 0 and not math.isnan(self.epsilon)):
                raise ValueError(f"epsilon must be > 0 (.inf for no noise), got {self.epsilon}")
            if self.noise_multiplier is not None and not 0 <= self.noise_multiplier < math.inf:
                raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
            if not 0 < self.delta < 1:
                raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
            if not 0 < self.max_grad_norm < math.inf:
                raise ValueError(f"max_grad_norm must be finite and > 0, got {self.max_grad_norm}")
            if self.sampling not in (None, "poisson", "shuffle"):
                raise ValueError(f"sampling must be 'poisson' or 'shuffle', got {self.sampling!r}")
        if self.kind == "output_noise":
            if self.relative_noise is None or not 0 <= self.relative_noise < math.inf:
                raise ValueError(f"output_noise needs a finite relative_noise >= 0, got {self.relative_noise}")
            if self.seed < 0:
                raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.kind == "rank_truncation" and (self.rank is None or self.rank < 1):
            raise ValueError(f"rank_truncation needs a rank >= 1, got {self.rank}")

    @property
    def post_hoc(self) -> bool:
        """True for defenses applied to a finished LoRA (the rest change how it is trained)."""
        return self.kind in POST_HOC_KINDS

    def settings(self) -> dict[str, Any]:
        """The kind and its settings, without the unset ones; ε = ∞ written as "inf" (JSON has no ∞)."""
        plain = {k: v for k, v in to_dict(self).items() if v is not None}
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in plain.items()}

    def to_manifest(self) -> str:
        """The zoo manifest's `defense` value: "none", or the settings as compact, sorted JSON."""
        if self.kind == "none":
            return NO_DEFENSE
        return json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_manifest(cls, value: str) -> "DefenseConfig":
        if value == NO_DEFENSE:
            return cls()
        try:
            data = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"defense {value!r} is neither 'none' nor JSON settings") from None
        return from_dict(cls, data, where="defense")


def _metadata_json(metadata: dict[str, str], key: str, kind: type, kind_name: str) -> Any:
    """The JSON value a LoRA file's metadata holds under `key` (None when absent), checked to be a `kind`."""
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"LoRA metadata {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise InputError(f"LoRA metadata {key!r} is not a {kind_name}")
    return value


def defenses_applied(metadata: dict[str, str]) -> list[DefenseConfig]:
    """The defenses a LoRA file records in its metadata, oldest first ([] for an undefended LoRA)."""
    entries = _metadata_json(metadata, DEFENSES_METADATA_KEY, list, "list") or []
    return [from_dict(DefenseConfig, entry, where=DEFENSES_METADATA_KEY) for entry in entries]


def dp_record(metadata: dict[str, str]) -> dict[str, Any] | None:
    """What a DP-trained LoRA file records about its privacy (σ, ε spent, δ, clip, unit...), else None."""
    return _metadata_json(metadata, DP_METADATA_KEY, dict, "mapping")


def lora_output_path(path: str | Path) -> Path:
    """Where to write a LoRA: the `.safetensors` file named, or `pytorch_lora_weights.safetensors`
    inside the directory named (what `load_lora_weights(directory)` looks for)."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME


def defended_metadata(metadata: dict[str, str], defense: DefenseConfig) -> dict[str, str]:
    """`metadata` with `defense` appended to the defenses it records."""
    recorded = [d.settings() for d in defenses_applied(metadata)] + [defense.settings()]
    return {**metadata, "format": "pt", DEFENSES_METADATA_KEY: json.dumps(recorded, sort_keys=True)}


def save_defended_lora(state_dict: dict[str, torch.Tensor], metadata: dict[str, str],
                       defense: DefenseConfig, out_path: str | Path) -> Path:
    """Write a defended LoRA (`lora.io.save_lora_file`: atomic, the same bytes for the same LoRA),
    appending `defense` to the recorded defenses; `out_path` may be the input."""
    return save_lora_file(state_dict, defended_metadata(metadata, defense), lora_output_path(out_path))
