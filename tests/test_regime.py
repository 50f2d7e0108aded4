"""The study's regime (strength, binding; weak / unbound / strong and bound) by hand, and in the report."""

import numpy as np
import pytest
from PIL import Image

from loraleak.evaluation.metrics import ImageScores, summarise
from loraleak.evaluation.regime import STRONG_BOUND, UNBOUND, WEAK, study_regime
from loraleak.evaluation.report import write_report


def victim(name: str, distances: list[float]) -> ImageScores:
    """Images of victim `name` at these distances from its photos; candidate 'other' at 0.5, threshold 0.4."""
    return ImageScores(name, (name, "other"), 0.4, np.array([[d, 0.5] for d in distances]),
                       np.array([1 - d / 2 for d in distances]))


def condition(*per_victim: list[float]):
    return summarise([victim(f"v{i}", d) for i, d in enumerate(per_victim)], n_boot=200)


STRONG_ORG = condition([0.1, 0.2], [0.2, 0.3], [0.1, 0.1])  # all verified (<= 0.4), all nearer than 'other'
BASE = condition([0.9, 0.9], [0.8, 0.9], [0.9, 1.0])


def test_strong_and_bound_victims_and_their_per_victim_figures():
    controls = {"victim_class_prompt": condition([0.9, 0.9], [0.8, 0.9], [0.9, 0.95]),
                "victim_wrong_trigger": condition([0.85, 0.9], [0.8, 0.85], [0.95, 1.0])}
    regime = study_regime({"org": STRONG_ORG, "base": BASE, **controls}, n_boot=200)
    assert regime.regime == STRONG_BOUND and regime.warning is None
    first = regime.victims[0]
    # v0: org similarity 1 - 0.15/2 = 0.925, base 0.55, best control: wrong trigger (distance 0.875) 0.5625.
    assert first.strength == pytest.approx(0.925 - 0.55)
    assert first.best_control == "victim_wrong_trigger" and first.binding == pytest.approx(0.925 - 0.5625)
    assert regime.strength.low <= regime.strength.value <= regime.strength.high
    assert regime.headline()["regime.strong_and_bound"] == 1.0


def test_a_control_that_draws_the_person_makes_the_study_unbound():
    unbound = {"victim_wrong_trigger": condition([0.1, 0.2], [0.2, 0.3], [0.2, 0.1])}  # = org
    regime = study_regime({"org": STRONG_ORG, "base": BASE, **unbound}, n_boot=200)
    assert regime.regime == UNBOUND and "leaks without an attack" in regime.warning
    assert regime.binding.value == pytest.approx(0.0, abs=0.03)


def test_victims_that_did_not_learn_are_weak_whatever_the_controls():
    weak_org = condition([0.6, 0.7], [0.8, 0.9], [0.5, 0.6])  # none verified
    regime = study_regime({"org": weak_org, "base": BASE}, n_boot=200)
    assert regime.regime == WEAK and "did not learn their person" in regime.warning
    assert study_regime({"org": weak_org}) is None  # no base: nothing to compare with


def test_the_report_shows_the_verdict_and_each_victims_strip(tmp_path):
    metrics = {"org": STRONG_ORG, "base": BASE,
               "victim_wrong_trigger": condition([0.1, 0.2], [0.2, 0.3], [0.2, 0.1])}
    regime = study_regime(metrics, n_boot=200)
    image = Image.new("RGB", (32, 32), (200, 120, 90))
    shown = [{"identity_id": "v0", "private": [image] * 3, "org": [image] * 4, "victim_wrong_trigger": [image] * 4,
              "base": [image] * 4}]
    html = write_report(tmp_path, "t", metrics, shown, regime=regime, verdict=["rec − best control: +0.010"]) \
        .read_text()
    assert "Verdict: victims are unbound" in html and "rec − best control: +0.010" in html
    assert "strength (org − base)" in html and "binding (org − victim_wrong_trigger)" in html
    assert 'class="glance"' in html and "best control<br><small>victim_wrong_trigger" in html
