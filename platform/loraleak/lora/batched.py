"""Many LoRAs in one UNet pass: each sample of a batch goes through its own victim's LoRA.

All LoRAs of a zoo share one frozen base. Instead of swapping adapters per sample (a Python loop
of `load_lora_weights` / `set_adapters`), every targeted Linear of the UNet is replaced by a
`BatchedLoRALinear` that computes, for sample i of the batch,

    y_i = x_i W0ᵀ + b + scale_i · ((x_i A_iᵀ) B_iᵀ)

with per-sample factors A_i (r x in), B_i (out x r) as two batched matmuls. A batch may hold the
N LoRAs k times over (classifier-free guidance duplicates the batch; several images per LoRA):
sample j then uses LoRA j mod N, the order `torch.cat([x] * k)` / `z.repeat(k, 1, 1)` produce.
A wrapper whose `grouped` is set reads the batch LoRA by LoRA instead (sample j uses LoRA
j // (batch / N)): the batched fine-tune lays its rows out so, because then each factor is one
batched matmul over (N, rows·tokens, in) without copying the inputs (about a third less time in
the LoRA layers, forward and backward, at the quick profile's sizes on a CPU).
LoRAs of different ranks share a pass by zero-padding their factors to the largest rank (the
padded rows/columns add exactly zero).

    factors = stack_lora_factors([sd_1, ..., sd_N])                 # module -> (A: N,r,in; B: N,out,r)
    with batched_lora(unet, factors, scale=[lora_scale(md) for md in metadatas]):
        eps = unet(latents, t, z).sample
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, LoraleakError
from .io import adapter_metadata, lora_factors, module_order_key

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A: N,r,in; B: N,out,r)
Scale = float | Sequence[float] | torch.Tensor


def lora_scale(metadata: Mapping[str, str] | None, alpha: float | None = None, rank: int | None = None) -> float:
    """alpha / rank of a diffusers-format LoRA (alpha / √rank for rsLoRA), as `load_lora_weights` applies it.

    diffusers stores the PEFT LoraConfig in the file's metadata (`unet.lora_alpha`, `unet.r`); a file
    without it needs `alpha` (and `rank`) from the caller — diffusers would silently assume alpha = rank.
    """
    stored = adapter_metadata(dict(metadata or {}))
    if stored.get("unet.rank_pattern") or stored.get("unet.alpha_pattern"):
        raise InputError("LoRA with per-module rank/alpha patterns: one scale per LoRA is not enough")
    alpha = alpha if alpha is not None else stored.get("unet.lora_alpha")
    rank = rank if rank is not None else stored.get("unet.r")
    if alpha is None or rank is None:
        raise InputError("the LoRA file does not record its alpha and rank (no diffusers adapter metadata); "
                         "pass them explicitly")
    return float(alpha) / (math.sqrt(rank) if stored.get("unet.use_rslora") else float(rank))


def stack_lora_factors(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Stack the UNet factors of N LoRAs (same modules) per module: A (N, r, in), B (N, out, r).

    Ranks may differ between LoRAs: factors are zero-padded to the largest rank.
    """
    if not state_dicts:
        raise InputError("no LoRAs to stack")
    per_lora = [lora_factors(dict(sd), "unet") for sd in state_dicts]
    modules = sorted(per_lora[0], key=module_order_key)
    if not modules:
        raise InputError("the LoRA holds no UNet LoRA matrices")
    for i, factors in enumerate(per_lora[1:], start=1):
        if set(factors) != set(modules):
            odd = sorted(set(factors) ^ set(modules))[0]
            raise InputError(f"LoRA {i} of the batch adapts other modules than LoRA 0 (e.g. {odd!r})")
    stacked = {}
    for module in modules:
        downs, ups = zip(*(factors[module] for factors in per_lora))
        if any(d.ndim != 2 for d in downs):
            raise InputError(f"LoRA module {module!r} is not a Linear LoRA; batched decoding supports Linear only")
        rank = max(d.shape[0] for d in downs)
        stacked[module] = (
            torch.stack([F.pad(d.float(), (0, 0, 0, rank - d.shape[0])) for d in downs]),
            torch.stack([F.pad(u.float(), (0, rank - u.shape[1])) for u in ups]),
        )
    return stacked


