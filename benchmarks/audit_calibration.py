"""How well does `loraleak audit`'s leakage score tell a fine-tune from a LoRA that learned nothing?

Positives: the final snapshot of every held-out victim of a zoo (`--attack-train` adds the attack_train
ones). Negatives, as many of each kind as positives, each built from one positive's layout
(`loraleak.audit.calibration`): zero update (B = 0, a fine-tune's step 0) and random update (random
factors with the positive's per-module ‖ΔW‖_F). All are scored by the audit's own `run_audit` (one
base pipeline, one base spread), with the zoo's scorer (synthetic for synthetic identities, dlib for
real ones) unless `--scorer` says otherwise. Prints a table; writes `<out>/calibration.json` (and the
audit's own `audit.json` / `index.html` under `<out>/audit`):

    PYTHONPATH=platform nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/audit_calibration.py \\
        --zoo runs/quick-stages/zoo-c07da58b --out /tmp/auditcal/zoo-c07da58b
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from loraleak.attack.baselines.finextract import FineXtractConfig
from loraleak.audit.calibration import (NEGATIVE_KINDS, auc_summary, describe, negative_metadata,
                                        random_update_lora, scale_of, threshold_for_tpr, zero_update_lora,
                                        zoo_victims)
from loraleak.audit.run import AuditConfig, run_audit
from loraleak.config import to_dict
from loraleak.errors import LoraleakError
from loraleak.lora.io import read_lora, save_lora_file
from loraleak.zoo.config import read_zoo_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, required=True, help="a finished (or partly finished) local zoo folder")
    p.add_argument("--out", type=Path, default=None, help="default /tmp/auditcal/<zoo folder name>")
    p.add_argument("--attack-train", action="store_true", help="also take the attack_train fine-tunes as positives")
    p.add_argument("--limit", type=int, default=None, help="at most this many positives (by lora_id), for a quick run")
    p.add_argument("--base", default=None, help="default: the zoo's recorded base")
    p.add_argument("--scorer", choices=("synthetic", "dlib"), default=None,
                   help="default: synthetic for a zoo of synthetic identities, else dlib")
    p.add_argument("--candidates", type=int, default=16, help="audit samples per file (the audit's default)")
    p.add_argument("--steps", type=int, default=25, help="audit sampling steps (the audit's default)")
    p.add_argument("--seed", type=int, default=0, help="audit sampling seed; the negatives use seed·1000 + i")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the files")
    p.add_argument("--min-tpr", type=float, default=0.9, help="the operating point: lowest TPR to keep")
    return p.parse_args(argv)


def build_negatives(victims, folder: Path, seed: int) -> dict[str, list[Path]]:
    """One zero-update and one random-update negative per positive, written by the project's writer."""
    out: dict[str, list[Path]] = {kind: [] for kind in NEGATIVE_KINDS}
    for i, victim in enumerate(victims):
        state, metadata = read_lora(victim.path)
        scale = scale_of(metadata)
        built = {"zero": (zero_update_lora(state, seed * 1000 + i), 0),
                 "random": (random_update_lora(state, scale, seed * 1000 + i), victim.step)}
        for kind, (tensors, step) in built.items():
            label = f"{kind}{i:03d}"
            out[kind].append(save_lora_file(tensors, negative_metadata(metadata, label, step, victim.path),
                                            folder / f"{label}.safetensors"))
    return out


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path("/tmp/auditcal") / args.zoo.resolve().name
    try:
        zoo = read_zoo_config(str(args.zoo))
        splits = ("heldout", "attack_train") if args.attack_train else ("heldout",)
        victims = zoo_victims(args.zoo, splits)[: args.limit]
        base = args.base or zoo.base
        scorer = args.scorer or ("synthetic" if zoo.identities.kind == "synthetic" else "dlib")
        negatives = build_negatives(victims, out / "negatives", args.seed)
        cfg = AuditConfig(base=base, out_dir=out / "audit", scorer=scorer, seed=args.seed,
                          finextract=FineXtractConfig(num_candidates=args.candidates, sample_steps=args.steps))
        files = [v.path for v in victims] + negatives["zero"] + negatives["random"]
        # CPU seconds between verdict lines: on a shared machine the wall time also counts other jobs.
        cpu_marks = [time.process_time()]

        def echo(line: str) -> None:
            cpu_marks.append(time.process_time())
            print(line, flush=True)

        started = time.perf_counter()
        results = run_audit(cfg, files, echo=echo)
        total = time.perf_counter() - started
    except LoraleakError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors = [r.record for r in results if "error" in r.record]
    if errors:
        print(f"error: {len(errors)} files could not be audited, first: {errors[0]['error']}", file=sys.stderr)
        return 2
    n = len(victims)
    groups = {"positive": results[:n], "zero": results[n:2 * n], "random": results[2 * n:]}
    scores = {g: [r.leakage for r in rs] for g, rs in groups.items()}
    negative_scores = scores["zero"] + scores["random"]
    walls = [r.record["wall_s"] for r in results]
    cpus = [b - a for a, b in zip(cpu_marks[1:], cpu_marks[2:])]  # files 2..N (the first also loads the base)
    auc = {"all negatives": auc_summary(scores["positive"], negative_scores, args.n_boot, args.seed),
           "zero update": auc_summary(scores["positive"], scores["zero"], args.n_boot, args.seed),
           "random update": auc_summary(scores["positive"], scores["random"], args.n_boot, args.seed)}
    point = threshold_for_tpr(scores["positive"], negative_scores, args.min_tpr)
    point_random = threshold_for_tpr(scores["positive"], scores["random"], args.min_tpr)
    report = {
        "zoo": str(args.zoo), "rank": zoo.finetune.rank, "alpha": zoo.finetune.alpha,
        "targets": list(zoo.finetune.targets), "steps": zoo.finetune.steps, "splits": list(splits),
        "audit": to_dict(cfg), "n_boot": args.n_boot,
        "auc": auc, "distribution": {g: describe(s) for g, s in scores.items()},
        "operating_point": {"min_tpr": args.min_tpr, "all negatives": vars(point), "random update": vars(point_random)},
        "wall_s": {"per_file_mean": sum(walls) / len(walls), "per_file_median": float(np.median(walls)),
                   "per_file_min": min(walls), "per_file_max": max(walls),
                   "base_setup": total - sum(walls), "total": total, "files": len(walls),
                   "cpu_per_file_median": float(np.median(cpus)) if cpus else None,
                   "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count()},
        "files": {g: [{"file": r.file, "leakage": r.leakage, "wall_s": r.record["wall_s"]} for r in rs]
                  for g, rs in groups.items()},
        "positives": [vars(v) for v in victims]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(report, indent=1, default=str))

    print(f"\nzoo {args.zoo} (rank {zoo.finetune.rank}, alpha {zoo.finetune.alpha}, {zoo.finetune.steps} steps), "
          f"base {base}, scorer {scorer}, {args.candidates} samples x {args.steps} steps per file")
    print(f"{'group':<10} | {'n':>3} | {'min':>7} | {'median':>7} | {'max':>7}")
    for g, d in report["distribution"].items():
        print(f"{g:<10} | {d['n']:>3} | {fmt(d['min']):>7} | {fmt(d['median']):>7} | {fmt(d['max']):>7}"
              + (f"  ({d['unscored']} unscored)" if d["unscored"] else ""))
    print(f"\n{'positives vs':<14} | ROC AUC [95% bootstrap, {args.n_boot} resamples of the files]")
    for name, a in auc.items():
        print(f"{name:<14} | {a['auc']:.3f} [{a['low']:.3f}, {a['high']:.3f}]")
    for name, p in (("all negatives", point), ("random update", point_random)):
        print(f"TPR >= {args.min_tpr:.2f} vs {name}: --fail-above {p.fail_above:+.4f} -> TPR {p.tpr:.3f}, "
              f"FPR {p.fpr:.3f}")
    w = report["wall_s"]
    cpu = "-" if w["cpu_per_file_median"] is None else f"{w['cpu_per_file_median']:.1f}"
    print(f"wall time per file: median {w['per_file_median']:.1f} s, mean {w['per_file_mean']:.1f} (min "
          f"{w['per_file_min']:.1f}, max {w['per_file_max']:.1f}); CPU time per file: median {cpu} s; "
          f"{w['base_setup']:.1f} s base setup, {w['total']:.0f} s for {w['files']} files "
          f"(load average {w['load_average_1min']:.1f} on {w['cpus']} CPUs)")
    print(f"wrote {out / 'calibration.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
