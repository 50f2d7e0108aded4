"""K DreamBooth-LoRA fine-tunes at once on one frozen base: one UNet pass per step for all of them.

A zoo fine-tunes thousands of identities on the same base. One small fine-tune (batch 1 + 1 class
image) leaves a GPU mostly idle; K of them side by side fill it. Every targeted Linear of the UNet
becomes a `BatchedLoRALinear` whose factors are trainable parameters A (K, r, in) and B (K, out, r),
read with `grouped` rows: the batch is laid out fine-tune by fine-tune,

    rows = [instance 0..B-1, class 0..B-1] of fine-tune 0, then of fine-tune 1, ..., K-1: row k·R + c

(R rows each), so that each LoRA factor is one batched matmul over the K fine-tunes' rows

and each fine-tune is exactly `finetune_lora` run alone, up to float rounding:

  - initial factors: peft's own "gaussian" init under each fine-tune's seed (peft is called and
    its adapter taken out again, so θ_0 is the single path's θ_0 by construction);
  - data: each fine-tune has its own CPU generator seeded from its cfg.seed and draws batch order,
    flips, VAE samples, noise and timesteps in the single path's order, with its helpers;
  - loss: per fine-tune, instance MSE + prior_loss_weight · class MSE; the backward of their sum
    gives every fine-tune the gradient of its own loss (no op of the UNet mixes samples: GroupNorm
    and attention are per sample);
  - gradient clipping: each fine-tune's gradient norm is clipped to its own grad_clip;
  - AdamW: torch's update formulas applied per row with each fine-tune's lr, betas and weight decay.

The fine-tunes must agree on what shapes the batch (rank, targets, steps, batch size, prior
preservation, precision, device); they may differ in seed, trigger, prompts, alpha, lr, betas,
weight decay, grad clip, prior loss weight, flips, class images and snapshot steps. Training-time
defenses that are not `batchable` (DP-SGD, DPGM: defenses/training.py) are refused: they run one
fine-tune at a time in `finetune_lora`. Both run the same loop (`loop.run_finetunes`); this module
is the K-per-pass step (`_BatchedTrainer`).

Device options (`BatchedOptions`; they change speed and memory, not what is learned beyond float
rounding): bf16 autocast comes from the configs' `mixed_precision="bf16"`; SDPA attention
(diffusers' AttnProcessor2_0); `torch.compile` of the UNet; gradient checkpointing; channels-last
convolutions. `find_max_k` finds the largest K that fits the GPU's memory.
"""

from __future__ import annotations

import gc
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from torch import nn

from ..base.attention import ATTENTION_CHOICES, attention_processor
from ..config import to_dict
from ..defenses.training import NoDefense, training_defense_class
from ..errors import ConfigError, InputError, LoraleakError
from ..lora.batched import install_batched_lora
from .config import FinetuneConfig
from .data import Draw, encode_tokens, token_ids
from .loop import ADAPTER_NAME, AMP_DTYPES, FrozenBase, diffusion_inputs, run_finetunes
from .prior_prompts import PromptEmbeddings
from .record import FinetuneResult, LoraLayers

# What every fine-tune of one batch must share: it shapes the batch, the LoRA layout or the pass.
SHARED_FIELDS = ("rank", "targets", "steps", "batch_size", "prior_preservation", "train_text_encoder",
                 "mixed_precision", "device")
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, as the single path uses it
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coefficient = max_norm / (norm + 1e-6)


