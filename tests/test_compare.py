"""`compare_runs` / `format_table` on a real sqlite MLflow store."""

from __future__ import annotations

import time

import numpy as np
import pytest

from loraleak.errors import LoraleakError
from loraleak.evaluation.compare import compare_runs, format_table
from loraleak.evaluation.metrics import score_embeddings, summarise
from loraleak.tracking import default_tracking_uri, mlflow_run


class L1Scorer:
    name, threshold = "l1-test", 1.0

    def distance(self, a, b):
        return float(np.abs(a - b).sum())

    def similarity(self, a, b):
        return max(0.0, 1 - self.distance(a, b) / 2)


def rec_metrics(offset: float):
    refs = {"A": [np.zeros(2)], "B": [np.full(2, 3.0)]}
    scores = [score_embeddings(L1Scorer(), [np.full(2, offset), np.full(2, 2 * offset)], refs, "A")]
    return summarise(scores, n_boot=50).flat("rec/")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlflow")
    uri = default_tracking_uri(workdir)
    ids = {}
    for name, rank, offset in [("attack-r4", 4, 0.2), ("attack-r8", 8, 0.4), ("attack-r8", 16, 0.1)]:
        with mlflow_run("attack", name, tracking_uri=uri, workdir=workdir) as run:
            run.log_params({"lora": {"rank": rank}, "lr": 1e-3})
            run.log_metrics(rec_metrics(offset))
        ids.setdefault(name, []).append(run.run_id)
        time.sleep(0.01)  # distinct start times: "newest of a name" must be well defined
    return uri, ids


def test_compare_by_id_and_name(store):
    uri, ids = store
    df = compare_runs([ids["attack-r4"][0], "attack-r8"], uri)
    assert list(df["run_name"]) == ["attack-r4", "attack-r8"]
    assert df["run_id"].iloc[1] == ids["attack-r8"][-1]  # a repeated name means its newest run
    assert list(df["params.lora.rank"]) == ["4", "16"]
    assert "params.lr" not in df.columns  # equal in both runs: not a key param
    assert df["metrics.rec/verified"].tolist() == [rec_metrics(0.2)["rec/verified"], rec_metrics(0.1)["rec/verified"]]
    assert df["metrics.rec/similarity"].iloc[0] == pytest.approx(rec_metrics(0.2)["rec/similarity"])
    assert set(df["experiment"]) == {"attack"} and set(df["status"]) == {"FINISHED"}

    chosen = compare_runs(ids["attack-r8"], uri, params=["lr"])
    assert list(chosen.filter(like="params.").columns) == ["params.lr"]


def test_format_table_puts_runs_side_by_side_with_intervals(store):
    uri, ids = store
    df = compare_runs([ids["attack-r4"][0], *ids["attack-r8"]], uri)
    text = format_table(df)
    header = text.splitlines()[0]
    assert "attack-r4" in header and "attack-r8" in header and "attack-r8 (2)" in header
    sim = next(line for line in text.splitlines() if line.startswith("metrics.rec/similarity "))
    m = rec_metrics(0.2)
    assert f"{m['rec/similarity']:.3f} [{m['rec/similarity_lo']:.3f}, {m['rec/similarity_hi']:.3f}]" in sim
    assert "_lo" not in text and "_hi" not in text  # folded into their metric's row
    assert "params.lora.rank" in text


def test_unknown_runs_and_unreachable_stores_fail_in_one_line(store, tmp_path):
    uri, _ = store
    with pytest.raises(LoraleakError, match="no MLflow run with id or name 'nope'") as e:
        compare_runs(["nope"], uri)
    assert "\n" not in str(e.value)
    with pytest.raises(LoraleakError, match="no MLflow run"):
        compare_runs(["0" * 32], uri)  # shaped like an id, but no such run
    missing = tmp_path / "absent" / "mlflow.db"
    with pytest.raises(LoraleakError, match="no MLflow store"):
        compare_runs(["x"], f"sqlite:///{missing}")
    assert not missing.exists()  # nothing created as a side effect
    with pytest.raises(LoraleakError, match="unreachable") as e:
        compare_runs(["x"], "http://127.0.0.1:9")
    assert "\n" not in str(e.value)
    with pytest.raises(LoraleakError, match="at least one"):
        compare_runs([], uri)


