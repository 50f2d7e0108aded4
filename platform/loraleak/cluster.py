"""Ray, as every stage uses it: join the running cluster (or start a local one) and ask what it has.

Runs on a local `ray.init()` and unchanged on a cluster: `RAY_ADDRESS` or `ray job submit`. The
stages that fan out (zoo, attack training, evaluation, sweeps) connect through here, so how the
platform finds its cluster is decided once.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping

from .errors import LoraleakError

logger = logging.getLogger(__name__)

WORKER_LOGS = "LORALEAK_WORKER_LOGS"  # "1": stream the Ray workers' output into the driver's (connect_ray)

_started_here = False  # whether connect_ray started the local Ray this process is connected to (shutdown_ray)


def connect_ray() -> None:
    """Join the running Ray (a `ray job submit` driver, `RAY_ADDRESS`, one `ray start` made on this machine) or
    start a local one; a failure is one line (LoraleakError) that says what to do, not Ray's traceback."""
    import ray  # ray starts slowly: only the commands that fan out pay for it

    global _started_here
    if ray.is_initialized():
        return
    try:
        # Reads RAY_ADDRESS itself; without it, joins a `ray start` cluster here or starts a local Ray. The
        # workers' own output (Ray Train's per-report lines, a tqdm bar per worker) is not streamed into this
        # driver's, where it buried the stage progress and the headline (hundreds of lines in a quick study,
        # the bulk of a `ray job submit` log): it stays in Ray's log files and dashboard, and
        # LORALEAK_WORKER_LOGS=1 streams it here again.
        client = os.environ.get("RAY_ADDRESS", "").startswith("ray://")  # Ray Client: its own log streaming
        ray.init(**({} if client else {"log_to_driver": os.environ.get(WORKER_LOGS, "0") == "1"}))
    except Exception as e:  # ConnectionError, RuntimeError, ValueError...: Ray raises many kinds here
        raise LoraleakError(ray_failure(e, os.environ.get("RAY_ADDRESS"), local_ray_instances())) from None
    _started_here = _owns_local_ray()


def _owns_local_ray() -> bool:
    """Whether this process started the Ray it is connected to (its GCS, raylet... are this process's
    children), rather than joined one (`--address`, RAY_ADDRESS, a `ray start` cluster, Ray Client)."""
    try:
        from ray._private import worker

        node = worker._global_node
        return node is not None and bool(node.head) and bool(node.all_processes)
    except Exception:  # private attributes: another Ray version; Ray's own exit handler still stops it
        return False


def shutdown_ray() -> None:
    """Stop the local Ray that `connect_ray` started in this process, waiting for its processes (GCS, raylet,
    workers) to exit; a Ray this process joined, or one started by someone else, is left as it is. What every
    command runs when it ends (loraleak.command.run_command): success, error or Ctrl-C."""
    global _started_here
    if not _started_here:
        return
    _started_here = False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown(wait_for_processes=True)


def local_ray_instances() -> list[str]:
    """The addresses of Ray instances running on this machine (their GCS servers), best effort."""
    try:
        from ray._private.services import find_gcs_addresses

        return sorted(set(find_gcs_addresses()))
    except Exception:  # a private helper: absent in another Ray version, nothing to say
        return []


def ray_failure(error: BaseException, address: str | None, running: list[str]) -> str:
    """One line for a Ray that would not start or join: Ray's own first line, and what to do about it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else type(error).__name__
    if address:
        return (f"cannot join the Ray cluster at RAY_ADDRESS={address} ({reason}); check it runs (`ray status "
                f"--address {address}`), or unset RAY_ADDRESS to start a local Ray")
    if running:
        return (f"cannot start a local Ray: another Ray instance runs on this machine ({', '.join(running)}; "
                f"{reason}); join it with `--address auto` (RAY_ADDRESS=auto), or stop it with `ray stop`")
    return f"cannot start a local Ray ({reason})"


def cluster_resources() -> dict[str, float]:
    """What the cluster holds in all ("CPU", "GPU", custom resources), connecting first if needed."""
    import ray  # see connect_ray

    connect_ray()
    return dict(ray.cluster_resources())


def shortfall(need: Mapping[str, float], have: Mapping[str, float]) -> list[str]:
    """Each resource `need` asks for beyond what `have` holds, as "<n> <resource> (cluster has <m>)"."""
    return [f"{need[k]:g} {k} (cluster has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]


def warn_if_short(what: str, workers: int, need: Mapping[str, float]) -> None:
    """A worker pool the cluster cannot place waits silently; say why (autoscalers add nodes)."""
    short = shortfall(need, cluster_resources())
    if short:
        logger.warning("%s: %d worker(s) need %s; they start as the cluster gains resources",
                       what, workers, ", ".join(short))
