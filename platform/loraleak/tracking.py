"""MLflow tracking for every stage: one run per stage execution, with params, metrics and artifacts.

Where runs go: the `tracking_uri` given, else $MLFLOW_TRACKING_URI (a team server, Databricks), else
a local `sqlite:///<workdir>/mlflow.db` (MLflow 3.17 refuses a plain file store). A sqlite store keeps
its artifacts beside it, in `<its folder>/mlartifacts`, whoever creates the experiment. Runs are logged
through an explicit `MlflowClient`, so nothing here changes MLflow's process-wide state for other code.

Every run carries MLflow's system tags (user, source, and `mlflow.source.git.commit` of the checkout
the loraleak code was imported from, when it is one); a run opened with `parent_run_id` is nested
under it in the UI (`mlflow.parentRunId`, same experiment). Experiments are created as "custom model
development" ones, so the UI opens on their runs rather than on the GenAI traces page.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import LoraleakError

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
BATCH = 100  # MLflow's limit on params per log_batch call
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
FOLDER_TAG = "loraleak.folder"  # a stage run's output folder (resolved): how a later run finds it
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# What the UI opens an experiment on: its runs (not the GenAI traces page MLflow 3 shows otherwise).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def default_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).expanduser().resolve() / 'mlflow.db'}"


def resolve_tracking_uri(tracking_uri: str | None, workdir: str | Path) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` store, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@lru_cache(maxsize=1)
def git_tags() -> dict[str, str]:
    """MLflow's source tags for the git checkout the loraleak package was imported from (commit, branch,
    dirty); {} for an installed copy or without git. The code that ran is this package, not the
    entry-point script MLflow itself would look at (a venv's `loraleak`, pytest, Ray's job driver)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {GIT_COMMIT_TAG: commit}
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    if status is not None:
        tags["mlflow.source.git.dirty"] = str(bool(status)).lower()
    return tags


def system_tags() -> dict[str, str]:
    """The tags `mlflow.start_run` would set (user, source), with git from `git_tags`."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in a container: MLflow itself falls back the same way
        user = "unknown"
    source = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return {"mlflow.user": user, "mlflow.source.name": source, "mlflow.source.type": "LOCAL", **git_tags()}


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, created when missing (a sqlite store's artifacts beside its file)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND[0] not in found.tags:
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    db = sqlite_path(uri)
    # MLflow would put the artifacts of a sqlite store under the *working directory* of whichever process
    # creates the experiment (a Ray worker's, for a sweep trial); beside the store they move with it.
    artifacts = (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
    except Exception:  # created meanwhile by another process (a sweep's trials start together)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


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


def _quoted(value: str) -> str:
    """A value in an MLflow filter string (which has no escapes: a value with ' is put in double quotes)."""
    quote = '"' if "'" in value else "'"
    return f"{quote}{value}{quote}"


def search_runs(uri: str, tags: Mapping[str, str], status: str | None = None, experiment: str | None = None) -> list:
    """Runs whose tags have these values (in `experiment`, else in any), newest first."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        ids = [found.experiment_id] if found is not None else []
    else:
        ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not ids:
        return []
    where = [f"tags.`{k}` = {_quoted(v)}" for k, v in tags.items()]
    if status is not None:
        where.append(f"attributes.status = {_quoted(status)}")
    return client.search_runs(ids, filter_string=" and ".join(where), order_by=["attributes.start_time DESC"],
                              max_results=1000)


def close_orphan_runs(uri: str, tags: Mapping[str, str]) -> list[str]:
    """Mark the runs still RUNNING that carry `tags` (e.g. a study's folder), and the runs RUNNING nested
    under them, as KILLED; returns their ids.

    Only for runs no live process writes to: a study's, called while holding its folder's lock
    (loraleak.locking). A run is left RUNNING only by a process killed inside it. Other studies sharing the
    store are left alone: their runs carry another folder."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    closed = []
    for run in search_runs(uri, tags, status="RUNNING"):
        children = search_runs(uri, {PARENT_TAG: run.info.run_id}, status="RUNNING")
        for orphan in [*children, run]:
            client.set_terminated(orphan.info.run_id, status="KILLED")
            closed.append(orphan.info.run_id)
    return closed


def end_status(error: BaseException) -> str:
    """How a run that `error` interrupted ends: KILLED when the user or the system stopped it (Ctrl-C,
    SIGTERM turned into SystemExit), FAILED otherwise."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


@contextmanager
def mlflow_run(experiment: str, run_name: str, tracking_uri: str | None = None,
               workdir: str | Path = "runs", parent_run_id: str | None = None,
               tags: Mapping[str, str] | None = None) -> Iterator[TrackedRun]:
    """An MLflow run in `experiment` (nested under `parent_run_id` when given), with the system tags and
    `tags`; ends FINISHED, or FAILED / KILLED when the block raises (`end_status`)."""
    uri = resolve_tracking_uri(tracking_uri, workdir)
    check_reachable(uri)
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(client, experiment, uri)
    all_tags = {**system_tags(), **({PARENT_TAG: parent_run_id} if parent_run_id else {}), **(tags or {})}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    try:
        yield TrackedRun(client, run.info.run_id)
    except BaseException as e:
        client.set_terminated(run.info.run_id, status=end_status(e))
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
