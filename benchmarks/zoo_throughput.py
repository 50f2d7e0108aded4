"""Fine-tunes per hour: one at a time with peft (the reference) against K at once in one UNet pass.

Both paths fine-tune the same identities (same images, steps, base and settings); the reference
is `finetune_lora` (peft LoRA, as diffusers' DreamBooth-LoRA example), the batched path
`finetune_lora_batched`. Each configuration is timed end to end (VAE encoding, LoRA init,
training, snapshot files), after an untimed 1-step warm-up of the same configuration.

    python benchmarks/zoo_throughput.py --steps 20 --ks 1,2,4,8              # tiny base, CPU
    python benchmarks/zoo_throughput.py --profile lfw --steps 20 --ks 8,32 --precisions fp32,bf16
    python benchmarks/zoo_throughput.py --sd14 --device cuda --dtype bf16 --steps 30 --ks 1,8,16,32,max \\
        --results benchmarks/results.md

--sd14: the SD 1.x UNet (diffusers' default UNet2DConditionModel config with SD 1.4's
cross_attention_dim=768 and sample_size=64: 64x64x4 latents, 77x768 text states) with random
weights, behind a small VAE (8x downsampling: 512 px images) and a 1-layer 768-wide text encoder,
which run once per fine-tune. --profile NAME takes the base and the fine-tune settings (rank, alpha, targets,
lr, batch size, prior preservation, wrong triggers) from that pipeline profile's zoo instead. The
reference is always fp32 (mixed precision "no"); --precisions lists the batched path's (bf16 = autocast
with fp32 LoRA factors and AdamW state). It also reports model FLOP utilisation: FLOPs of one training step
(forward + backward, counted by torch.utils.flop_counter.FlopCounterMode) / step time / --peak-tflops.
(On a CPU FlopCounterMode does not count the SDPA attention kernel, so MFU there is a lower bound.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from loraleak.errors import LoraleakError
from loraleak.finetune.batched import BatchedOptions, find_max_k, finetune_lora_batched, probe_step
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.identities.synthetic import SyntheticFaces

H100_BF16_DENSE_TFLOPS = 989.0
PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # --precisions -> FinetuneConfig.mixed_precision


# --- bases ---------------------------------------------------------------------------------------


def tiny_base(ref: str) -> tuple[Any, str]:
    """The shipped `tiny` base, or a randomly initialised one of its architecture when absent."""
    from loraleak.base.loading import load_base_pipeline

    try:
        return load_base_pipeline(ref), ref
    except LoraleakError:
        if ref != "tiny":
            raise
    from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline

    return build_tiny_pipeline(TinyBaseConfig(), seed=0), "tiny (random weights: shipped weights absent)"


def profile_base(profile: str) -> tuple[Any, str, FinetuneConfig]:
    """The base of a pipeline profile and its zoo's fine-tune settings."""
    from loraleak.base.loading import load_base_pipeline
    from loraleak.pipeline.api import load_pipeline_config

    config = load_pipeline_config(profile)
    return load_base_pipeline(config.base.ref), f"{config.base.ref} (profile {profile})", config.zoo.finetune


def sd14_pipeline(text_layers: int = 1) -> Any:
    """SD 1.x's UNet with random weights; a small VAE with SD's 8x downsampling and a 768-wide CLIP text
    encoder of `text_layers` layers (SD 1.4's has 12; a fine-tune runs it once, the attack's encoder every step)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraleak.base.tokenizer import MODEL_MAX_LENGTH, build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.4's two non-default values
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4, sample_size=512,
                        scaling_factor=0.18215)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=text_layers,
        num_attention_heads=12, max_position_embeddings=MODEL_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)).eval()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# --- measuring -----------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory over a block: allocated CUDA memory, or on a CPU the process RSS sampled every 10 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        process = psutil.Process()
        self._stop = threading.Event()
        self._peak = process.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(0.01):
                self._peak = max(self._peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = self._peak / 2**20


def step_flops(pipe: Any, cfg: FinetuneConfig, k: int) -> float:
    """FLOPs of one training step of K fine-tunes (forward + backward; the LoRA matmuls included)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        probe_step(pipe, cfg, k, BatchedOptions(), steps=1)
    return float(counter.get_total_flops())


