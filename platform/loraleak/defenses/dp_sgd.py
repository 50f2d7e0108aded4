"""DP-SGD on the LoRA parameters of a fine-tune: a small privacy engine in the manner of Opacus.

    engine = LoraPrivacyEngine.for_defense(defense, num_images=5, batch_size=1, steps=1000, noise_seed=s)
    with engine.attach(unet, optimizer):        # per-sample gradient hooks on the LoRA layers
        for step in range(steps):
            rows = engine.private_rows(next_shuffled_rows, num_images, generator)
            row_losses = ...                     # one loss per row: [private rows..., public rows...]
            engine.backward(row_losses, private_rows=len(rows), public_weight=w / class_rows)
            engine.step(batch_clip=cfg.grad_clip)
    engine.epsilon_spent()                       # what the steps taken cost, by the RDP accountant

One step:
 1. Per-sample gradients of every LoRA parameter for every row of the batch, from Opacus'
    `GradSampleHooks`: forward/backward hooks on the trainable modules only, which in a peft-LoRA
    UNet are the `lora_A` / `lora_B` nn.Linear layers (the frozen base gets none). Their input is
    batch-first whatever attention processor diffusers runs, so the hooks fit; on the tiny base they
    match a per-row backward to 1e-5 relative error (tests/test_dp.py). Opacus' functorch mode
    (`force_functorch=True`) gives the same gradients, slower: benchmarks/dp_step_cost.py.
 2. Record gradients: unit "image" — one per private photo row; unit "user" — the sum over the
    person's rows of their share of the instance loss (a mean over the rows), i.e. the gradient of
    the person's whole instance loss: one record.
 3. Opacus' `DPOptimizer` clips each record gradient to `max_grad_norm` C (one norm over all LoRA
    parameters), sums them, adds N(0, σ²C²) to every coordinate and divides by the expected number
    of records per batch (batch_size photos, or 1 person).
 4. The public gradient is added unclipped and without noise: prior-preservation class images are
    sampled from the public base with the public prompt "A human face."; they are nobody's record,
    and any function of public data and the privatised gradient is post-processing, which spends no
    ε. They still share the UNet pass with the private rows (their per-sample gradients are summed).
 5. Then the plain recipe: the batch gradient-norm clip (cfg.grad_clip; post-processing again) and
    AdamW. With σ = 0 and a clip C above every record's norm the step is the plain fine-tune's step.

Sampling (`DefenseConfig.sampling`):
 - "poisson" (default): what the RDP accountant assumes, so the recorded ε is exact. Unit "image":
   each photo joins a step's batch independently with probability q = batch_size / photos (the
   batch size varies, and may be 0: the step is then noise plus the public gradient). Unit "user":
   the person's record joins with probability q = 1 / 1 (a single-person fine-tune has one record),
   i.e. every step, with the next batch_size photos of the shuffled order (which photos of a record
   a step uses does not matter to a record-level guarantee).
 - "shuffle": the plain recipe's fixed-size batches from a shuffled order (the same batches as the
   fine-tune without DP). For unit "image" the recorded ε is then the usual approximation (computed
   as if Poisson at q); for unit "user" with q = 1 the two coincide.

What ε means (see dp_accounting.py): unit "image" — two sets of photos that differ in one photo give
LoRAs whose distributions differ by at most e^ε (plus δ); it hides which photos were used, not who
is in them (every photo shows the same face). Unit "user" — the whole identity is one record: ε
bounds how distinguishable the shared LoRA is from one trained without this person, which protects
the identity, and is exactly what the owner's utility (the LoRA renders this person) needs to break.

Noise is drawn on the CPU from a generator seeded by `noise_seed` (the fine-tune derives it from its
seed), so one config gives the same LoRA on any device and a zoo rebuilt from its config is the same
zoo. That suits measuring an attack that never sees the seed; a real release should draw its noise
from an unknown seed (`noise_seed=None`: from os.urandom) — the guarantee assumes the noise is secret.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ConfigError, LoraleakError
from . import DefenseConfig, Sampling
from .dp_accounting import DPPlan, epsilon_spent

MECHANISM = ("DP-SGD on the LoRA parameters: Opacus GradSampleHooks per-sample gradients, per-record clipping "
             "and Gaussian noise (Opacus DPOptimizer), RDP accountant")
PUBLIC_ROWS = ("prior-preservation class images (sampled from the public base with the public class prompt): "
               "public, not clipped, no noise")
UNIT_MEANING = {
    "image": ("a record is one private photo: e^epsilon bounds how much adding, removing or changing one photo "
              "changes the distribution of the shared LoRA. It hides which photos were used, not the person "
              "in them (all photos show the same face)."),
    "user": ("a record is the person's whole photo set: e^epsilon bounds how much training on this person "
             "at all changes the distribution of the shared LoRA. It protects the identity, which is the "
             "same thing the owner's utility needs."),
}
# Opacus' full backward hooks on lora_A, whose input (a frozen activation) needs no gradient.
_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"


def _dp_optimizer_class():
    from opacus.optimizers import DPOptimizer  # opacus: optional (the `dp` extra), only a DP fine-tune needs it

    class CpuNoiseDPOptimizer(DPOptimizer):
        """Opacus' DPOptimizer with its noise drawn on the CPU from our seeded generator, then moved:
        the same seed gives the same noise on any device (the recipe's promise for everything else)."""

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                noise = torch.normal(0.0, std, tuple(p.summed_grad.shape), generator=self.generator) \
                    if std > 0 else torch.zeros(p.summed_grad.shape)
                p.grad = (p.summed_grad + noise.to(p.summed_grad)).view_as(p)

    return CpuNoiseDPOptimizer


class LoraPrivacyEngine:
    """Makes a LoRA fine-tune differentially private on its trainable (LoRA) parameters only."""

    def __init__(self, plan: DPPlan, *, sampling: Sampling = "poisson", noise_seed: int | None = None,
                 force_functorch: bool = False) -> None:
        if sampling not in ("poisson", "shuffle"):
            raise ConfigError(f"sampling must be 'poisson' or 'shuffle', got {sampling!r}")
        self.plan, self.sampling, self.force_functorch = plan, sampling, force_functorch
        seed = noise_seed if noise_seed is not None else int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
        self.noise_generator = torch.Generator("cpu").manual_seed(seed)
        self.steps_taken = 0
        self._params: list[nn.Parameter] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._dp_optimizer: Any = None
        self._public: list[torch.Tensor | None] = []

    @classmethod
    def for_defense(cls, defense: DefenseConfig, *, num_images: int, batch_size: int, steps: int,
                    noise_seed: int | None, force_functorch: bool = False) -> "LoraPrivacyEngine":
        """The engine of a dp_sgd defense for a single-person fine-tune on `num_images` photos."""
        if defense.kind != "dp_sgd":
            raise ConfigError(f"LoraPrivacyEngine runs a 'dp_sgd' defense, not {defense.kind!r}")
        records, per_batch = (num_images, batch_size) if defense.accounting == "image" else (1, 1)
        if defense.accounting == "image" and batch_size > num_images:
            raise ConfigError(f"dp_sgd with per-image accounting needs batch_size <= the number of photos "
                              f"(sample rate batch/photos <= 1), got batch_size={batch_size} for {num_images} photos")
        plan = DPPlan.for_defense(defense, records=records, batch_size=per_batch, steps=steps)
        return cls(plan, sampling=defense.sampling or "poisson", noise_seed=noise_seed,
                   force_functorch=force_functorch)

    # --- attaching to a model -------------------------------------------------------------------

    @contextmanager
    def attach(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator["LoraPrivacyEngine"]:
        """Per-sample gradient hooks on `module`'s trainable layers, and Opacus' clip-and-noise around
        `optimizer`, for the duration of the block; the module is left as it was (no hooks, no attributes)."""
        from opacus.grad_sample import GradSampleHooks  # opacus: optional (the `dp` extra)

        params = [p for group in optimizer.param_groups for p in group["params"]]
        trainable = [p for p in module.parameters() if p.requires_grad]
        if {id(p) for p in params} != {id(p) for p in trainable}:
            raise LoraleakError("the optimizer must hold exactly the module's trainable parameters (the LoRA, "
                                "with the base frozen): other parameters would get no per-sample gradient")
        if self._optimizer is not None:
            raise LoraleakError("this privacy engine is already attached")
        hooks = GradSampleHooks(module, batch_first=True, loss_reduction="sum", strict=True,
                                force_functorch=self.force_functorch)
        try:
            self._dp_optimizer = _dp_optimizer_class()(
                optimizer, noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.plan.max_grad_norm,
                expected_batch_size=self.plan.batch_size, loss_reduction="mean", generator=self.noise_generator)
            self._params, self._optimizer = params, optimizer
            yield self
        finally:
            hooks.cleanup()  # removes the hooks and grad_sample & co. from the parameters
            for p in params:
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
            for m in module.modules():  # activations of a forward that never went backward
                if hasattr(m, "activations"):
                    del m.activations
            self._params, self._optimizer, self._dp_optimizer, self._public = [], None, None, []

    # --- one step --------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> float:
        return self.plan.sample_rate

    def private_rows(self, shuffled: list[int], num_images: int, generator: torch.Generator) -> list[int]:
        """The photos of this step's private batch. `shuffled`: the plain recipe's next batch_size
        photos (used by "shuffle", and by unit "user" for the rows of a record that joins)."""
        if self.sampling == "shuffle":
            return list(shuffled)
        q = self.plan.sample_rate
        if self.plan.unit == "image":
            joins = torch.rand(num_images, generator=generator) < q
            return [i for i in range(num_images) if joins[i]]
        if q >= 1.0:  # the single person's record is in every step: nothing to draw
            return list(shuffled)
        return list(shuffled) if torch.rand((), generator=generator).item() < q else []

    def backward(self, row_losses: torch.Tensor, private_rows: int, public_weight: float) -> None:
        """Backpropagate one batch and keep its per-record and public gradients for `step`.

        `row_losses[i]` is row i's own loss (e.g. its mean squared error); rows [:private_rows] are the
        records' photos, the rest public rows, each weighted `public_weight` (prior_loss_weight / rows).
        """
        if self._optimizer is None:
            raise LoraleakError("attach the privacy engine to a model before its backward")
        rows = row_losses.shape[0] if row_losses.ndim else 0
        if not 0 <= private_rows <= rows:
            raise LoraleakError(f"private_rows={private_rows} for a batch of {rows} rows")
        if rows:
            weights = torch.full((rows,), float(public_weight), device=row_losses.device)
            if private_rows:
                weights[:private_rows] = 1.0 if self.plan.unit == "image" else 1.0 / private_rows
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_HOOK_WARNING)
                (row_losses * weights).sum().backward()
        self._public = []
        for p in self._params:
            samples = getattr(p, "grad_sample", None)
            if samples is None:  # no rows, or a parameter the pass did not reach
                samples = torch.zeros((rows, *p.shape), device=p.device, dtype=p.dtype)
            private = samples[:private_rows]
            if self.plan.unit == "user" and private_rows:
                private = private.sum(0, keepdim=True)  # the person's whole gradient: one record
            self._public.append(samples[private_rows:].sum(0) if rows > private_rows else None)
            p.grad_sample = private

    def step(self, batch_clip: float | None = None) -> None:
        """Clip each record, add noise, add the public gradient, clip the batch, step the optimizer."""
        if self._optimizer is None:
            raise LoraleakError("attach the privacy engine to a model before its step")
        if not self._dp_optimizer.pre_step():  # clip per record, sum, noise, / expected records per batch
            raise LoraleakError("Opacus skipped a DP step (gradient accumulation is not supported here)")
        for p, public in zip(self._params, self._public):
            if public is not None:
                p.grad += public.to(p.grad.dtype)
        if batch_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, batch_clip)
        self._optimizer.step()
        self._dp_optimizer.zero_grad(set_to_none=True)
        self._public = []
        self.steps_taken += 1

    # --- what it cost ----------------------------------------------------------------------------

    def epsilon_spent(self, steps: int | None = None) -> float:
        """ε of `steps` steps (default: the steps taken) at this plan's σ and q; 0 before any step."""
        steps = self.steps_taken if steps is None else steps
        if steps == 0:
            return 0.0
        return epsilon_spent(self.plan.noise_multiplier, self.plan.delta, self.plan.sample_rate, steps)

    @property
    def accounting_exact(self) -> bool:
        """True when the batches are drawn as the accountant assumes (Poisson, or every record every step)."""
        return self.sampling == "poisson" or self.plan.sample_rate >= 1.0

    def record(self, steps: int | None = None) -> dict[str, Any]:
        """What the fine-tune records about its privacy after `steps` steps (ε = ∞ written as "inf")."""
        spent = self.epsilon_spent(steps)
        return {
            "kind": "dp_sgd",
            "mechanism": MECHANISM,
            **self.plan.summary(),
            "epsilon_planned": self.plan.summary()["epsilon"],
            "epsilon": "inf" if math.isinf(spent) else spent,  # spent so far
            "steps_taken": self.steps_taken if steps is None else steps,
            "sampling": self.sampling,
            "accounting_exact": self.accounting_exact,
            "unit_meaning": UNIT_MEANING[self.plan.unit],
            "public_rows": PUBLIC_ROWS,
        }
