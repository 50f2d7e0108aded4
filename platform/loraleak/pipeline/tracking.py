"""The study's MLflow runs: one pipeline run per `loraleak run` that does work, its stage runs nested under it.

Where: `tracking_uri` (the config's, or `loraleak run --tracking-uri`), else $MLFLOW_TRACKING_URI, else the
sqlite store shared by every study beside this one (`study_workdir`). Which experiment: the study's name
(`experiment`, default the out folder's name: `--out runs/quick` logs to experiment "quick").

The pipeline run opens before the first stage and closes after the report, so its duration is the
study's and its status is FAILED when a stage fails, KILLED when interrupted (Ctrl-C, SIGTERM; a run a
killed process left RUNNING is closed as KILLED by the next run of the study, under its folder lock).
It carries the system tags with `mlflow.source.git.commit`, the config as `config.yaml` (what
`loraleak run --config` reads back), the stage keys as params, the headline as metrics and the report.

A study that runs inside a larger one (a sweep's trial) passes `NestUnder`: its pipeline run is then nested
under the sweep's run, named after the trial and tagged with it, in the sweep's experiment (`experiment`).

A stage that was complete already is not run again, so it logs no run: the pipeline run links to the run
that built it instead (tag `loraleak.reused.<stage>` = that run's id). A rerun of a complete study opens
no run at all: `run_pipeline` reports the study's earlier pipeline run.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterator

from ..config import to_dict
from ..tracking import FOLDER_TAG, TrackedRun, check_reachable, close_orphan_runs, mlflow_run, \
    resolve_tracking_uri, search_runs
from .config import PipelineConfig

STUDY_TAG = "loraleak.study"  # the study's out folder (resolved): scopes orphan closing and earlier-run lookups
EVALUATION_TAG = "loraleak.evaluation"  # the pipeline run's evaluation folder: which result it reports
REUSED_TAG = "loraleak.reused."  # + a stage's label: the earlier run that built the output this run reused
CONFIG_ARTIFACT = "config.yaml"


@dataclass(frozen=True)
class NestUnder:
    """Where a study's pipeline run goes inside a larger run: a sweep's trial under the sweep's run."""
    run_id: str  # the parent run (same store, same experiment: the UI nests only within one)
    run_name: str | None = None  # None: the study's own name (<out folder>-<evaluation key>)
    tags: dict[str, str] = field(default_factory=dict)  # e.g. the trial's id and label


def study_workdir(out: Path) -> Path:
    """The folder whose `mlflow.db` is a study's default store: the one holding its out folder.

    `--out runs/quick` and `--out runs/lfw` then log to one store, runs/mlflow.db, where one MLflow UI
    compares them (`mlflow ui` started in runs/ opens it: MLflow's own default store is ./mlflow.db), where
    the stand-alone stage commands log by default (their `workdir: runs`) and where `loraleak compare`
    looks by default. A store inside each out folder kept studies apart; one at a fixed place (./runs)
    would separate a study on shared storage (`--out /shared/studies/x`) from its runs."""
    return out.parent


def study_tracking_uri(cfg: PipelineConfig, out: Path) -> str:
    return resolve_tracking_uri(cfg.tracking_uri, study_workdir(out))


def study_experiment(cfg: PipelineConfig, out: Path | None = None) -> str:
    """The study's MLflow experiment: `experiment`, else the out folder's name."""
    return cfg.experiment or (out if out is not None else cfg.out_dir.expanduser().resolve()).name


def earlier_run(uri: str, folder: Path | str) -> str | None:
    """The newest FINISHED run that built the stage folder `folder`, in any experiment."""
    found = search_runs(uri, {FOLDER_TAG: str(folder)}, status="FINISHED")
    return found[0].info.run_id if found else None


def earlier_study_run(uri: str, experiment: str, out: Path, evaluation_folder: Path) -> str | None:
    """The newest FINISHED pipeline run of this study that reported this evaluation."""
    found = search_runs(uri, {STUDY_TAG: str(out), EVALUATION_TAG: str(evaluation_folder)}, status="FINISHED",
                        experiment=experiment)
    return found[0].info.run_id if found else None


def close_study_orphans(uri: str, out: Path) -> list[str]:
    """The study's runs a killed process left RUNNING (its pipeline run and the stage run nested in it),
    as KILLED. Call only while holding the study's folder lock."""
    check_reachable(uri)
    return close_orphan_runs(uri, {STUDY_TAG: str(out)})


class StudyRun:
    """The pipeline run while the stages run: what they nest under, and the links to reused stage runs."""

    def __init__(self, run: TrackedRun, uri: str) -> None:
        self.run, self.uri = run, uri
        self.reused: dict[str, str] = {}

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def link(self, label: str, folder: Path | str) -> str | None:
        """Tag the run that built `folder` (a stage complete before this run) as reused; returns its id."""
        earlier = earlier_run(self.uri, folder)
        if earlier is not None:
            self.reused[label] = earlier
            self.run.client.set_tag(self.run_id, REUSED_TAG + label, earlier)
        return earlier

    def finish(self, metrics: dict[str, float], artifacts: list[Path]) -> None:
        self.run.log_metrics(metrics)
        for path in artifacts:
            self.run.log_artifact(path)
        if self.reused:  # the run's description in the UI: where the reused stages' runs are
            note = "Stages complete before this run, not run again:\n" + "\n".join(
                f"- {label}: run {run_id}" for label, run_id in sorted(self.reused.items()))
            self.run.client.set_tag(self.run_id, "mlflow.note.content", note)


@contextmanager
def _open_study_run(cfg: PipelineConfig, out: Path, uri: str, experiment: str, run_name: str,
                    evaluation_folder: Path, params: dict[str, Any], parent: NestUnder | None) -> Iterator[StudyRun]:
    import yaml

    tags = {**(parent.tags if parent else {}), STUDY_TAG: str(out), EVALUATION_TAG: str(evaluation_folder)}
    with mlflow_run(experiment, (parent and parent.run_name) or run_name, uri, study_workdir(out),
                    parent_run_id=parent.run_id if parent else None, tags=tags) as run:
        # The config and params first: a run that fails still says what it was asked to do.
        run.client.log_text(run.run_id, yaml.safe_dump(to_dict(cfg), sort_keys=False), CONFIG_ARTIFACT)
        run.log_params({**to_dict(cfg), **params})
        yield StudyRun(run, uri)


def open_study_run(cfg: PipelineConfig, out: Path, uri: str, experiment: str, run_name: str,
                   evaluation_folder: Path, params: dict[str, Any],
                   parent: NestUnder | None = None) -> ContextManager[StudyRun | None]:
    """The pipeline run (None without tracking), as a context: FINISHED, FAILED or KILLED when it exits. Its params
    are the config's and `params` (the stage keys); nested under `parent` when given."""
    if not cfg.tracking:
        return nullcontext()
    return _open_study_run(cfg, out, uri, experiment, run_name, evaluation_folder, params, parent)


def nested(config: Any, study: StudyRun | None) -> Any:
    """A stage's own config, its run nested under the pipeline run."""
    return dataclasses.replace(config, parent_run_id=study.run_id) if study is not None else config
