"""`run_pipeline(cfg)`: identities -> base -> zoo -> attack -> baselines -> evaluation -> report.

Every stage runs through its own library entry point (`pretrain_base`, `build_zoo`, `train_attack`,
`fit_baseline`, `evaluate`) and keeps that stage's own resume. Its output goes to a folder named by
a key over everything its result depends on (its settings and the keys of the stages before it),
so the pipeline is a pure function of its config: another config never reuses a stage it should
not, a rerun of the same config skips every stage whose output is complete, and configs that share
the early stages (a sweep over attack settings) share their outputs too.

    OUT/zoo-<key>/             the LoRA zoo (manifest, LoRA files)
    OUT/attack-<key>/attack/   the trained network autoencoder (OUT/attack-<key>/ray: checkpoints)
    OUT/baseline-<name>-<key>/ each fitted baseline
    OUT/evaluation-<key>/      per-victim results, report/report.html and its figures
    OUT/report.html            a copy of the latest report
    OUT/pipeline.json          the latest result: headline numbers, stage folders, MLflow run ids
    OUT/mlflow.db              MLflow (unless MLFLOW_TRACKING_URI or tracking_uri says otherwise)

Settings that only say how to run a stage (Ray workers, CPUs and GPUs, fine-tunes per pass,
checkpoint cadence, attack max_steps) are left out of the keys: changing them resumes the same
stage. A larger attack.max_steps continues the trained attack and re-evaluates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attack.config import AttackTrainConfig
from ..base.pretrain import PretrainConfig
from ..config import to_dict
from ..errors import ConfigError
from ..evaluation.config import EvaluationConfig
from ..zoo.config import ZooConfig
from . import config as pipeline_config
from .config import UNDEFENDED_CONDITION, PipelineConfig, stage_config, with_overrides

logger = logging.getLogger(__name__)

STAGES = ("identities", "base", "zoo", "attack", "baselines", "evaluation", "report")
RESULT_FILE = "pipeline.json"
# Beside an evaluation's summary: the inputs it was computed from. The folder's key names the upstream
# settings, but not what is in the upstream folders when the evaluation runs (a zoo with victims still
# failing, an attack trained further since): the evaluation is complete only for the inputs recorded here.
EVALUATION_INPUTS = "pipeline_inputs.json"
REPORT_FILE = "report.html"
# How to run a stage, not what it computes: left out of the stage keys (a change resumes the stage).
HOW_TO_RUN = {
    "zoo": ("workers", "num_cpus_per_worker", "num_gpus_per_worker", "max_retries", "fine_tunes_per_pass",
            "batched_options"),
    "attack": ("max_steps", "use_gpu", "resources_per_worker", "loader_workers", "max_failures",
               "checkpoints_to_keep", "checkpoint_every", "val_every", "log_every"),
    "evaluation": ("workers", "num_cpus_per_worker", "num_gpus_per_worker", "max_retries", "report_victims",
                   "report_images"),
}


@dataclass
class PipelineResult:
    out_dir: Path
    # The headline numbers (see loraleak.evaluation.evaluate.headline_metrics): "<condition>.<rate>"
    # for org / rec / base / each baseline / each control, "chance_top1", "chance_top5",
    # "rec_over_best_control.similarity" (+ _lo / _hi).
    metrics: dict[str, float]
    report: Path
    table: str  # the evaluation's headline table, as printed
    best_control: str | None
    mlflow_run_ids: dict[str, str | None]  # stage -> its MLflow run ("pipeline": the pipeline's own)
    tracking_uri: str
    stage_dirs: dict[str, str]
    skipped: list[str] = field(default_factory=list)  # stages whose output was already complete
    wall_time_s: float = 0.0

    def headline(self) -> str:
        """rec vs org vs base (identity similarity), and top-1 identification vs chance, in one line each."""
        m = self.metrics
        fmt = lambda key: "-" if key not in m else f"{m[key]:.3f}"  # noqa: E731
        lines = [f"identity similarity: rec {fmt('rec.similarity')} vs org {fmt('org.similarity')} vs base "
                 f"{fmt('base.similarity')}"
                 + (f" (best control {self.best_control}: {fmt(f'{self.best_control}.similarity')})"
                    if self.best_control and self.best_control != "base" else ""),
                 f"top-1 identification: rec {fmt('rec.top1_image')} vs org {fmt('org.top1_image')} vs base "
                 f"{fmt('base.top1_image')}; chance {fmt('chance_top1')}"]
        return "\n".join(lines)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _settings(section: Any, stage: str) -> dict[str, Any]:
    """A section's settings that decide its result (its key's part)."""
    return {k: v for k, v in to_dict(section).items() if k not in HOW_TO_RUN.get(stage, ())}


def undefended_study(cfg: PipelineConfig) -> PipelineConfig | None:
    """The same study without the zoo's defense, whose attack is also evaluated against the defended victims
    (`UNDEFENDED_CONDITION`); None when the zoo is undefended or `cfg.undefended_attack` is off.

    Rank truncation to k < r changes the shared LoRA's rank, which an attack trained on rank-r LoRAs
    refuses to read, so it gets no such condition."""
    defense = cfg.zoo.defense
    if not cfg.undefended_attack or defense.kind == "none":
        return None
    if defense.kind == "rank_truncation" and defense.rank is not None and defense.rank < cfg.zoo.finetune.rank:
        return None
    return with_overrides(cfg, {"zoo.defense": {"kind": "none"}})


def stage_keys(cfg: PipelineConfig) -> dict[str, Any]:
    """The key of every stage's output folder for `cfg`, computed without running anything (what the
    sweeps use to know which trials share a stage): "base", "zoo", "attack", "baselines" (name -> key),
    "evaluation", "pretrained_base" (bool), and for a defended study "undefended_zoo", "undefended_attack"."""
    base_key = _key(cfg.base.ref) if cfg.base.pretrain is None else _key(to_dict(cfg.base.pretrain))
    zoo_key = _key(base_key, to_dict(cfg.identities), _settings(cfg.zoo, "zoo"))
    attack_key = _key(zoo_key, _settings(cfg.attack, "attack"))
    keys: dict[str, Any] = {"base": base_key, "pretrained_base": cfg.base.pretrain is not None, "zoo": zoo_key,
                            "attack": attack_key,
                            "baselines": {spec.name: _key(zoo_key, to_dict(spec)) for spec in cfg.baselines}}
    upstream = {"zoo": zoo_key, "attack": attack_key, "attack_steps": cfg.attack.max_steps,
                "baselines": keys["baselines"]}
    undefended = undefended_study(cfg)
    if undefended is not None:
        plain = stage_keys(undefended)
        keys["undefended_zoo"], keys["undefended_attack"] = plain["zoo"], plain["attack"]
        upstream["undefended_attack"] = plain["attack"]
    keys["upstream"] = upstream
    keys["evaluation"] = _key(upstream, _settings(cfg.evaluation, "evaluation"))
    return keys


class _Progress:
    """One line when a stage starts and one when it ends (or is skipped)."""

    def __init__(self, show: bool) -> None:
        self.show, self.index, self.started = show, 0, 0.0
        self.skipped: list[str] = []  # stages whose output was complete

    def _print(self, text: str) -> None:
        if self.show:
            print(text, flush=True)
        logger.debug(text)

    def start(self, name: str, detail: str) -> None:
        self.index, self.name, self.started = STAGES.index(name) + 1, name, time.perf_counter()
        self._print(f"[{self.index}/{len(STAGES)}] {name}: {detail}")

    def done(self, detail: str, skipped: bool = False) -> None:
        took = time.perf_counter() - self.started
        when = "complete, skipped" if skipped else f"done in {duration_text(took)}"
        if skipped:
            self.skipped.append(self.name)
        self._print(f"[{self.index}/{len(STAGES)}] {self.name}: {when}: {detail}")


def duration_text(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def _mlflow_run_id(tracking_uri: str, experiment: str, run_name: str) -> str | None:
    """The newest run of that name (stages that return no run id, or that were skipped)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


