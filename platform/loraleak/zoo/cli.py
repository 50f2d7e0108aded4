"""`loraleak zoo build CONFIG | info ROOT | verify ROOT`.

`add_zoo_commands(subparsers)` adds the `zoo` command to the `loraleak` parser; `zoo_main(argv)`
runs the same commands on their own (what `jobs/build_zoo.py` calls).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..command import stage_main
from ..errors import LoraleakError


def load_zoo_config(path: Path, root: str | None = None, workers: int | None = None):
    from ..config import load_yaml
    from .config import ZooConfig

    overrides = {k: v for k, v in (("root", root), ("workers", workers)) if v is not None}
    return load_yaml(ZooConfig, path, overrides)


def cmd_zoo_build(args: argparse.Namespace) -> None:
    cfg = load_zoo_config(args.config, args.root, args.workers)
    if args.dry_run:
        from .config import check_identity_source
        from .manifest import finished_lora_ids
        from .plan import plan_zoo
        from .storage import ZooStore

        check_identity_source(cfg)
        plan = plan_zoo(cfg)
        finished = finished_lora_ids(ZooStore(cfg.root))
        todo = sum(ft.lora_id not in finished for ft in plan.fine_tunes)
        print(json.dumps({"root": cfg.root, "planned": len(plan.fine_tunes), "to_run": todo,
                          "skipped_identities": plan.skipped_identities}, indent=2))
        return
    from .build import build_zoo

    print(json.dumps(build_zoo(cfg, undefended_twin=args.undefended_twin), indent=2, default=str))


def cmd_zoo_info(args: argparse.Namespace) -> None:
    from .inspect import zoo_info

    info = zoo_info(args.root)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    print(f"zoo {info['root']}: {info['fine_tunes']} fine-tunes of {info['identities']} identities, "
          f"{info['snapshot_files']} snapshot files")
    for key in ("status", "split", "rank", "steps", "snapshots_per_fine_tune", "base", "defense"):
        print(f"  {key:<24}" + ", ".join(f"{k}: {v}" for k, v in info[key].items()))
    if info["final_loss"]:
        loss = info["final_loss"]
        print(f"  {'final_loss':<24}mean {loss['mean']:.4f}, min {loss['min']:.4f}, max {loss['max']:.4f}")
    for failure in info["failures"]:
        print(f"  failed {failure['lora_id']} ({failure['identity_id']}): {failure['error']}")


def cmd_zoo_verify(args: argparse.Namespace) -> None:
    from .inspect import verify_zoo

    report = verify_zoo(args.root, base=None if args.base == "none" else args.base)
    for problem in report.problems:
        print(problem)
    if not report.ok:
        raise LoraleakError(f"zoo {report.root}: {len(report.problems)} problem(s) in "
                            f"{report.files_checked} files of {report.fine_tunes} fine-tunes")
    print(f"zoo {report.root}: ok, {report.files_checked} files of {report.fine_tunes} fine-tunes verified")


def add_zoo_commands(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser("zoo", help="the LoRA zoo: build (Ray Data), info, verify").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = zoo.add_parser("build", help="fine-tune every identity's victim LoRA (resumes: finished ones are skipped)")
    p.add_argument("config", type=Path, help="YAML ZooConfig")
    p.add_argument("--root", help="zoo root, a path or URI (overrides root)")
    p.add_argument("--workers", type=int, help="Ray fine-tune workers (overrides workers)")
    p.add_argument("--dry-run", action="store_true", help="plan only: how many fine-tunes would run")
    p.add_argument("--undefended-twin", metavar="ROOT",
                   help="the same zoo built without the defense: a post-hoc-defended zoo copies and defends the "
                        "fine-tunes it has finished instead of training them")
    p.set_defaults(func=cmd_zoo_build)
    p = zoo.add_parser("info", help="summarise a zoo: counts by status, split, rank, steps, base, defense")
    p.add_argument("root", help="zoo root, a path or URI")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_zoo_info)
    p = zoo.add_parser("verify", help="check every listed LoRA file exists, loads and matches the manifest")
    p.add_argument("root", help="zoo root, a path or URI")
    p.add_argument("--base", default="zoo", help="also check every LoRA's shapes against this base: 'zoo' (default: "
                                                 "the base the zoo records), a base reference, or 'none'")
    p.set_defaults(func=cmd_zoo_verify)


def zoo_main(argv: list[str] | None = None) -> int:
    """`loraleak zoo ...` on its own: one line on stderr and exit code 2 for a user-facing error."""
    return stage_main(add_zoo_commands, ["zoo", *(sys.argv[1:] if argv is None else argv)])
