"""`loraleak audit FILE... --base B`: the command (heavy imports only once it runs, so --help stays fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cmd_audit(args: Any) -> int:
    from ..config import from_dict
    from .run import REPORT_HTML, REPORT_JSON, AuditConfig, exit_status, run_audit

    data: dict[str, Any] = {"base": args.base, "out_dir": str(args.out), "scorer": args.scorer, "seed": args.seed,
                            "finextract": {"num_candidates": args.candidates, "sample_steps": args.steps,
                                           "guidance": args.guidance, "prompt": args.prompt}}
    if args.attack is not None:
        data["attack"] = str(args.attack)
    if args.fail_above is not None:
        data["fail_above"] = args.fail_above
    cfg = from_dict(AuditConfig, data, where="arguments")
    results = run_audit(cfg, list(args.files))
    print(f"wrote {Path(cfg.out_dir) / REPORT_HTML} and {Path(cfg.out_dir) / REPORT_JSON}")
    return exit_status(results, cfg.fail_above)


def add_audit_command(subparsers: Any) -> None:
    p = subparsers.add_parser("audit", help="score LoRA files (diffusers, PEFT folder, kohya) for identity leakage, "
                                            "no private photos needed; nonzero exit above --fail-above")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="LoRA .safetensors files or PEFT folders")
    p.add_argument("--base", required=True, help="the base the LoRAs were trained for: 'tiny', 'tiny-lfw', a "
                                                 "pipeline directory or a hub id")
    p.add_argument("--attack", type=Path, help="a saved learned attack for this base (also run and shown)")
    p.add_argument("--out", type=Path, default=Path("runs/audit"), help="where audit.json, index.html go")
    p.add_argument("--fail-above", type=float, help="exit 1 when a file's leakage score is above this")
    p.add_argument("--scorer", default="synthetic", choices=["synthetic", "dlib"],
                   help="identity embedding for the spread (dlib for real faces)")
    p.add_argument("--candidates", type=int, default=16, help="FineXtract samples per file (and for the base)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="FineXtract model guidance w (1 = the LoRA as is)")
    p.add_argument("--prompt", default="A human face.", help="the prompt sampled with (no trigger is known)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_audit)
