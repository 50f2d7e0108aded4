"""What the paper's study costs at full scale: FLOPs and activation memory per task, GPU-hours under stated rates.

Counts, on meta tensors (no weights, no compute, seconds on a CPU), with SD 1.4's exact configs
(`loraleak.base.sd14_shaped`):
- FLOPs (torch.utils.flop_counter, attention included: on meta SDPA decomposes into bmm) of one
  UNet forward and one forward + backward with the weights frozen (gradients flow to the input, as
  they flow to the LoRA factors), the CLIP-L text encoder, the VAE and facenet;
- the activations the backward keeps (saved-tensor hooks): the memory a training step needs
  beyond the weights.
Then the study's tasks from the paper profile's settings (pipeline-paper.yaml) and the study size:

    victim fine-tune   steps x UNet fwd+bwd on (batch + class rows) + text encoder fwd+bwd (its LoRA)
    class images       num_class_images x class_inference_steps x UNet fwd x 2 (guidance), once per zoo
    attack             max_steps x batch_size x UNet fwd+bwd (each LoRA decoded against one photo)
    evaluation         victims x conditions x n_images x sample_steps x UNet fwd x 2 (guidance) + VAE decodes

GPU-hours = FLOPs / sustained rate. The rates are ASSUMPTIONS (flags), not measurements: an H100
SXM's dense peaks are ~67 TFLOPS fp32 (non-tensor-core), ~495 TF32 and ~989 bf16; the defaults
(10 fp32 for the fp32 victim fine-tunes, 100 bf16 for the attack and evaluation, 10-15% of peak)
are deliberately conservative for a UNet at batch 2-8 with launch and data overheads. Replace them with measured rates (`benchmarks/zoo_throughput.py
--sd14 --device cuda` prints the model FLOP utilisation of a fine-tune step).

    python benchmarks/paper_scale.py --victims 1000 --gpus 8
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from loraleak.base.sd14_shaped import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG
from loraleak.scoring.facenet_net import InceptionResnetV1

GB = 2**30


def flops(fn) -> float:
    with FlopCounterMode(display=False) as mode:
        fn()
    return float(mode.get_total_flops())


def saved_bytes(fn, module: torch.nn.Module) -> float:
    """Bytes of the tensors autograd keeps for the backward of `fn()` (its activation memory); the
    module's own weights, which autograd also keeps (by reference) for the input gradients, left out."""
    total = 0
    weights = {id(p) for p in module.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t
        if id(t) not in weights and id(base) not in weights:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return float(total)


@dataclass(frozen=True)
class Costs:
    unet_fwd: float  # FLOPs, batch 1
    unet_train: float  # fwd + bwd (frozen weights), batch 1
    unet_saved: float  # activation bytes for that backward, batch 1
    text_train: float  # text encoder fwd + bwd, one prompt
    vae_encode: float
    vae_decode: float
    facenet: float
    weights_fp32: float  # bytes of UNet + text encoder + VAE


def measure(resolution: int) -> Costs:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    latent = resolution // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG, sample_size=latent).requires_grad_(False)
        vae = AutoencoderKL(**VAE_CONFIG, sample_size=resolution).requires_grad_(False)
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).requires_grad_(False)
        face = InceptionResnetV1().eval()
        x = torch.randn(1, 4, latent, latent)
        t = torch.tensor([500])
        cond = torch.randn(1, 77, 768)
        ids = torch.zeros(1, 77, dtype=torch.long)
        image = torch.randn(1, 3, resolution, resolution)
        crop = torch.randn(1, 3, 160, 160)

    def unet_step():
        x_in = x.clone().requires_grad_(True)
        unet(x_in, t, cond).sample.sum().backward()

    weights = sum(p.numel() * 4 for m in (unet, vae, text) for p in m.parameters())
    return Costs(
        unet_fwd=flops(lambda: unet(x, t, cond)),
        unet_train=flops(unet_step),
        unet_saved=saved_bytes(lambda: unet(x.clone().requires_grad_(True), t, cond), unet),
        text_train=3 * flops(lambda: text(ids)),  # fwd + bwd through frozen layers ~ 3x fwd (input + LoRA grads)
        vae_encode=flops(lambda: vae.encode(image)),
        vae_decode=flops(lambda: vae.decode(x)),
        facenet=flops(lambda: face(crop)),
        weights_fp32=float(weights),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--victims", type=int, default=1000, help="fine-tunes in the zoo (attack-train + held out)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of victims evaluated")
    p.add_argument("--steps", type=int, default=1000, help="fine-tune steps")
    p.add_argument("--batch", type=int, default=1, help="fine-tune batch (plus as many class rows)")
    p.add_argument("--class-images", type=int, default=200)
    p.add_argument("--class-steps", type=int, default=50)
    p.add_argument("--attack-steps", type=int, default=20000)
    p.add_argument("--attack-batch", type=int, default=8)
    p.add_argument("--conditions", type=int, default=9, help="org, rec, 3 baselines, base, 3 controls")
    p.add_argument("--eval-images", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--fp32-tflops", type=float, default=10.0, help="ASSUMED sustained fp32 rate per GPU")
    p.add_argument("--bf16-tflops", type=float, default=100.0, help="ASSUMED sustained bf16 rate per GPU")
    p.add_argument("--gpus", type=int, default=8)
    a = p.parse_args()

    c = measure(a.resolution)
    rows_per_step = 2 * a.batch  # instance rows + prior-preservation class rows
    finetune = a.steps * (rows_per_step * c.unet_train + 2 * c.text_train) + (5 + a.class_images) * c.vae_encode
    class_images = a.class_images * (a.class_steps * 2 * c.unet_fwd + c.vae_decode)
    attack = a.attack_steps * a.attack_batch * (c.unet_train + c.vae_encode / 5)
    per_victim_eval = a.conditions * a.eval_images * (a.sample_steps * 2 * c.unet_fwd + c.vae_decode + c.facenet)
    heldout = max(1, round(a.victims * a.heldout))
    evaluation = heldout * per_victim_eval
    fp32, bf16 = a.fp32_tflops * 1e12, a.bf16_tflops * 1e12
    tasks = [  # name, FLOPs, rate, how many run side by side on the cluster
        ("victim fine-tune (each, fp32)", finetune, fp32, 1),
        (f"zoo: {a.victims} fine-tunes + class images", a.victims * finetune + class_images, fp32, a.gpus),
        (f"attack ({a.attack_steps} steps x {a.attack_batch}, bf16)", attack, bf16, a.gpus),
        (f"evaluation ({heldout} victims, bf16)", evaluation, bf16, a.gpus),
    ]
    print(f"SD 1.4 at {a.resolution} px: UNet fwd {c.unet_fwd / 1e9:.0f} GFLOP, fwd+bwd {c.unet_train / 1e9:.0f} "
          f"GFLOP, activations kept for its backward {c.unet_saved / GB:.2f} GB fp32 per row; text encoder "
          f"fwd+bwd {c.text_train / 1e9:.0f} GFLOP; VAE encode {c.vae_encode / 1e9:.0f} / decode "
          f"{c.vae_decode / 1e9:.0f} GFLOP; facenet {c.facenet / 1e9:.1f} GFLOP; weights {c.weights_fp32 / GB:.2f} GB fp32")
    print(f"| task | PFLOP | H100-hours (1 GPU) | wall on {a.gpus} GPUs (h) |")
    print("| --- | ---: | ---: | ---: |")
    total = 0.0
    for name, f, rate, width in tasks:
        hours = f / rate / 3600
        if not name.startswith("victim"):
            total += hours
        print(f"| {name} | {f / 1e15:,.2f} | {hours:,.2f} | {hours / width:,.2f} |")
    print(f"| **study** | | **{total:,.1f}** | **{total / a.gpus:,.1f}** |")
    train_mem = c.weights_fp32 + rows_per_step * c.unet_saved
    attack_mem = c.weights_fp32 + a.attack_batch * c.unet_saved / 2  # autocast: fp32 weights, bf16 activations
    # Upper bound: on meta tensors SDPA runs its math form, whose attention probabilities autograd keeps
    # (at 512 px, 4096^2 per head in the first level); flash / memory-efficient SDPA on a GPU keeps none.
    print(f"peak memory per task, upper bound (weights + kept activations with math attention, before allocator "
          f"overhead and the optimiser's LoRA state): "
          f"fine-tune {train_mem / GB:.1f} GB fp32 (batch {a.batch} + {a.batch} class rows); attack "
          f"{attack_mem / GB:.1f} GB bf16 at batch {a.attack_batch}; sampling {c.weights_fp32 / GB:.1f} GB + a "
          "few hundred MB")


if __name__ == "__main__":
    main()
