"""`loraleak evaluate CONFIG` and `loraleak compare RUN...`.

`add_evaluation_commands(subparsers)` adds both to the `loraleak` parser; `evaluate_main(argv)` runs
`evaluate` on its own (what `jobs/evaluate.py` calls).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..command import stage_main


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ..config import load_yaml
    from .config import EvaluationConfig
    from .evaluate import evaluate, format_headline, format_regime

    overrides = {k: v for k, v in (("zoo", args.zoo), ("out_dir", args.out), ("workers", args.workers))
                 if v is not None}
    result = evaluate(load_yaml(EvaluationConfig, args.config, overrides))
    print(format_headline(result.metrics, result.headline, result.best_control))
    if result.regime is not None:
        print(format_regime(result.regime))
    failed = f", {len(result.failures)} failed (rerun to retry)" if result.failures else ""
    print(f"{result.victims} victims ({result.evaluated} evaluated now, {result.reused} from an earlier run{failed})")
    print(f"report: {result.report}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")


def cmd_compare(args: argparse.Namespace) -> None:
    from ..tracking import resolve_tracking_uri
    from .compare import compare_runs, format_table

    uri = resolve_tracking_uri(args.tracking_uri, args.workdir)
    params = [p for p in args.params.split(",") if p] if args.params is not None else None
    print(format_table(compare_runs(args.runs, uri, params)))


def add_evaluation_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="score every held-out victim of a zoo under every condition "
                                               "(Ray; a rerun resumes), write the report, log an MLflow run")
    p.add_argument("config", type=Path, help="YAML EvaluationConfig")
    p.add_argument("--zoo", help="zoo root, a path or URI (overrides zoo)")
    p.add_argument("--out", help="output directory (overrides out_dir)")
    p.add_argument("--workers", type=int, help="Ray evaluation workers (overrides workers; 0 = in this process)")
    p.set_defaults(func=cmd_evaluate)
    p = subparsers.add_parser("compare", help="print the metrics of several MLflow runs side by side")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids or run names (the newest run of a name)")
    p.add_argument("--workdir", type=Path, default=Path("runs"),
                   help="where the local store is: WORKDIR/mlflow.db (default: runs; `loraleak run --out DIR` "
                        "keeps its store in DIR)")
    p.add_argument("--tracking-uri", help="an MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the "
                                          "workdir's store)")
    p.add_argument("--params", help="comma-separated param keys to show (default: those that differ)")
    p.set_defaults(func=cmd_compare)


def evaluate_main(argv: list[str] | None = None) -> int:
    """`loraleak evaluate ...` on its own: one line on stderr and exit code 2 for a user-facing error."""
    return stage_main(add_evaluation_commands, ["evaluate", *(sys.argv[1:] if argv is None else argv)])
