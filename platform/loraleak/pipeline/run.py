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
    OUT/evaluation-<key>/      per-victim results, report/report.html and its figures, and pipeline.json:
                               the study's record (headline numbers, stage folders, MLflow run ids, config)
    OUT/report.html            copies of the report and the record of the study last run on OUT as its only
    OUT/pipeline.json          writer (`loraleak run`); a sweep's trials, which share OUT, leave them alone
    OUT/../mlflow.db           MLflow, shared by the studies beside this one (unless --tracking-uri,
                               tracking_uri or MLFLOW_TRACKING_URI says otherwise): loraleak.pipeline.tracking

Settings that only say how to run a stage (Ray workers, CPUs and GPUs, fine-tunes per pass,
checkpoint cadence) are left out of the keys: changing them resumes the same stage. A larger
attack.max_steps continues the trained attack from its latest checkpoint into a new attack folder,
keeping the earlier one, and evaluates it.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..finetune.record import write_json_atomically
from ..leftovers import remove_study_leftovers
from ..locking import folder_lock
from .config import PipelineConfig
from .stages import STAGES, BaselinesStage, RunContext, Stage, StudyStages, plan_stages
from .tracking import NestUnder, close_study_orphans, earlier_study_run, open_study_run, study_experiment, \
    study_tracking_uri

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
    experiment: str | None = None  # the study's MLflow experiment (None: not tracked)

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
        self.skipped: list[str] = []  # stages whose output was complete, by Stage.label

    def _print(self, text: str) -> None:
        if self.show:
            print(text, flush=True)
        logger.debug(text)

    def start(self, name: str, detail: str, label: str | None = None) -> None:
        self.index, self.name, self.started = STAGES.index(name) + 1, name, time.perf_counter()
        self.label = label or name
        self._print(f"[{self.index}/{len(STAGES)}] {name}: {detail}")

    def done(self, detail: str, skipped: bool = False) -> None:
        took = time.perf_counter() - self.started
        when = "complete, skipped" if skipped else f"done in {duration_text(took)}"
        if skipped:
            self.skipped.append(self.label)
        self._print(f"[{self.index}/{len(STAGES)}] {self.name}: {when}: {detail}")


