"""Which regime a study's victims are in: the only question to ask before reading the attack's figures.

The paper's question exists only where the victim's model has learned its person (**strength**:
org above base) *and* keeps it behind its own trigger (**binding**: org above every prompt that
does not name the trigger — the class prompt, the empty prompt, a wrong trigger). A victim that
did not learn its person holds nothing to leak; a victim whose model draws its person for every
prompt leaks to anyone who samples it, without an attack. Both are findings, but in neither does
"rec" measure the attack.

Per victim (identity similarity, the evaluation's scale):
    strength = org − base
    binding  = org − max(controls)          (the best of the no-attack controls for that victim)
Per study: the regime is "weak" unless the owner's images verify and identify (org verified and
org top-1 victim at or above the targets below), "unbound" when some control sits more than
`bound_margin` above base (mean over victims), else "strong and bound".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from .config import CONTROLS
from .metrics import ConditionMetrics, Estimate

# The targets of a study in the paper's regime (issue "victims that learn their person"): the owner's
# images are verified as the person at least half the time and identify the victim for 4 in 5 victims,
# and no prompt without the trigger moves more than 0.05 similarity from the base model.
STRONG_VERIFIED = 0.5
STRONG_TOP1_VICTIM = 0.8
BOUND_MARGIN = 0.05

WEAK, UNBOUND, STRONG_BOUND = "weak", "unbound", "strong and bound"
MEANING = {
    WEAK: "victims did not learn their person: their LoRAs hold little to leak, so the attack's figures do "
          "not measure the attack",
    UNBOUND: "every prompt draws the person: the LoRA leaks without an attack (a control equals org), so the "
             "attack's figures do not measure the attack",
    STRONG_BOUND: "victims learned their person and hide it behind their trigger: the paper's regime, in which "
                  "rec measures what the weights alone give away",
}


@dataclass(frozen=True)
class VictimRegime:
    victim_id: str
    strength: float | None  # org − base similarity
    binding: float | None  # org − the best control's similarity
    best_control: str | None  # that control


@dataclass(frozen=True)
class StudyRegime:
    regime: str
    meaning: str
    org_verified: float | None
    org_top1_victim: float | None
    strength: Estimate  # mean over victims of org − base, with its bootstrap interval
    binding: Estimate  # mean over victims of org − the victim's best control
    control_over_base: dict[str, Estimate]  # each control − base
    victims: tuple[VictimRegime, ...]

    @property
    def warning(self) -> str | None:
        return None if self.regime == STRONG_BOUND else f"WARNING: {self.meaning}"

    def headline(self) -> dict[str, float]:
        """Flat numbers for MLflow and sweeps."""
        out: dict[str, float] = {}
        for name, est in (("strength", self.strength), ("binding", self.binding)):
            if est.value is not None:
                out.update({f"org.{name}": est.value, f"org.{name}_lo": est.low, f"org.{name}_hi": est.high})
        out["regime.strong_and_bound"] = float(self.regime == STRONG_BOUND)
        return out

    def summary_line(self) -> str:
        return (f"regime: {self.regime} — strength (org − base) {_fmt(self.strength)}, binding (org − best "
                f"control) {_fmt(self.binding)}; org verified {_rate(self.org_verified)}, org top-1 victim "
                f"{_rate(self.org_top1_victim)} (targets {STRONG_VERIFIED:.1f} / {STRONG_TOP1_VICTIM:.1f}; "
                f"controls within {BOUND_MARGIN:.2f} of base)")

    def to_dict(self) -> dict:
        return {"regime": self.regime, "meaning": self.meaning, "org_verified": self.org_verified,
                "org_top1_victim": self.org_top1_victim, "strength": asdict(self.strength),
                "binding": asdict(self.binding),
                "control_over_base": {k: asdict(v) for k, v in self.control_over_base.items()},
                "victims": [asdict(v) for v in self.victims]}


def _fmt(est: Estimate) -> str:
    return "-" if est.value is None else f"{est.value:+.3f} [{est.low:+.3f}, {est.high:+.3f}]"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _similarities(m: ConditionMetrics) -> np.ndarray:
    return np.array([np.nan if v.similarity is None else v.similarity for v in m.victims], dtype=np.float64)


def mean_with_interval(values: np.ndarray, n_boot: int, seed: int) -> Estimate:
    """Mean over victims of per-victim values (NaN left out), with a bootstrap 95% interval over victims."""
    values = values[~np.isnan(values)]
    if not values.size:
        return Estimate(None, None, None)
    boot = values[np.random.default_rng(seed).integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Estimate(float(values.mean()), float(low), float(high))


def study_regime(metrics: Mapping[str, ConditionMetrics], n_boot: int = 1000, seed: int = 0) -> StudyRegime | None:
    """The study's regime from its evaluation's per-condition metrics; None without org and base."""
    if "org" not in metrics or "base" not in metrics:
        return None
    org, base = metrics["org"], metrics["base"]
    ids = [v.victim_id for v in org.victims]
    controls = [c for c in CONTROLS if c in metrics and [v.victim_id for v in metrics[c].victims] == ids]
    org_sim, base_sim = _similarities(org), _similarities(base)
    strength = org_sim - base_sim
    control_sims = np.stack([_similarities(metrics[c]) for c in controls]) if controls else None
    victims = []
    binding = np.full(len(ids), np.nan)
    for i, victim_id in enumerate(ids):
        best = None
        if control_sims is not None and not np.all(np.isnan(control_sims[:, i])):
            j = int(np.nanargmax(control_sims[:, i]))
            best = controls[j]
            binding[i] = org_sim[i] - control_sims[j, i]
        victims.append(VictimRegime(victim_id, None if np.isnan(strength[i]) else float(strength[i]),
                                    None if np.isnan(binding[i]) else float(binding[i]), best))
    over_base = {c: mean_with_interval(_similarities(metrics[c]) - base_sim, n_boot, seed) for c in controls}
    verified, top1 = org.verified.value, org.top1_victim.value
    if verified is None or top1 is None or verified < STRONG_VERIFIED or top1 < STRONG_TOP1_VICTIM:
        regime = WEAK
    elif any(e.value is not None and e.value > BOUND_MARGIN for e in over_base.values()):
        regime = UNBOUND
    else:
        regime = STRONG_BOUND
    return StudyRegime(regime, MEANING[regime], verified, top1, mean_with_interval(strength, n_boot, seed),
                       mean_with_interval(binding, n_boot, seed), over_base, tuple(victims))
