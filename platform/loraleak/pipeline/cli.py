"""`loraleak run [--profile quick|lfw|paper] [--config FILE] [--out DIR] [--set KEY=VALUE ...]`: the study.

`add_pipeline_commands(subparsers)` adds `run` to the `loraleak` parser; `pipeline_main(argv)` runs it on
its own (what `jobs/pipeline.py` calls).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..command import stage_main
from .api import load_pipeline_config  # noqa: F401 - the library's, re-exported where it used to be
from .profiles import PROFILES


def cmd_run(args: argparse.Namespace) -> None:
    import os

    from .run import duration_text, run_pipeline

    cfg = load_pipeline_config(None if args.config else args.profile, args.config, args.out, args.set,
                               tracking_uri=args.tracking_uri)
    if args.address:  # what ray.init() reads (loraleak.cluster.connect_ray)
        os.environ["RAY_ADDRESS"] = args.address
    result = run_pipeline(cfg)
    print()
    print(result.table)
    print()
    print(result.headline())
    print(f"report: {result.report}")
    runs = ", ".join(f"{stage} {run_id}" for stage, run_id in result.mlflow_run_ids.items() if run_id)
    experiment = f", experiment {result.experiment}" if result.experiment else ""
    print(f"MLflow store: {result.tracking_uri}{experiment}" + (f" (runs: {runs})" if runs else ""))
    if result.tracking_uri.startswith("sqlite:"):
        print(f"  browse it: mlflow ui --backend-store-uri {result.tracking_uri}")
    skipped = f"; complete before, skipped: {', '.join(result.skipped)}" if result.skipped else ""
    print(f"wall time: {duration_text(result.wall_time_s)}{skipped}")


def add_pipeline_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="the whole study: identities -> base -> zoo -> attack -> evaluation -> report (resumable)",
        description="Run the whole study, stage by stage; a rerun skips every stage whose output is complete. "
                    "Ends with the report's path, the headline numbers and the MLflow store.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="packaged settings: quick (synthetic faces, the shipped tiny base, CPU), lfw (real "
                             "faces, ../shared/datasets/lfw) or paper (SD 1.4 at 512 px, the paper's settings, GPUs)")
    source.add_argument("--config", type=Path, help="a YAML PipelineConfig instead of a profile")
    p.add_argument("--out", help="the study's folder, a local path or file:// URI on storage every Ray node sees "
                                 "(default: the config's out_dir, runs/<profile>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set zoo.finetune.steps=100 (repeatable)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store: sqlite:///FILE, http://server:5000, databricks (default: the config's "
                        "tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<the folder holding --out>/mlflow.db, "
                        "one store for the studies side by side)")
    p.add_argument("--address", metavar="ADDRESS",
                   help="the Ray cluster to join: auto (one started on this machine with `ray start`), "
                        "ray://host:10001 or host:6379 (default: $RAY_ADDRESS, else start a local Ray)")
    p.set_defaults(func=cmd_run)


def pipeline_main(argv: list[str] | None = None) -> int:
    """`loraleak run ...` on its own: one line on stderr and exit code 2 for a user-facing error."""
    return stage_main(add_pipeline_commands, ["run", *(sys.argv[1:] if argv is None else argv)])