def duration_text(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


# --- the pipeline -------------------------------------------------------------------------------------------

def run_pipeline(cfg: PipelineConfig, show_progress: bool = True, lock: bool = True,
                 parent: NestUnder | None = None) -> PipelineResult:
    """Run (or resume) every stage of the study `cfg` describes; returns its headline numbers.

    With `lock`, the whole out_dir is this run's until it returns (a second run on it fails at once, in one
    line); a sweep's trials share their stage folder by design and pass lock=False (each stage they build
    is still locked), and `parent`: their pipeline run nests under the sweep's run."""
    if not lock:
        return _run_pipeline(cfg, show_progress, parent, publish=False)
    with folder_lock(cfg.out_dir) as out:
        _close_orphan_runs(cfg, out)
        if removed := remove_study_leftovers(out):
            logger.info("removed %d temporary or unregistered folder(s) left by a killed run", len(removed))
        return _run_pipeline(cfg, show_progress, parent, publish=True)


def _close_orphan_runs(cfg: PipelineConfig, out: Path) -> None:
    """This study's runs a killed process left RUNNING become KILLED: with the folder's lock held, no live process
    writes them. Other studies' runs in a shared store are left alone (loraleak.pipeline.tracking)."""
    if cfg.tracking:
        closed = close_study_orphans(study_tracking_uri(cfg, out), out)
        if closed:
            logger.info("closed %d MLflow run(s) left RUNNING by a killed run as KILLED", len(closed))


def _tracked_folders(stage: Stage) -> dict[str, Path]:
    """label -> output folder of each MLflow run a stage logs (what a rerun that skips it links to)."""
    if isinstance(stage, BaselinesStage):
        return {f"baseline.{name}": folder for name, folder in stage.folders.items()}
    if stage.name in ("zoo", "attack", "evaluation"):
        return {("undefended_" if stage.note else "") + stage.name: stage.folder}
    return {}  # identities (a check) and base (its pretraining logs no run)


def _all_complete(stages: StudyStages) -> bool:
    return all(stage.is_complete() for stage in stages if stage.name != "identities")


def _ended_once(out: Path, stages: StudyStages) -> bool:
    """Whether a study of these stages ended once, its record written (in its evaluation folder; folders made
    before the record moved there have it in OUT only)."""
    return (stages.evaluation.folder / RESULT_FILE).is_file() or (out / RESULT_FILE).is_file()


def _run_pipeline(cfg: PipelineConfig, show_progress: bool, parent: NestUnder | None,
                  publish: bool) -> PipelineResult:
    """The study; with `publish` (the run holds OUT's lock) its record and report are also copied to OUT."""
    started = time.perf_counter()
    out = cfg.out_dir.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    progress = _Progress(show_progress)
    stages = plan_stages(cfg, out)  # every stage's folder key, the same ones the sweeps predict
    keys = stages.keys()
    uri, experiment = study_tracking_uri(cfg, out), study_experiment(cfg, out)
    # A rerun of a complete study computes nothing: it opens no run, and reports the one that computed it.
    # (Only a study that ended once, with its record written, can be complete: a new one plans no stage here,
    # before the identities' check.)
    earlier = earlier_study_run(uri, experiment, out, stages.evaluation.folder) \
        if cfg.tracking and _ended_once(out, stages) and _all_complete(stages) else None
    stage_keys = {"stage": {"keys": {"base": keys["base"], "attack": keys["attack"],
                                     **{f"upstream.{k}": v for k, v in keys["upstream"].items()},
                                     "evaluation": keys["evaluation"]}}}
    opened = open_study_run(cfg, out, uri, experiment, f"{out.name}-{keys['evaluation']}", stages.evaluation.folder,
                            stage_keys, parent) if earlier is None else nullcontext()
    with opened as study:
        ctx = RunContext(out, cfg.tracking, uri, show_progress, study)
        results = {}
        for stage in stages:
            progress.start(stage.name, stage.note + stage.describe(), stage.label)
            if stage.is_complete():
                progress.done(stage.summary(), skipped=True)
                results[stage] = stage.load_result(ctx)
                if study is not None:
                    for label, folder in _tracked_folders(stage).items():
                        study.link(label, folder)
            else:
                ran = stage.run(ctx)
                progress.done(ran.detail)
                results[stage] = stage.load_result(ctx, ran)
        zoo, attack, summary = results[stages.zoo], results[stages.attack], results[stages.evaluation]

        progress.start("report", "headline numbers, MLflow")
        report = Path(summary["report"])
        shown = out / REPORT_FILE if publish else report
        if publish:
            shutil.copyfile(report, shown)
        stage_dirs = {"base": results[stages.base], "zoo": zoo.config.root, "attack": str(attack.directory),
                      **{f"baseline {k}": str(v) for k, v in stages.evaluation.attacks.items()},
                      "evaluation": str(report.parent.parent)}
        run_ids = {"zoo": zoo.mlflow_run_id, "attack": attack.mlflow_run_id,
                   "evaluation": summary.get("mlflow_run_id")}
        if study is not None or earlier is not None:
            run_ids["pipeline"] = study.run_id if study is not None else earlier
        result = PipelineResult(out, dict(summary["headline"]), shown, summary["table"],
                                summary.get("best_control"), run_ids, uri, stage_dirs, progress.skipped,
                                experiment=experiment if cfg.tracking else None)
        result.wall_time_s = time.perf_counter() - started
        data = {
            "metrics": result.metrics, "best_control": result.best_control, "report": str(result.report),
            "evaluation_report": str(report), "stage_dirs": stage_dirs, "mlflow_run_ids": run_ids,
            "tracking_uri": uri, "experiment": experiment, "skipped": result.skipped,
            "wall_time_s": result.wall_time_s, "config": to_dict(cfg)}
        # The record lives with the evaluation it reports (one study per evaluation key), so studies sharing OUT
        # (a sweep's trials) never overwrite each other's; OUT's copy is the single writer's.
        record = stages.evaluation.folder / RESULT_FILE
        for path in (record, out / RESULT_FILE) if publish else (record,):
            write_json_atomically(path, data)
        if study is not None:
            study.finish(result.metrics, [shown, record])
        progress.done(f"{result.report}")
    return result