@dataclass(frozen=True)
class BatchedOptions:
    """How the K fine-tunes run on the device. None of these change what a LoRA learns (beyond rounding).

    attention: "sdpa" runs attention with diffusers' AttnProcessor2_0 (PyTorch's
        scaled_dot_product_attention: flash / memory-efficient kernels on GPU), "math" with
        AttnProcessor (baddbmm, softmax, bmm), "auto" picks math for bf16 on a CPU unless compiled, and
        sdpa otherwise (loraleak.base.attention says why). The UNet's own processors are put back afterwards.
    compile: `torch.compile` the UNet's forward (first steps are slow while it compiles; worth it
        for long fine-tunes on GPU). compile_mode: torch.compile's mode ("max-autotune", ...);
        compile_backend: its backend ("inductor"; "aot_eager" traces without generating kernels).
    gradient_checkpointing: recompute UNet block activations in the backward pass: less memory,
        so a larger K fits, for ~30% more compute.
    channels_last: NHWC convolutions (faster on tensor cores with bf16).
    loss_sync_every: read the losses back from the device every this many steps (each read makes
        the host wait for the device); also at every snapshot step and the last step. A diverged
        fine-tune is found at the next read, and named with the step where its loss first went bad.
    """

    attention: str = "auto"
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    loss_sync_every: int = 25

    def __post_init__(self) -> None:
        if self.loss_sync_every < 1:
            raise ValueError(f"loss_sync_every must be >= 1, got {self.loss_sync_every}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")

    def attention_processor(self, device: torch.device, amp_dtype: torch.dtype | None) -> Any:
        """The attention processor `attention` names for a step on `device` under autocast to `amp_dtype`."""
        return attention_processor(self.attention, device, amp_dtype, self.compile_backend if self.compile else None)


# ---------------------------------------------------------------------------------------------
# K LoRA factor sets as trainable parameters inside the UNet


def peft_initial_lora(unet: nn.Module, cfg: FinetuneConfig) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                      dict[str, Any]]:
    """θ_0 of cfg's fine-tune exactly as `finetune_lora` draws it: module -> (A: r x in, B: out x r), fp32,
    plus the LoraConfig that diffusers stores in the file's metadata. The UNet is left without adapters."""
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                        target_modules=list(cfg.targets))
    requires_grad = [(p, p.requires_grad) for p in unet.parameters()]  # peft freezes all but its adapter
    with torch.random.fork_rng(devices=[]):  # as _add_loras: peft initialises on the CPU
        torch.manual_seed(cfg.seed)
        try:
            unet.add_adapter(config)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise ConfigError(f"LoRA targets do not fit this base model: {e}") from None
    try:
        state_dict = get_peft_model_state_dict(unet)
        metadata = unet.peft_config[ADAPTER_NAME].to_dict()
        factors = {}
        for key, tensor in state_dict.items():
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                factors[module] = (tensor.detach().float().clone(),
                                   state_dict[f"{module}.lora_B.weight"].detach().float().clone())
    finally:
        unet.unload_lora()
        for p, flag in requires_grad:
            p.requires_grad_(flag)
    if any(a.ndim != 2 for a, _ in factors.values()):
        raise ConfigError(f"targets {list(cfg.targets)} include convolutions; batched fine-tuning adapts "
                          "Linear layers only (use finetune_lora)")
    return factors, metadata


class BatchedLoRAFactors:
    """K LoRAs of one layout as parameters A (K, r, in) and B (K, out, r) per UNet module."""

    def __init__(self, initial: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]], scales: Sequence[float],
                 device: torch.device) -> None:
        self.modules = list(initial[0])
        if any(list(f) != self.modules for f in initial):
            raise LoraleakError("the fine-tunes' LoRAs adapt different modules")
        self.downs = [nn.Parameter(torch.stack([f[m][0] for f in initial]).to(device)) for m in self.modules]
        self.ups = [nn.Parameter(torch.stack([f[m][1] for f in initial]).to(device)) for m in self.modules]
        self.scale = torch.tensor(list(scales), dtype=torch.float32, device=device)

    def __len__(self) -> int:
        return self.scale.shape[0]

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in zip(self.downs, self.ups) for p in pair]

    @contextmanager
    def installed(self, unet: nn.Module) -> Iterator[None]:
        """Within the block the UNet routes the batch's rows k·R..(k+1)·R - 1 (R = batch / K) through LoRA k
        (`grouped`, see _group), and trains these factors."""
        handle = install_batched_lora(unet, self.modules)  # also freezes the UNet's own weights
        wrappers = [unet.get_submodule(module) for module in self.modules]
        try:
            for wrapper, down, up in zip(wrappers, self.downs, self.ups):
                # Registered as the wrapper's parameters (not set_factors, which casts to the base's dtype:
                # a cast copy would neither train nor see the optimiser's updates); forward casts per call.
                wrapper.down, wrapper.up, wrapper.scale = down, up, self.scale
                wrapper.grouped = True
            yield
        finally:
            for wrapper in wrappers:  # a wrapper installed before (it stays) reads the default layout again
                wrapper.grouped = False
            handle.remove()

    def peft_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """LoRA k with the keys `get_peft_model_state_dict` gives, on the CPU."""
        state = {}
        for module, down, up in zip(self.modules, self.downs, self.ups):
            state[f"{module}.lora_A.weight"] = down[k].detach().cpu().contiguous()
            state[f"{module}.lora_B.weight"] = up[k].detach().cpu().contiguous()
        return state