# --- the stages ---------------------------------------------------------------------------------------------

def _identities(cfg: PipelineConfig, progress: _Progress) -> None:
    from ..identities import make_source, split_identities

    progress.start("identities", f"{cfg.identities.kind} source")
    ids = sorted(i.identity_id for i in make_source(cfg.identities).identities())
    split = split_identities(ids, cfg.identities.heldout_fraction, cfg.identities.split_seed)
    used = ids[: cfg.zoo.max_identities]
    heldout = sum(split[i] == "heldout" for i in used)
    if heldout < 2 or heldout == len(used):
        raise ConfigError(f"identities: {len(used)} identities give {heldout} held-out victims: the study needs "
                          "at least 2 held out (candidates to identify among) and some to train the attack on")
    progress.done(f"{len(used)} identities: {len(used) - heldout} attack_train, {heldout} heldout")


def _base(cfg: PipelineConfig, key: str, out: Path, progress: _Progress) -> str:
    """The base reference every later stage uses."""
    if cfg.base.pretrain is None:
        from ..zoo.plan import base_resolution

        progress.start("base", cfg.base.ref)
        progress.done(f"{cfg.base.ref} ({base_resolution(cfg.base.ref)} px), nothing to pretrain", skipped=True)
        return cfg.base.ref
    from ..base.pretrain import pretrain_base

    directory = out / f"base-{key}"
    progress.start("base", f"pretrain a tiny base -> {directory}")
    if (directory / "training.json").is_file():
        progress.done(f"pretrained base in {directory}", skipped=True)
    else:
        pretrain_base(stage_config(PretrainConfig, cfg.base.pretrain, "base.pretrain", out_dir=directory))
        progress.done(f"pretrained base in {directory}")
    return str(directory)


