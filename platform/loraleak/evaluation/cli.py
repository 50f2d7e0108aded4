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
    if result.image_sets and result.image_sets["reused"]:
        print(f"image cache: {result.image_sets['reused']} condition image sets read back, "
              f"{result.image_sets['generated']} generated")
    print(f"report: {result.report}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")


def cmd_compare(args: argparse.Namespace) -> None:
    from ..tracking import resolve_tracking_uri
    from .compare import HEADLINE, compare_runs, comparison_plot, format_table

    uri = resolve_tracking_uri(args.tracking_uri, args.workdir)
    params = [p for p in args.params.split(",") if p] if args.params is not None else None
    metrics = None if args.all_metrics else [m for m in args.metrics.split(",") if m] if args.metrics else HEADLINE
    if args.against is not None:
        print_paired(args.runs, args.against, uri)
        return
    table = compare_runs(args.runs, uri, params, metrics)
    print(format_table(table))
    if args.plot is not None:
        print(f"plot: {comparison_plot(table, args.plot, metrics or HEADLINE)}")


def print_paired(runs: list[str], against: str, uri: str) -> None:
    from ..errors import LoraleakError
    from .compare import evaluation_folders
    from .paired import VictimFigures, format_paired, paired_differences

    references = evaluation_folders([against], uri)
    if len(references) != 1:
        raise LoraleakError(f"--against names {len(references)} evaluations ({against} is a sweep); name one "
                            f"study, trial run or evaluation folder")
    (reference_name, reference_folder), = references
    reference = VictimFigures.read(reference_folder)
    rows = [(name, paired_differences(VictimFigures.read(folder), reference))
            for name, folder in evaluation_folders(runs, uri)]
    print(f"reference: {reference_name} ({reference_folder})")
    print(format_paired(rows, reference_name))


def add_evaluation_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="score every held-out victim of a zoo under every condition "
                                               "(Ray; a rerun resumes), write the report, log an MLflow run")
    p.add_argument("config", type=Path, help="YAML EvaluationConfig")
    p.add_argument("--zoo", help="zoo root, a path or URI (overrides zoo)")
    p.add_argument("--out", help="output directory (overrides out_dir)")
    p.add_argument("--workers", type=int, help="Ray evaluation workers (overrides workers; 0 = in this process)")
    p.set_defaults(func=cmd_evaluate)
    p = subparsers.add_parser("compare", help="print the headline metrics of several studies (MLflow runs) side by side",
                              description="Compare MLflow runs: studies by name (`loraleak compare quick lfw`: each "
                                          "study's newest finished pipeline run), or runs by id or run name.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a study's name (its MLflow experiment, e.g. quick for --out runs/quick), a run id, or a run "
                        "name (the newest run of that name)")
    p.add_argument("--workdir", type=Path, default=Path("runs"),
                   help="where the local store is: WORKDIR/mlflow.db, the store `loraleak run --out WORKDIR/NAME` "
                        "logs to")
    p.add_argument("--tracking-uri", help="an MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the "
                                          "workdir's store)")
    p.add_argument("--params", help="comma-separated param keys to show (default: those that differ)")
    p.add_argument("--metrics", help="comma-separated metrics to show (default: the headline: "
                                     "rec/org/base similarity and top-1, rec over the best control, chance, regime)")
    p.add_argument("--all-metrics", action="store_true", help="show every metric")
    p.add_argument("--plot", type=Path, metavar="FILE", help="also draw the metrics as bars to FILE (.png, .pdf, .svg)")
    p.add_argument("--against", metavar="REF",
                   help="instead, compare each run with REF victim by victim (a study, a run or an evaluation "
                        "folder; RUN may also be an evaluation folder): the paired change of leak, strength, "
                        "binding, rec and org, with intervals over victims")
    p.set_defaults(func=cmd_compare)


def evaluate_main(argv: list[str] | None = None) -> int:
    """`loraleak evaluate ...` on its own: one line on stderr and exit code 2 for a user-facing error."""
    return stage_main(add_evaluation_commands, ["evaluate", *(sys.argv[1:] if argv is None else argv)])
