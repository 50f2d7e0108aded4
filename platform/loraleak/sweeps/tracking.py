"""The sweep's MLflow runs: one experiment per sweep, a parent run for the sweep, one run per trial nested under it.

Which store: the one `loraleak run` would use for a study in the sweep's folder (loraleak.pipeline.tracking):
`tracking_uri` (the sweep's config, or `loraleak sweep --tracking-uri`), else $MLFLOW_TRACKING_URI, else the
sqlite store beside the sweep's folder (`runs/sweeps/rank` -> `runs/sweeps/mlflow.db`, shared by the sweeps side
by side). Which experiment: `experiment`, else the sweep folder's name (as a study's is its out folder's name).

In it: the sweep's parent run (the table and the plot), and under it each trial's pipeline run (its settings,
headline metrics and report; tags `loraleak.trial_id`, `loraleak.label`) with that trial's stage runs nested
under it in turn. A trial is its study: there is no second run per trial beside its pipeline run. A rerun of
the sweep reopens its parent run (its id is kept in the sweep folder) rather than starting another, and closes
as KILLED the trial runs a killed sweep left RUNNING.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..pipeline.tracking import close_study_orphans, study_workdir
from ..tracking import PARENT_TAG, TrackedRun, check_reachable, ensure_experiment, resolve_tracking_uri, sqlite_path, \
    system_tags

SWEEP_TAG = "loraleak.sweep"
TRIAL_TAG = "loraleak.trial_id"
LABEL_TAG = "loraleak.label"


def sweep_tracking_uri(tracking_uri: str | None, directory: Path) -> str:
    """The store, chosen as for `loraleak run --out DIRECTORY`."""
    return resolve_tracking_uri(tracking_uri, study_workdir(directory))


def sweep_experiment(experiment: str | None, directory: Path) -> str:
    return experiment or directory.name


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiments(uri: str, names: Iterable[str]) -> dict[str, str]:
    """name -> experiment id, creating those missing (a sqlite store's artifacts beside it: loraleak.tracking)."""
    check_reachable(uri)
    client = _client(uri)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return {name: ensure_experiment(client, name, uri) for name in dict.fromkeys(names)}


def open_parent_run(uri: str, experiment_id: str, name: str, previous_run_id: str | None) -> TrackedRun:
    """The sweep's parent run: the previous one reopened when it still exists, else a new one."""
    client = _client(uri)
    if previous_run_id:
        try:
            run = client.get_run(previous_run_id)
        except Exception:  # deleted, or another store: start a new parent
            run = None
        if run is not None and run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active":
            client.update_run(previous_run_id, status="RUNNING")
            return TrackedRun(client, previous_run_id)
    run = client.create_run(experiment_id, run_name=name, tags={**system_tags(), SWEEP_TAG: name})
    return TrackedRun(client, run.info.run_id)


def close_trial_orphans(uri: str, pipeline_dirs: Iterable[Path]) -> list[str]:
    """The trials' pipeline runs (and their stage runs) a killed sweep left RUNNING, as KILLED. Call only while
    holding the sweep's folder lock: no live process writes them then."""
    return [run_id for out in dict.fromkeys(pipeline_dirs) for run_id in close_study_orphans(uri, out)]


def child_runs(uri: str, parent_run_id: str) -> list[Any]:
    """The trials' runs under a parent (oldest first)."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    return list(client.search_runs([parent.info.experiment_id],
                                   filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                   order_by=["attributes.start_time ASC"], max_results=10000))
