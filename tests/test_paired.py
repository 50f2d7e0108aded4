"""The paired per-victim comparison of two evaluations (`loraleak compare RUN... --against REF`).

The evaluation summaries here are built by the evaluation's own scoring and summarising (`score_embeddings`,
`summarise`, `headline_metrics`) from embeddings at chosen distances, so the expected differences are known;
the end-to-end path (a real sweep's trials, found through MLflow) is in test_sweeps.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loraleak.errors import LoraleakError
from loraleak.evaluation.evaluate import headline_metrics
from loraleak.evaluation.metrics import score_embeddings, summarise
from loraleak.evaluation.paired import MEASURES, VictimFigures, evaluations_in, format_paired, paired_differences

VICTIMS = ["v0", "v1", "v2", "v3"]


class L1Scorer:
    name, threshold = "l1-test", 1.0

    def distance(self, a, b):
        return float(np.abs(a - b).sum())

    def similarity(self, a, b):
        return max(0.0, 1 - self.distance(a, b))


def write_evaluation(folder, offsets):
    """An evaluation.json whose condition c draws, for victim i, an image at distance offsets[c][i] from the
    victim's reference (None: no face); every victim's reference is a point of its own."""
    refs = {v: [np.array([10.0 * i, 0.0])] for i, v in enumerate(VICTIMS)}
    metrics = {}
    for condition, by_victim in offsets.items():
        scores = [score_embeddings(L1Scorer(), [None if d is None else refs[v][0] + np.array([0.0, d])], refs, v)
                  for v, d in zip(VICTIMS, by_victim)]
        metrics[condition] = summarise(scores, n_boot=50)
    headline, best = headline_metrics(metrics, n_boot=50)
    folder.mkdir(parents=True)
    (folder / "evaluation.json").write_text(json.dumps(
        {"metrics": {k: m.to_dict() for k, m in metrics.items()}, "best_control": best, "headline": headline}))
    return headline


REFERENCE = {"org": [0.2, 0.2, 0.3, 0.1], "rec": [0.4, 0.5, 0.4, 0.3], "base": [0.9, 0.8, 0.9, 0.9],
             "victim_class_prompt": [0.8, 0.9, 0.85, 0.9], "victim_wrong_trigger": [0.7, 0.75, 0.8, 0.7]}


def test_each_measure_is_the_victims_mean_difference_and_leak_matches_the_headlines(tmp_path):
    # A: rec nearer its victim by 0.1 for every victim (the leak grows by 0.1), org farther by 0.05 for
    # three victims and unmeasured (no face) for the fourth.
    a = {**REFERENCE, "rec": [d - 0.1 for d in REFERENCE["rec"]], "org": [0.25, 0.25, 0.35, None]}
    head_a, head_ref = write_evaluation(tmp_path / "a", a), write_evaluation(tmp_path / "ref", REFERENCE)
    found = {p.measure: p for p in paired_differences(VictimFigures.read(tmp_path / "a"),
                                                      VictimFigures.read(tmp_path / "ref"))}
    assert list(found) == list(MEASURES)
    leak = found["leak"]
    assert leak.difference.value == pytest.approx(head_a["rec_over_best_control.similarity"]
                                                  - head_ref["rec_over_best_control.similarity"])
    assert leak.difference.value == pytest.approx(0.1) and (leak.n_victims, leak.n_lower) == (4, 0)
    assert leak.difference.low == pytest.approx(0.1) and leak.difference.high == pytest.approx(0.1)
    for measure in ("strength", "org"):  # the victim without a face is left out
        assert found[measure].difference.value == pytest.approx(-0.05)
        assert (found[measure].n_victims, found[measure].n_lower) == (3, 3)
    # binding = org − the victim's best control (the wrong trigger for every victim here): −0.05 as well
    assert found["binding"].difference.value == pytest.approx(-0.05) and found["binding"].n_victims == 3

    text = format_paired([("a", paired_differences(VictimFigures.read(tmp_path / "a"),
                                                   VictimFigures.read(tmp_path / "ref")))], "ref")
    assert "A − ref" in text.splitlines()[0] and "+0.100 [+0.100, +0.100] 0/4 lower" in text


def test_the_interval_is_over_victims_and_spans_zero_when_victims_disagree(tmp_path):
    a = {**REFERENCE, "rec": [0.3, 0.6, 0.3, 0.4]}  # two victims leak more, two less
    write_evaluation(tmp_path / "a", a), write_evaluation(tmp_path / "ref", REFERENCE)
    [leak] = paired_differences(VictimFigures.read(tmp_path / "a"), VictimFigures.read(tmp_path / "ref"), ["leak"])
    assert leak.difference.value == pytest.approx(0.0, abs=1e-12) and leak.n_lower == 2
    assert leak.difference.low < 0 < leak.difference.high


def test_rounding_is_no_change(tmp_path):
    write_evaluation(tmp_path / "ref", REFERENCE)
    summary = json.loads((tmp_path / "ref" / "evaluation.json").read_text())
    for victim in summary["metrics"]["org"]["victims"]:
        victim["similarity"] -= 1e-9  # as the same images scored again may differ
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "evaluation.json").write_text(json.dumps(summary))
    [org] = paired_differences(VictimFigures.read(tmp_path / "a"), VictimFigures.read(tmp_path / "ref"), ["org"])
    assert org.n_victims == 4 and org.n_lower == 0


def test_folders_name_their_evaluations_and_bad_ones_fail_in_one_line(tmp_path):
    write_evaluation(tmp_path / "runs" / "study" / "evaluation-1", REFERENCE)
    study = tmp_path / "runs" / "study"
    (study / "pipeline.json").write_text(json.dumps({"stage_dirs": {"evaluation": str(study / "evaluation-1")}}))
    assert evaluations_in(study) == [("study", study / "evaluation-1")]
    assert evaluations_in(study / "evaluation-1") == [("evaluation-1", study / "evaluation-1")]
    with pytest.raises(LoraleakError, match="is not an evaluation, a study, a sweep"):
        evaluations_in(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "evaluation.json").write_text("{not json")
    with pytest.raises(LoraleakError, match="is not an evaluation summary"):
        VictimFigures.read(tmp_path / "bad")
    with pytest.raises(LoraleakError, match="not a finished evaluation"):
        VictimFigures.read(tmp_path / "missing")
    with pytest.raises(LoraleakError, match="unknown measure 'leaks'"):
        VictimFigures.read(study / "evaluation-1").per_victim("leaks")


def test_the_file_names_are_those_the_stages_write():
    from loraleak.evaluation import paired
    from loraleak.evaluation.evaluate import SUMMARY_FILE
    from loraleak.pipeline.run import RESULT_FILE
    from loraleak.sweeps.results import FINISHED, record_path
    from loraleak.sweeps.run import SWEEP_FILE

    assert (paired.SUMMARY_FILE, paired.STUDY_FILE, paired.SWEEP_FILE) == (SUMMARY_FILE, RESULT_FILE, SWEEP_FILE)
    assert paired.TRIAL_RECORD.format(trial_id="t1") == str(record_path(Path(""), "t1"))
    assert paired.FINISHED == FINISHED


def test_a_sweep_folder_names_each_finished_trial_and_cannot_be_the_reference(tmp_path, capsys):
    from loraleak.cli import main
    from loraleak.sweeps.results import record_path, write_record

    sweep = tmp_path / "sweep"
    trials = [{"trial_id": f"t{i}", "label": f"rank={r}"} for i, r in enumerate((4, 16, 64))]
    (sweep).mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"trials": trials}))
    for i, status in ((0, "finished"), (1, "finished"), (2, "failed")):  # the failed one has no evaluation
        write_evaluation(tmp_path / f"evaluation-{i}", {**REFERENCE, "rec": [d + 0.01 * i for d in REFERENCE["rec"]]})
        write_record(record_path(sweep, f"t{i}"), {**trials[i], "status": status, "metrics": {},
                                                  "stage_dirs": {"evaluation": str(tmp_path / f"evaluation-{i}")}})
    assert evaluations_in(sweep) == [("rank=4", tmp_path / "evaluation-0"), ("rank=16", tmp_path / "evaluation-1")]
    assert evaluations_in(record_path(sweep, "t1").parent) == [("rank=16", tmp_path / "evaluation-1")]
    assert main(["compare", str(sweep), "--against", str(record_path(sweep, "t1").parent)]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith("rank=4 ")]
    assert row.split()[1:5] == ["+0.010", "[+0.010,", "+0.010]", "0/4"]  # rec nearer by 0.01: the leak up by 0.01
    assert main(["compare", str(tmp_path / "evaluation-2"), "--against", str(sweep)]) == 2
    assert "--against names 2 evaluations" in capsys.readouterr().err