class PerRowAdamW:
    """K independent AdamWs over stacked (K, ...) parameters: row k uses fine-tune k's lr, betas, weight decay.

    The formulas are torch.optim.AdamW's (decoupled weight decay, bias-corrected moments, eps added
    after the square root); one optimiser over the stack would force equal hyper-parameters.
    """

    def __init__(self, params: Sequence[nn.Parameter], lr: Sequence[float], betas: Sequence[tuple[float, float]],
                 weight_decay: Sequence[float]) -> None:
        self.params = list(params)
        device = self.params[0].device

        def column(values: Sequence[float]) -> torch.Tensor:  # float64: bias corrections as torch computes them
            return torch.tensor(list(values), dtype=torch.float64, device=device)

        self.lr, self.weight_decay = column(lr), column(weight_decay)
        self.beta1, self.beta2 = column([b[0] for b in betas]), column([b[1] for b in betas])
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        decay = (1 - self.lr * self.weight_decay).float()
        step_size = (self.lr / (1 - self.beta1 ** self.steps)).float()
        bias_correction2_sqrt = (1 - self.beta2 ** self.steps).sqrt().float()
        beta1, beta2 = self.beta1.float(), self.beta2.float()
        for p, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            view = (-1,) + (1,) * (p.ndim - 1)
            grad = p.grad
            p.mul_(decay.view(view))
            exp_avg.lerp_(grad, (1 - beta1).view(view))
            exp_avg_sq.mul_(beta2.view(view)).add_(grad * grad * (1 - beta2).view(view))
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt.view(view)).add_(ADAM_EPS)
            p.sub_(step_size.view(view) * exp_avg / denom)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


