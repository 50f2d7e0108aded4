"""A smoke job for a cluster: run one Ray task on it and log one MLflow run describing it.

    ray job submit --address http://127.0.0.1:8265 --runtime-env runtime_env.yaml -- python jobs/hello_tracking.py

Proves the round trip a real job relies on: the job reaches the cluster (RAY_ADDRESS is set by
`ray job submit`), the installed `loraleak` imports on the node, and runs land in the tracking
store ($MLFLOW_TRACKING_URI on a cluster, or --tracking-uri).
"""

import argparse
import socket
import sys

import ray

from loraleak.tracking import mlflow_run


@ray.remote(num_cpus=1)
def where_am_i() -> str:
    return socket.gethostname()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db")
    parser.add_argument("--experiment", default="loraleak-smoke")
    parser.add_argument("--run-name", default="hello-tracking")
    args = parser.parse_args(argv)

    ray.init()
    host = ray.get(where_am_i.remote())
    resources = ray.cluster_resources()
    with mlflow_run(args.experiment, args.run_name, tracking_uri=args.tracking_uri) as run:
        run.log_params({"ray_version": ray.__version__, "task_host": host})
        run.log_metrics({"cluster_cpus": resources.get("CPU", 0.0), "cluster_gpus": resources.get("GPU", 0.0)})
    print(f"logged MLflow run {run.run_id}: task ran on {host}, cluster has {resources.get('CPU', 0.0)} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
