"""Sweeps: config validation, search-space expansion, stage sharing, the table and the plot; and a real
2-trial sweep through Ray Tune at the smallest pipeline sizes, tracked in MLflow, then resumed."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from loraleak.cli import main
from loraleak.config import from_dict, to_dict
from loraleak.errors import ConfigError
from loraleak.sweeps.config import SweepConfig, load_sweep_config
from loraleak.sweeps.results import (FAILED, FINISHED, format_table, leak_by_trial_plot, privacy_utility_plot,
                                     results_frame, trial_order, write_table)
from loraleak.sweeps.stages import builds_per_stage, check_rerun, concurrency, peak_need, stage_folders, waves
from loraleak.sweeps.trials import base_pipeline_config, expand_trials, points
from studies import SMALLEST_NO_BASELINES as SMALLEST

REPO = Path(__file__).resolve().parents[1]


def sweep(tmp_path, **settings) -> SweepConfig:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(SMALLEST))
    data = {"name": "t", "pipeline": str(pipeline), "out_dir": str(tmp_path / "sweep"),
            "search_space": {"attack.model.step_embedding": [True, False]}, **settings}
    return from_dict(SweepConfig, data, where="sweep.yaml")


def write_sweep(tmp_path, data) -> Path:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(SMALLEST))
    path = tmp_path / "sweep.yaml"
    data = {"name": "t", "pipeline": "pipeline.yaml", "out_dir": str(tmp_path / "out"), **data}
    path.write_text(yaml.safe_dump(data))
    return path


def one_line_error(capsys) -> str:
    """The CLI's error: its last stderr line, and the only one of ours (a library's import-time notice may
    come before it, once per process)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("loraleak: error:")
    assert not any(line.startswith(("loraleak", "Traceback")) for line in lines[:-1])
    return lines[-1]


# --- config validation: one line, before anything runs ------------------------------------------------------

