"""Two evaluations of the same victims, compared victim by victim: what `loraleak compare RUN... --against REF`
prints.

A setting that changes every victim's LoRA (its rank, a defense, an ε) moves each victim's figures by a
little, while victims differ from one another by a lot: two studies' intervals over victims then overlap
even when nearly every victim moved the same way. Paired per victim, the spread between victims cancels
and the question "did this setting change the leak?" gets its own interval. Each measure is a per-victim
number of one evaluation; the comparison is its mean over the victims both evaluations scored, A − REF,
with a bootstrap 95% interval over victims, and how many victims went down.

    leak      rec − the evaluation's best control (its headline `rec_over_best_control`: what the attack
              gives beyond what needs no attack)
    strength  org − base (what the victim's model learned of its person)
    binding   org − the victim's best control (how well the trigger hides it)
    rec, org  the similarities themselves

Only `evaluation.json` is read (its per-victim similarities), so the images need not be on this machine.
`evaluations_in(folder)` finds the evaluations a folder holds or reports: an evaluation folder, a study's
out folder (the evaluation its last run reported), a sweep's out folder (each finished trial's) or a trial's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import LoraleakError
from .config import CONTROLS
from .metrics import Estimate
from .regime import mean_with_interval

# Not imported from the modules that write them: those pull in Ray and the scorers, and the pipeline and the
# sweeps sit above the evaluation (ARCHITECTURE.md). tests/test_paired.py checks they are the same.
SUMMARY_FILE = "evaluation.json"  # loraleak.evaluation.evaluate.SUMMARY_FILE
STUDY_FILE = "pipeline.json"  # loraleak.pipeline.run.RESULT_FILE
SWEEP_FILE = "sweep.json"  # loraleak.sweeps.run.SWEEP_FILE
TRIAL_RECORD = "trials/{trial_id}/result.json"  # loraleak.sweeps.results.record_path
FINISHED = "finished"  # loraleak.sweeps.results.FINISHED
MEASURES = ("leak", "strength", "binding", "rec", "org")
SAME = 1e-6  # per-victim differences smaller than this are no change (float rounding)


def evaluations_in(folder: str | Path) -> list[tuple[str, Path]]:
    """(name, evaluation folder) of each evaluation `folder` is or reports, in the sweep's trial order."""
    folder = Path(folder)
    if (folder / SUMMARY_FILE).is_file():
        return [(folder.name, folder)]
    if (folder / STUDY_FILE).is_file():
        return [(folder.name, Path(_read_json(folder / STUDY_FILE)["stage_dirs"]["evaluation"]))]
    if (folder / SWEEP_FILE).is_file():
        trials = _read_json(folder / SWEEP_FILE)["trials"]
        records = [_trial_record(folder / TRIAL_RECORD.format(trial_id=t["trial_id"])) for t in trials]
        found = [r for r in records if r is not None]
        if not found:
            raise LoraleakError(f"sweep {folder} has no finished trial")
        return found
    record = _trial_record(folder / Path(TRIAL_RECORD).name)
    if record is not None:
        return [record]
    raise LoraleakError(f"{folder} is not an evaluation, a study, a sweep or a finished sweep trial folder")


def _trial_record(path: Path) -> tuple[str, Path] | None:
    """(label, evaluation folder) of a finished trial's record; None for a missing, unfinished or damaged one."""
    try:
        record = json.loads(path.read_text())
        if record["status"] == FINISHED:
            return str(record["label"]), Path(record["stage_dirs"]["evaluation"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise LoraleakError(f"{path} is damaged ({e})") from None


@dataclass(frozen=True)
class VictimFigures:
    """One evaluation's per-victim similarities: {condition: {victim: similarity}} (None: no face found)."""
    folder: Path
    best_control: str | None
    similarity: Mapping[str, Mapping[str, float | None]]

    @classmethod
    def read(cls, folder: str | Path) -> VictimFigures:
        folder = Path(folder)
        path = folder / SUMMARY_FILE
        if not path.is_file():
            raise LoraleakError(f"{folder} is not a finished evaluation (no {SUMMARY_FILE})")
        try:
            summary = json.loads(path.read_text())
            similarity = {name: {v["victim_id"]: v["similarity"] for v in m["victims"]}
                          for name, m in summary["metrics"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise LoraleakError(f"{path} is not an evaluation summary ({type(e).__name__}: {e})") from None
        return cls(folder, summary.get("best_control"), similarity)

    def per_victim(self, measure: str) -> dict[str, float]:
        """The measure for each victim where it can be computed."""
        sim = self.similarity

        def minus(a: str, b: str | None) -> dict[str, float]:
            if a not in sim or b is None or b not in sim:
                return {}
            return {v: x - sim[b][v] for v, x in sim[a].items() if x is not None and sim[b].get(v) is not None}

        if measure == "leak":
            return minus("rec", self.best_control)
        if measure == "strength":
            return minus("org", "base")
        if measure == "binding":
            controls = [c for c in CONTROLS if c in sim]
            out = {}
            for v, x in sim.get("org", {}).items():
                scored = [sim[c][v] for c in controls if sim[c].get(v) is not None]
                if x is not None and scored:
                    out[v] = x - max(scored)
            return out
        if measure in ("rec", "org"):
            return {v: x for v, x in sim.get(measure, {}).items() if x is not None}
        raise LoraleakError(f"unknown measure {measure!r}; one of {', '.join(MEASURES)}")


@dataclass(frozen=True)
class PairedDifference:
    """A − REF of one measure over the victims both have."""
    measure: str
    difference: Estimate
    n_victims: int
    n_lower: int  # victims whose measure is lower in A than in REF


def paired_differences(a: VictimFigures, reference: VictimFigures, measures: Sequence[str] = MEASURES,
                       n_boot: int = 2000, seed: int = 0) -> list[PairedDifference]:
    out = []
    for measure in measures:
        x, y = a.per_victim(measure), reference.per_victim(measure)
        victims = sorted(set(x) & set(y))
        d = np.array([x[v] - y[v] for v in victims], dtype=np.float64)
        # "Lower" by more than float rounding: images read back from the image cache score the same victim
        # with differences of 1e-9, which are not a change.
        out.append(PairedDifference(measure, mean_with_interval(d, n_boot, seed), d.size, int((d < -SAME).sum())))
    return out


def format_paired(rows: Sequence[tuple[str, Sequence[PairedDifference]]], reference: str) -> str:
    """One line per compared evaluation, one column per measure: "+0.012 [-0.004, +0.030] 9/21 lower"."""
    if not rows:
        return "(no runs)"
    measures = [p.measure for p in rows[0][1]]
    cells = [[name] + [difference_text(p) for p in paired] for name, paired in rows]
    header = [f"A − {reference}"] + list(measures)
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.append("per victim, A − reference, mean over the victims both scored [bootstrap 95% over victims], "
                 "and how many went down; leak = rec − best control, strength = org − base, "
                 "binding = org − the victim's best control")
    return "\n".join(lines)


def difference_text(p: PairedDifference) -> str:
    e = p.difference
    if e.value is None:
        return "-"
    return f"{e.value:+.3f} [{e.low:+.3f}, {e.high:+.3f}] {p.n_lower}/{p.n_victims} lower"
