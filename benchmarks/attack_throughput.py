"""Attack-training samples per second: each sample decoded through its own victim LoRA in one UNet pass
(`batched_lora`) against swapping peft adapters sample by sample (`unet.set_adapters` in a loop).

One attack-training step on a batch of N victim LoRAs, as the paper trains the encoder: the
network autoencoder encodes the N LoRAs to z, each z conditions its own victim's UNet on a noised
latent of that victim's images, ε-MSE, backward into the encoder, AdamW (lr 5e-3, wd 5e-4). Same
encoder, same batch, same noise; the two paths give the same loss (checked before timing).

  - batched_lora: read the N LoRA files, stack their factors, one UNet pass over the batch
    (file reading is inside the timed step: the conservative side for this path);
  - set_adapters loop, preloaded: all N adapters loaded once, outside the timing; per sample
    `unet.set_adapters(name)` and a UNet pass of one sample (a lower bound on swapping's cost);
  - set_adapters loop, loaded per batch: what training over a zoo of thousands needs: load the
    batch's N LoRA files as adapters, loop, unload.

    python benchmarks/attack_throughput.py --batch 8 --steps 5               # tiny base, CPU
    python benchmarks/attack_throughput.py --sd14 --device cuda --dtype bf16 --batch 16 --steps 20
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils import convert_state_dict_to_diffusers

from loraleak.base.attention import attention_processor
from loraleak.attack import AttackModelConfig, NetworkAutoencoder, collate_lora_matrices, lora_layout, lora_matrices
from loraleak.lora.batched import epsilon_loss, lora_scale, stack_lora_factors
from loraleak.finetune.batched import peft_initial_lora
from loraleak.finetune.config import FinetuneConfig
from loraleak.lora.io import LORA_WEIGHT_NAME, read_lora
from zoo_throughput import PeakMemory, emit, sd14_pipeline, tiny_base


@dataclass
class Victim:
    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]


def make_victims(pipe: Any, n: int, rank: int, targets: tuple[str, ...], work: Path) -> list[Victim]:
    """N diffusers-format victim LoRA files: peft's init, with B drawn so that every LoRA matters."""
    victims = []
    for i in range(n):
        cfg = FinetuneConfig(rank=rank, alpha=rank, targets=targets, seed=i)
        factors, metadata = peft_initial_lora(pipe.unet, cfg)
        generator = torch.Generator().manual_seed(1000 + i)
        state = {}
        for module, (down, up) in factors.items():
            state[f"{module}.lora_A.weight"] = down
            state[f"{module}.lora_B.weight"] = 0.02 * torch.randn(up.shape, generator=generator)
        type(pipe).save_lora_weights(work / f"victim-{i}", unet_lora_layers=convert_state_dict_to_diffusers(state),
                                     unet_lora_adapter_metadata=metadata)
        path = work / f"victim-{i}" / LORA_WEIGHT_NAME
        state_dict, file_metadata = read_lora(path)
        victims.append(Victim(path, state_dict, file_metadata))
    return victims