def _zoo(cfg: PipelineConfig, key: str, base: str, out: Path, tracking: dict[str, Any], uri: str,
         progress: _Progress, show_progress: bool, note: str = "") -> tuple[ZooConfig, str | None]:
    from ..zoo.build import build_zoo
    from ..zoo.config import check_identity_source
    from ..zoo.manifest import finished_lora_ids
    from ..zoo.plan import plan_zoo
    from ..zoo.storage import ZooStore

    zoo = stage_config(ZooConfig, cfg.zoo, "zoo", root=str(out / f"zoo-{key}"), base=base,
                       identities=cfg.identities, **tracking)
    check_identity_source(zoo)
    plan = plan_zoo(zoo, show_progress=False)
    pending = len({ft.lora_id for ft in plan.fine_tunes} - finished_lora_ids(ZooStore(zoo.root)))
    progress.start("zoo", f"{note}{len(plan.fine_tunes)} fine-tunes ({cfg.zoo.finetune.steps} steps, rank "
                          f"{cfg.zoo.finetune.rank}), {pending} to run -> {zoo.root}")
    if pending == 0:
        progress.done(f"{len(plan.fine_tunes)} fine-tunes in {zoo.root}", skipped=True)
    else:
        summary = build_zoo(zoo, show_progress=show_progress)
        progress.done(f"{summary['done']} done, {summary['failed']} failed of {summary['planned']}")
    run_id = _mlflow_run_id(uri, zoo.experiment, f"zoo {zoo.root}") if zoo.tracking else None
    return zoo, run_id


def _attack(cfg: PipelineConfig, key: str, zoo: ZooConfig, out: Path, tracking: dict[str, Any], uri: str,
            progress: _Progress, show_progress: bool, note: str = "") -> tuple[Path, str | None]:
    from ..attack.train import TRAINING_RECORD, train_attack

    attack = stage_config(AttackTrainConfig, cfg.attack, "attack", zoo=zoo.root, base=zoo.base,
                          identities=cfg.identities, out_dir=out / f"attack-{key}", run_name=f"attack-{key}",
                          **tracking)
    progress.start("attack", f"{note}network autoencoder, {attack.max_steps} steps on {attack.num_workers} Ray Train "
                             f"worker(s) -> {attack.attack_dir}")
    record = attack.attack_dir / TRAINING_RECORD
    if record.is_file() and json.loads(record.read_text()).get("step", 0) >= attack.max_steps:
        progress.done(f"trained attack in {attack.attack_dir}", skipped=True)
        run_id = _mlflow_run_id(uri, attack.experiment, f"attack {attack.run_name}") \
            if attack.tracking else None
    else:
        result = train_attack(attack, show_progress=show_progress)
        final = result.evaluations.get(result.step, {})
        progress.done(f"step {result.step}" + "".join(f", {k} {v:.4f}" for k, v in sorted(final.items())))
        run_id = result.mlflow_run_id
    return attack.attack_dir, run_id


