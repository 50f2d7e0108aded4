"""Evaluation sampling in bf16 against fp32: seconds per victim and what the scores do, same victims, same run.

A finished study's evaluation (its zoo, its attack, its settings: `loraleak run --profile P --out STUDY`) is
run again on its first N held-out victims, once with `evaluation.mixed_precision: no` (the reference) and once
with `bf16` (autocast; on a CPU the UNet and VAE attend with the unfused kernel, loraleak.base.attention),
in this process with one worker of `--threads` threads and no image cache, so that every image is sampled.
Prints the wall seconds per victim of each (sampling every condition and scoring it), the ratio, the mean
absolute pixel difference between the paired images, and each condition's mean similarity both ways with the
largest per-victim change: the bf16 evaluation is worth having only if that change is within rounding.

    python benchmarks/evaluation_sampling.py --profile quick --study runs/quick --victims 6
    python benchmarks/evaluation_sampling.py --profile lfw --study runs/lfw --victims 6 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loraleak.evaluation.evaluate import RESULTS_DIR, evaluate
from loraleak.pipeline.api import load_pipeline_config
from loraleak.pipeline.stages import plan_stages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="quick", help="the study's profile (quick | lfw | paper)")
    p.add_argument("--study", type=Path, required=True, help="the study's --out folder (its zoo and attack are read)")
    p.add_argument("--set", action="append", default=[], dest="assignments", metavar="KEY=VALUE",
                   help="a setting over the profile's, as `loraleak run --set` (to find the same study)")
    p.add_argument("--victims", type=int, default=6, help="held-out victims evaluated each way")
    p.add_argument("--threads", type=int, default=1, help="torch threads (an evaluation worker has one per CPU)")
    return p.parse_args(argv)


def pixels(folder: Path) -> dict[tuple[str, str], np.ndarray]:
    """(lora_id, png name) -> its pixels, for every image an evaluation wrote."""
    return {(png.parent.name, png.name): np.asarray(Image.open(png), dtype=np.float64)
            for png in sorted((folder / RESULTS_DIR).glob("*/*.png")) if not png.name.startswith("private")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_pipeline_config(args.profile, out=args.study, assignments=args.assignments)
    stages = plan_stages(cfg)
    if not stages.attack.directory.is_dir():
        print(f"no finished attack at {stages.attack.directory}: run `loraleak run --profile {args.profile} "
              f"--out {args.study}` first", file=sys.stderr)
        return 2
    reference = dataclasses.replace(stages.evaluation.config, workers=0, max_victims=args.victims, image_cache=None,
                                    tracking=False, report_victims=0, mixed_precision="no")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="eval-sampling-") as tmp:
        for precision in ("no", "bf16"):
            out = Path(tmp) / precision
            started = time.perf_counter()
            result = evaluate(dataclasses.replace(reference, out_dir=out, workdir=out, mixed_precision=precision),
                              show_progress=False)
            wall = time.perf_counter() - started
            runs[precision] = {"wall": wall, "result": result, "pixels": pixels(out)}
            print(f"{'fp32' if precision == 'no' else 'bf16'}: {result.evaluated} victims in {wall:.1f} s, "
                  f"{wall / max(1, result.evaluated):.1f} s per victim", flush=True)
    fp32, bf16 = runs["no"], runs["bf16"]
    print(f"\nbf16 / fp32 speed: {fp32['wall'] / bf16['wall']:.2f}x "
          f"({args.victims} victims, {reference.n_images} images x {len(reference.conditions)} conditions, "
          f"{reference.sample_steps} steps, {args.threads} thread(s), scoring included)")
    diffs = [np.abs(a - bf16["pixels"][k]).mean() for k, a in fp32["pixels"].items() if k in bf16["pixels"]]
    print(f"paired images: {len(diffs)}, mean |pixel difference| {np.mean(diffs):.2f} levels of 255 "
          f"(max per image {np.max(diffs):.2f})")
    print(f"\n{'condition':24s} {'fp32':>7s} {'bf16':>7s} {'max |change| per victim':>24s}")
    for name in reference.conditions:
        if name not in fp32["result"].metrics:
            continue
        # Per victim (the evaluation's own summaries, images without a face left out): the largest change.
        bf16_victims = {v.victim_id: v.similarity for v in bf16["result"].metrics[name].victims}
        per_victim = [abs(v.similarity - bf16_victims[v.victim_id]) for v in fp32["result"].metrics[name].victims
                      if v.similarity is not None and bf16_victims.get(v.victim_id) is not None]
        print(f"{name:24s} {fp32['result'].metrics[name].similarity.value:7.3f} "
              f"{bf16['result'].metrics[name].similarity.value:7.3f} {max(per_victim, default=float('nan')):24.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
