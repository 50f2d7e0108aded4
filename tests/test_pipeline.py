"""The whole study end to end: identities -> base -> zoo -> attack (Ray Train) -> baselines ->
evaluation -> report, tracked in MLflow, and a rerun that skips every complete stage.

The CI end-to-end test (`test_the_smallest_study_end_to_end`) runs it on a random 16 px base, with
one baseline and one control, the zoo in this process, the evaluation on one Ray actor. The slow tests run the
default path at the smallest sizes: the shipped tiny base, both cheap baselines, every control, zoo
and evaluation on Ray workers (~3 minutes on a busy 2-core machine).
"""

import json
from pathlib import Path

import pytest
import yaml

from loraleak.base.tiny import build_tiny_pipeline

from loraleak.cli import main
from loraleak.config import from_dict, to_dict
from loraleak.errors import ConfigError
from loraleak.pipeline.cli import load_pipeline_config
from loraleak.pipeline.config import UNDEFENDED_CONDITION, PipelineConfig, with_overrides
from loraleak.pipeline.run import run_pipeline
from loraleak.pipeline.stages import EVALUATION_INPUTS, STAGES, settings_of, stage_keys
from loraleak.zoo.manifest import read_manifest
from studies import SMALLEST, TINY

CONDITIONS = ["org", "rec", "nearest_neighbour", "pca_map", "base", "victim_class_prompt", "victim_empty_prompt",
              "victim_wrong_trigger"]


@pytest.fixture(scope="module")
def study(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    cfg = from_dict(PipelineConfig, {**SMALLEST, "out_dir": str(out)})
    return cfg, run_pipeline(cfg, show_progress=False)


def random_base(directory):
    """A random 16 px SD-architecture base: fast enough for a whole study in CI."""
    build_tiny_pipeline(TINY).save_pretrained(directory, safe_serialization=True)
    return str(directory)


def test_the_smallest_study_end_to_end(ray_local, tmp_path):
    random_base(tmp_path / "base")
    cfg = from_dict(PipelineConfig, {
        **SMALLEST, "out_dir": str(tmp_path / "out"), "base": {"ref": str(tmp_path / "base")},
        "identities": {**SMALLEST["identities"], "num_identities": 4},  # 2 held out
        "baselines": [{"name": "nearest_neighbour", "kind": "nearest_neighbour"}],
        "evaluation": {**SMALLEST["evaluation"], "n_images": 1, "controls": ["victim_class_prompt"]}})
    result = run_pipeline(cfg, show_progress=False)
    conditions = ["org", "rec", "nearest_neighbour", "base", "victim_class_prompt"]
    assert all(f"{c}.face_found" in result.metrics and f"{c}.top1_image" in result.metrics for c in conditions)
    assert result.metrics["chance_top1"] == 0.5 and result.report.is_file()
    assert set(result.mlflow_run_ids) == {"zoo", "attack", "evaluation", "pipeline"}
    assert all(result.mlflow_run_ids.values())

    # MLflow: the stage runs nested under the pipeline run, in the study's experiment, with the git commit.
    from mlflow.tracking import MlflowClient

    from loraleak.tracking import GIT_COMMIT_TAG, PARENT_TAG

    client = MlflowClient(result.tracking_uri)
    pipeline = client.get_run(result.mlflow_run_ids["pipeline"])
    assert client.get_experiment(pipeline.info.experiment_id).name == "out" and GIT_COMMIT_TAG in pipeline.data.tags
    nested = {r.info.run_id for r in client.search_runs([pipeline.info.experiment_id],
                                                        f"tags.`{PARENT_TAG}` = '{pipeline.info.run_id}'")}
    assert {result.mlflow_run_ids[s] for s in ("zoo", "attack", "evaluation")} < nested and len(nested) == 4
    runs = len(client.search_runs([pipeline.info.experiment_id]))

    again = run_pipeline(cfg, show_progress=False)
    assert again.skipped == ["base", "zoo", "attack", "baselines", "evaluation"]
    assert again.metrics == result.metrics and again.mlflow_run_ids["evaluation"] == result.mlflow_run_ids["evaluation"]
    assert again.mlflow_run_ids == result.mlflow_run_ids  # nothing computed: no new run, the earlier one reported
    assert len(client.search_runs([pipeline.info.experiment_id])) == runs

    # An evaluation is complete only for the inputs it was computed from (recorded beside it): found beside
    # other ones (here its record names another attack) it is evaluated again, its per-victim results reused.
    marker = Path(result.stage_dirs["evaluation"]) / EVALUATION_INPUTS
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "attacks": {"rec": "another attack"}}))
    third = run_pipeline(cfg, show_progress=False)
    assert "evaluation" not in third.skipped and third.metrics == result.metrics
    # Only the evaluation ran: one new stage run under a new pipeline run, which links to the zoo's and attack's.
    rerun = client.get_run(third.mlflow_run_ids["pipeline"])
    assert rerun.data.tags["loraleak.reused.zoo"] == result.mlflow_run_ids["zoo"]
    assert rerun.data.tags["loraleak.reused.attack"] == result.mlflow_run_ids["attack"]
    assert len(client.search_runs([pipeline.info.experiment_id])) == runs + 2
    assert json.loads(marker.read_text())["attacks"]["rec"] != "another attack"


