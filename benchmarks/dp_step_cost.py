"""What a training-time defense costs per fine-tuning step, against the plain step.

Every configuration runs the same fine-tune (`finetune_lora`: same photos, class images, base and
settings; the paper's recipe at the tiny base's size: rank 16, alpha 27, batch 1 + 1 class image)
after an untimed 2-step warm-up of the same configuration, and reports the seconds per training step
that `finetune.json` records (the step loop only; the median and the fastest of --repeats rounds,
configurations interleaved in each round so that a machine shared with other work slows all of them
alike) and its ratio to the plain step. DP runs use a fixed noise multiplier (σ = 1; the step costs the same for
any σ): a target ε adds the accountant's σ search before training, which takes from under a second
(1000 steps at q = 0.2) to minutes on a busy machine (few steps at large q), once per process.

    python benchmarks/dp_step_cost.py                       # shipped tiny base (random if absent), CPU
    python benchmarks/dp_step_cost.py --steps 50 --batch-size 2 --device cuda

Configurations: plain; dp_sgd per image (Poisson batches, as the accountant assumes; batch sizes
vary around batch_size); dp_sgd per image with the plain recipe's fixed batches ("shuffle": the
like-for-like comparison); dp_sgd per user; dp_sgd with Opacus' functorch per-sample gradients
instead of its hooks; dpgm (the paper's noisy MMD loss).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from loraleak.config import from_dict
from loraleak.defenses import dp_sgd
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.identities.synthetic import SyntheticFaces

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_throughput import tiny_base  # noqa: E402  (the shipped tiny base, or its architecture at random)

DEFENSES: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "dp_sgd image poisson": {"kind": "dp_sgd", "noise_multiplier": 1.0},
    "dp_sgd image shuffle": {"kind": "dp_sgd", "noise_multiplier": 1.0, "sampling": "shuffle"},
    "dp_sgd user": {"kind": "dp_sgd", "noise_multiplier": 1.0, "accounting": "user"},
    "dp_sgd image shuffle functorch": {"kind": "dp_sgd", "noise_multiplier": 1.0, "sampling": "shuffle"},
    "dpgm": {"kind": "dpgm", "noise_multiplier": 0.6},
}


class functorch_per_sample_gradients:
    """Within the block, privacy engines take per-sample gradients with Opacus' functorch mode."""

    def __enter__(self) -> None:
        self.original = dp_sgd.LoraPrivacyEngine.for_defense.__func__
        original = self.original
        dp_sgd.LoraPrivacyEngine.for_defense = classmethod(
            lambda cls, *a, **k: original(cls, *a, **{**k, "force_functorch": True}))

    def __exit__(self, *exc: object) -> None:
        dp_sgd.LoraPrivacyEngine.for_defense = classmethod(self.original)


def seconds_per_step(pipe: Any, name: str, settings: dict[str, Any], images: list, class_images: list) -> float:
    """Seconds per training step of one configuration, after a 2-step warm-up."""
    defense = DEFENSES[name]
    extra = {"defense": defense} if defense else {}
    warm = from_dict(FinetuneConfig, {**settings, "steps": 2, **extra})
    cfg = from_dict(FinetuneConfig, {**settings, **extra})
    with tempfile.TemporaryDirectory() as tmp, \
            (functorch_per_sample_gradients() if name.endswith("functorch") else nullcontext()):
        finetune_lora(pipe, images, warm, Path(tmp) / "warm", class_images=class_images, show_progress=False)
        result = finetune_lora(pipe, images, cfg, Path(tmp) / "run", class_images=class_images, show_progress=False)
    return result.settings["timings"]["seconds_per_step"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--images", type=int, default=5, help="private photos (the paper: up to 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe, base_name = tiny_base(args.base)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    faces = SyntheticFaces(num_identities=2, images_per_identity=max(args.images, args.batch_size))
    images = [faces.render(0, j, size) for j in range(args.images)]
    class_images = [faces.render(1, j, size) for j in range(args.batch_size)]  # public stand-ins
    settings = {"rank": 16, "alpha": 27, "steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4,
                "num_class_images": len(class_images), "device": args.device}
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(DEFENSES)

    print(f"base: {base_name}; {args.images} photos, batch {args.batch_size} + {args.batch_size} class, "
          f"{args.steps} steps, device {args.device}, {torch.get_num_threads()} thread(s)")
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.repeats):
        for name in names:
            times[name].append(seconds_per_step(pipe, name, settings, images, class_images))
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {t[-1]:.3f}" for n, t in times.items()), flush=True)
    # The median and the fastest round: on a shared machine the fastest is the least disturbed.
    print(f"{'configuration':34s} {'median s':>9s} {'x plain':>8s} {'min s':>8s} {'x plain':>8s}")
    for name, values in times.items():
        cells = []
        for stat in (statistics.median, min):
            value = stat(values)
            plain = stat(times["plain"]) if "plain" in times else None
            cells.append(f"{value:8.3f} {value / plain:8.2f}" if plain else f"{value:8.3f} {'-':>8s}")
        print(f"{name:34s} {cells[0]:>18s} {cells[1]:>17s}")


if __name__ == "__main__":
    main()