def test_a_study_is_named_by_its_experiment_and_the_headline_is_the_default(tmp_path, capsys):
    """Two studies' pipeline runs in one store: `loraleak compare A B` shows their headline, and plots it."""
    from loraleak.cli import main
    from loraleak.evaluation.compare import HEADLINE

    uri = default_tracking_uri(tmp_path)
    for study, rec in (("quick", 0.57), ("lfw", 0.44)):
        for status, value in (("FINISHED", rec), ("FAILED", 0.0)):  # a failed later run is not the study's result
            try:
                with mlflow_run(study, f"{study}-run", uri, tags={"loraleak.study": f"/runs/{study}"}) as run:
                    run.log_params({"out_dir": f"/runs/{study}", "attack": {"max_steps": 300}})
                    run.log_metrics({"rec.similarity": value, "rec.similarity_lo": value - 0.01,
                                     "rec.similarity_hi": value + 0.01, "org.similarity": 0.6, "chance_top1": 0.1,
                                     "rec.verified": 0.2, "victim_empty_prompt.top5_image": 0.3})
                    if status == "FAILED":
                        raise RuntimeError("a stage failed")
            except RuntimeError:
                pass
            time.sleep(0.01)
    table = compare_runs(["quick", "lfw"], uri, metrics=HEADLINE)
    assert list(table["experiment"]) == ["quick", "lfw"] and list(table["status"]) == ["FINISHED", "FINISHED"]
    assert table["metrics.rec.similarity"].tolist() == [0.57, 0.44]
    assert "metrics.rec.verified" not in table.columns and list(table.filter(like="params.").columns) == \
        ["params.out_dir"]
    assert main(["compare", "quick", "lfw", "--workdir", str(tmp_path), "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "metrics.rec.similarity " in out and "0.570 [0.560, 0.580]" in out and "top5" not in out
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert main(["compare", "quick", "lfw", "--workdir", str(tmp_path), "--all-metrics"]) == 0
    assert "victim_empty_prompt.top5_image" in capsys.readouterr().out


def test_a_sweep_is_named_by_its_experiment_and_every_trial_is_shown(tmp_path, capsys):
    """A sweep's experiment holds one pipeline run per trial (tagged with its trial id and label): `loraleak compare
    SWEEP` shows each trial's newest finished run, in the order the trials first ran, headed by their labels — the
    sweep's frontier table."""
    from loraleak.cli import main

    uri = default_tracking_uri(tmp_path)
    runs = [("t-inf", "epsilon=inf", "FINISHED", 0.60), ("t-10", "epsilon=10", "FINISHED", 0.52),
            ("t-inf", "epsilon=inf", "FINISHED", 0.61),  # a rerun of the first trial: its newest result counts
            ("t-1", "epsilon=1", "FAILED", 0.0)]  # a trial that never finished is not in the table
    for trial, label, status, org in runs:
        try:
            with mlflow_run("dp", f"dp-{trial}", uri, tags={"loraleak.study": "/runs/dp/stages",
                                                             "loraleak.trial_id": trial, "loraleak.label": label}) as run:
                run.log_params({"zoo": {"defense": {"epsilon": label.split("=")[1]}}})
                run.log_metrics({"org.similarity": org, "rec.similarity": org - 0.1,
                                 "rec_undefended.similarity": org - 0.2})
                if status == "FAILED":
                    raise RuntimeError("a stage failed")
        except RuntimeError:
            pass
        time.sleep(0.01)
    table = compare_runs(["dp"], uri)
    assert list(table["run_name"]) == ["epsilon=inf", "epsilon=10"]
    assert table["metrics.org.similarity"].tolist() == [0.61, 0.52]
    assert list(table["params.zoo.defense.epsilon"]) == ["inf", "10"]
    assert main(["compare", "dp", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "epsilon=inf" in out and "epsilon=10" in out and "metrics.rec_undefended.similarity" in out


def test_the_paired_comparison_needs_runs_that_report_an_evaluation(store):
    """`--against`: a stage's run (no evaluation of its own) is named as such, with what to name instead."""
    from loraleak.evaluation.compare import evaluation_folders

    uri, _ = store
    with pytest.raises(LoraleakError, match=r"run attack-r4 \(\w+\) reports no evaluation: name a study or a sweep "
                                            r"by its experiment \(its out folder's name, e\.g\. attack\)"):
        evaluation_folders(["attack-r4"], uri)