@dataclass
class Row:
    """One configuration's timed run; with processes > 1, the slowest of that many concurrent processes,
    each fine-tuning `fine_tunes` (its peak memory the largest of theirs: per worker)."""

    path: str
    k: int
    fine_tunes: int
    wall_s: float
    train_s: float
    steps: int
    peak_mib: float
    flops_per_step: float | None = None
    processes: int = 1
    threads: int = 1

    @property
    def seconds_per_step(self) -> float:
        return self.train_s / (self.steps * (self.fine_tunes // self.k))

    @property
    def per_hour(self) -> float:
        return self.processes * self.fine_tunes * 3600 / self.wall_s

    def per_hour_at(self, steps: int) -> float:
        """Fine-tunes/hour projected to `steps` steps: the measured setup plus that many measured steps."""
        setup = (self.wall_s - self.train_s) / (self.fine_tunes // self.k)
        return self.processes * self.k * 3600 / (setup + steps * self.seconds_per_step)


def run_reference(pipe: Any, identities: list[list[Image.Image]], cfg: FinetuneConfig, class_images: list,
                  work: Path) -> tuple[float, float]:
    """Fine-tune the identities one after another; (wall seconds, training seconds)."""
    started, train_s = time.perf_counter(), 0.0
    for i, images in enumerate(identities):
        result = finetune_lora(pipe, images, replace(cfg, seed=i), work / f"ref-{i}", class_images=class_images,
                               show_progress=False)
        train_s += result.settings["timings"]["train_s"]
    return time.perf_counter() - started, train_s


def run_batched(pipe: Any, identities: list[list[Image.Image]], cfg: FinetuneConfig, class_images: list,
                work: Path, options: BatchedOptions) -> tuple[float, float]:
    started = time.perf_counter()
    k = len(identities)
    results = finetune_lora_batched(pipe, identities, [replace(cfg, seed=i) for i in range(k)],
                                    [work / f"batched-{k}-{i}" for i in range(k)], options=options,
                                    class_images=[class_images] * k, show_progress=False)
    return time.perf_counter() - started, results[0].settings["timings"]["train_s"]


def measure(name: str, k: int, n: int, steps: int, device: torch.device, warmup: Callable[[], Any] | None,
            run: Callable[[], tuple[float, float]], repeats: int) -> Row:
    """The fastest of `repeats` runs (others' load on a shared machine only ever slows a run down)."""
    if warmup is not None:
        warmup()
    best = None
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            wall_s, train_s = run()
        row = Row(name, k, n, wall_s, train_s, steps, memory.peak_mib, threads=torch.get_num_threads())
        print(f"  measured {name} K={k}: {wall_s:.1f} s", file=sys.stderr, flush=True)
        best = row if best is None or row.wall_s < best.wall_s else best
    return best


@dataclass
class Setup:
    """What every measurement of one benchmark run shares."""

    pipe: Any
    base_name: str
    cfg: FinetuneConfig  # fp32; each batched row sets its precision
    options: BatchedOptions
    identities: list[list[Image.Image]]
    class_images: list[Image.Image]


def prepare(args: argparse.Namespace, device: torch.device, count: int) -> Setup:
    """The base, the fine-tune settings and `count` identities' images, as --sd14/--profile/--base say."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    if args.sd14:
        pipe, base_name = sd14_pipeline(), "SD 1.x UNet (random weights), 64x64 latents, 77x768 text"
    elif args.profile:
        pipe, base_name, profile_cfg = profile_base(args.profile)
    else:
        pipe, base_name = tiny_base(args.base)
    pipe.to(device)
    resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    if args.profile and not args.sd14:
        cfg = replace(profile_cfg, steps=args.steps, device=str(device), snapshot_steps=(), class_images_dir=None,
                      mixed_precision="no")
        args.rank, args.targets, args.batch_size = cfg.rank, ",".join(cfg.targets), cfg.batch_size
        args.no_prior = not cfg.prior_preservation
    else:
        cfg = FinetuneConfig(steps=args.steps, rank=args.rank, alpha=args.rank, targets=tuple(args.targets.split(",")),
                             batch_size=args.batch_size, prior_preservation=not args.no_prior, device=str(device),
                             mixed_precision="no", lr=1e-4)
    options = BatchedOptions(attention=args.attention, compile=args.compile,
                             gradient_checkpointing=args.gradient_checkpointing,
                             channels_last=args.channels_last, loss_sync_every=max(args.steps, 1))
    faces = SyntheticFaces(count, args.images, seed=0)
    identities = [identity.load(min(resolution, 128)) for identity in faces.identities()]  # resized as trained
    # Class images only need the right size here: their content does not change the cost.
    rng = np.random.default_rng(0)
    class_images = [Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))
                    for _ in range(4)]
    return Setup(pipe, base_name, cfg, options, identities, class_images)


def _batched_process(args: argparse.Namespace, precision: str, k: int, start: Any, results: Any) -> None:
    """One of --processes concurrent workers: prepare, warm up, wait for the others, fine-tune K, report."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or 1)
    setup = prepare(args, device, k)
    cfg = replace(setup.cfg, mixed_precision=PRECISIONS[precision])
    work = Path(tempfile.mkdtemp(prefix="zoo-throughput-"))
    try:
        if not args.no_warmup:
            run_batched(setup.pipe, setup.identities, replace(cfg, steps=1), setup.class_images, work, setup.options)
        start.wait()
        with PeakMemory(device) as memory:
            wall_s, train_s = run_batched(setup.pipe, setup.identities, cfg, setup.class_images, work, setup.options)
        results.put((wall_s, train_s, memory.peak_mib))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_processes(args: argparse.Namespace, precision: str, k: int) -> Row:
    """K fine-tunes in each of --processes concurrent processes (the zoo's `workers`), started together."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(args.processes), context.Queue()
    workers = [context.Process(target=_batched_process, args=(args, precision, k, start, results))
               for _ in range(args.processes)]
    for worker in workers:
        worker.start()
    measured = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
        if worker.exitcode:
            raise RuntimeError(f"a benchmark process exited with {worker.exitcode}")
    wall_s = max(m[0] for m in measured)
    train_s = max(m[1] for m in measured)
    print(f"  measured batched {precision} {args.processes}x K={k}: {wall_s:.1f} s", file=sys.stderr, flush=True)
    return Row(f"batched {precision}", k, k, wall_s, train_s, args.steps, max(m[2] for m in measured),
               processes=args.processes, threads=args.threads or 1)


# --- the benchmark -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="tiny", help="base model ref (default tiny; random tiny when not shipped)")
    p.add_argument("--sd14", action="store_true", help="SD 1.x UNet at 64x64 latents, random weights")
    p.add_argument("--steps", type=int, default=10, help="fine-tuning steps per fine-tune (timed)")
    p.add_argument("--ks", default="1,2,4,8",
                   help="batched K values, comma-separated; 'max': the largest that fits the GPU (find_max_k)")
    p.add_argument("--reference-runs", type=int, default=2, help="fine-tunes timed one after another")
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", default=None, help="take the base and fine-tune settings from this pipeline profile "
                   "(e.g. lfw); --rank/--targets/--batch-size/--no-prior are then ignored")
    p.add_argument("--precisions", default="fp32", help="batched path's precisions, comma-separated: fp32, bf16 "
                   "(autocast, fp32 LoRA and optimiser state); the reference is fp32")
    p.add_argument("--attention", default="auto", help="batched path's attention: auto, sdpa or math (BatchedOptions)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="to_q,to_v", help="LoRA targets (the paper's: to_q,to_v)")
    p.add_argument("--batch-size", type=int, default=1, help="instance images per step (+ as many class images)")
    p.add_argument("--images", type=int, default=5, help="private images per identity")
    p.add_argument("--no-prior", action="store_true", help="no prior preservation (no class images)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (batched path)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="batched path")
    p.add_argument("--channels-last", action="store_true", help="batched path")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-step run before each measurement")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration; the fastest counts")
    p.add_argument("--project-steps", type=int, default=1000, help="also project fine-tunes/hour to this many steps")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="device peak for MFU (default: H100 SXM bf16 dense)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per batched worker on CPU (default: 1)")
    p.add_argument("--reference-threads", type=int, default=None,
                   help="torch threads of the one-at-a-time reference (default: --threads)")
    p.add_argument("--processes", type=int, default=1,
                   help="batched rows run in this many concurrent processes (the zoo's workers), each --threads")
    p.add_argument("--results", type=Path, default=None, help="also append the table to this file (with the date)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.reference_threads or args.threads or 1)
    try:
        requested = [k.strip() for k in args.ks.split(",")]
        if not all(k == "max" or int(k) >= 1 for k in requested):
            raise ValueError
    except ValueError:
        print(f"--ks takes positive integers and 'max', got {args.ks!r}", file=sys.stderr)
        return 2
    precisions = [p.strip() for p in args.precisions.split(",")]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        print(f"--precisions takes {', '.join(PRECISIONS)}, got {args.precisions!r}", file=sys.stderr)
        return 2
    if args.processes > 1 and (device.type != "cpu" or "max" in requested):
        print("--processes runs CPU workers side by side; it takes neither a GPU device nor --ks max", file=sys.stderr)
        return 2
    count = max([int(k) for k in requested if k != "max"] + [args.reference_runs])
    setup = prepare(args, device, count)
    pipe, cfg, options, identities, class_images = (setup.pipe, setup.cfg, setup.options, setup.identities,
                                                    setup.class_images)
    ks = sorted({find_max_k(pipe, cfg, device, options=options) if k == "max" else int(k) for k in requested})
    if max(ks) > len(identities):
        identities = prepare(args, device, max(ks)).identities
    warm_cfg = replace(cfg, steps=1)

    with PeakMemory(device) as idle:  # what the process holds before any fine-tune (base, images)
        pass
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="zoo-throughput-"))
    try:
        rows.append(measure(
            "reference (peft)", 1, args.reference_runs, args.steps, device,
            None if args.no_warmup else lambda: run_reference(pipe, identities[:1], warm_cfg, class_images, work),
            lambda: run_reference(pipe, identities[:args.reference_runs], cfg, class_images, work), args.repeats))
        if device.type == "cpu":
            torch.set_num_threads(args.threads or 1)
        for precision in precisions:
            mixed = replace(cfg, mixed_precision=PRECISIONS[precision])
            warm = replace(mixed, steps=1)
            for k in ks:
                if args.processes > 1:
                    rows.append(measure_processes(args, precision, k))
                    continue
                rows.append(measure(
                    f"batched {precision}", k, k, args.steps, device,
                    None if args.no_warmup else lambda: run_batched(pipe, identities[:k], warm, class_images, work,
                                                                    options),
                    lambda: run_batched(pipe, identities[:k], mixed, class_images, work, options), args.repeats))
        if args.sd14 or device.type == "cuda":
            reference_flops = step_flops(pipe, cfg, 1)  # peft's step does the same matmuls as K=1
            rows[0].flops_per_step = reference_flops
            for row in rows[1:]:
                row.flops_per_step = reference_flops if row.k == 1 else step_flops(pipe, cfg, row.k)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    emit(table(args, setup.base_name, device, rows, idle.peak_mib), args.results)
    return 0


def table(args: argparse.Namespace, base_name: str, device: torch.device, rows: list[Row],
          idle_mib: float) -> list[str]:
    reference = rows[0]
    memory = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    with_mfu = any(r.flops_per_step for r in rows)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"zoo_throughput: base {base_name}; device {device} ({where}); reference fp32, batched "
             f"{args.precisions} (attention {args.attention}); {args.steps} steps; "
             f"LoRA r={args.rank} on {args.targets}; batch {args.batch_size}{'' if args.no_prior else ' + class'}; "
             f"{args.images} images per identity; reference = {args.reference_runs} fine-tunes one after another; "
             f"fastest of {args.repeats} run(s); {'allocated' if device.type == 'cuda' else 'RSS'} before the "
             f"first run {idle_mib:.0f} MiB"]
    header = (f"{'path':<17} {'workers x threads':>17} {'K':>3} {'wall s':>8} {'s/step':>8} {'fine-tunes/h':>13} "
              f"{'x ref':>6} {f'ft/h @{args.project_steps}':>12} {'x ref':>6} {memory:>15}")
    lines.append(header + (f" {'TFLOP/step':>11} {'MFU':>6}" if with_mfu else ""))
    for row in rows:
        projected = row.per_hour_at(args.project_steps)
        line = (f"{row.path:<17} {f'{row.processes} x {row.threads}':>17} {row.k:>3} {row.wall_s:>8.2f} "
                f"{row.seconds_per_step:>8.4f} {row.per_hour:>13.1f} {row.per_hour / reference.per_hour:>6.2f} "
                f"{projected:>12.1f} {projected / reference.per_hour_at(args.project_steps):>6.2f} "
                f"{row.peak_mib:>15.0f}")
        if with_mfu and row.flops_per_step:
            achieved = row.flops_per_step / row.seconds_per_step / 1e12
            line += f" {row.flops_per_step / 1e12:>11.3f} {achieved / args.peak_tflops:>6.1%}"
        lines.append(line)
    best = max(rows[1:], key=lambda r: r.per_hour_at(args.project_steps))
    lines.append(f"best: batched {best.path.split()[-1]} K={best.k} in {best.processes} worker(s) x {best.threads} "
                 f"thread(s): {best.per_hour / reference.per_hour:.1f}x the reference's fine-tunes/hour "
                 f"({best.per_hour_at(args.project_steps) / reference.per_hour_at(args.project_steps):.1f}x at "
                 f"{args.project_steps} steps); reference {reference.processes} x {reference.threads} thread(s)")
    return lines


def emit(lines: list[str], results: Path | None) -> None:
    """Print the table; with --results also append it to that file under the date and the command line."""
    text = "\n".join(lines)
    print(text)
    if results is not None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with results.open("a") as f:
            f.write(f"\n## {stamp}: {' '.join(['python', *sys.argv])}\n\n```\n{text}\n```\n")


if __name__ == "__main__":
    sys.exit(main())