@pytest.mark.parametrize("space, message", [
    ({"zoo.finetune.rnak": [1, 2]}, "'zoo.finetune.rnak' is not a setting: zoo.finetune has no 'rnak'"),
    ({"atack.max_steps": [1]}, "the pipeline config has no 'atack'"),
    ({"zoo.finetune.rank.x": [1]}, "goes inside zoo.finetune.rank, which is a single setting"),
    ({"out_dir": ["a", "b"]}, "is set by the sweep"),
    ({"experiment": ["a", "b"]}, "is set by the sweep"),
    ({"zoo.finetune.rank, zoo.finetune.alpha": [[1, 1], [4]]}, "each value is a list of 2"),
    ({"zoo.finetune.rank": []}, "needs at least one value"),
])
def test_a_bad_search_space_is_one_line_of_error(tmp_path, capsys, space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        sweep(tmp_path, search_space=space)
    assert main(["sweep", str(write_sweep(tmp_path, {"search_space": space})), "--dry-run"]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("space, message", [
    ({"zoo.finetune.rank": [4, "four"]}, "search_space: zoo.finetune.rank = four: expected an integer, got str"),
    ({"zoo.defense": [{"kind": "none"}, {"kind": "dp_sgd"}]},
     "zoo.defense = dp_sgd: a 'dp_sgd' defense needs exactly one of epsilon or noise_multiplier"),
    ({"zoo.defense": [{"kind": "dp_sgd", "epsilon": 1.0, "rank": 2}]}, "rank does not apply to a 'dp_sgd' defense"),
    ({"attack.model.input_mode": ["delta", "diagonal"]},
     "attack.model.input_mode = diagonal: 'diagonal' is not one of 'delta', 'raw', 'gl_invariant'"),
])
def test_a_bad_value_is_one_line_naming_it(tmp_path, capsys, space, message):
    with pytest.raises(ConfigError, match=message):
        expand_trials(sweep(tmp_path, search_space=space), "sqlite:///unused.db")
    assert main(["sweep", str(write_sweep(tmp_path, {"search_space": space})), "--dry-run"]) == 2
    assert message in one_line_error(capsys)


def test_other_sweep_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="num_samples must be 1"):
        sweep(tmp_path, num_samples=3)
    with pytest.raises(ConfigError, match="unknown key 'serch'"):
        sweep(tmp_path, serch="grid")
    with pytest.raises(ConfigError, match="is also in search_space"):
        sweep(tmp_path, overrides={"attack.model.step_embedding": True})
    with pytest.raises(ConfigError, match=r"overrides: 'zoo.workerz' is not a setting"):
        sweep(tmp_path, overrides={"zoo.workerz": 1})
    with pytest.raises(ConfigError, match="pipeline: 'nope.yaml' is neither a profile"):
        load_sweep_config(write_sweep(tmp_path, {"pipeline": "nope.yaml",
                                                 "search_space": {"attack.seed": [0, 1]}}))
    # A search space that changes a stage `rerun` does not list: refused, naming the stage.
    trials = expand_trials(sweep(tmp_path, search_space={"zoo.finetune.rank": [1, 2]}), "sqlite:///x.db")
    with pytest.raises(ConfigError, match="2 different zoo outputs, but rerun lists only attack, evaluation"):
        check_rerun(("attack", "evaluation"), trials, "sweep t")
    check_rerun(("zoo", "attack", "baselines", "evaluation"), trials, "sweep t")


def test_the_reference_trial_is_picked_by_its_values_and_a_bad_pick_is_one_line(tmp_path, capsys):
    from loraleak.sweeps.trials import reference_trial

    space = {"zoo.finetune.rank, zoo.finetune.alpha": [[4, 4], [16, 16]], "attack.seed": [0, 1]}
    cfg = sweep(tmp_path, search_space=space, reference={"zoo.finetune.rank": 16})
    trials = expand_trials(cfg, "sqlite:///unused.db")
    assert reference_trial(cfg, trials).overrides == {"zoo.finetune.rank": 16, "zoo.finetune.alpha": 16,
                                                      "attack.seed": 0}
    assert reference_trial(sweep(tmp_path, search_space=space), trials) is trials[0]  # none given: the first
    with pytest.raises(ConfigError, match=r"reference: 'zoo.finetune.lr' is not in search_space"):
        sweep(tmp_path, search_space=space, reference={"zoo.finetune.lr": 1e-3})
    good = {"search_space": space, "reference": {"zoo.finetune.rank": 16}}
    assert main(["sweep", str(write_sweep(tmp_path, good)), "--dry-run"]) == 0
    assert "paired per victim with: seed=0 rank=16 alpha=16 (reference)" in capsys.readouterr().out
    data = {"search_space": space, "reference": {"zoo.finetune.rank": 8}}
    assert main(["sweep", str(write_sweep(tmp_path, data)), "--dry-run"]) == 2
    error = one_line_error(capsys)
    assert "reference {'zoo.finetune.rank': 8} matches no trial (the trials: " in error and "rank=16 alpha=16" in error
    assert not (tmp_path / "out").exists()


def test_the_shipped_tune_configs_load_and_expand():
    expected = {"rank.yaml": 4, "dp_epsilon.yaml": 11, "step_embedding.yaml": 5, "defenses.yaml": 6}
    for name, count in expected.items():
        cfg = load_sweep_config(REPO / "tune_configs" / name)
        trials = expand_trials(cfg, "sqlite:///unused.db")
        assert len(trials) == count, name
        check_rerun(cfg.rerun, trials, name)
    step = expand_trials(load_sweep_config(REPO / "tune_configs" / "step_embedding.yaml"), "sqlite:///u.db")
    assert builds_per_stage(step)["zoo"] == 1 and builds_per_stage(step)["attack"] == 5
    seeds = expand_trials(load_sweep_config(REPO / "tune_configs" / "attack_seeds.yaml"), "sqlite:///u.db")
    assert len(seeds) == 6 and builds_per_stage(seeds)["zoo"] == 2 and builds_per_stage(seeds)["attack"] == 6
    # Another zoo seed is another zoo (victims included); seed 0 is the quick study's, as are its stages.
    zoo_seeds = expand_trials(load_sweep_config(REPO / "tune_configs" / "zoo_seeds.yaml"), "sqlite:///u.db")
    assert len(zoo_seeds) == 6 and builds_per_stage(zoo_seeds)["zoo"] == 6
    check_rerun(("zoo", "attack", "baselines", "evaluation"), zoo_seeds, "zoo_seeds.yaml")
    assert stage_folders(zoo_seeds[0].config) == stage_folders(seeds[0].config)


def test_the_lfw_defenses_sweep_starts_from_the_lfw_study_and_derives_every_defended_zoo(lfw_root):
    cfg = load_sweep_config(REPO / "tune_configs" / "defenses_lfw.yaml")
    trials = expand_trials(cfg, "sqlite:///unused.db")
    check_rerun(cfg.rerun, trials, "defenses_lfw.yaml")
    # `--stages runs/lfw`: the `none` trial is `loraleak run --profile lfw` itself, not a twin of it.
    study = stage_folders(base_pipeline_config(cfg))
    none, *defended = trials
    assert none.config.zoo.defense.kind == "none" and stage_folders(none.config) == study
    assert [t.config.zoo.defense.kind for t in defended] == ["output_noise"] * 2 + ["rank_truncation"] * 2
    # Output noise is scored against the attack trained undefended too; each defended zoo is its own folder.
    assert {stage_folders(t.config).get("undefended zoo") for t in defended[:2]} == {study["zoo"]}
    assert len({stage_folders(t.config)["zoo"] for t in trials}) == 5


def test_the_lfw_common_noise_sweep_reevaluates_the_lfw_defense_trials_only(lfw_root):
    """Common random numbers for the LFW defenses: the same zoos, attacks and baselines as defenses_lfw.yaml's none
    and rank-1 trials (nothing retrained), another evaluation (each victim's noise from its identity)."""
    common = expand_trials(load_sweep_config(REPO / "tune_configs" / "defenses_lfw_common_noise.yaml"), "sqlite:///u.db")
    defenses = expand_trials(load_sweep_config(REPO / "tune_configs" / "defenses_lfw.yaml"), "sqlite:///u.db")
    assert {t.config.evaluation.victim_noise for t in common} == {"identity"}
    for trial, twin in zip(common, (defenses[0], defenses[-1])):
        assert trial.config.zoo.defense == twin.config.zoo.defense
        ours, theirs = stage_folders(trial.config), stage_folders(twin.config)
        assert {k: ours[k] for k in ("zoo", "attack", "baselines")} == {k: theirs[k] for k in ("zoo", "attack", "baselines")}
        assert ours["evaluation"] != theirs["evaluation"]
    # The rank comparison with common noise: rank_lfw.yaml's stages, and rank 16's evaluation is the none trial's.
    ranks = expand_trials(load_sweep_config(REPO / "tune_configs" / "rank_lfw_common_noise.yaml"), "sqlite:///u.db")
    for trial, twin in zip(ranks, expand_trials(load_sweep_config(REPO / "tune_configs" / "rank_lfw.yaml"), "u")):
        ours, theirs = stage_folders(trial.config), stage_folders(twin.config)
        assert ours["zoo"] == theirs["zoo"] and ours["attack"] == theirs["attack"]
        assert ours["evaluation"] != theirs["evaluation"]
    assert stage_folders(ranks[1].config)["evaluation"] == stage_folders(common[0].config)["evaluation"]


def test_the_lfw_rank_sweep_reuses_the_study_as_rank_16_and_trains_a_zoo_per_other_rank(lfw_root):
    cfg = load_sweep_config(REPO / "tune_configs" / "rank_lfw.yaml")
    trials = expand_trials(cfg, "sqlite:///unused.db")
    check_rerun(cfg.rerun, trials, "rank_lfw.yaml")
    assert [(t.config.zoo.finetune.rank, t.config.zoo.finetune.alpha) for t in trials] == [(4, 4), (16, 16), (64, 64)]
    # `--stages runs/lfw`: rank 16 is `loraleak run --profile lfw` itself; the others are zoos of their own.
    study_config = base_pipeline_config(cfg)
    assert stage_folders(trials[1].config) == stage_folders(study_config)
    assert len({stage_folders(t.config)["zoo"] for t in trials}) == 3
    # Rank 64 trains at its own lr (the one that gives rank 16's victim strength), rank 4 at the study's.
    study_lr = study_config.zoo.finetune.lr
    assert [t.config.zoo.finetune.lr for t in trials] == [study_lr, study_lr, 3.0e-4]


def test_the_lfw_zoo_seed_sweep_reuses_the_study_as_seed_0_and_trains_a_zoo_per_other_seed(lfw_root):
    cfg = load_sweep_config(REPO / "tune_configs" / "zoo_seeds_lfw.yaml")
    trials = expand_trials(cfg, "sqlite:///unused.db")
    check_rerun(cfg.rerun, trials, "zoo_seeds_lfw.yaml")
    assert [t.config.zoo.finetune.seed for t in trials] == [0, 1, 2]
    assert stage_folders(trials[0].config) == stage_folders(base_pipeline_config(cfg))
    folders = [stage_folders(t.config) for t in trials]
    assert all(len({f[stage] for f in folders}) == 3 for stage in ("zoo", "attack", "evaluation"))


def test_the_learning_curve_shares_one_zoo_and_trains_one_attack_per_training_set_size(lfw_root):
    cfg = load_sweep_config(REPO / "tune_configs" / "learning_curve.yaml")
    trials = expand_trials(cfg, "sqlite:///unused.db")
    # The attack ablation reuses the curve's zoo (--stages), and its paper trial is the curve's last.
    ablation = expand_trials(load_sweep_config(REPO / "tune_configs" / "attack_ablation_lfw.yaml"), "sqlite:///u.db")
    assert len(ablation) == 9 and builds_per_stage(ablation)["zoo"] == 1
    check_rerun(("attack", "evaluation"), ablation, "attack_ablation_lfw.yaml")
    assert {stage_folders(t.config)["zoo"] for t in ablation} == {stage_folders(trials[0].config)["zoo"]}
    assert stage_folders(trials[-1].config)["attack"] in {stage_folders(t.config)["attack"] for t in ablation}
    assert [t.config.attack.train_identities for t in trials] == [32, 64, 128, None]
    # Every usable identity trains the attack (5+ photos); the victims are the lfw profile's (12+ photos).
    assert {t.config.identities.train_min_images for t in trials} == {5}
    assert {t.config.identities.min_images for t in trials} == {12}
    check_rerun(cfg.rerun, trials, "learning_curve.yaml")
    assert builds_per_stage(trials)["zoo"] == 1 and builds_per_stage(trials)["attack"] == 4


# --- where a sweep logs -------------------------------------------------------------------------------------

def test_a_sweep_logs_to_the_store_loraleak_run_would_use(tmp_path, capsys, monkeypatch):
    """--tracking-uri, else the config's, else $MLFLOW_TRACKING_URI, else the sqlite store beside the sweep's
    folder: the one `loraleak run --out <that folder>` logs to; the experiment is the folder's name."""
    from loraleak.pipeline.config import PipelineConfig
    from loraleak.pipeline.tracking import study_experiment, study_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write_sweep(tmp_path, {"search_space": {"attack.seed": [0, 1]}})  # out_dir: tmp_path/out
    study = from_dict(PipelineConfig, {"out_dir": str(tmp_path / "out")})
    store = study_tracking_uri(study, study.out_dir.resolve())
    assert store == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}" and study_experiment(study) == "out"

    def dry_run(*args: str) -> str:
        assert main(["sweep", str(path), "--dry-run", *args]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if "MLflow:" in line).strip()

    assert dry_run() == f"MLflow: {store}, experiment 'out'"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert dry_run() == "MLflow: sqlite:///from-env.db, experiment 'out'"
    assert dry_run("--tracking-uri", "sqlite:///flag.db") == "MLflow: sqlite:///flag.db, experiment 'out'"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "tracking_uri": "sqlite:///config.db",
                                    "experiment": "seeds"}))
    assert dry_run() == "MLflow: sqlite:///config.db, experiment 'seeds'"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()  # a dry run writes nothing


