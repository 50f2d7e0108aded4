"""The paper's efficiency claim, measured: does embedding the fine-tuning step (every trajectory
snapshot a training sample) reach a validation loss with fewer samples than training without it?

Three attacks are trained in this process on one zoo, same seed, same batches of the same
validation LoRAs (the final snapshots of identities none of them trains on, fixed noise):

  - final:      one sample per fine-tune (its final LoRA), no step embedding: the reference;
  - all:        every snapshot θ_r a sample, no step embedding (the trajectory without saying where);
  - all+step:   every snapshot a sample, with the step embedding r (the paper's method).

For each, the validation ε-loss every --val-every steps. A model that keeps training wanders in
validation loss by about as much as the variants differ, so each curve is smoothed (the running
mean of --smooth evaluations) before asking when it first reaches the target: the best smoothed loss
of the reference. The table gives the samples (steps × batch) and wall time each variant needs to
reach it, and their ratio to the reference's.

The ε-loss is mostly noise that no z can predict, so its raw values say little on their own. Each
run also measures the same loss with z = the victims' true instance prompt and z = the empty
prompt, and the table reads each variant's mean loss over the second half of training on that
scale: "gap closed" = (empty − loss) / (empty − true), 0 for an attack that learned nothing about
the victim, 1 for one as good as knowing the trigger. A small gap (empty − true) means z barely
matters on this zoo, and no variant can separate from another.

    python benchmarks/step_embedding.py --zoo runs/quick/zoo-<key> --steps 400 --val-every 20 \
        --val-fraction 0.25 --results se.json
    python benchmarks/step_embedding.py --summarise se.json --smooth 5     # the table again

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
    p.add_argument("--zoo", help="a zoo root (its attack_train split is used)")
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
    p.add_argument("--smooth", type=int, default=5, help="validation points in each point's running mean")
    p.add_argument("--results", type=Path, help="also write the curves and the table here (JSON)")
    p.add_argument("--summarise", type=Path, metavar="RESULTS", help="print the table of a saved --results file")
    args = p.parse_args(argv)
    if not args.zoo and not args.summarise:
        p.error("give --zoo (or --summarise RESULTS)")
    return args


def smoothed(curve: dict[int, float], window: int) -> dict[int, float]:
    """Each validation point as the mean of the last `window` points up to it: the loss of a model
    that keeps training wanders by about as much as the variants differ, and a single lucky dip
    should not decide how soon a variant "reaches" a loss."""
    steps, out = sorted(curve), {}
    for i, step in enumerate(steps):
        last = [curve[s] for s in steps[max(0, i - window + 1): i + 1]]
        out[step] = sum(last) / len(last)
    return out


def samples_to_reach(curve: dict[int, float], target: float, batch: int) -> int | None:
    """Samples seen when the (smoothed) validation loss first reaches target (None: never)."""
    reached = [step for step, loss in sorted(curve.items()) if loss <= target + 1e-12]
    return reached[0] * batch if reached else None


def summarise(curves: dict[str, dict[int, float]], seconds: dict[str, float], references: dict[str, float],
              steps: int, batch: int, window: int) -> dict:
    """The table: per variant, the samples its smoothed validation loss needs to reach the reference's
    best smoothed loss, and its mean loss over the second half of training, on the true-vs-empty scale."""
    names = list(curves)
    reference = names[0]
    smooth = {name: smoothed(curve, window) for name, curve in curves.items()}
    target = min(smooth[reference].values())
    true, empty = references["val_loss.true_prompt"], references["val_loss.empty_prompt"]
    gap = empty - true

    def closed(loss: float) -> float | None:
        return (empty - loss) / gap if gap > 0 else None

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"\nvalidation ε-loss, smoothed over {window} evaluations; target {target:.5f} (the best of "
          f"'{reference}', {steps} steps of batch {batch})")
    print(f"the same loss with z = the true instance prompt: {true:.5f}, with z = the empty prompt: {empty:.5f} "
          f"(gap {gap:+.5f}); 'gap closed' = (empty - loss) / gap")
    print("| variant | samples to target | × reference | s to target | mean loss, 2nd half | gap closed | wall s |")
    print("|---|---|---|---|---|---|---|")
    ref_samples = samples_to_reach(smooth[reference], target, batch)
    rows = []
    for name in names:
        samples = samples_to_reach(smooth[name], target, batch)
        late = [loss for step, loss in curves[name].items() if step > steps // 2]
        late_mean = sum(late) / len(late)
        ratio = samples / ref_samples if samples is not None and ref_samples else None
        to_target = samples * seconds[name] / (steps * batch) if samples is not None else None
        rows.append({"variant": name, "samples_to_target": samples, "ratio": ratio, "s_to_target": to_target,
                     "late_mean_loss": late_mean, "gap_closed": closed(late_mean), "wall_s": seconds[name]})
        print(f"| {name} | {samples if samples is not None else 'not reached'} | {fmt(ratio, '.2f')} | "
              f"{fmt(to_target, '.0f')} | {late_mean:.5f} | {fmt(closed(late_mean), '+.2f')} | {seconds[name]:.0f} |")
    return {"target": target, "window": window, "references": references, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarise:  # the table again from a saved --results file, nothing trained
        saved = json.loads(args.summarise.read_text())
        curves = {name: {int(k): v for k, v in curve.items()} for name, curve in saved["curves"].items()}
        summarise(curves, saved["seconds"], saved["references"], int(saved["args"]["steps"]),
                  int(saved["args"]["batch"]), args.smooth)
        return 0
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

    table = summarise(curves, seconds, references, args.steps, args.batch, args.smooth)
    if args.results:
        args.results.write_text(json.dumps({**table, "curves": curves, "seconds": seconds,
                                            "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
