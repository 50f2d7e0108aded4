"""`run_sweep(cfg)`: every trial of a sweep through Ray Tune, tracked in MLflow, summed up in a table and a plot.

    <sweep>/sweep.json             the sweep's settings, its trials and its MLflow parent run
    <sweep>/stages/                the pipeline folder the trials share (zoo-<key>, attack-<key>, ...)
    <sweep>/trials/<id>/result.json  each trial's record (a finished one is not run again)
    <sweep>/results.csv            one row per trial: the varied settings and every headline metric
    <sweep>/privacy_utility.png    utility (org similarity) against privacy loss (rec similarity, top-1)
    <sweep>/ray/                   Ray Tune's experiment folders
    <sweep>/../mlflow.db           MLflow, as for `loraleak run --out <sweep>` (unless --tracking-uri,
                                   tracking_uri or MLFLOW_TRACKING_URI says otherwise): in the sweep's
                                   experiment, its parent run (the table and the plot as artifacts), each
                                   trial's pipeline run nested under it, its stage runs under that
                                   (loraleak.sweeps.tracking)

Before anything runs, every trial's settings are checked, the stages they may share are worked out
(`stages.stage_folders`) and checked against `rerun`. Trials run in waves so that two trials never
build one shared output at once; within a wave, as many run at once as the cluster holds.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..cluster import cluster_resources, connect_ray
from ..config import to_dict
from ..errors import LoraleakError
from ..locking import folder_lock
from ..tracking import end_status
from .config import SweepConfig
from .report import (REPORT_FILE, STRIPS_FILE, format_paired_text, paired_with_reference, strips_by_trial,
                     write_sweep_report)
from .results import (CURVE_FILE, FAILED, FINISHED, PLOT_FILE, TABLE_FILE, format_table, is_finished,
                      leak_by_trial_plot, privacy_utility_plot, read_record, record_path, results_frame, table_columns,
                      write_table)
from .stages import (Concurrency, builds_per_stage, check_rerun, concurrency, driver_resources, peak_need, waves)
from .tracking import close_trial_orphans, ensure_experiments, open_parent_run, sweep_experiment, sweep_tracking_uri
from .trainable import describe_record, trial_payload, trial_trainable
from .watch import TrialWatch
from .trials import Trial, expand_trials, reference_trial

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
@dataclass
class SweepPlan:
    cfg: SweepConfig
    tracking_uri: str
    experiment: str  # the sweep's MLflow experiment: its parent run, its trials' runs and their stage runs
    trials: list[Trial]
    finished: list[str]  # trial ids with a finished record (not run again)
    builds: dict[str, int]  # stage -> distinct outputs the trials need

    @property
    def pending(self) -> list[Trial]:
        return [t for t in self.trials if t.trial_id not in self.finished]

    def describe(self) -> str:
        cfg = self.cfg
        varied = ", ".join(cfg.search_space)
        lines = [f"sweep {cfg.name}: {len(self.trials)} trials ({cfg.search} over {varied}), "
                 f"{len(self.finished)} finished before, {len(self.pending)} to run -> {cfg.directory}"]
        if cfg.share_stages:
            if cfg.stages_dir is not None:
                lines.append(f"  stage folder: {cfg.stages_directory} (stages_dir)")
            shared = [s for s, n in self.builds.items() if n == 1]
            per = [f"{s} {n}" for s, n in self.builds.items() if n > 1]
            lines.append(f"  stage outputs: {', '.join(per) or 'none differ'}"
                         + (f"; shared by every trial: {', '.join(shared)}" if shared else ""))
        else:
            lines.append("  stage outputs: every trial its own (share_stages: false)")
        if len(self.trials) > 1:
            how = "reference" if cfg.reference else "the first trial; reference: to choose"
            lines.append(f"  paired per victim with: {reference_trial(cfg, self.trials).label} ({how})")
        return "\n".join(lines)


@dataclass
class SweepResult:
    directory: Path
    frame: Any  # pandas DataFrame, one row per trial
    table: str  # as printed
    table_path: Path
    plot_path: Path
    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    ran: list[str] = field(default_factory=list)  # trial ids run by this call
    reused: list[str] = field(default_factory=list)  # trial ids finished before
    failed: list[str] = field(default_factory=list)  # trial ids that failed (rerun the sweep to retry them)
    wall_time_s: float = 0.0


def plan_sweep(cfg: SweepConfig) -> SweepPlan:
    """The sweep's trials, validated, and which of them finished before; runs and writes nothing."""
    uri = sweep_tracking_uri(cfg.tracking_uri, cfg.directory)
    trials = expand_trials(cfg, uri)
    check_rerun(cfg.rerun, trials, f"sweep {cfg.name}")
    reference_trial(cfg, trials)  # a reference that picks no trial is one line now, not after the trials
    finished = [t.trial_id for t in trials if is_finished(read_record(record_path(cfg.directory, t.trial_id)))]
    return SweepPlan(cfg, uri, sweep_experiment(cfg.experiment, cfg.directory), trials, finished,
                     builds_per_stage(trials))


