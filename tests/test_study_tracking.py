"""A study in MLflow as its users expect it (loraleak.pipeline.tracking), on a real sqlite store and local Ray:
one store shared by the studies beside each other, an experiment per study, the stage runs nested under a
pipeline run that opens first and closes last (FAILED / KILLED when it does not finish), with the git
commit and the config; a rerun that skips stages links to their earlier runs, and a rerun of a complete
study adds no run. A larger attack.max_steps continues the attack into a new folder, the old one kept.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from loraleak.cli import main
from loraleak.config import from_dict
from loraleak.pipeline.config import PipelineConfig, with_overrides
from loraleak.pipeline.run import run_pipeline
from loraleak.pipeline.stages import ATTACK_LINE, plan_stages
from loraleak.pipeline.tracking import CONFIG_ARTIFACT, REUSED_TAG, STUDY_TAG, study_tracking_uri
from loraleak.tracking import FOLDER_TAG, GIT_COMMIT_TAG, PARENT_TAG, close_orphan_runs, mlflow_run
from studies import SMALLEST, TINY

REPO = Path(__file__).resolve().parents[1]


def all_runs(client: MlflowClient) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000)


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def smallest(tmp_path):
    from loraleak.base.tiny import build_tiny_pipeline

    build_tiny_pipeline(TINY).save_pretrained(tmp_path / "base", safe_serialization=True)
    return from_dict(PipelineConfig, {
        **SMALLEST, "out_dir": str(tmp_path / "studies" / "first"), "base": {"ref": str(tmp_path / "base")},
        "identities": {**SMALLEST["identities"], "num_identities": 4},
        "baselines": [{"name": "nearest_neighbour", "kind": "nearest_neighbour"}],
        "evaluation": {**SMALLEST["evaluation"], "n_images": 1, "controls": ["victim_class_prompt"]}})


def test_the_default_store_is_shared_by_the_studies_beside_each_other(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = from_dict(PipelineConfig, {"out_dir": str(tmp_path / "runs" / "quick")})
    b = from_dict(PipelineConfig, {"out_dir": str(tmp_path / "runs" / "lfw")})
    store = f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    assert study_tracking_uri(a, a.out_dir.resolve()) == study_tracking_uri(b, b.out_dir.resolve()) == store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert study_tracking_uri(a, a.out_dir.resolve()) == "sqlite:///elsewhere.db"
    explicit = with_overrides(a, {"tracking_uri": "http://mlflow.example:5000"})
    assert study_tracking_uri(explicit, a.out_dir.resolve()) == "http://mlflow.example:5000"


@pytest.mark.slow  # ~2 min (6 on a busy machine); test_pipeline's end-to-end test checks the nesting too
def test_a_study_is_one_pipeline_run_with_its_stage_runs_nested(ray_local, smallest, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, out = smallest, smallest.out_dir.resolve()
    result = run_pipeline(cfg, show_progress=False)
    assert result.tracking_uri == f"sqlite:///{out.parent / 'mlflow.db'}"
    client = MlflowClient(result.tracking_uri)
    pipeline = client.get_run(result.mlflow_run_ids["pipeline"])
    experiment = client.get_experiment(pipeline.info.experiment_id)
    assert experiment.name == "first" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert pipeline.info.status == "FINISHED" and pipeline.data.tags[STUDY_TAG] == str(out)
    # The checkout's commit when the study ran (HEAD, or an ancestor of it if a commit was made meanwhile).
    commit = pipeline.data.tags[GIT_COMMIT_TAG]
    assert len(commit) == 40 and subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit,
                                                 "HEAD"]).returncode == 0
    config = client.download_artifacts(pipeline.info.run_id, CONFIG_ARTIFACT)
    assert from_dict(PipelineConfig, yaml.safe_load(Path(config).read_text())) == cfg

    children = {r.info.run_id: r for r in all_runs(client) if r.data.tags.get(PARENT_TAG) == pipeline.info.run_id}
    assert {result.mlflow_run_ids[s] for s in ("zoo", "attack", "evaluation")} < set(children)
    assert len(children) == 4  # zoo, attack, the baseline, evaluation
    assert {r.info.experiment_id for r in children.values()} == {pipeline.info.experiment_id}
    assert all(r.info.status == "FINISHED" and GIT_COMMIT_TAG in r.data.tags for r in children.values())
    # The pipeline run opens before the first stage and closes after the last: its duration is the study's.
    assert pipeline.info.start_time <= min(r.info.start_time for r in children.values())
    assert pipeline.info.end_time >= max(r.info.end_time for r in children.values())
    assert pipeline.info.end_time - pipeline.info.start_time >= 0.8 * result.wall_time_s * 1000
    before = {r.info.run_id for r in all_runs(client)}

    # A rerun of the complete study computes nothing and adds no run: it reports the earlier pipeline run.
    again = run_pipeline(cfg, show_progress=False)
    assert again.mlflow_run_ids == result.mlflow_run_ids and {r.info.run_id for r in all_runs(client)} == before

    # A longer attack: its own folder, continued from the earlier attack's last checkpoint (which is kept, and
    # so is the evaluation made of it); the new pipeline run nests only the stages that ran and links the rest.
    stages = plan_stages(cfg)
    old_attack = stages.attack.folder
    kept = digest(old_attack / "attack")
    longer_cfg = with_overrides(cfg, {"attack.max_steps": 4})
    longer = run_pipeline(longer_cfg, show_progress=False)
    assert longer.skipped == ["base", "zoo", "baselines"]
    new_attack = plan_stages(longer_cfg).attack.folder
    assert new_attack != old_attack and (new_attack / ATTACK_LINE).is_file()
    assert Path(longer.stage_dirs["attack"]) == new_attack / "attack"
    assert digest(old_attack / "attack") == kept and Path(result.stage_dirs["evaluation"]).is_dir()
    attack_run = client.get_run(longer.mlflow_run_ids["attack"])
    assert Path(attack_run.data.params["resume_from"]).is_relative_to(old_attack)
    # Continued at step 2: this run trained steps 3 and 4 only.
    assert [m.step for m in client.get_metric_history(attack_run.info.run_id, "loss")] == [3, 4]
    second = client.get_run(longer.mlflow_run_ids["pipeline"])
    assert second.info.run_id != pipeline.info.run_id and second.info.status == "FINISHED"
    assert second.data.tags[REUSED_TAG + "zoo"] == result.mlflow_run_ids["zoo"]
    assert second.data.tags[REUSED_TAG + "baseline.nearest_neighbour"] in children
    new_children = [r for r in all_runs(client) if r.data.tags.get(PARENT_TAG) == second.info.run_id]
    assert sorted(r.info.run_name.split(" ")[0].split("-")[0] for r in new_children) == ["attack", "evaluation"]
    assert {r.data.tags[FOLDER_TAG] for r in new_children} >= {str(new_attack)}

    # Back to the shorter attack: still complete, nothing reruns, the first pipeline run is reported.
    assert run_pipeline(cfg, show_progress=False).mlflow_run_ids["pipeline"] == pipeline.info.run_id


def test_a_failed_study_run_says_so_and_keeps_its_config(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "runs" / "small"
    assert main(["run", "--out", str(out), "--set", "identities.num_identities=2"]) == 2
    assert "held-out" in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = all_runs(client)
    assert run.info.status == "FAILED" and run.data.tags[STUDY_TAG] == str(out.resolve())
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, CONFIG_ARTIFACT)).read_text())
    assert config["identities"]["num_identities"] == 2


def test_an_interrupted_run_is_killed_and_orphans_are_closed_per_study(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt):
        with mlflow_run("study", "interrupted", uri, tags={STUDY_TAG: "/a"}) as run:
            raise KeyboardInterrupt
    client = MlflowClient(uri)
    assert client.get_run(run.run_id).info.status == "KILLED"
    experiment = client.get_experiment_by_name("study").experiment_id
    mine = client.create_run(experiment, run_name="killed -9", tags={STUDY_TAG: "/a"})
    nested = client.create_run(experiment, run_name="its stage", tags={PARENT_TAG: mine.info.run_id})
    other = client.create_run(experiment, run_name="another study, live", tags={STUDY_TAG: "/b"})
    assert set(close_orphan_runs(uri, {STUDY_TAG: "/a"})) == {mine.info.run_id, nested.info.run_id}
    status = {r.info.run_name: r.info.status for r in all_runs(client)}
    assert status == {"interrupted": "KILLED", "killed -9": "KILLED", "its stage": "KILLED",
                      "another study, live": "RUNNING"}
