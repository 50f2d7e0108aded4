"""Ray, as every stage uses it: join the running cluster (or start a local one) and ask what it has.

Runs on a local `ray.init()` and unchanged on a cluster: `RAY_ADDRESS` or `ray job submit`. The
stages that fan out (zoo, attack training, evaluation, sweeps) connect through here, so how the
platform finds its cluster is decided once.
"""

from __future__ import annotations

import logging
from typing import Mapping

logger = logging.getLogger(__name__)


def connect_ray() -> None:
    """Join the running Ray (a `ray job submit` driver, `RAY_ADDRESS`) or start a local one."""
    import ray  # ray starts slowly: only the commands that fan out pay for it

    if not ray.is_initialized():
        ray.init()  # reads RAY_ADDRESS itself; without it, starts a local Ray on this machine


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