class _Say:
    def __init__(self, show: bool) -> None:
        self.show = show

    def __call__(self, text: str) -> None:
        if self.show:
            print(text, flush=True)
        logger.debug(text)


def _progress_callback(directory: Path, total: int, start: int, cfg: SweepConfig, say: _Say, watch: TrialWatch):
    from ray.tune import Callback  # ray starts slowly: only a running sweep imports it

    class TrialProgress(Callback):
        """One line per trial as it ends (Tune itself runs quiet); the watch says the running ones' zoo progress."""

        def __init__(self) -> None:
            self.done = start

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            watch.running(trial.config["trial"]["trial_id"])

        def _line(self, trial) -> None:
            watch.ended(trial.config["trial"]["trial_id"])
            self.done += 1
            record = read_record(record_path(directory, trial.config["trial"]["trial_id"])) or {
                "label": trial.config["trial"]["label"], "status": FAILED, "error": "no record (the trial died)"}
            say(f"[{self.done}/{total}] {describe_record(record, cfg.utility, cfg.privacy)}")

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._line(trial)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._line(trial)

    return TrialProgress()


def _trial_name(trial) -> str:
    return f"trial-{trial.config['trial']['trial_id']}"


def _run_wave(cfg: SweepConfig, wave: list[Trial], index: int, common: dict[str, Any], at_once: int,
              callback: Any) -> None:
    from ray import tune  # see _progress_callback

    payloads = [trial_payload(t, cfg.resources_per_trial) for t in wave]
    trainable = tune.with_resources(
        tune.with_parameters(trial_trainable, common=common),
        # The trial actor itself needs nothing (an empty head bundle); bundle 0 is its driver task's.
        lambda config: tune.PlacementGroupFactory([{}, config["trial"]["driver_bundle"]]))
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(payloads)},
        tune_config=tune.TuneConfig(max_concurrent_trials=min(at_once, len(wave)), reuse_actors=False,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-wave{index}",
                                  storage_path=str(cfg.directory / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=[callback]))
    tuner.fit()  # errored trials are in the records; the sweep goes on with the others


def _concurrency(cfg: SweepConfig, trials: Sequence[Trial]) -> Concurrency:
    needs = [peak_need(t.config, driver_resources(t.config, cfg.resources_per_trial)) for t in trials]
    return concurrency(needs, cluster_resources(), cfg.max_concurrent_trials)


def _parent_params(cfg: SweepConfig, plan: SweepPlan) -> dict[str, Any]:
    data = to_dict(cfg)
    return {"name": cfg.name, "pipeline": cfg.pipeline, "search": cfg.search, "trials": len(plan.trials),
            "search_space": json.dumps(data["search_space"], default=str),
            "overrides": json.dumps(data["overrides"], default=str), "share_stages": cfg.share_stages,
            "rerun": ",".join(cfg.rerun) if cfg.rerun is not None else "-", "metric": cfg.metric}


def summarize(cfg: SweepConfig, trials: Sequence[Trial]) -> tuple[Any, str, Path, Path]:
    """The results frame of the trials' records, its CSV and printed table, and the privacy-utility plot."""
    records = []
    for t in trials:
        record = read_record(record_path(cfg.directory, t.trial_id))
        records.append(record if record is not None else
                       {"trial_id": t.trial_id, "label": t.label, "overrides": t.overrides, "status": "not run"})
    varied = list(dict.fromkeys(p for t in trials for p in t.overrides))
    frame = results_frame(records, varied, cfg.metric, cfg.mode)
    table_path = write_table(frame, cfg.directory / TABLE_FILE)
    plot_path = privacy_utility_plot(frame, cfg.utility, cfg.privacy, cfg.directory / PLOT_FILE,
                                     f"sweep {cfg.name}: privacy against utility ({len(frame)} trials)")
    curve_path = leak_by_trial_plot(frame, records, varied, cfg.directory / CURVE_FILE,
                                    f"sweep {cfg.name} ({len(frame)} trials)")
    strips_path = strips_by_trial(records, varied, cfg.directory / STRIPS_FILE, f"sweep {cfg.name}")
    columns = [c for c in table_columns(frame, cfg.utility, cfg.privacy, cfg.metric) if c in frame.columns]
    paired = paired_with_reference(records, reference_trial(cfg, list(trials)).trial_id)
    write_sweep_report(cfg.directory, cfg.name, frame[columns].to_html(index=False, float_format="%.3f"),
                       [plot_path, curve_path, strips_path], records, paired)
    table = format_table(frame, cfg.utility, cfg.privacy, cfg.metric)
    paired_text = format_paired_text(paired)
    return frame, table + ("\n\n" + paired_text if paired_text else ""), table_path, plot_path


def run_sweep(cfg: SweepConfig, show_progress: bool = True) -> SweepResult:
    """Run (or resume) the sweep: every trial not finished before, then the table and the plot.

    One sweep per directory at a time (its folder lock). Its trials share the stage folder by design and
    lock only the stage outputs they build (`waves` keeps two trials from building the same one)."""
    plan_sweep(cfg)  # a bad setting is one line before any folder is made
    with folder_lock(cfg.directory, f"sweep {cfg.name}"), ExitStack() as shared:
        if cfg.share_stages and not cfg.stages_directory.is_relative_to(cfg.directory):
            shared.enter_context(folder_lock(cfg.stages_directory, f"sweep {cfg.name}"))  # shared with others
        return _run_sweep(cfg, show_progress)