class AttackStep:
    """One encoder update on a batch of victims; `decode` is the path under test (returns the ε-MSE)."""

    def __init__(self, pipe: Any, victims: list[Victim], device: torch.device, amp_dtype: torch.dtype | None) -> None:
        self.pipe, self.victims, self.device, self.amp_dtype = pipe, victims, device, amp_dtype
        torch.manual_seed(0)
        self.encoder = NetworkAutoencoder.from_pipeline(pipe, lora_layout(victims[0].state_dict),
                                                        AttackModelConfig()).to(device)
        self.optimizer = torch.optim.AdamW(self.encoder.trainable_parameters(), lr=5e-3, weight_decay=5e-4)
        self.matrices = [m.to(device) for m in collate_lora_matrices(
            [lora_matrices(v.state_dict, "delta") for v in victims])]
        self.lora_steps = torch.full((len(victims),), 1000, device=device)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        size = pipe.unet.config.sample_size
        self.latents = torch.randn(len(victims), pipe.unet.config.in_channels, size, size,
                                   generator=torch.Generator().manual_seed(0)).to(device)

    def __call__(self, decode: Callable[..., torch.Tensor], seed: int, train: bool = True) -> float:
        generator = torch.Generator().manual_seed(seed)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.encoder(self.matrices, self.lora_steps, generator=generator)
            loss = decode(out.z, generator)
        if train:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # --- the two decoders --------------------------------------------------------------------

    def batched(self, z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        state_dicts, metadatas = zip(*(read_lora(v.path) for v in self.victims))
        factors = stack_lora_factors(state_dicts)
        return epsilon_loss(self.pipe.unet, self.scheduler, self.latents, z, factors,
                            [lora_scale(md) for md in metadatas], generator).epsilon

    def swapping(self, z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per sample: activate its victim's adapter, run the UNet on that sample alone."""
        # The same noise and timesteps as epsilon_loss draws.
        noise = torch.randn(self.latents.shape, generator=generator).to(self.latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.latents.shape[0],),
                                  generator=generator).to(self.device)
        noisy = self.scheduler.add_noise(self.latents, noise, timesteps)
        losses = []
        for i in range(len(self.victims)):
            self.pipe.unet.set_adapters(adapter_name(i))
            pred = self.pipe.unet(noisy[i:i + 1], timesteps[i:i + 1], z[i:i + 1], return_dict=False)[0]
            losses.append(F.mse_loss(pred.float(), noise[i:i + 1].float()))
        return torch.stack(losses).mean()  # equal sizes: the batch's MSE

    def load_adapters(self) -> None:
        for i, victim in enumerate(self.victims):
            self.pipe.load_lora_weights(str(victim.path.parent), weight_name=victim.path.name,
                                        adapter_name=adapter_name(i))
        self.pipe.unet.requires_grad_(False)  # the victims are fixed: only the encoder trains

    def swapping_loaded_per_batch(self, z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.load_adapters()
        try:
            return self.swapping(z, generator)
        finally:
            self.pipe.unload_lora_weights()


def adapter_name(i: int) -> str:
    return f"victim_{i}"


def timed(step: AttackStep, decode: Callable[..., torch.Tensor], steps: int,
          device: torch.device) -> tuple[float, float]:
    """(seconds per step, peak memory MiB) over `steps` steps after one untimed warm-up step."""
    step(decode, seed=0)
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        for i in range(steps):
            step(decode, seed=1 + i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - started) / steps
    return seconds, memory.peak_mib


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="tiny", help="base model ref (default tiny; random tiny when not shipped)")
    p.add_argument("--sd14", action="store_true", help="SD 1.x UNet at 64x64 latents, 12-layer 768-wide CLIP")
    p.add_argument("--batch", type=int, default=8, help="victim LoRAs per attack-training batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="to_q,to_v")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--attention", default="auto", help="auto (as attack training picks it), sdpa or math")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: 1)")
    p.add_argument("--results", type=Path, default=None, help="also append the table to this file (with the date)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoder", once per load
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # N adapters on purpose
    if args.sd14:
        pipe, base_name = sd14_pipeline(text_layers=12), "SD 1.x UNet + 12-layer CLIP (random weights)"
    else:
        pipe, base_name = tiny_base(args.base)
    pipe.to(device)
    pipe.unet.requires_grad_(False)
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    pipe.unet.set_attn_processor(attention_processor(args.attention, device, amp_dtype))
    work = Path(tempfile.mkdtemp(prefix="attack-throughput-"))
    try:
        victims = make_victims(pipe, args.batch, args.rank, tuple(args.targets.split(",")), work)
        step = AttackStep(pipe, victims, device, amp_dtype)
        # Same encoder state, same batch, same noise: the two decoders must agree before being timed.
        batched_loss = step(step.batched, seed=0, train=False)
        swapped_loss = step(step.swapping_loaded_per_batch, seed=0, train=False)
        rows = [("batched_lora", *timed(step, step.batched, args.steps, device))]
        rows.append(("set_adapters, per batch", *timed(step, step.swapping_loaded_per_batch, args.steps, device)))
        step.load_adapters()
        rows.append(("set_adapters, preloaded", *timed(step, step.swapping, args.steps, device)))
        pipe.unload_lora_weights()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    memory = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} thread(s)"
    lines = [f"attack_throughput: base {base_name}; device {device} ({where}); {args.dtype}, attention "
             f"{args.attention}; batch of {args.batch} "
             f"victim LoRAs (r={args.rank} on {args.targets}), 1 image each; {args.steps} timed steps per path; "
             f"loss check: batched {batched_loss:.6f} vs swapped {swapped_loss:.6f}",
             f"{'path':<24} {'s/step':>8} {'samples/s':>10} {'x preloaded':>12} {memory:>15}"]
    reference = rows[2][1]
    for name, seconds, peak in rows:
        lines.append(f"{name:<24} {seconds:>8.4f} {args.batch / seconds:>10.2f} {reference / seconds:>12.2f} "
                     f"{peak:>15.0f}")
    lines.append(f"batched_lora : {rows[2][1] / rows[0][1]:.1f}x the set_adapters loop's samples/second "
                 f"(adapters preloaded; {rows[1][1] / rows[0][1]:.1f}x when loaded per batch)")
    emit(lines, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
