"""Where one batched fine-tune step spends its time: torch.profiler over K fine-tunes' steps, by kind of work.

The step is the zoo's (`loraleak.finetune.batched.probe_step`: forward, per-fine-tune losses,
backward, per-row clipping, per-row AdamW) on random data of a profile's real shapes (its base,
rank, targets, batch size, prior preservation). Operators are grouped into

    conv        convolutions, forward and backward
    attention   scaled_dot_product_attention kernels, or the math processor's softmax
    matmul      mm / addmm / bmm / baddbmm: the Linear layers, the LoRA factors, the math attention
    norm        group / layer norm, forward and backward
    optimizer   what runs inside the per-row clipping and AdamW
    elementwise everything else aten runs (activations, adds, copies, casts)
    fused       kernels torch.compile generated (--compile: inductor's fused C++ loops)
    python      the step's wall time not spent in any operator (dispatch, autograd bookkeeping)

    python benchmarks/zoo_step_profile.py --profile lfw --ks 1,8,32 --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from loraleak.finetune.batched import BatchedOptions, probe_step

CATEGORIES = ("conv", "attention", "matmul", "norm", "optimizer", "elementwise", "fused", "python")


def category(op: str) -> str:
    if "convolution" in op:
        return "conv"
    if "scaled_dot_product" in op or "softmax" in op:
        return "attention"
    if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matmul"
    if "norm" in op:
        return "norm"
    return "elementwise"


def profile_step(pipe: Any, cfg: Any, k: int, options: BatchedOptions, steps: int) -> tuple[float, dict[str, float]]:
    """(wall seconds per step, seconds per step by category) of `steps` profiled steps after one warm-up."""
    from loraleak.finetune import batched

    probe_step(pipe, cfg, k, options, steps=1)  # warm-up: allocations, oneDNN primitive caches
    original_clip, original_adam = batched.clip_grad_norm_per_row_, batched.PerRowAdamW.step

    def clip(*args: Any, **kwargs: Any) -> Any:
        with record_function("optimizer"):
            return original_clip(*args, **kwargs)

    def adam(self: Any) -> None:
        with record_function("optimizer"):
            original_adam(self)

    batched.clip_grad_norm_per_row_, batched.PerRowAdamW.step = clip, adam
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            probe_step(pipe, cfg, k, options, steps=steps)
            wall = time.perf_counter() - started
    finally:
        batched.clip_grad_norm_per_row_, batched.PerRowAdamW.step = original_clip, original_adam
    seconds: dict[str, float] = defaultdict(float)
    optimizer_total = 0.0
    for event in prof.key_averages():
        if event.key == "optimizer":
            optimizer_total = event.cpu_time_total / 1e6
        elif event.key.startswith("aten::"):
            seconds[category(event.key)] += event.self_cpu_time_total / 1e6
        elif event.key.startswith("cpp_fused") or event.key.startswith("graph_"):
            seconds["fused"] += event.self_cpu_time_total / 1e6
    # Operators inside the optimizer regions were counted by kind above: move them to "optimizer".
    optimizer_ops = _ops_inside(prof, "optimizer")
    for cat, s in optimizer_ops.items():
        seconds[cat] -= s
    seconds["optimizer"] = optimizer_total
    threads = max(1, torch.get_num_threads())
    seconds["python"] = max(0.0, wall - sum(seconds.values()) / threads)
    return wall / steps, {c: seconds[c] / steps for c in CATEGORIES}


def _ops_inside(prof: Any, region: str) -> dict[str, float]:
    """Self time of the aten operators that ran inside `region` ranges, by category."""
    events = prof.events()
    ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == region]
    inside: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith("aten::") and any(s <= e.time_range.start and e.time_range.end <= t for s, t in ranges):
            inside[category(e.name)] += e.self_cpu_time_total / 1e6
    return inside


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="lfw", help="the pipeline profile whose zoo settings are profiled")
    p.add_argument("--ks", default="1,8,32")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast, fp32 LoRA and AdamW)")
    p.add_argument("--attention", default="auto", help="BatchedOptions.attention: auto, sdpa or math")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (BatchedOptions.compile)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per configuration")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import diffusers

    from loraleak.base.loading import load_base_pipeline
    from loraleak.pipeline.api import load_pipeline_config

    diffusers.utils.logging.disable_progress_bar()
    config = load_pipeline_config(args.profile)
    pipe = load_base_pipeline(config.base.ref)
    base_cfg = replace(config.zoo.finetune, device="cpu")
    rows = base_cfg.batch_size * (2 if base_cfg.prior_preservation else 1)
    print(f"zoo_step_profile: profile {args.profile} (base {config.base.ref}, rank {base_cfg.rank} on "
          f"{', '.join(base_cfg.targets)}, {rows} rows per fine-tune per step), {args.threads} thread(s), "
          f"attention {args.attention}{', compiled' if args.compile else ''}; ms per fine-tune-step by kind of work")
    print(f"{'precision':<9} {'K':>3} {'ms/step':>9} {'ms/ft-step':>10} "
          + " ".join(f"{c:>11}" for c in CATEGORIES))
    for precision in args.precisions.split(","):
        cfg = replace(base_cfg, mixed_precision="bf16" if precision == "bf16" else "no")
        for k in (int(k) for k in args.ks.split(",")):
            options = BatchedOptions(attention=args.attention, compile=args.compile)
            wall, parts = profile_step(pipe, cfg, k, options, args.steps)
            shares = " ".join(f"{1000 * parts[c] / k:>6.1f} {parts[c] / wall:>3.0%}" for c in CATEGORIES)
            print(f"{precision:<9} {k:>3} {1000 * wall:>9.1f} {1000 * wall / k:>10.1f} {shares}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