@torch.no_grad()
def clip_grad_norm_per_row_(params: Sequence[nn.Parameter], max_norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ for each row k of stacked (K, ...) parameters separately; returns the K norms."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.stack([g.float().pow(2).sum(dim=tuple(range(1, g.ndim))) for g in grads]).sum(dim=0)
    norms = squares.sqrt()
    coef = (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view((-1,) + (1,) * (g.ndim - 1)).to(g.dtype))
    return norms


# ---------------------------------------------------------------------------------------------
# The UNet prepared for the run, and one training step


@contextmanager
def _device_setup(unet: nn.Module, options: BatchedOptions, cfg: FinetuneConfig) -> Iterator[Callable[..., Any]]:
    """Apply the options to the UNet for cfg's fine-tunes in the block; yields the forward to call (compiled or not)."""
    processors = unet.attn_processors
    was_checkpointing = unet.is_gradient_checkpointing
    try:
        unet.set_attn_processor(options.attention_processor(torch.device(cfg.device), AMP_DTYPES[cfg.mixed_precision]))
        if options.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if options.channels_last:
            unet.to(memory_format=torch.channels_last)
        yield torch.compile(unet, mode=options.compile_mode, backend=options.compile_backend) if options.compile \
            else unet
    finally:
        if options.channels_last:
            unet.to(memory_format=torch.contiguous_format)
        if options.gradient_checkpointing and not was_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.set_attn_processor(processors)


class _BatchedStep:
    """One optimisation step of all K fine-tunes: forward, per-fine-tune losses, backward, clip, AdamW."""

    def __init__(self, forward: Callable[..., Any], factors: BatchedLoRAFactors, cfgs: Sequence[FinetuneConfig],
                 device: torch.device) -> None:
        self.forward, self.factors, self.device = forward, factors, device
        self.batch_size = cfgs[0].batch_size
        self.prior = cfgs[0].prior_preservation
        self.amp_dtype = AMP_DTYPES[cfgs[0].mixed_precision]
        self.prior_weight = torch.tensor([c.prior_loss_weight for c in cfgs], device=device)
        self.max_norm = torch.tensor([c.grad_clip for c in cfgs], device=device)
        self.optimizer = PerRowAdamW(factors.parameters(), [c.lr for c in cfgs], [c.adam_betas for c in cfgs],
                                     [c.weight_decay for c in cfgs])

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
        """Inputs in batch layout (row k·R + c, see _group); returns the K total losses (on the device, detached)."""
        k = len(self.factors)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            pred = self.forward(noisy, timesteps, hidden, return_dict=False)[0]
        # Per-sample MSE, then per fine-tune: equal counts per sample, so this is F.mse_loss's mean.
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1).view(k, -1)
        b = self.batch_size
        losses = per_sample[:, :b].mean(dim=1)
        if self.prior:
            losses = losses + self.prior_weight * per_sample[:, b:].mean(dim=1)
        losses.sum().backward()
        clip_grad_norm_per_row_(self.factors.parameters(), self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return losses.detach()


def _group(per_finetune: Sequence[torch.Tensor]) -> torch.Tensor:
    """K tensors (R rows, ...) -> one (K·R, ...) with row c of fine-tune k at k·R + c: the `grouped` layout."""
    return torch.cat(list(per_finetune))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned memory copies without making the host wait for the device
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------------------------------------
# The K fine-tunes' step, as the loop calls it


class _PromptRows:
    """The prompt embeddings of each step's rows, in batch layout: each fine-tune's instance prompt,
    then its class rows' prior prompts (prior_prompts.py). With the paper's prior (no wrong triggers)
    every step has the same rows, built once."""

    def __init__(self, pipe: Any, cfgs: Sequence[FinetuneConfig]) -> None:
        self.batch_size = cfgs[0].batch_size
        self.embeddings = [PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, cfg, token_ids, encode_tokens)
                           for cfg in cfgs]
        varies = any(cfg.prior_negative_triggers for cfg in cfgs)  # wrong triggers imply prior preservation
        self.fixed = None if varies else self._rows(step=1)

    def _rows(self, step: int) -> torch.Tensor:
        return _group([e.step_rows(step, self.batch_size) for e in self.embeddings])

    def at(self, step: int) -> torch.Tensor:
        return self.fixed if self.fixed is not None else self._rows(step)