# --- overrides ----------------------------------------------------------------------------------------------

def test_overrides_reach_each_trials_pipeline_config(tmp_path):
    cfg = sweep(tmp_path, overrides={"zoo.finetune.steps": 3, "attack.resources_per_worker": {"CPU": 2}},
                search_space={"zoo.finetune.rank, zoo.finetune.alpha": [[1, 1], [8, 16]],
                              "zoo.defense": [{"kind": "none"}, {"kind": "output_noise", "relative_noise": 0.5}]})
    trials = expand_trials(cfg, "sqlite:///sweep.db")
    assert [t.label for t in trials] == ["rank=1 alpha=1 defense=none",
                                         "rank=1 alpha=1 defense=output_noise relative_noise=0.5",
                                         "rank=8 alpha=16 defense=none",
                                         "rank=8 alpha=16 defense=output_noise relative_noise=0.5"]
    last = trials[-1].config
    assert (last.zoo.finetune.rank, last.zoo.finetune.alpha) == (8, 16)
    assert last.zoo.defense.kind == "output_noise" and last.zoo.defense.relative_noise == 0.5
    assert trials[0].config.zoo.defense.kind == "none"
    assert all(t.config.zoo.finetune.steps == 3 for t in trials)  # fixed overrides: every trial
    assert all(t.config.attack.resources_per_worker == {"CPU": 2} for t in trials)
    assert all(t.config.zoo.finetune.lr == 1e-3 for t in trials)  # the pipeline file's own settings stay
    # Trials share the sweep's stage folder, MLflow store and experiment (the sweep folder's name).
    assert {t.config.out_dir for t in trials} == {cfg.directory / "stages"}
    assert {t.config.tracking_uri for t in trials} == {"sqlite:///sweep.db"}
    assert {t.config.experiment for t in trials} == {"sweep"}
    assert {t.config.experiment for t in expand_trials(sweep(tmp_path, experiment="ranks"), "sqlite:///x.db")} \
        == {"ranks"}
    # Ids: one per distinct setting, stable across expansions, new when a fixed setting changes.
    assert len({t.trial_id for t in trials}) == 4
    assert [t.trial_id for t in expand_trials(cfg, "sqlite:///other.db")] == [t.trial_id for t in trials]
    changed = sweep(tmp_path, overrides={"zoo.finetune.steps": 5}, search_space=cfg.search_space)
    assert not {t.trial_id for t in expand_trials(changed, "sqlite:///sweep.db")} & {t.trial_id for t in trials}
    own = expand_trials(sweep(tmp_path, share_stages=False), "sqlite:///sweep.db")
    assert own[0].config.out_dir == cfg.directory / "trials" / own[0].trial_id / "stages"


