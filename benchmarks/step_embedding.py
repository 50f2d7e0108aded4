"""The paper's efficiency claim, measured: does embedding the fine-tuning step (every trajectory
snapshot a training sample) reach a validation loss with fewer samples than training without it?

Three attacks are trained in this process on one zoo, same seed, same batches of the same
validation LoRAs (the final snapshots of identities none of them trains on, fixed noise):

  - final:      one sample per fine-tune (its final LoRA), no step embedding: the reference;
  - all:        every snapshot θ_r a sample, no step embedding (the trajectory without saying where);
  - all+step:   every snapshot a sample, with the step embedding r (the paper's method).

For each, the validation ε-loss every --val-every steps. The target is the best validation loss
the reference reaches; the table gives the samples (steps × batch) and wall time each variant
needs to first reach it, and the ratio to the reference. It also prints every curve.

The ε-loss is mostly the noise no z can predict, so its raw values say little on their own. Each
run also measures the same loss with z = the victims' true instance prompt and z = the empty
prompt; "gap closed" = (empty − best) / (empty − true) reads a variant's best loss on that scale:
0 is an attack that learned nothing about the victim, 1 one as good as knowing the trigger. A small
gap (empty − true) means z barely matters on this zoo, and no variant can separate from another.

    python benchmarks/step_embedding.py --zoo runs/quick/zoo-<key> --steps 300 --val-every 25

The zoo's recorded config gives the base and the identity source (run from where it was built).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from loraleak.attack.config import AttackTrainConfig
from loraleak.attack.model import AttackModelConfig
from loraleak.attack.train import train_attack
from loraleak.zoo.config import read_zoo_config

VARIANTS = {  # name -> (snapshots, step_embedding); the first is the reference
    "final": ("final", False),
    "all": ("all", False),
    "all+step": ("all", True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True, help="a zoo root (its attack_train split is used)")
    p.add_argument("--steps", type=int, default=300, help="attack steps per variant")
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-mode", default="delta", choices=("delta", "raw", "gl_invariant"))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per attack")
    p.add_argument("--cpus-per-worker", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of attack_train identities held out for the validation loss")
    p.add_argument("--results", type=Path, help="also write the curves and the table here (JSON)")
    return p.parse_args(argv)


def samples_to_reach(curve: dict[int, float], target: float, batch: int) -> int | None:
    """Samples seen when the validation loss first reaches target (None: never)."""
    reached = [step for step, loss in sorted(curve.items()) if loss <= target]
    return reached[0] * batch if reached else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        sys.exit(f"step_embedding: unknown variant {unknown[0] if unknown else ''!r} (known: {', '.join(VARIANTS)})")
    zoo = read_zoo_config(args.zoo)
    curves, seconds, references = {}, {}, {}
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            snapshots, step_embedding = VARIANTS[name]
            cfg = AttackTrainConfig(
                zoo=args.zoo, base=zoo.base, identities=zoo.identities,
                model=replace(AttackModelConfig(), input_mode=args.input_mode, step_embedding=step_embedding),
                snapshots=snapshots, batch_size=args.batch, max_steps=args.steps, val_every=args.val_every,
                checkpoint_every=args.steps, seed=args.seed, val_fraction=args.val_fraction, num_workers=args.workers,
                resources_per_worker={"CPU": args.cpus_per_worker}, out_dir=Path(work) / name,
                run_name=name.replace("+", "_"), tracking=False)
            started = time.perf_counter()
            result = train_attack(cfg, show_progress=False)
            seconds[name] = time.perf_counter() - started
            curves[name] = {step: values["val_loss"] for step, values in sorted(result.evaluations.items())}
            references = references or result.references  # the same validation batches for every variant
            print(f"{name}: val loss " + ", ".join(f"{s}:{v:.4f}" for s, v in curves[name].items()), flush=True)

    reference = names[0]
    target = min(curves[reference].values())
    true, empty = references["val_loss.true_prompt"], references["val_loss.empty_prompt"]
    gap = empty - true

    def closed(loss: float) -> str:
        return f"{(empty - loss) / gap:+.2f}" if gap > 0 else "-"

    print(f"\nvalidation ε-loss target: {target:.4f} (the best of '{reference}', {args.steps} steps of batch "
          f"{args.batch}, input {args.input_mode})")
    print(f"the same loss with z = the true instance prompt: {true:.4f}, with z = the empty prompt: {empty:.4f} "
          f"(gap {gap:+.4f})")
    print("| variant | best val loss | gap closed | samples to target | × reference samples | wall s | s to target |")
    print("|---|---|---|---|---|---|---|")
    ref_samples = samples_to_reach(curves[reference], target, args.batch)
    rows = []
    for name in names:
        samples = samples_to_reach(curves[name], target, args.batch)
        per_sample = seconds[name] / (args.steps * args.batch)
        ratio = "-" if samples is None or not ref_samples else f"{samples / ref_samples:.2f}"
        to_target = "-" if samples is None else f"{samples * per_sample:.0f}"
        best = min(curves[name].values())
        rows.append({"variant": name, "best_val_loss": best, "gap_closed": (empty - best) / gap if gap > 0 else None,
                     "samples_to_target": samples, "wall_s": seconds[name]})
        print(f"| {name} | {best:.4f} | {closed(best)} | {samples if samples is not None else 'not reached'} | "
              f"{ratio} | {seconds[name]:.0f} | {to_target} |")
    if args.results:
        args.results.write_text(json.dumps({"target": target, "references": references, "curves": curves, "rows": rows,
                                            "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