def test_a_defended_study_is_also_attacked_by_the_attack_trained_without_the_defense(ray_local, tmp_path):
    cfg = from_dict(PipelineConfig, {
        **SMALLEST, "out_dir": str(tmp_path / "out"), "base": {"ref": random_base(tmp_path / "base")},
        "identities": {**SMALLEST["identities"], "num_identities": 4}, "baselines": [],
        "zoo": {**SMALLEST["zoo"], "defense": {"kind": "output_noise", "relative_noise": 0.5}},
        "evaluation": {**SMALLEST["evaluation"], "n_images": 1, "controls": [], "workers": 0}})
    result = run_pipeline(cfg, show_progress=False)
    keys = stage_keys(cfg)
    plain = stage_keys(with_overrides(cfg, {"zoo.defense": {"kind": "none"}}))
    assert keys["undefended_zoo"] == plain["zoo"] != keys["zoo"] and keys["undefended_attack"] == plain["attack"]
    out = cfg.out_dir.resolve()
    assert (out / f"zoo-{plain['zoo']}" / "manifest.parquet").is_file() and (out / f"attack-{plain['attack']}").is_dir()
    # The undefended zoo was built first and the defended one derived from it (zoo.derive): every fine-tune
    # trained once, so the defended rows record the undefended training's start.
    trained = {(r["identity_id"], r["snapshot_step"]): r["started_at"]
               for r in read_manifest(str(out / f"zoo-{plain['zoo']}")).to_pylist()}
    rows = read_manifest(str(out / f"zoo-{keys['zoo']}")).to_pylist()
    assert rows and all(trained[r["identity_id"], r["snapshot_step"]] == r["started_at"] for r in rows)
    for condition in ("rec", UNDEFENDED_CONDITION):  # adaptive, and trained on undefended LoRAs
        assert 0 <= result.metrics[f"{condition}.top1_image"] <= 1
    # Run again, every stage is found complete; the undefended study's are named as such.
    again = run_pipeline(cfg, show_progress=False)
    assert again.skipped == ["base", "zoo", "attack", "baselines", "undefended zoo", "undefended attack",
                             "evaluation"]
    assert result.stage_dirs["evaluation"].endswith(f"evaluation-{keys['evaluation']}")
    # The undefended study itself, run now, reuses the zoo and attack the defended one built.
    undefended = run_pipeline(with_overrides(cfg, {"zoo.defense": {"kind": "none"}}), show_progress=False)
    assert {"zoo", "attack"} <= set(undefended.skipped) and f"{UNDEFENDED_CONDITION}.top1_image" not in undefended.metrics
    with pytest.raises(ConfigError, match="reserved"):
        from_dict(PipelineConfig, {"baselines": [{"name": UNDEFENDED_CONDITION, "kind": "pca_map"}]})


@pytest.mark.slow
def test_the_whole_study_runs_and_reports_the_headline(study):
    cfg, result = study
    assert result.skipped == ["base"]  # the shipped tiny base: nothing to pretrain
    for name in CONDITIONS:
        assert f"{name}.face_found" in result.metrics and f"{name}.top1_image" in result.metrics
    assert result.metrics["chance_top1"] == pytest.approx(1 / 3)  # 3 held-out victims among 3 candidates
    assert all(0 <= result.metrics[f"{c}.top1_image"] <= 1 for c in CONDITIONS)
    assert "rec" in result.table and "chance: top-1 0.333" in result.table
    assert "rec" in result.headline() and "chance 0.333" in result.headline()

    html = result.report.read_text()
    assert result.report == cfg.out_dir.resolve() / "report.html"
    assert all(f"<th>{name}</th>" in html for name in CONDITIONS)
    assert set(result.stage_dirs) == {"base", "zoo", "attack", "baseline nearest_neighbour", "baseline pca_map",
                                      "evaluation"}
    record = json.loads((cfg.out_dir / "pipeline.json").read_text())
    assert record["metrics"] == result.metrics and record["config"] == json.loads(json.dumps(to_dict(cfg)))
    # The record also lives with the evaluation it reports (the copy in OUT is the folder's single writer's).
    assert json.loads((Path(result.stage_dirs["evaluation"]) / "pipeline.json").read_text()) == record