def test_random_search_draws_are_seeded_and_distinct(tmp_path):
    space = {"zoo.finetune.rank": [1, 2, 4, 8, 16], "attack.seed": [0, 1, 2]}
    first = points(sweep(tmp_path, search="random", num_samples=6, seed=3, search_space=space))
    again = points(sweep(tmp_path, search="random", num_samples=6, seed=3, search_space=space))
    other = points(sweep(tmp_path, search="random", num_samples=6, seed=4, search_space=space))
    assert first == again and first != other
    assert 1 <= len(first) <= 6 and len({json.dumps(p, sort_keys=True) for p in first}) == len(first)
    assert all(p["zoo.finetune.rank"] in space["zoo.finetune.rank"] for p in first)


# --- stage sharing, waves, concurrency ----------------------------------------------------------------------

def test_trials_that_differ_only_in_attack_settings_share_one_zoo(tmp_path):
    cfg = sweep(tmp_path, search_space={"attack.model.step_embedding": [True, False],
                                        "attack.snapshots": ["all", "final"]})
    trials = expand_trials(cfg, "sqlite:///x.db")
    assert builds_per_stage(trials) == {"zoo": 1, "attack": 4, "evaluation": 4}
    assert len({stage_folders(t.config)["zoo"] for t in trials}) == 1
    # The first trial builds the zoo alone; the other three then run side by side.
    assert [[t.label for t in wave] for wave in waves(trials)] == [[trials[0].label], [t.label for t in trials[1:]]]
    ranks = expand_trials(sweep(tmp_path, search_space={"zoo.finetune.rank": [1, 2, 4]}), "sqlite:///x.db")
    assert len(waves(ranks)) == 1 and builds_per_stage(ranks)["zoo"] == 3
    # Unshared trials never wait for each other.
    alone = expand_trials(sweep(tmp_path, share_stages=False), "sqlite:///x.db")
    assert len(waves(alone)) == 1


