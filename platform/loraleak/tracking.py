"""MLflow tracking for every stage: one run per stage execution, with params, metrics and artifacts.

Where runs go: the `tracking_uri` given, else $MLFLOW_TRACKING_URI (a team server), else a local
`sqlite:///<workdir>/mlflow.db` with artifacts in `<workdir>/mlartifacts` (MLflow 3.17 refuses a
plain file store). Runs are logged through an explicit `MlflowClient`, so nothing here changes
MLflow's process-wide state for other code.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import LoraleakError

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
BATCH = 100  # MLflow's limit on params per log_batch call


def default_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).expanduser().resolve() / 'mlflow.db'}"


def resolve_tracking_uri(tracking_uri: str | None, workdir: str | Path) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in one line, at once, when a tracking server does not answer (MLflow itself would
    retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise LoraleakError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, or unset "
                            "MLFLOW_TRACKING_URI / tracking_uri to log to a local sqlite store") from None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: {"finetune": {"rank": 4}} -> {"finetune.rank": "4"}."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


class TrackedRun:
    """One MLflow run, logged through its own client."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + BATCH])

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, json.loads(json.dumps(data, default=str)), artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


def close_orphan_runs(uri: str) -> list[str]:
    """Mark every run still RUNNING in the store `uri` as KILLED; returns their ids.

    Only for a store no live process writes to: the out folder's own sqlite store, called while holding
    the folder's lock (loraleak.locking). A run is left RUNNING only by a process killed inside it."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiments:
        return []
    orphans = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'",
                                 run_view_type=ViewType.ALL, max_results=10_000)
    for run in orphans:
        client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in orphans]


@contextmanager
def mlflow_run(experiment: str, run_name: str, tracking_uri: str | None = None,
               workdir: str | Path = "runs") -> Iterator[TrackedRun]:
    """An MLflow run in `experiment`; ends FINISHED, or FAILED when the block raises."""
    uri = resolve_tracking_uri(tracking_uri, workdir)
    check_reachable(uri)
    from mlflow.tracking import MlflowClient

    local_store = uri == default_tracking_uri(workdir)
    if local_store:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        artifacts = (Path(workdir).expanduser().resolve() / "mlartifacts").as_uri() if local_store else None
        experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
    run = client.create_run(experiment_id, run_name=run_name)
    try:
        yield TrackedRun(client, run.info.run_id)
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