class BatchedLoRALinear(nn.Module):
    """A frozen nn.Linear plus, while factors are set, a per-sample LoRA update."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.down: torch.Tensor | None = None  # (N, r, in)
        self.up: torch.Tensor | None = None  # (N, out, r)
        self.scale: torch.Tensor | None = None  # (N,)
        self.grouped = False  # False: sample j uses LoRA j mod N; True: LoRA j // (batch / N)

    # Attention processors read `attn.to_q.weight.dtype`; look like the Linear this replaces.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_factors(self, down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> None:
        n = down.shape[0]
        if down.ndim != 3 or up.ndim != 3 or up.shape[0] != n or down.shape[2] != self.in_features \
                or up.shape[1] != self.out_features or up.shape[2] != down.shape[1]:
            raise InputError(f"LoRA factors {tuple(down.shape)} / {tuple(up.shape)} do not fit a Linear "
                             f"with in={self.in_features}, out={self.out_features}")
        weight = self.base.weight
        self.down, self.up = down.to(weight.device, weight.dtype), up.to(weight.device, weight.dtype)
        self.scale = scale.to(weight.device, weight.dtype)

    def clear_factors(self) -> None:
        self.down = self.up = self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.down is None:
            return out
        n = self.down.shape[0]
        if x.shape[0] % n:
            raise LoraleakError(f"a batch of {x.shape[0]} samples cannot be split over {n} LoRAs")
        if self.grouped:
            # (N, rows·tokens, in): LoRA i's rows are contiguous; the scale goes on the small rank-r product.
            xs = x.reshape(n, -1, x.shape[-1])
            hidden = (xs @ self.down.to(x.dtype).transpose(1, 2)) * self.scale.to(x.dtype).view(n, 1, 1)
            return torch.baddbmm(out.reshape(n, -1, out.shape[-1]), hidden,
                                 self.up.to(x.dtype).transpose(1, 2)).reshape(out.shape)
        # (k, N, tokens, in): sample j = copy j // N of LoRA j % N.
        xs = x.reshape(x.shape[0] // n, n, -1, x.shape[-1])
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        delta = (xs @ down.transpose(1, 2)) @ up.transpose(1, 2)
        return out + (delta * self.scale.to(x.dtype).view(1, n, 1, 1)).reshape(out.shape)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@dataclass
class BatchedLoraHandle:
    """What `install_batched_lora` changed, so that `remove()` can put it back."""

    unet: nn.Module
    wrapped: list[str]
    requires_grad: list[tuple[nn.Parameter, bool]]  # the UNet's flags before it was frozen

    def remove(self) -> None:
        for path in self.wrapped:
            wrapper = self.unet.get_submodule(path)
            wrapper.clear_factors()
            _set_submodule(self.unet, path, wrapper.base)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        self.wrapped, self.requires_grad = [], []


def install_batched_lora(unet: nn.Module, modules: Iterable[str]) -> BatchedLoraHandle:
    """Replace the Linear modules at `modules` by BatchedLoRALinear (those already replaced stay).

    The UNet is frozen while wrappers are installed: decoding through a victim trains only what
    feeds it (z, or factors passed with requires_grad), never the base. Keep the wrappers for a
    whole training run by calling this once; `batched_lora` installs them per call otherwise.
    """
    todo = []
    for path in modules:
        try:
            module = unet.get_submodule(path)
        except AttributeError:
            raise InputError(f"the UNet has no module {path!r}: the LoRA was made for another base") from None
        if isinstance(module, BatchedLoRALinear):
            continue
        if type(module) is not nn.Linear:
            raise InputError(f"UNet module {path!r} is a {type(module).__name__}, not a plain Linear "
                             "(a loaded PEFT adapter? unload it first)")
        todo.append((path, module))
    flags = []
    if todo:
        flags = [(p, p.requires_grad) for p in unet.parameters()]
        unet.requires_grad_(False)
        for path, module in todo:
            _set_submodule(unet, path, BatchedLoRALinear(module))
    return BatchedLoraHandle(unet, [path for path, _ in todo], flags)


def _scale_tensor(scale: Scale, n: int) -> torch.Tensor:
    values = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if values.numel() == 1:
        return values.expand(n).clone()
    if values.numel() != n:
        raise InputError(f"got {values.numel()} LoRA scales for {n} LoRAs")
    return values


@contextmanager
def batched_lora(unet: nn.Module, factors: Factors, scale: Scale) -> Iterator[nn.Module]:
    """Within the block, `unet` applies LoRA i of `factors` (module -> (A: N,r,in; B: N,out,r)) to
    sample i (mod N) of each batch, with `scale` (one float, or one per LoRA: alpha / rank)."""
    if not factors:
        raise InputError("no LoRA factors given")
    counts = {down.shape[0] for down, _ in factors.values()} | {up.shape[0] for _, up in factors.values()}
    if len(counts) != 1:
        raise InputError(f"LoRA factors hold different numbers of LoRAs per module: {sorted(counts)}")
    scales = _scale_tensor(scale, counts.pop())
    handle = install_batched_lora(unet, factors)
    wrappers = {path: unet.get_submodule(path) for path in factors}
    try:
        for path, (down, up) in factors.items():
            wrappers[path].set_factors(down, up, scales)
        yield unet
    finally:
        for wrapper in wrappers.values():
            wrapper.clear_factors()
        handle.remove()


@dataclass
class LossTerms:
    total: torch.Tensor  # what to backpropagate
    epsilon: torch.Tensor  # MSE of the victim UNet's prediction (ε or v) conditioned on z
    kl: torch.Tensor | None
    embedding_mse: torch.Tensor | None

    def as_floats(self) -> dict[str, float]:
        terms = {"loss": self.total, "epsilon_mse": self.epsilon, "kl": self.kl, "embedding_mse": self.embedding_mse}
        return {name: float(value.detach()) for name, value in terms.items() if value is not None}


def epsilon_loss(unet: nn.Module, scheduler: Any, latents: torch.Tensor, z: torch.Tensor, factors: Factors,
                 scale: Scale, generator: torch.Generator | None = None, *, kl: torch.Tensor | None = None,
                 kl_weight: float = 0.0, target_embeds: torch.Tensor | None = None,
                 embedding_mse_weight: float = 0.0) -> LossTerms:
    """The attack's training loss: decode z through each sample's own victim UNet.

    `latents` (k·N, C, h, w) are scaled VAE latents of the victims' images (image j belongs to LoRA
    j mod N), `z` (N, P, D) the encoder's output, `scheduler` a training noise scheduler (DDPM, with
    `add_noise`). Noise and diffusion timesteps are drawn from `generator` (on its device). Adds
    kl_weight · KL and embedding_mse_weight · MSE(z, target_embeds) (the true prompt embeddings).
    """
    n = z.shape[0]
    if latents.shape[0] % n:
        raise InputError(f"{latents.shape[0]} latents cannot be split over {n} LoRAs")
    copies = latents.shape[0] // n
    rng_device = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=rng_device).to(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=rng_device).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise LoraleakError(f"cannot train against a UNet that predicts {prediction_type!r} (only epsilon or v)")
    with batched_lora(unet, factors, scale):
        pred = unet(noisy, timesteps, z.repeat(copies, 1, 1), return_dict=False)[0]
    epsilon = F.mse_loss(pred.float(), target.float())
    total = epsilon
    if kl_weight:
        if kl is None:
            raise LoraleakError("kl_weight > 0 needs the encoder's KL term")
        total = total + kl_weight * kl
    embedding_mse = None
    if target_embeds is not None:
        embedding_mse = F.mse_loss(z.float(), target_embeds.to(z.device, torch.float32))
        if embedding_mse_weight:
            total = total + embedding_mse_weight * embedding_mse
    elif embedding_mse_weight:
        raise LoraleakError("embedding_mse_weight > 0 needs the true prompt embeddings (target_embeds)")
    return LossTerms(total, epsilon, kl, embedding_mse)