def test_sweeps_given_one_stages_dir_share_its_stage_outputs_and_its_lock(tmp_path):
    from loraleak.locking import FolderInUseError
    from loraleak.sweeps.run import run_sweep
    from loraleak.sweeps.trials import pipeline_dir

    shared = tmp_path / "shared-stages"
    ablation = sweep(tmp_path, stages_dir=str(shared), out_dir=str(tmp_path / "ablation"))
    curve = sweep(tmp_path, stages_dir=str(shared), out_dir=str(tmp_path / "curve"),
                  search_space={"attack.train_identities": [1, None]})
    trials = expand_trials(ablation, "sqlite:///x.db") + expand_trials(curve, "sqlite:///x.db")
    assert {pipeline_dir(ablation, t.trial_id) for t in trials} == {shared.resolve()}
    assert {str(t.config.out_dir) for t in trials} == {str(shared.resolve())}
    assert len({stage_folders(t.config)["zoo"] for t in trials}) == 1  # one zoo for both sweeps
    assert expand_trials(sweep(tmp_path), "sqlite:///x.db")[0].config.out_dir == tmp_path.resolve() / "sweep" / "stages"
    with pytest.raises(ConfigError, match="stages_dir .* needs share_stages: true"):
        sweep(tmp_path, stages_dir=str(shared), share_stages=False)
    # A writer of the shared folder (another sweep, a `loraleak run --out`) keeps this sweep out, before any trial.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from loraleak.locking import folder_lock\n"
         "with folder_lock(sys.argv[1], 'the other sweep'):\n    print('holding', flush=True); time.sleep(60)",
         str(shared)], env={**os.environ, "PYTHONPATH": str(REPO / "platform")}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(FolderInUseError, match="the other sweep"):
            run_sweep(ablation, show_progress=False)
        assert not (tmp_path / "ablation" / "trials").exists()
    finally:
        holder.kill()
        holder.wait()


def test_defended_trials_wait_for_the_undefended_study_they_also_attack_with(tmp_path):
    cfg = sweep(tmp_path, search_space={"zoo.defense": [{"kind": "output_noise", "relative_noise": 0.5},
                                                        {"kind": "none"},
                                                        {"kind": "dp_sgd", "epsilon": 1.0}]})
    noisy, plain, dp = expand_trials(cfg, "sqlite:///x.db")
    assert "undefended zoo" not in stage_folders(plain.config)
    for defended in (noisy, dp):
        folders = stage_folders(defended.config)
        assert folders["undefended zoo"] == stage_folders(plain.config)["zoo"] != folders["zoo"]
        assert folders["undefended attack"] == stage_folders(plain.config)["attack"]
    # The first defended trial builds the undefended zoo and attack; the others wait for it.
    assert [[t.label for t in wave] for wave in waves([noisy, plain, dp])] == [[noisy.label], [plain.label, dp.label]]
    # Off, a defended trial is attacked only by the attack retrained on its own zoo.
    off = expand_trials(sweep(tmp_path, overrides={"undefended_attack": False},
                              search_space={"zoo.defense": [{"kind": "dp_sgd", "epsilon": 1.0}]}), "sqlite:///x.db")
    assert "undefended zoo" not in stage_folders(off[0].config)


def test_concurrency_follows_the_resources():
    from loraleak.pipeline.config import PipelineConfig

    cfg = from_dict(PipelineConfig, SMALLEST)
    need = peak_need(cfg, {"CPU": 1.0})  # the driver (the zoo runs in it) + the hungriest stage (1 CPU)
    assert need == {"CPU": 2.0}
    assert concurrency([need], {"CPU": 2.0}, None).trials == 1
    assert concurrency([need, need], {"CPU": 9.0, "GPU": 1.0}, None).trials == 4
    gpu = {"CPU": 1.0, "GPU": 1.0}
    assert concurrency([gpu], {"CPU": 64.0, "GPU": 8.0}, None).trials == 8
    short = concurrency([gpu], {"CPU": 4.0}, None)
    assert short.trials == 1 and short.short == ["GPU 1 (cluster has 0)"]
    assert concurrency([need], {"CPU": 2.0}, 3).trials == 3  # as configured
    assert concurrency([need], {"CPU": 2.0}, 3).oversubscribed
    assert not concurrency([need], {"CPU": 2.0}, None).oversubscribed


# --- the table and the plot (hand-made records) -------------------------------------------------------------

def _record(trial_id, rank, status=FINISHED, rec=None, org=None, top1=None):
    metrics = None if status != FINISHED else {
        "rec.similarity": rec, "org.similarity": org, "rec.top1_image": top1, "base.similarity": 0.2,
        "base.top1_image": 0.25, "chance_top1": 0.25, "rec_over_best_control.similarity": rec - 0.3}
    return {"trial_id": trial_id, "label": f"rank={rank}", "overrides": {"zoo.finetune.rank": rank},
            "status": status, "metrics": metrics, "wall_time_s": 12.0, "mlflow_run_id": f"run-{trial_id}",
            **({"error": "RuntimeError: out of memory"} if status == FAILED else {})}


