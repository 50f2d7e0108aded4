"""The evaluation stage on a real (tiny) zoo: every held-out victim under every condition, resumable
per victim, summarised, reported and tracked in MLflow.

The default tests decode through a network autoencoder saved as `train_attack` saves it but not
trained (training costs a Ray Train start-up; the pipeline's end-to-end test evaluates a trained
one) and run the victims in this process. The slow test trains the attack with Ray Train and
evaluates on two Ray actors.
"""

import json
import shutil

import numpy as np
import pytest

from loraleak.attack.config import AttackTrainConfig
from loraleak.attack.train import train_attack
from loraleak.cli import main
from loraleak.config import from_dict, to_dict
from loraleak.errors import ConfigError, LoraleakError
from loraleak.evaluation.config import CONTROLS, EvaluationConfig
from loraleak.evaluation.evaluate import RESULTS_DIR, evaluate, headline_metrics, paired_difference
from loraleak.evaluation.metrics import ImageScores, summarise
from loraleak.evaluation.worker import victim_seed, wrong_trigger
from loraleak.zoo.manifest import read_manifest
from studies import EVALUATION_IDENTITIES, build_evaluation_zoo, save_untrained_attack

IDENTITIES = EVALUATION_IDENTITIES  # 6 identities, half held out: 3 victims ranked among 3 candidates
CONDITIONS = ["org", "rec", "base", *CONTROLS]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny base, a zoo of 6 fine-tunes, and a network autoencoder for its LoRA layout."""
    work = tmp_path_factory.mktemp("evaluate")
    zoo = build_evaluation_zoo(work)
    return work, zoo, save_untrained_attack(zoo, work / "nae")


def eval_config(study, out, **overrides) -> EvaluationConfig:
    work, zoo, attack_dir = study
    data = {"zoo": zoo.root, "attack": str(attack_dir), "out_dir": str(out), "n_images": 2, "sample_steps": 2,
            "reference_size": 32, "n_boot": 200, "workers": 0, "tracking": False, "workdir": str(out)}
    return from_dict(EvaluationConfig, {**data, **overrides})


@pytest.fixture(scope="module")
def evaluated(study, tmp_path_factory):
    """One evaluation, tracked in MLflow."""
    out = tmp_path_factory.mktemp("evaluation")
    cfg = eval_config(study, out, tracking=True)
    return cfg, evaluate(cfg, show_progress=False)


def test_every_heldout_victim_under_every_condition(study, evaluated):
    _, zoo, _ = study
    cfg, result = evaluated
    heldout = {r["identity_id"] for r in read_manifest(zoo.root).to_pylist() if r["split"] == "heldout"}
    assert result.victims == 3 and result.candidates == 3 and len(heldout) == 3
    assert result.evaluated == 3 and result.reused == 0 and not result.failures
    assert list(result.metrics) == CONDITIONS
    for name, m in result.metrics.items():
        assert m.n_victims == 3 and m.n_images == 3 * 2 and m.n_candidates == 3
        assert {v.victim_id for v in m.victims} == heldout
        assert m.chance_top1 == pytest.approx(1 / 3) and m.chance_top5 == 1.0
    assert result.headline["chance_top1"] == pytest.approx(1 / 3)
    assert {f"{c}.face_found" for c in CONDITIONS} <= set(result.headline)

    # Each victim's record: its seed, its prompts, and the images the scores were computed on.
    for path in sorted((cfg.out_dir / RESULTS_DIR).glob("*.json")):
        record = json.loads(path.read_text())
        assert record["seed"] == victim_seed(cfg.seed, record["lora_id"])
        assert record["images"] == {"private": 3, **{c: 2 for c in CONDITIONS}}
        assert record["prompts"]["victim_empty_prompt"] == "" and record["prompts"]["base"] == "A human face."
        assert record["prompts"]["org"].startswith("A face of ")
        wrong = record["prompts"]["victim_wrong_trigger"]
        assert wrong != record["prompts"]["org"] and wrong.startswith("A face of ")
        pngs = sorted(p.name for p in (cfg.out_dir / RESULTS_DIR / record["lora_id"]).iterdir())
        assert len(pngs) == 3 + 2 * len(CONDITIONS)


def test_identity_noise_gives_a_person_the_same_noise_whatever_its_lora(study, evaluated, tmp_path):
    """victim_noise "identity": each victim's seed (its images' noise and its wrong trigger) comes from its identity,
    so another LoRA of the same person (a defense, a rank, another zoo) is sampled with the same noise; the results
    are kept under another settings key, and the default ("lora") keeps the key of before the setting existed."""
    from loraleak.evaluation.worker import victim_record

    lora_cfg, _ = evaluated
    cfg = eval_config(study, tmp_path / "identity", victim_noise="identity", controls=["victim_wrong_trigger"])
    evaluate(cfg, show_progress=False)
    records = [json.loads(p.read_text()) for p in sorted((cfg.out_dir / RESULTS_DIR).glob("*.json"))]
    assert len(records) == 3
    for record in records:
        assert record["seed"] == victim_seed(cfg.seed, record["identity_id"]) != victim_seed(cfg.seed, record["lora_id"])
    row = next(r for r in read_manifest(study[1].root).to_pylist() if r["split"] == "heldout")
    other_lora = {**row, "lora_id": "another-lora-of-the-same-person"}
    assert victim_record(row, 7, "identity")["seed"] == victim_record(other_lora, 7, "identity")["seed"]
    assert victim_record(row, 7)["seed"] != victim_record(other_lora, 7)["seed"]  # the default: by LoRA
    summary = lambda c: json.loads((c.out_dir / "evaluation.json").read_text())  # noqa: E731
    assert summary(cfg)["settings_key"] != summary(lora_cfg)["settings_key"]
    with pytest.raises(ConfigError, match="victim_noise: 'victim' is not one of 'lora', 'identity'"):
        eval_config(study, tmp_path / "x", victim_noise="victim")


def test_report_and_mlflow_run(evaluated):
    cfg, result = evaluated
    html = result.report.read_text()
    assert result.report.is_file() and (result.report.parent / "similarity_histogram.png").is_file()
    for name in CONDITIONS:
        assert f"<th>{name}</th>" in html  # a row of the metrics table per condition
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cfg.out_dir / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["n_images"] == "2"
    assert run.data.params["data.victims"] == "3" and run.data.params["data.candidates"] == "3"
    # The run opens before the work and closes after it: its duration is the evaluation's (less opening the store).
    written = [p.stat().st_mtime * 1000 for p in (cfg.out_dir / RESULTS_DIR).glob("*.json")]
    assert len(written) == 3 and run.info.start_time <= min(written)
    assert run.info.end_time >= (cfg.out_dir / "evaluation.json").stat().st_mtime_ns // 1_000_000
    assert run.data.metrics["rec.chance_top1"] == pytest.approx(1 / 3)
    assert {"org.face_found", "org.face_found_lo", "org.face_found_hi", "rec.top1_image"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.html", "report/similarity_histogram.png", "report/rates.png"} <= artifacts


def test_a_rerun_evaluates_only_what_is_missing(study, evaluated, tmp_path):
    cfg, first = evaluated
    out = tmp_path / "copy"
    shutil.copytree(cfg.out_dir / RESULTS_DIR, out / RESULTS_DIR)
    records = sorted((out / RESULTS_DIR).glob("*.json"))
    kept = {p: p.stat().st_mtime_ns for p in records[1:]}
    before = json.loads(records[0].read_text())
    records[0].unlink()

    again = evaluate(eval_config(study, out), show_progress=False)
    assert again.evaluated == 1 and again.reused == 2
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    after = json.loads(records[0].read_text())
    assert after["seed"] == before["seed"]
    for name in CONDITIONS:  # the same seed and settings give the same images, hence the same scores
        a, b = ImageScores.from_dict(before["scores"][name]), ImageScores.from_dict(after["scores"][name])
        np.testing.assert_allclose(a.distances, b.distances, rtol=1e-4, atol=1e-5)
    assert again.metrics["org"].similarity.value == pytest.approx(first.metrics["org"].similarity.value, abs=1e-4)

    # Other settings: every victim again.
    changed = evaluate(eval_config(study, out, n_images=1, controls=[]), show_progress=False)
    assert changed.evaluated == 3 and changed.reused == 0
    assert list(changed.metrics) == ["org", "rec", "base"] and changed.metrics["rec"].n_images == 3


def test_the_training_free_attack_is_one_more_row(study, tmp_path):
    """FineXtract, fitted as a baseline kind (nothing to learn), evaluated beside rec."""
    from loraleak.attack.baselines import BaselineConfig, fit_baseline

    _, zoo, _ = study
    directory = fit_baseline(from_dict(BaselineConfig, {
        "kind": "finextract", "zoo": zoo.root, "base": zoo.base, "out_dir": str(tmp_path / "finextract"),
        "settings": {"num_candidates": 3, "sample_steps": 2}}), show_progress=False)
    result = evaluate(eval_config(study, tmp_path / "eval", baselines={"finextract": str(directory)}, controls=[]),
                      show_progress=False)
    assert list(result.metrics) == ["org", "rec", "finextract", "base"] and not result.failures
    assert result.metrics["finextract"].n_images == 3 * 2 and "finextract.top1_image" in result.headline


def test_a_victim_that_fails_is_reported_and_the_others_go_on(study, tmp_path):
    _, zoo, _ = study
    root = tmp_path / "zoo"
    shutil.copytree(zoo.root, root)
    rows = sorted((r for r in read_manifest(str(root)).to_pylist()
                   if r["split"] == "heldout" and r["snapshot_step"] == r["steps"]), key=lambda r: r["lora_id"])
    (root / rows[0]["lora_path"]).write_bytes(b"not a safetensors file")
    result = evaluate(eval_config(study, tmp_path / "out", zoo=str(root), controls=[]), show_progress=False)
    assert [f["lora_id"] for f in result.failures] == [rows[0]["lora_id"]]
    assert result.victims == 2 and result.metrics["org"].n_candidates == 3
    assert not (tmp_path / "out" / RESULTS_DIR / f"{rows[0]['lora_id']}.json").exists()


def test_an_evaluation_that_fails_is_a_failed_run_with_its_settings(study, tmp_path):
    from mlflow.tracking import MlflowClient

    _, zoo, _ = study
    root = tmp_path / "zoo"
    shutil.copytree(zoo.root, root)
    for row in read_manifest(str(root)).to_pylist():
        if row["split"] == "heldout" and row["snapshot_step"] == row["steps"]:
            (root / row["lora_path"]).write_bytes(b"not a safetensors file")
    cfg = eval_config(study, tmp_path / "out", zoo=str(root), controls=[], tracking=True)
    with pytest.raises(LoraleakError, match="every victim failed"):
        evaluate(cfg, show_progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and run.data.params["n_images"] == "2"
    assert run.data.params["data.candidates"] == "3" and run.data.tags["loraleak.folder"] == str(cfg.out_dir)


def test_evaluate_command_prints_the_table(study, tmp_path, capsys):
    cfg = eval_config(study, tmp_path / "cli", controls=["victim_class_prompt"], tracking=True)
    config = tmp_path / "evaluate.yaml"
    config.write_text(json.dumps(to_dict(cfg)))  # JSON is YAML
    assert main(["evaluate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "victim_class_prompt" in out and "chance: top-1 0.333" in out and "report.html" in out
    run_id = json.loads((tmp_path / "cli" / "evaluation.json").read_text())["mlflow_run_id"]
    assert main(["compare", run_id, "--workdir", str(tmp_path / "cli")]) == 0
    table = capsys.readouterr().out
    # The headline by default; every metric on request.
    assert "metrics.chance_top1" in table and "metrics.regime.strong_and_bound" in table and "0.333" in table
    assert "metrics.rec.face_found" not in table
    assert main(["compare", run_id, "--workdir", str(tmp_path / "cli"), "--all-metrics"]) == 0
    assert "metrics.rec.face_found" in capsys.readouterr().out


@pytest.mark.slow
def test_a_trained_attack_evaluated_on_ray_actors(ray_local, study, evaluated, tmp_path):
    """Ray Train's attack, victims on two Ray actors: for the conditions that need no attack, the
    same images as in this process (same seeds)."""
    work, zoo, _ = study
    trained = train_attack(from_dict(AttackTrainConfig, {
        "zoo": zoo.root, "base": zoo.base, "identities": IDENTITIES, "batch_size": 2, "max_steps": 2,
        "checkpoint_every": 2, "val_every": 2, "val_fraction": 0.0, "out_dir": str(tmp_path / "attack"),
        "tracking": False, "resources_per_worker": {"CPU": 1}}), show_progress=False)
    result = evaluate(eval_config(study, tmp_path / "out", attack=str(trained.attack_dir), workers=2),
                      show_progress=False)
    assert result.evaluated == 3 and not result.failures and list(result.metrics) == CONDITIONS
    local_cfg, _ = evaluated
    from PIL import Image

    pixels = lambda path: np.asarray(Image.open(path), dtype=np.int16)  # noqa: E731
    for victim in (tmp_path / "out" / RESULTS_DIR).glob("*.json"):
        lora_id = victim.stem
        for name in ("org", "base", *CONTROLS):
            ours = pixels(tmp_path / "out" / RESULTS_DIR / lora_id / f"{name}-000.png")
            theirs = pixels(local_cfg.out_dir / RESULTS_DIR / lora_id / f"{name}-000.png")
            assert np.abs(ours - theirs).max() <= 1


# --- pieces that need no models ---------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"baselines": {"rec": "x"}}, "cannot name a baseline"),
    ({"controls": ["victim_no_prompt"]}, "unknown control"),
    ({"n_images": 0}, "n_images must be >= 1"),
    ({"scorer": "face++"}, "not one of"),
    ({"sample_step": 3}, "unknown key 'sample_step'"),
])
def test_config_rejects_bad_settings(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(EvaluationConfig, {"zoo": "zoo", **change})


def test_wrong_trigger_is_never_the_true_one():
    for seed in range(200):
        true = wrong_trigger(seed, "")  # the word a seed draws first
        assert wrong_trigger(seed, true) != true


def _scores(distances_to_victim: list[float]) -> ImageScores:
    """One image per victim; candidates 'v' (the victim) and 'x' at distance 0.5."""
    return ImageScores("v", ("v", "x"), 0.4, np.array([[d, 0.5] for d in distances_to_victim]),
                       np.array([1 - d / 2 for d in distances_to_victim]))


def test_paired_difference_and_headline_by_hand():
    # Victims are the unit: a, b per victim similarity 1 - d / 2.
    rec = summarise([_scores([0.2]), _scores([0.4]), _scores([0.6])], n_boot=100)
    control = summarise([_scores([0.4]), _scores([0.4]), _scores([0.4])], n_boot=100)
    base = summarise([_scores([0.8]), _scores([0.8]), _scores([0.8])], n_boot=100)
    diff = paired_difference(rec, control, "similarity", n_boot=500)
    # rec similarities 0.9, 0.8, 0.7; control 0.8 each: differences +0.1, 0, -0.1.
    assert diff.value == pytest.approx(0.0, abs=1e-12)
    assert -0.1 - 1e-9 <= diff.low < 0 < diff.high <= 0.1 + 1e-9  # a mean of resampled ±0.1, 0
    headline, best = headline_metrics({"rec": rec, "victim_class_prompt": control, "base": base}, n_boot=100)
    assert best == "victim_class_prompt"
    assert headline["rec.similarity"] == pytest.approx(0.8) and headline["base.similarity"] == pytest.approx(0.6)
    assert headline["rec.top1_image"] == pytest.approx(2 / 3)  # victim nearer than x (0.5) for d = 0.2, 0.4
    assert headline["chance_top1"] == 0.5
    assert headline["rec_over_best_control.similarity"] == pytest.approx(0.0, abs=1e-12)