def _run_sweep(cfg: SweepConfig, show_progress: bool) -> SweepResult:
    started = time.perf_counter()
    say = _Say(show_progress)
    plan = plan_sweep(cfg)  # every bad setting fails here, before anything is written or started
    say(plan.describe())
    directory = cfg.directory
    directory.mkdir(parents=True, exist_ok=True)
    sweep_file = directory / SWEEP_FILE
    previous = json.loads(sweep_file.read_text()) if sweep_file.is_file() else {}
    experiment_id = ensure_experiments(plan.tracking_uri, [plan.experiment])[plan.experiment]
    # Under the sweep's lock no trial of it runs: what a killed sweep left RUNNING is closed as KILLED.
    if closed := close_trial_orphans(plan.tracking_uri, [t.config.out_dir for t in plan.trials]):
        logger.info("sweep %s: closed %d MLflow run(s) left RUNNING by a killed sweep as KILLED", cfg.name, len(closed))
    parent = open_parent_run(plan.tracking_uri, experiment_id, cfg.name, previous.get("parent_run_id"))
    if parent.run_id != previous.get("parent_run_id"):
        parent.log_params(_parent_params(cfg, plan))
    parent.log_dict(to_dict(cfg), "sweep_config.json")
    sweep_file.write_text(json.dumps({
        "name": cfg.name, "parent_run_id": parent.run_id, "tracking_uri": plan.tracking_uri,
        "experiment": plan.experiment, "config": to_dict(cfg),
        "trials": [{"trial_id": t.trial_id, "label": t.label, "overrides": t.overrides} for t in plan.trials]},
        indent=1, default=str))

    pending = plan.pending
    status = "FAILED"
    try:
        if pending:
            connect_ray()
            at_once = _concurrency(cfg, pending)
            say(f"  concurrency: {at_once.describe()}")
            if at_once.short:
                logger.warning("sweep %s: a trial needs %s; its stages wait until the cluster has them",
                               cfg.name, ", ".join(at_once.short))
            elif cfg.max_concurrent_trials is not None and at_once.oversubscribed:
                logger.warning("sweep %s: %d trials at once need more than the cluster has (%s); their stages "
                               "wait on each other, and hang if the trials' drivers hold what the stages need",
                               cfg.name, at_once.trials, at_once.describe())
            groups = waves(pending) if at_once.trials > 1 else [pending]
            if len(groups) > 1:
                say(f"  {len(groups)} waves (trials that share an output wait for the first to build it): "
                    + ", ".join(str(len(g)) for g in groups))
            common = {"directory": str(directory), "sweep": cfg.name, "parent_run_id": parent.run_id}
            watch = TrialWatch(pending, say).start()
            try:
                callback = _progress_callback(directory, len(plan.trials), len(plan.finished), cfg, say, watch)
                for index, wave in enumerate(groups):
                    _run_wave(cfg, wave, index, common, at_once.trials, callback)
            finally:
                watch.stop()
        status = "FINISHED"
    except BaseException as e:
        status = end_status(e)  # KILLED on Ctrl-C / SIGTERM, FAILED otherwise
        raise
    finally:
        frame, table, table_path, plot_path = summarize(cfg, plan.trials)
        failed = [t.trial_id for t in plan.trials
                  if (read_record(record_path(directory, t.trial_id)) or {}).get("status") != FINISHED]
        parent.log_artifact(table_path)
        parent.log_artifact(plot_path)
        for extra in (CURVE_FILE, STRIPS_FILE, REPORT_FILE):  # the strips need a finished trial with images
            if (directory / extra).is_file():
                parent.log_artifact(directory / extra)
        finished = int((frame["status"] == FINISHED).sum()) if "status" in frame.columns else 0
        summary = {"trials_finished": finished, "trials_failed": len(failed)}
        if cfg.metric in frame.columns and finished:
            best = frame[frame["status"] == FINISHED][cfg.metric].dropna()
            if len(best):
                summary[f"best.{cfg.metric}"] = float(best.min() if cfg.mode == "min" else best.max())
        parent.log_metrics(summary)
        if status == "FINISHED" and failed:
            status = "FAILED"
        parent.client.set_terminated(parent.run_id, status=status)
    ran = [t.trial_id for t in pending]
    return SweepResult(directory, frame, table, table_path, plot_path, plan.tracking_uri, plan.experiment,
                       parent.run_id, ran=ran, reused=list(plan.finished), failed=failed, wall_time_s=time.perf_counter() - started)


def require_finished(result: SweepResult) -> None:
    """LoraleakError naming the failed trials (after the table and plot are written)."""
    if not result.failed:
        return
    first = read_record(record_path(result.directory, result.failed[0])) or {}
    raise LoraleakError(f"{len(result.failed)} trial(s) did not finish (first: {first.get('label', result.failed[0])}: "
                        f"{first.get('error', 'not run')}); rerun the sweep to retry them (finished trials are kept)")