def test_results_table_and_privacy_utility_plot(tmp_path):
    records = [_record("a", 1, rec=0.31, org=0.40, top1=0.25), _record("b", 4, rec=0.55, org=0.62, top1=0.75),
               _record("c", 16, rec=0.48, org=0.70, top1=0.5), _record("d", 64, status=FAILED)]
    frame = results_frame(records, ["zoo.finetune.rank"], "rec.similarity", "min")
    assert frame["label"].tolist() == ["rank=1", "rank=16", "rank=4", "rank=64"]  # least leak first, failed last
    assert frame["zoo.finetune.rank"].tolist() == ["1", "16", "4", "64"]
    assert frame["status"].tolist() == [FINISHED, FINISHED, FINISHED, FAILED]
    table = format_table(frame, "org.similarity", ["rec.similarity", "rec.top1_image"], "rec.similarity")
    header, *rows = table.splitlines()
    assert header.split()[:5] == ["label", "status", "org.similarity", "rec.similarity", "rec.top1_image"]
    assert "chance_top1" in header and "base.similarity" in header
    assert rows[0].split()[:5] == ["rank=1", "finished", "0.400", "0.310", "0.250"] and "failed" in rows[3]
    csv = write_table(frame, tmp_path / "results.csv")
    assert csv.read_text().splitlines()[0].startswith("trial_id,label,zoo.finetune.rank,status")
    assert len(csv.read_text().splitlines()) == 5

    path = privacy_utility_plot(frame, "org.similarity", ["rec.similarity", "rec.top1_image"], tmp_path / "p.png", "t")
    empty = privacy_utility_plot(frame[frame["status"] == FAILED], "org.similarity",
                                 ["rec.similarity", "rec.top1_image"], tmp_path / "empty.png", "t")
    with Image.open(path) as image, Image.open(empty) as blank:
        assert image.format == "PNG" and image.width > 2 * image.height  # two panels side by side
        def coloured(im):  # pixels of a saturated colour (the trials' points; the axes are grey)
            return int((np.ptp(np.asarray(im.convert("RGB"), dtype=np.int16), axis=2) > 60).sum())

        assert coloured(image) > coloured(blank) + 100  # the trials' points (and their levels) are drawn


def test_leak_by_trial_plot_orders_trials_by_the_swept_value_with_intervals(tmp_path):
    records = [_record(t, rank, rec=0.5, org=0.6, top1=0.5) for t, rank in (("a", 16), ("b", None), ("c", 1))]
    for record, gain in zip(records, (0.08, 0.11, 0.03)):
        record["metrics"].update({"rec_over_best_control.similarity": gain,
                                  "rec_over_best_control.similarity_lo": gain - 0.03,
                                  "rec_over_best_control.similarity_hi": gain + 0.03,
                                  "org.strength": 0.15, "org.strength_lo": 0.12, "org.strength_hi": 0.18})
    assert trial_order(records, ["zoo.finetune.rank"]) == ["c", "a", "b"]  # numbers in order, null ("all") last
    assert trial_order(records, ["zoo.finetune.rank", "zoo.finetune.alpha"]) == ["a", "b", "c"]  # as given
    frame = results_frame(records, ["zoo.finetune.rank"], "rec.similarity", "min")
    path = leak_by_trial_plot(frame, records, ["zoo.finetune.rank"], tmp_path / "leak.png", "t")
    blank = leak_by_trial_plot(frame[frame["status"] == FAILED], records, ["zoo.finetune.rank"],
                               tmp_path / "blank.png", "t")
    with Image.open(path) as image, Image.open(blank) as empty:
        def red(im):  # the rec - best control points and their interval bars (C3)
            rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
            return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())

        assert red(image) > 200 and red(empty) == 0


