"""The sweep's MLflow runs: one parent run per sweep, one child run per trial nested under it.

A rerun of the sweep reopens its parent run (its id is kept in the sweep folder) rather than
starting another, so the sweep stays one parent with one child per finished trial. With the local
store (`sqlite:///<sweep>/mlflow.db`) every experiment the trials log to, the pipeline's stage
experiments included, is created up front with its artifacts under `<sweep>/mlartifacts`: the
stages run in Ray worker processes, whose working directory MLflow would otherwise use.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..tracking import TrackedRun, check_reachable, ensure_experiment, resolve_tracking_uri, sqlite_path

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
SWEEP_TAG = "loraleak.sweep"
TRIAL_TAG = "loraleak.trial_id"


def sweep_tracking_uri(tracking_uri: str | None, directory: Path) -> str:
    return resolve_tracking_uri(tracking_uri, directory)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiments(uri: str, directory: Path, names: Iterable[str]) -> dict[str, str]:
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
    run = client.create_run(experiment_id, run_name=name, tags={SWEEP_TAG: name})
    return TrackedRun(client, run.info.run_id)


@contextmanager
def child_run(uri: str, experiment_id: str, parent_run_id: str, name: str,
              tags: dict[str, str]) -> Iterator[TrackedRun]:
    """A trial's run, nested under the sweep's; FINISHED, or FAILED when the block raises."""
    client = _client(uri)
    run = client.create_run(experiment_id, run_name=name, tags={PARENT_TAG: parent_run_id, **tags})
    tracked = TrackedRun(client, run.info.run_id)
    try:
        yield tracked
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


def child_runs(uri: str, parent_run_id: str) -> list[Any]:
    """The trials' runs under a parent (oldest first)."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    return list(client.search_runs([parent.info.experiment_id],
                                   filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                   order_by=["attributes.start_time ASC"], max_results=10000))
