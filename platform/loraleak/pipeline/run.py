"""`run_pipeline(cfg)`: identities -> base -> zoo -> attack -> baselines -> evaluation -> report.

A loop over the study's stages (`loraleak.pipeline.stages`): each one is skipped when its output is
complete, else run through its own library entry point (`pretrain_base`, `build_zoo`, `train_attack`,
`fit_baseline`, `evaluate`), which keeps that stage's own resume. Its output goes to a folder named by
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

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..locking import folder_lock
from ..tracking import close_orphan_runs, default_tracking_uri, mlflow_run, resolve_tracking_uri
from .config import PipelineConfig
from .stages import STAGES, RunContext, plan_stages

logger = logging.getLogger(__name__)

RESULT_FILE = "pipeline.json"
REPORT_FILE = "report.html"


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


# --- the pipeline -------------------------------------------------------------------------------------------

def run_pipeline(cfg: PipelineConfig, show_progress: bool = True, lock: bool = True) -> PipelineResult:
    """Run (or resume) every stage of the study `cfg` describes; returns its headline numbers.

    With `lock`, the whole out_dir is this run's until it returns (a second run on it fails at once, in one
    line); a sweep's trials share their stage folder by design and pass lock=False (each stage they build
    is still locked)."""
    if not lock:
        return _run_pipeline(cfg, show_progress)
    with folder_lock(cfg.out_dir) as out:
        _close_orphan_runs(cfg, out)
        return _run_pipeline(cfg, show_progress)


def _close_orphan_runs(cfg: PipelineConfig, out: Path) -> None:
    """Runs a killed process left RUNNING in the out folder's own MLflow store become KILLED: with the folder's
    lock held, no live process writes there. A shared server (tracking_uri, $MLFLOW_TRACKING_URI) is left alone."""
    uri = resolve_tracking_uri(cfg.tracking_uri, out)
    if cfg.tracking and uri == default_tracking_uri(out) and (out / "mlflow.db").is_file():
        closed = close_orphan_runs(uri)
        if closed:
            logger.info("closed %d MLflow run(s) left RUNNING by a killed run as KILLED", len(closed))


def _run_pipeline(cfg: PipelineConfig, show_progress: bool) -> PipelineResult:
    started = time.perf_counter()
    out = cfg.out_dir.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(out, cfg.tracking, cfg.tracking_uri, resolve_tracking_uri(cfg.tracking_uri, out), show_progress)
    progress = _Progress(show_progress)

    stages = plan_stages(cfg, out)  # every stage's folder key, the same ones the sweeps predict
    results = {}
    for stage in stages:
        progress.start(stage.name, stage.note + stage.describe())
        if stage.is_complete():
            progress.done(stage.summary(), skipped=True)
            results[stage] = stage.load_result(ctx)
        else:
            ran = stage.run(ctx)
            progress.done(ran.detail)
            results[stage] = stage.load_result(ctx, ran)
    zoo, attack, summary = results[stages.zoo], results[stages.attack], results[stages.evaluation]
    keys = stages.keys()

    progress.start("report", "headline numbers, MLflow")
    report = Path(summary["report"])
    shutil.copyfile(report, out / REPORT_FILE)
    stage_dirs = {"base": results[stages.base], "zoo": zoo.config.root, "attack": str(attack.directory),
                  **{f"baseline {k}": str(v) for k, v in stages.evaluation.attacks.items()},
                  "evaluation": str(report.parent.parent)}
    run_ids = {"zoo": zoo.mlflow_run_id, "attack": attack.mlflow_run_id, "evaluation": summary.get("mlflow_run_id")}
    result = PipelineResult(out, dict(summary["headline"]), out / REPORT_FILE, summary["table"],
                            summary.get("best_control"), run_ids, ctx.uri, stage_dirs, progress.skipped)
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
        "evaluation_report": str(report), "stage_dirs": stage_dirs, "mlflow_run_ids": run_ids, "tracking_uri": ctx.uri,
        "skipped": result.skipped, "wall_time_s": result.wall_time_s, "config": to_dict(cfg)}, indent=1))
    progress.done(f"{result.report}")
    return result