class _BatchedTrainer:
    """K fine-tunes through `BatchedLoRALinear` layers in one UNet pass: the step `loop.run_finetunes` calls."""

    cpu_banks = True  # K fine-tunes' latents move to the device in one copy per step

    def __init__(self, pipe: Any, cfgs: Sequence[FinetuneConfig], defenses: Sequence[NoDefense],
                 options: BatchedOptions) -> None:
        self.pipe, self.cfgs, self.options = pipe, cfgs, options
        self.device = torch.device(cfgs[0].device)

    @contextmanager
    def installed(self) -> Iterator["_BatchedTrainer"]:
        """θ_0 of every fine-tune drawn by peft, stacked and installed; the options applied; training mode."""
        pipe, cfgs = self.pipe, self.cfgs
        self.prompt_rows = _PromptRows(pipe, cfgs)
        initial, self.metadata = zip(*(peft_initial_lora(pipe.unet, cfg) for cfg in cfgs))
        self.factors = BatchedLoRAFactors(initial, [cfg.alpha / cfg.rank for cfg in cfgs], self.device)
        self.trainable_parameters = sum(p[0].numel() for p in self.factors.parameters())
        with self.factors.installed(pipe.unet), _device_setup(pipe.unet, self.options, cfgs[0]) as forward:
            self.train_step = _BatchedStep(forward, self.factors, cfgs, self.device)
            pipe.unet.train()
            yield self

    def step(self, step: int, draws: list[Draw], noise_scheduler: Any) -> torch.Tensor:
        latents, noise, timesteps = (_to_device(_group(part), self.device) for part in zip(*(d[:3] for d in draws)))
        noisy, target = diffusion_inputs(noise_scheduler, latents, noise, timesteps)
        return self.train_step(noisy, timesteps, self.prompt_rows.at(step), target)

    def lora(self, k: int) -> LoraLayers:
        return LoraLayers(unet=self.factors.peft_state_dict(k), unet_metadata=self.metadata[k])


# ---------------------------------------------------------------------------------------------
# Checks


def check_batchable(cfgs: Sequence[FinetuneConfig]) -> None:
    """ConfigError unless the fine-tunes agree on everything that shapes the shared batch."""
    if not cfgs:
        raise InputError("no fine-tunes to batch")
    first = cfgs[0]
    for name in SHARED_FIELDS:
        for i, cfg in enumerate(cfgs[1:], start=1):
            if getattr(cfg, name) != getattr(first, name):
                raise ConfigError(f"batched fine-tunes must agree on {name}: fine-tune 0 has {getattr(first, name)!r}, "
                                  f"fine-tune {i} has {getattr(cfg, name)!r}")
    if first.train_text_encoder:
        raise ConfigError("batched fine-tuning trains the UNet LoRA only; use finetune_lora for "
                          "train_text_encoder=True")
    # DP-SGD clips per record and draws its own batches, DPGM changes the loss: one by one instead.
    defended = next((cfg.defense.kind for cfg in cfgs if not training_defense_class(cfg.defense.kind).batchable),
                    None)
    if defended:
        raise ConfigError(f"batched fine-tuning runs undefended fine-tunes only; a {defended!r} fine-tune runs "
                          "alone in finetune_lora (a zoo routes it there)")
    if first.mixed_precision == "fp16":
        raise ConfigError("batched fine-tuning supports mixed_precision 'no' or 'bf16' (fp16 needs a loss "
                          "scaler per fine-tune); use 'bf16'")


# ---------------------------------------------------------------------------------------------
# The batched fine-tune


def finetune_lora_batched(pipe: Any, image_sets: Sequence[list[Image.Image]], cfgs: Sequence[FinetuneConfig],
                          out_dirs: Sequence[str | Path], *, options: BatchedOptions = BatchedOptions(),
                          base_ref: str | None = None, base_fingerprint: str | None = None,
                          class_images: Sequence[list[Image.Image] | None] | None = None,
                          return_exceptions: bool = False, show_progress: bool = True,
                          on_step: Callable[[int], None] | None = None) -> list[FinetuneResult | LoraleakError]:
    """Fine-tune K = len(cfgs) LoRAs at once: image_sets[k] with cfgs[k] into out_dirs[k] (`on_step(step)`
    after each step of the pass: loop.run_finetunes).

    Each out_dir gets what `finetune_lora` would write there (snapshots, finetune.json) and each
    result equals its result up to float rounding. `class_images[k]` are fine-tune k's prior-
    preservation images (pass the same list to share them; None: load or sample per cfg).
    A fine-tune whose loss becomes non-finite raises LoraleakError, or, with return_exceptions,
    becomes that error in its slot of the result while the others carry on (no finetune.json for it).
    """
    k_count = len(cfgs)
    if len(image_sets) != k_count or len(out_dirs) != k_count:
        raise InputError(f"got {len(image_sets)} image sets, {k_count} configs and {len(out_dirs)} output "
                         "directories; one of each per fine-tune")
    check_batchable(cfgs)
    for k, images in enumerate(image_sets):
        if not images:
            raise InputError(f"fine-tune {k} has no instance images")
    out_dirs = [Path(d) for d in out_dirs]
    if len({d.resolve() for d in out_dirs}) != k_count:
        raise InputError("every fine-tune of a batch needs its own output directory")
    if class_images is not None and len(class_images) != k_count:
        raise InputError(f"got {len(class_images)} class image lists for {k_count} fine-tunes")
    return run_finetunes(pipe, image_sets, cfgs, out_dirs, _BatchedTrainer, options=options,
                         sync_every=options.loss_sync_every, base_ref=base_ref, base_fingerprint=base_fingerprint,
                         class_images=class_images, return_exceptions=return_exceptions,
                         show_progress=show_progress, description=f"fine-tune x{k_count}",
                         batched_options=to_dict(options), on_step=on_step)


