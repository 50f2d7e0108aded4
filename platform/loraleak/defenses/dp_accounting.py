"""How much noise a DP fine-tune needs, and what its ε promises.

DP-SGD (and DPGM's noisy loss) clip each record's gradient to norm C (`max_grad_norm`) and add
N(0, σ²C²) noise per step; Opacus' RDP accountant turns (σ, sample rate q, steps T) into (ε, δ).
The accounting assumes each step's batch is a Poisson sample of the records at rate q, as Opacus'
DPDataLoader draws it; a trainer that walks through shuffled fixed-size batches gets these figures
only approximately. What a *record* is decides what ε means:

- unit "image" (the paper's code): a record is one private photo; q = batch / number of photos
  (≈ 5 of one person; class images for prior preservation are public and not records). ε bounds
  how much any *one photo* can change the distribution of the shared LoRA: for two photo sets that
  differ in one photo, every outcome's probability differs by at most a factor e^ε (plus δ). It
  says nothing useful about the *person*: all photos show the same face, and group privacy over
  k = 5 photos only gives (kε, k·e^{(k-1)ε}·δ) — e^50 at ε = 10. Per-image DP hides which photos
  were used, not who is in them.
- unit "user": a record is one person's whole photo set; q = identities per batch / identities
  trained on, and clipping is applied to each person's summed gradient. ε bounds how much adding or
  removing *one person entirely* can change the LoRA — the guarantee that protects identity. It is
  meant for a model trained on a collection of people (a multi-identity LoRA, or one trained across
  many owners' data). For the victim's usual single-person fine-tune the collection has one record
  (q = 1): ε then bounds how distinguishable the shared LoRA is from one trained on *no one*, so the
  guarantee is real, but the owner's utility (the model renders this person) is exactly what it
  limits: privacy and utility are the same quantity, and no ε gives both.
- ε = ∞: no noise (σ = 0); clipping alone, which bounds sensitivity but promises nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..errors import ConfigError
from . import AccountingUnit, DefenseConfig, DP_KINDS

ACCOUNTANT = "rdp"
# Opacus' default RDP orders stop at 63, where the conversion to (ε, δ = 1e-5) alone costs ε ≈ 0.1:
# small budgets such as the paper's ε = 0.1 need higher orders.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512, 1024]


def _check_budget(delta: float, sample_rate: float, steps: int) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"delta must lie in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")


# Both accountant calls are pure and slow at large sample rates (RDP at ~250 orders, fractional ones by
# series; the σ search evaluates it ~20 times: seconds): cached, since every fine-tune of a zoo plans alike.
@lru_cache(maxsize=256)
def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest σ (to 0.01 in ε) for which `steps` steps at rate `sample_rate` stay within
    (epsilon, delta) under the RDP accountant; 0.0 for ε = ∞."""
    _check_budget(delta, sample_rate, steps)
    if math.isnan(epsilon) or epsilon <= 0:
        raise ConfigError(f"epsilon must be > 0 (inf for no noise), got {epsilon}")
    if math.isinf(epsilon):
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier  # opacus: optional (the `dp` extra)

    try:
        return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                    steps=steps, accountant=ACCOUNTANT, alphas=RDP_ORDERS)
    except ValueError:  # opacus: "The privacy budget is too low." (σ would exceed 1e6)
        raise ConfigError(f"epsilon={epsilon} is out of reach for {steps} steps at sample rate {sample_rate}: "
                          "no noise multiplier up to 1e6 achieves it") from None


@lru_cache(maxsize=4096)
def epsilon_spent(noise_multiplier: float, delta: float, sample_rate: float, steps: int) -> float:
    """The ε that `steps` steps with noise multiplier σ at rate `sample_rate` cost (∞ for σ = 0)."""
    _check_budget(delta, sample_rate, steps)
    if not 0 <= noise_multiplier < math.inf:
        raise ConfigError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import RDPAccountant  # opacus: optional (the `dp` extra)

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS)


@dataclass(frozen=True)
class DPPlan:
    """The settings of one DP fine-tune, with what they promise (see the module docstring)."""

    epsilon: float  # the ε the accountant certifies for this σ (≤ the target, within 0.01)
    delta: float
    max_grad_norm: float  # clip norm C, per record
    noise_multiplier: float  # σ: noise std is σ·C per step
    sample_rate: float  # q = batch_size / records
    steps: int
    unit: AccountingUnit  # what one record is: "image" or "user"
    records: int  # photos ("image") or identities ("user") in the training set
    batch_size: int  # records per step, on average (Poisson sampling)

    @classmethod
    def plan(cls, *, epsilon: float | None = None, noise_multiplier: float | None = None, delta: float,
             max_grad_norm: float, unit: AccountingUnit, records: int, batch_size: int, steps: int) -> "DPPlan":
        """Derive σ from a target ε, or the ε a given σ costs: exactly one of the two."""
        if (epsilon is None) == (noise_multiplier is None):
            raise ConfigError("a DP plan needs exactly one of epsilon or noise_multiplier")
        if unit not in ("image", "user"):
            raise ConfigError(f"unit must be 'image' or 'user', got {unit!r}")
        if not 0 < max_grad_norm < math.inf:
            raise ConfigError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
        if records < 1 or not 1 <= batch_size <= records:
            raise ConfigError(f"need 1 <= batch_size <= records, got batch_size={batch_size}, records={records}")
        sample_rate = batch_size / records
        if noise_multiplier is None:
            noise_multiplier = noise_multiplier_for(epsilon, delta, sample_rate, steps)
        spent = epsilon_spent(noise_multiplier, delta, sample_rate, steps)
        return cls(epsilon=spent, delta=delta, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                   sample_rate=sample_rate, steps=steps, unit=unit, records=records, batch_size=batch_size)

    @classmethod
    def for_defense(cls, defense: DefenseConfig, *, records: int, batch_size: int, steps: int) -> "DPPlan":
        """The plan of a dp_sgd / dpgm defense for a training set of `records` records."""
        if defense.kind not in DP_KINDS:
            raise ConfigError(f"a {defense.kind!r} defense has no DP plan (DP defenses: {', '.join(DP_KINDS)})")
        return cls.plan(epsilon=defense.epsilon, noise_multiplier=defense.noise_multiplier, delta=defense.delta,
                        max_grad_norm=defense.max_grad_norm, unit=defense.accounting, records=records,
                        batch_size=batch_size, steps=steps)

    def summary(self) -> dict[str, Any]:
        """The plan as MLflow params / manifest JSON (ε = ∞ written as "inf")."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in fields.items()}