def _baselines(cfg: PipelineConfig, keys: dict[str, str], zoo: ZooConfig, out: Path, tracking: dict[str, Any],
               progress: _Progress, show_progress: bool) -> dict[str, Path]:
    names = ", ".join(f"{b.name} ({b.kind})" for b in cfg.baselines) or "none configured"
    progress.start("baselines", names)
    if not cfg.baselines:
        progress.done("none configured", skipped=True)
        return {}
    fit, config_class = pipeline_config.fit_baseline, pipeline_config.BaselineConfig
    if fit is None:
        raise ConfigError("baselines are configured, but this build has no loraleak.attack.baselines.fit_baseline")
    directories, fitted = {}, []
    for spec in cfg.baselines:
        directory = out / f"baseline-{spec.name}-{keys[spec.name]}"
        if not (directory / "config.json").is_file():
            baseline = config_class(kind=spec.kind, zoo=zoo.root, base=zoo.base, out_dir=directory,
                                    settings=spec.settings, identities=cfg.identities,
                                    tracking=tracking["tracking"], tracking_uri=tracking["tracking_uri"],
                                    workdir=tracking["workdir"])
            fit(baseline, show_progress=show_progress)
            fitted.append(spec.name)
        directories[spec.name] = directory
    progress.done(f"{len(fitted)} fitted, {len(cfg.baselines) - len(fitted)} already fitted", skipped=not fitted)
    return directories


def evaluation_inputs(upstream: dict[str, Any], zoo: ZooConfig, attack_dir: Path,
                      baselines: dict[str, Path]) -> dict[str, Any]:
    """What an evaluation is computed from: the upstream stage keys, the zoo's finished LoRAs and the content
    of the attack and every baseline folder (a digest each)."""
    from ..evaluation.evaluate import _hash_dir
    from ..zoo.manifest import finished_lora_ids
    from ..zoo.storage import ZooStore

    loras = hashlib.sha256(json.dumps(sorted(finished_lora_ids(ZooStore(zoo.root)))).encode()).hexdigest()[:16]
    attacks = {"rec": attack_dir, **baselines}
    return {"keys": upstream, "zoo_loras": loras,
            "attacks": {name: _hash_dir(Path(d)) if Path(d).is_dir() else None for name, d in sorted(attacks.items())}}


def _evaluation(cfg: PipelineConfig, key: str, zoo: ZooConfig, attack_dir: Path, baselines: dict[str, Path],
                out: Path, tracking: dict[str, Any], progress: _Progress, show_progress: bool,
                inputs: dict[str, Any]) -> dict[str, Any]:
    from ..evaluation.evaluate import SUMMARY_FILE, evaluate

    evaluation = stage_config(EvaluationConfig, cfg.evaluation, "evaluation", zoo=zoo.root,
                              out_dir=out / f"evaluation-{key}", attack=attack_dir, baselines=baselines, base=zoo.base,
                              identities=cfg.identities, run_name=f"evaluate {out.name}-{key}", **tracking)
    progress.start("evaluation", f"{len(evaluation.conditions)} conditions x {evaluation.n_images} images per "
                                 f"held-out victim, {evaluation.scorer} scorer -> {evaluation.out_dir}")
    summary_path, inputs_path = evaluation.out_dir / SUMMARY_FILE, evaluation.out_dir / EVALUATION_INPUTS
    summary = _read_json(summary_path)
    complete = summary is not None and not summary.get("failures") and _read_json(inputs_path) == inputs
    if complete:
        progress.done(f"{summary['victims']} victims", skipped=True)
    else:
        inputs_path.unlink(missing_ok=True)  # not complete for any inputs until this evaluation ends
        evaluate(evaluation, show_progress=show_progress)
        summary = json.loads(summary_path.read_text())
        inputs_path.write_text(json.dumps(inputs, indent=1))
        failed = f", {len(summary['failures'])} failed (rerun to retry)" if summary["failures"] else ""
        progress.done(f"{summary['victims']} victims among {summary['candidates']} candidates{failed}")
    return summary


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a half-written file counts as missing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- the pipeline -------------------------------------------------------------------------------------------

def run_pipeline(cfg: PipelineConfig, show_progress: bool = True, lock: bool = True) -> PipelineResult:
    """Run (or resume) every stage of the study `cfg` describes; returns its headline numbers.

    With `lock`, the whole out_dir is this run's until it returns (a second run on it fails at once, in one
    line); a sweep's trials share their stage folder by design and pass lock=False (each stage they build
    is still locked)."""
    from ..locking import folder_lock

    if not lock:
        return _run_pipeline(cfg, show_progress)
    with folder_lock(cfg.out_dir) as out:
        _close_orphan_runs(cfg, out)
        return _run_pipeline(cfg, show_progress)


