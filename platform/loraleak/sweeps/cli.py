"""`loraleak sweep CONFIG.yaml [--out DIR] [--tracking-uri URI] [--max-concurrent N] [--dry-run]`: a sweep of the
whole study.

`add_sweep_commands(subparsers)` adds `sweep` to the `loraleak` parser; `sweep_main(argv)` runs it on
its own (what `jobs/sweep.py` calls).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..command import stage_main


def cmd_sweep(args: argparse.Namespace) -> None:
    from .config import load_sweep_config
    from .run import plan_sweep, require_finished, run_sweep
    from .results import CURVE_FILE

    overrides = {}
    if args.out is not None:
        overrides["out_dir"] = str(args.out)
    if args.stages is not None:
        overrides["stages_dir"] = str(args.stages)
    if args.tracking_uri is not None:
        overrides["tracking_uri"] = args.tracking_uri
    if args.max_concurrent is not None:
        overrides["max_concurrent_trials"] = args.max_concurrent
    cfg = load_sweep_config(args.config, overrides)
    if args.dry_run:
        plan = plan_sweep(cfg)
        print(plan.describe())
        print(f"  MLflow: {plan.tracking_uri}, experiment {plan.experiment!r}")
        for trial in plan.trials:
            state = "finished" if trial.trial_id in plan.finished else "to run"
            print(f"  {trial.trial_id}  {trial.label}  ({state})")
        return
    result = run_sweep(cfg)
    print()
    print(result.table)
    print()
    print(f"results: {result.table_path}")
    print(f"privacy-utility plot: {result.plot_path}")
    print(f"leak by trial (rec - best control, org strength, with intervals): {result.directory / CURVE_FILE}")
    print(f"MLflow store: {result.tracking_uri}, experiment {result.experiment!r} (sweep run {result.parent_run_id}, "
          "each trial's pipeline run nested under it)")
    if result.tracking_uri.startswith("sqlite:"):
        print(f"  browse it: mlflow ui --backend-store-uri {result.tracking_uri}")
    print(f"trials run now: {len(result.ran)}, finished before (not rerun): {len(result.reused)}")
    require_finished(result)


def add_sweep_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep", help="run the whole study over a search space with Ray Tune (tune_configs/*.yaml), resumable",
        description="Run a sweep: one trial (the whole study, `loraleak run`) per point of the search space, "
                    "through Ray Tune, each trial's pipeline run nested under the sweep's MLflow run; ends with the "
                    "results table and the privacy-utility plot. A rerun skips the finished trials.")
    p.add_argument("config", type=Path, help="a sweep YAML (see tune_configs/)")
    p.add_argument("--out", type=Path, help="the sweep's folder (overrides out_dir; default runs/sweeps/<name>)")
    p.add_argument("--stages", type=Path, metavar="DIR",
                   help="the stage folder the trials share (default <sweep folder>/stages): another sweep's, or a "
                        "`loraleak run --out`, to reuse its zoo and attacks (stages are keyed by their settings)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="the MLflow store, as for `loraleak run` (default: the config's tracking_uri, else "
                        "$MLFLOW_TRACKING_URI, else sqlite:///<the folder holding the sweep's folder>/mlflow.db)")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials at once (default: as many as the cluster's resources hold)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and print the trials and what they share; run nothing")
    p.set_defaults(func=cmd_sweep)


def sweep_main(argv: list[str] | None = None) -> int:
    """`loraleak sweep ...` on its own: one line on stderr and exit code 2 for a user-facing error."""
    return stage_main(add_sweep_commands, ["sweep", *(sys.argv[1:] if argv is None else argv)])