# ---------------------------------------------------------------------------------------------
# How many fine-tunes fit


def probe_step(pipe: Any, cfg: FinetuneConfig, k: int, options: BatchedOptions, steps: int = 2) -> None:
    """`steps` training steps of K copies of cfg's fine-tune on random data of the real shapes, optimiser
    state included: what `find_max_k` measures memory with, and what a FLOP count can run under."""
    device = torch.device(cfg.device)
    rows = cfg.batch_size * (2 if cfg.prior_preservation else 1)
    latent_shape = (rows * k, pipe.unet.config.in_channels, pipe.unet.config.sample_size,
                    pipe.unet.config.sample_size)
    hidden = torch.zeros(rows * k, int(pipe.tokenizer.model_max_length), pipe.unet.config.cross_attention_dim,
                         device=device)
    cfgs = [cfg] * k
    with ExitStack() as stack:
        stack.enter_context(FrozenBase(pipe))
        initial, _ = peft_initial_lora(pipe.unet, cfg)
        factors = BatchedLoRAFactors([initial] * k, [cfg.alpha / cfg.rank] * k, device)
        stack.enter_context(factors.installed(pipe.unet))
        forward = stack.enter_context(_device_setup(pipe.unet, options, cfg))
        train_step = _BatchedStep(forward, factors, cfgs, device)
        for _ in range(steps):
            latents = torch.randn(latent_shape, device=device)
            timesteps = torch.randint(0, 1000, (latent_shape[0],), device=device)
            train_step(latents, timesteps, hidden, torch.randn_like(latents)).cpu()


def find_max_k(pipe: Any, cfg: FinetuneConfig, device: str | torch.device | None = None, *,
               options: BatchedOptions = BatchedOptions(), cpu_k: int = 8, limit: int = 1024) -> int:
    """The largest K whose batched fine-tune step fits the GPU's memory (at most `limit`).

    Doubles K until a probe step raises torch.cuda.OutOfMemoryError, then bisects. The probe runs
    uncompiled (compiled steps need no more memory, usually less); leave a little margin for the
    allocator's fragmentation in a long run. On a CPU there is nothing to probe: returns `cpu_k`.
    """
    device = torch.device(device if device is not None else cfg.device)
    if device.type != "cuda":
        return cpu_k
    cfg = replace(cfg, device=str(device))
    probe_options = replace(options, compile=False)
    pipe.to(device)

    def fits(k: int) -> bool:
        try:
            probe_step(pipe, cfg, k, probe_options)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    if not fits(1):
        raise LoraleakError(f"not even one fine-tune fits on {device} (rank {cfg.rank}, batch {cfg.batch_size}); "
                            "try gradient_checkpointing or mixed_precision='bf16'")
    return largest_fitting(fits, limit)


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest k in [1, limit] with fits(k), for a fits that is monotone and true at 1: doubling, then bisection."""
    good, bad = 1, None
    while bad is None and good < limit:
        trial = min(2 * good, limit)
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good
