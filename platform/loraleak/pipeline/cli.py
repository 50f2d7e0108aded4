"""`loraleak run [--profile quick|lfw|paper] [--config FILE] [--out DIR] [--set KEY=VALUE ...]`: the study.

`add_pipeline_commands(subparsers)` adds `run` to the `loraleak` parser; `pipeline_main(argv)` runs it on
its own (what `jobs/pipeline.py` calls).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..command import stage_main
from .profiles import PROFILES, profile_path


def _assignment(text: str) -> tuple[str, Any]:
    """KEY=VALUE with a YAML value: zoo.finetune.steps=100, attack.model.step_embedding=false."""
    from ..config import parse_yaml
    from ..errors import ConfigError

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. zoo.finetune.steps=100")
    return key.strip(), parse_yaml(value, f"--set {text!r}")


def load_pipeline_config(profile: str | None = None, config: Path | None = None, out: Path | None = None,
                         assignments: list[str] | None = None):
    """The config of a profile (default quick) or a file, with --out and --set applied."""
    from ..config import load_yaml
    from .config import PipelineConfig, with_overrides

    path = config if config is not None else profile_path(profile or "quick")
    cfg = load_yaml(PipelineConfig, path, {"out_dir": str(out)} if out is not None else None)
    overrides = dict(_assignment(a) for a in assignments or [])
    return with_overrides(cfg, overrides) if overrides else cfg


def cmd_run(args: argparse.Namespace) -> None:
    from .run import duration_text, run_pipeline

    cfg = load_pipeline_config(args.profile, args.config, args.out, args.set)
    result = run_pipeline(cfg)
    print()
    print(result.table)
    print()
    print(result.headline())
    print(f"report: {result.report}")
    runs = ", ".join(f"{stage} {run_id}" for stage, run_id in result.mlflow_run_ids.items() if run_id)
    print(f"MLflow store: {result.tracking_uri}" + (f" (runs: {runs})" if runs else ""))
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
    source.add_argument("--profile", choices=sorted(PROFILES),
                        help="packaged settings: quick (default; synthetic faces, the shipped tiny base, CPU) or "
                             "paper (SD 1.4 at 512 px, the paper's settings, GPU workers)")
    source.add_argument("--config", type=Path, help="a YAML PipelineConfig instead of a profile")
    p.add_argument("--out", type=Path, help="output directory (overrides out_dir; MLflow's store goes there too)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set zoo.finetune.steps=100 (repeatable)")
    p.set_defaults(func=cmd_run)


def pipeline_main(argv: list[str] | None = None) -> int:
    """`loraleak run ...` on its own: one line on stderr and exit code 2 for a user-facing error."""
    return stage_main(add_pipeline_commands, ["run", *(sys.argv[1:] if argv is None else argv)])