@pytest.mark.slow
def test_every_stage_is_an_mlflow_run_in_the_studys_store(study):
    cfg, result = study
    from mlflow.tracking import MlflowClient

    assert result.tracking_uri == f"sqlite:///{cfg.out_dir.resolve().parent / 'mlflow.db'}"  # shared beside it
    client = MlflowClient(result.tracking_uri)
    assert set(result.mlflow_run_ids) == {"zoo", "attack", "evaluation", "pipeline"}
    runs = {stage: client.get_run(run_id) for stage, run_id in result.mlflow_run_ids.items()}
    assert all(run.info.status == "FINISHED" for run in runs.values())
    pipeline = runs["pipeline"].data
    assert pipeline.params["zoo.finetune.steps"] == "4" and pipeline.params["evaluation.n_images"] == "2"
    assert pipeline.metrics["chance_top1"] == pytest.approx(1 / 3)
    assert pipeline.metrics["rec.top1_image"] == pytest.approx(result.metrics["rec.top1_image"])
    assert runs["evaluation"].data.metrics["org.n_victims"] == 3


@pytest.mark.slow
def test_a_rerun_skips_every_complete_stage(study, capsys):
    cfg, result = study
    config = cfg.out_dir / "study.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    for stage in ("zoo", "attack", "baselines", "evaluation"):
        assert f"] {stage}: complete, skipped" in out
    assert f"report: {result.report}" in out and "chance 0.333" in out and "MLflow store: sqlite:///" in out
    again = json.loads((cfg.out_dir / "pipeline.json").read_text())
    assert again["metrics"] == result.metrics and again["stage_dirs"] == result.stage_dirs
    assert again["skipped"] == [s for s in STAGES if s not in ("identities", "report")]


def test_stage_keys_leave_out_how_a_stage_runs():
    cfg = from_dict(PipelineConfig, SMALLEST)
    how = with_overrides(cfg, {"zoo.workers": 3, "zoo.fine_tunes_per_pass": 2, "attack.max_steps": 5,
                               "evaluation.workers": 4})
    what = with_overrides(cfg, {"zoo.finetune.rank": 4, "attack.model.step_embedding": False,
                                "evaluation.n_images": 3})
    for stage in ("zoo", "attack", "evaluation"):
        assert settings_of(getattr(how, stage), stage) == settings_of(getattr(cfg, stage), stage)
        assert settings_of(getattr(what, stage), stage) != settings_of(getattr(cfg, stage), stage)


# --- configs (no models) ---------------------------------------------------------------------------------

def test_the_packaged_profiles_load():
    quick, paper = load_pipeline_config("quick"), load_pipeline_config("paper")
    assert quick.base.ref == "tiny" and quick.identities.kind == "synthetic" and quick.evaluation.scorer == "synthetic"
    assert paper.base.ref == "CompVis/stable-diffusion-v1-4" and paper.zoo.finetune.steps == 1000
    assert paper.zoo.finetune.rank == 16 and paper.zoo.finetune.alpha == 27 and paper.zoo.num_gpus_per_worker == 1
    tuned = load_pipeline_config("quick", out="elsewhere", assignments=["zoo.finetune.steps=50",
                                                                       "attack.model.step_embedding=false"])
    assert str(tuned.out_dir) == "elsewhere" and tuned.zoo.finetune.steps == 50
    assert tuned.attack.model.step_embedding is False
    lfw = load_pipeline_config("lfw")
    assert lfw.base.ref == "tiny-lfw" and lfw.identities.kind == "folder" and lfw.evaluation.scorer == "dlib"


@pytest.mark.parametrize("change, message", [
    ({"zoo": {"finetune": {"rnak": 4}}}, "unknown key 'rnak'"),
    ({"zoo": {"root": "x"}}, "unknown key 'root'"),  # the pipeline wires the zoo's root itself
    ({"attack": {"max_steps": 0}}, "max_steps must be >= 1"),
    ({"evaluation": {"controls": ["nope"]}}, "unknown control"),
    ({"baselines": [{"name": "base", "kind": "pca_map"}]}, "reserved"),
    ({"baselines": [{"name": "a", "kind": "knn"}]}, "kind 'knn'"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PipelineConfig, change)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(change))
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraleak: error:") and message in err and "\n" not in err


def test_too_few_heldout_identities_stop_before_any_work(tmp_path, capsys):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"identities": {"num_identities": 3}, "tracking": False}))
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "held-out victims" in capsys.readouterr().err
    assert not (tmp_path / "out" / "mlflow.db").exists()