# --- a real sweep -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_two_trial_sweep_through_ray_tune_tracked_and_resumed(ray_local, tmp_path, capsys):
    """Two trials that differ in the attack only: the first builds the zoo, the second reuses it; each trains
    its attack with TorchTrainer inside its Tune trial. In MLflow, in the store `loraleak run` would use beside the
    sweep's folder and one experiment for the sweep: the sweep's parent run (the table and the plot), each
    trial's pipeline run nested under it, the trial's stage runs under that; a rerun runs nothing and closes
    what a killed sweep left RUNNING."""
    from mlflow.tracking import MlflowClient

    from loraleak.sweeps.results import read_record, record_path
    from loraleak.sweeps.run import run_sweep
    from loraleak.sweeps.tracking import child_runs

    cfg = sweep(tmp_path, rerun=["attack", "evaluation"])
    result = run_sweep(cfg, show_progress=False)
    assert len(result.ran) == 2 and result.failed == [] and result.reused == []
    trials = expand_trials(cfg, result.tracking_uri)
    records = [read_record(record_path(cfg.directory, t.trial_id)) for t in trials]
    assert [r["status"] for r in records] == [FINISHED, FINISHED]
    assert all(0 <= r["metrics"]["rec.top1_image"] <= 1 and "org.similarity" in r["metrics"] for r in records)
    # One zoo for both; each trial's stage folders are those the sweep predicted.
    assert len(list((cfg.directory / "stages").glob("zoo-*"))) == 1
    assert "zoo" in records[1]["skipped"] and "zoo" not in records[0]["skipped"]
    for trial, record in zip(trials, records):
        predicted = stage_folders(trial.config)
        assert Path(record["stage_dirs"]["zoo"]).name == predicted["zoo"]
        assert Path(record["stage_dirs"]["attack"]).parent.name == predicted["attack"]  # <folder>/attack
        assert Path(record["stage_dirs"]["evaluation"]).name == predicted["evaluation"]
        # Each trial's record and report are its own, in its evaluation folder, whichever trial ended last.
        own = json.loads((Path(record["stage_dirs"]["evaluation"]) / "pipeline.json").read_text())
        assert own["metrics"] == record["metrics"] and record["report"] == own["evaluation_report"]
        assert Path(record["report"]).parent.parent.name == predicted["evaluation"]
    # The stage folder the trials share gets no study-level copies: no trial's overwrites another's.
    assert not (cfg.directory / "stages" / "pipeline.json").exists()
    assert not (cfg.directory / "stages" / "report.html").exists()

    assert result.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"  # beside the sweep's folder
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 2
    # One experiment for the sweep, named after its folder (beside MLflow's own "Default", empty).
    [experiment] = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.name == "sweep" and parent.info.experiment_id == experiment.experiment_id
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"results.csv", "privacy_utility.png", "leak_by_trial.png", "strips_by_trial.png", "report.html"} <= artifacts
    page = (cfg.directory / "report.html").read_text()
    assert "strips_by_trial.png" in page and page.count("report.html'") == 2  # a link to each trial's report
    children = child_runs(result.tracking_uri, result.parent_run_id)  # nested by the mlflow.parentRunId tag
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {result.parent_run_id}
    assert sorted(c.data.params["attack.model.step_embedding"] for c in children) == ["false", "true"]
    stage_runs = {}
    for child in children:  # a trial's run is its pipeline run: its stage runs nest under it
        record = next(r for r in records if r["mlflow_run_id"] == child.info.run_id)
        assert child.data.metrics["rec.similarity"] == pytest.approx(record["metrics"]["rec.similarity"])
        assert child.data.tags["loraleak.trial_id"] == record["trial_id"]
        assert child.info.run_name == f"t {record['label']}" and "config.yaml" in {
            a.path for a in client.list_artifacts(child.info.run_id)}
        stage_runs[record["trial_id"]] = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{child.info.run_id}'")
        assert all(r.info.status == "FINISHED" for r in stage_runs[record["trial_id"]])
    # The first trial built the zoo; the second reused it (linked, not run again).
    first, second = (next(c for c in children if c.info.run_id == r["mlflow_run_id"]) for r in records)
    names = lambda runs: sorted(r.info.run_name.split(" ")[0].split("-")[0] for r in runs)  # noqa: E731
    assert names(stage_runs[records[0]["trial_id"]]) == ["attack", "evaluation", "zoo"]
    assert names(stage_runs[records[1]["trial_id"]]) == ["attack", "evaluation"]
    assert second.data.tags["loraleak.reused.zoo"] == next(
        r.info.run_id for r in stage_runs[records[0]["trial_id"]] if r.info.run_name.startswith("zoo"))
    assert first.info.start_time <= min(r.info.start_time for r in stage_runs[records[0]["trial_id"]])
    assert len(result.frame) == 2 and set(result.frame["status"]) == {FINISHED}

    # A trial run a killed sweep left RUNNING (with a stage run in it): the rerun closes both as KILLED.
    orphan = client.create_run(experiment.experiment_id, run_name="killed trial",
                               tags={"loraleak.study": str(cfg.directory / "stages")})
    orphan_stage = client.create_run(experiment.experiment_id, run_name="its stage",
                                     tags={"mlflow.parentRunId": orphan.info.run_id})
    # A rerun (through the CLI) finds both trials finished: no Tune run, no new MLflow runs, same parent.
    tune_runs = sorted((cfg.directory / "ray").iterdir())
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["sweep", str(config)]) == 0
    out = capsys.readouterr().out
    assert "2 finished before, 0 to run" in out and "finished before (not rerun): 2" in out
    assert "privacy-utility plot:" in out and "step_embedding=true" in out
    # The reference (the first trial: none is named) is paired with the other, in the printout and the report.
    assert f"paired per victim with the reference trial ({records[0]['label']})" in out
    assert f"<h2>paired per victim with {records[0]['label']}</h2>" in (cfg.directory / "report.html").read_text()
    assert sorted((cfg.directory / "ray").iterdir()) == tune_runs
    assert [c.info.run_id for c in child_runs(result.tracking_uri, result.parent_run_id)] == \
        [c.info.run_id for c in children]
    assert json.loads((cfg.directory / "sweep.json").read_text())["parent_run_id"] == result.parent_run_id
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    assert {client.get_run(r.info.run_id).info.status for r in (orphan, orphan_stage)} == {"KILLED"}

    # `loraleak compare SWEEP --against TRIAL`: each trial paired per victim with the first, the sweep named by
    # its experiment (MLflow) or by its folder; the first against itself moves by exactly 0; the second's rec
    # moves by the difference of the two trials' headline rec where every victim's rec images had a face.
    first_trial = record_path(cfg.directory, records[0]["trial_id"]).parent
    evaluations = [json.loads((Path(r["stage_dirs"]["evaluation"]) / "evaluation.json").read_text()) for r in records]
    all_faces = all(v["similarity"] is not None for e in evaluations for v in e["metrics"]["rec"]["victims"])
    rec_change = records[1]["metrics"]["rec.similarity"] - records[0]["metrics"]["rec.similarity"]
    for ref in ("sweep", str(cfg.directory)):
        assert main(["compare", ref, "--against", str(first_trial), "--workdir", str(tmp_path)]) == 0
        lines = capsys.readouterr().out.splitlines()
        first, second = (next(line for line in lines if line.startswith(r["label"] + " ")) for r in records)
        assert first.count("+0.000 [+0.000, +0.000] 0/") == 5
        cells = second[len(records[1]["label"]):].split("lower")
        assert len(cells) == 6  # leak, strength, binding, rec, org (and what follows the last)
        if all_faces:
            assert cells[3].split()[0] == f"{rec_change:+.3f}"