def _close_orphan_runs(cfg: PipelineConfig, out: Path) -> None:
    """Runs a killed process left RUNNING in the out folder's own MLflow store become KILLED: with the folder's
    lock held, no live process writes there. A shared server (tracking_uri, $MLFLOW_TRACKING_URI) is left alone."""
    from ..tracking import close_orphan_runs, default_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking_uri, out)
    if cfg.tracking and uri == default_tracking_uri(out) and (out / "mlflow.db").is_file():
        closed = close_orphan_runs(uri)
        if closed:
            logger.info("closed %d MLflow run(s) left RUNNING by a killed run as KILLED", len(closed))


def _run_pipeline(cfg: PipelineConfig, show_progress: bool) -> PipelineResult:
    from ..tracking import mlflow_run, resolve_tracking_uri

    started = time.perf_counter()
    out = cfg.out_dir.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(cfg.tracking_uri, out)
    tracking = {"tracking": cfg.tracking, "tracking_uri": cfg.tracking_uri, "workdir": out}
    progress = _Progress(show_progress)

    keys = stage_keys(cfg)  # every stage's folder key, the same ones the sweeps predict
    _identities(cfg, progress)
    base = _base(cfg, keys["base"], out, progress)
    zoo, zoo_run = _zoo(cfg, keys["zoo"], base, out, tracking, uri, progress, show_progress)
    attack_dir, attack_run = _attack(cfg, keys["attack"], zoo, out, tracking, uri, progress, show_progress)
    baselines = _baselines(cfg, keys["baselines"], zoo, out, tracking, progress, show_progress)
    undefended = undefended_study(cfg)
    if undefended is not None:  # the attack trained on undefended LoRAs, against the same defended victims
        note = "undefended study, for the attack trained without the defense: "
        plain_zoo, _ = _zoo(undefended, keys["undefended_zoo"], base, out, tracking, uri, progress, show_progress,
                            note)
        plain_attack, _ = _attack(undefended, keys["undefended_attack"], plain_zoo, out, tracking, uri, progress,
                                  show_progress, note)
        baselines = {**baselines, UNDEFENDED_CONDITION: plain_attack}
    inputs = evaluation_inputs(keys["upstream"], zoo, attack_dir, baselines)
    summary = _evaluation(cfg, keys["evaluation"], zoo, attack_dir, baselines, out, tracking, progress,
                          show_progress, inputs)

    progress.start("report", "headline numbers, MLflow")
    report = Path(summary["report"])
    shutil.copyfile(report, out / REPORT_FILE)
    stage_dirs = {"base": base, "zoo": zoo.root, "attack": str(attack_dir),
                  **{f"baseline {k}": str(v) for k, v in baselines.items()},
                  "evaluation": str(report.parent.parent)}
    run_ids = {"zoo": zoo_run, "attack": attack_run, "evaluation": summary.get("mlflow_run_id")}
    result = PipelineResult(out, dict(summary["headline"]), out / REPORT_FILE, summary["table"],
                            summary.get("best_control"), run_ids, uri, stage_dirs, progress.skipped)
    if cfg.tracking:
        with mlflow_run(cfg.experiment, f"{out.name}-{keys['evaluation']}", cfg.tracking_uri, out) as run:
            run.log_params({**to_dict(cfg), "stage": {"keys": {"base": keys["base"], **keys["upstream"],
                                                               "evaluation": keys["evaluation"]},
                                                      "runs": {k: v or "-" for k, v in run_ids.items()}}})
            run.log_metrics(result.metrics)
            run.log_artifact(out / REPORT_FILE)
            run_ids["pipeline"] = run.run_id
    result.wall_time_s = time.perf_counter() - started
    (out / RESULT_FILE).write_text(json.dumps({
        "metrics": result.metrics, "best_control": result.best_control, "report": str(result.report),
        "evaluation_report": str(report), "stage_dirs": stage_dirs, "mlflow_run_ids": run_ids, "tracking_uri": uri,
        "skipped": result.skipped, "wall_time_s": result.wall_time_s, "config": to_dict(cfg)}, indent=1))
    progress.done(f"{result.report}")
    return result