def test_the_sweep_says_how_far_a_running_trials_zoo_is(ray_local, tmp_path):
    """A trial's zoo build publishes its steps in a Ray actor named after the zoo's folder; the sweep's watch reads
    it for each running trial and says one line when it moved (and nothing for a trial that ended)."""
    import ray

    from loraleak.sweeps.watch import TrialWatch, zoo_roots
    from loraleak.zoo.progress import StepCounter, progress_actor_name, step_reporter

    trial = expand_trials(sweep(tmp_path), "sqlite:///unused.db")[0]
    [root] = zoo_roots(trial)
    assert Path(root).name == stage_folders(trial.config)["zoo"]
    counter = ray.remote(StepCounter).options(num_cpus=0, name=progress_actor_name(root)).remote()
    ray.get(counter.start.remote({"a": 100, "b": 100}))
    step_reporter(counter, ["a", "b"])(30)  # a pass of two fine-tunes at step 30 (sent at once: first report)
    said: list[str] = []
    watch = TrialWatch([trial], said.append, every_s=3600)
    assert watch.check() == []  # not running yet: nothing said
    watch.running(trial.trial_id)
    deadline = time.monotonic() + 60
    while not said and time.monotonic() < deadline:  # the report is asynchronous
        watch.check()
        time.sleep(0.2)
    assert len(said) == 1 and said[0].startswith(f"[running] {trial.label}: zoo 30% of 200 fine-tune steps, about ")
    assert watch.check() == []  # unchanged: not said again
    watch.ended(trial.trial_id)
    ray.get(counter.report.remote({"a": 100}))
    assert watch.check() == []  # ended trials are not watched
    ray.kill(counter)
    import pickle  # Tune pickles its callbacks, which hold the watch: a copy keeps its settings, not its thread
    copy = pickle.loads(pickle.dumps(watch.start()))
    watch.stop()
    assert copy.labels == watch.labels and copy.thread is None and copy.check() == []


def test_strips_show_the_same_identities_in_every_trial_in_the_swept_order(tmp_path):
    """The strips figure matches victims across trials by identity (their LoRA ids differ with the settings), puts
    the trials in the swept value's order, and leaves out trials without images."""
    from loraleak.sweeps.report import strips_by_trial, write_sweep_report

    records = []
    for rank, shade in ((16, 200), (1, 40)):
        evaluation = tmp_path / f"evaluation-r{rank}"
        for identity in ("id-a", "id-b"):
            lora_id = f"{identity}-r{rank}"  # another LoRA id per trial, as a setting changes it
            folder = evaluation / "victims" / lora_id
            folder.mkdir(parents=True)
            (evaluation / "victims" / f"{lora_id}.json").write_text(json.dumps({"identity_id": identity}))
            for condition in ("private", "org", "rec"):
                Image.new("RGB", (8, 8), (shade, 0, 0)).save(folder / f"{condition}-000.png")
        records.append({"trial_id": f"t{rank}", "label": f"rank={rank}", "status": FINISHED,
                        "overrides": {"zoo.finetune.rank": rank}, "stage_dirs": {"evaluation": str(evaluation)},
                        "report": str(evaluation / "report" / "report.html")})
    records.append({"trial_id": "t4", "label": "rank=4", "status": FAILED, "overrides": {"zoo.finetune.rank": 4}})
    path = strips_by_trial(records, ["zoo.finetune.rank"], tmp_path / "strips.png", "t")
    with Image.open(path) as im:
        assert im.width > im.height > 100  # 2 trials x (2 victims x 3 images)
        pixels = np.asarray(im.convert("RGB"))
    # rank 1 (dark) is drawn above rank 16 (bright): the swept order, not the records' order
    rows = [y for y in range(pixels.shape[0]) if ((pixels[y, :, 0] > 150) & (pixels[y, :, 1] < 30)).sum() > 20]
    dark = [y for y in range(pixels.shape[0]) if ((pixels[y, :, 0] > 25) & (pixels[y, :, 0] < 60)
                                                    & (pixels[y, :, 1] < 10)).sum() > 20]
    assert rows and dark and max(dark) < min(rows)
    assert strips_by_trial(records[2:], ["zoo.finetune.rank"], tmp_path / "none.png", "t") is None
    page = write_sweep_report(tmp_path, "t", "<table></table>", [path, None], records).read_text()
    assert "strips.png" in page and "evaluation-r16/report/report.html" in page and "rank=4" not in page


def test_trial_ids_of_the_shipped_sweeps_are_those_of_before_attack_train_identities():
    # Computed at 4ad6da9, before AttackTrainConfig.train_identities existed: a finished trial on disk is
    # found again (pipeline.config.ADDED_SETTINGS leaves the new setting out of the id at its default).
    ids = [t.trial_id for t in expand_trials(load_sweep_config(REPO / "tune_configs" / "step_embedding.yaml"),
                                             "sqlite:///u.db")]
    assert ids == ["d78022aa0b", "1dae4a724e", "462cfe508f", "bdf333bf18", "b57df24583"]
