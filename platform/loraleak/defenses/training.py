"""Training-time defenses as objects with hooks: what a fine-tune loop calls, whatever the defense.

    defense = training_defense(cfg, num_images)      # first: a budget out of reach fails before any work
    with defense.prepare(unet, optimizer):           # e.g. DP-SGD's per-sample gradient hooks
        for step in steps:
            rows = defense.before_step(rows, num_images, generator)   # the step's private photo rows
            ...                                                        # the UNet pass on them (+ class rows)
            loss = defense.loss(pred, target, private_rows, prior_weight, class_rows)
            defense.after_step(loss, update)                           # backward, clips, optimiser step
    defense.account(steps)                           # what it cost: finetune.json's `privacy`, snapshots' metadata

`NoDefense` is the plain DreamBooth-LoRA recipe. A defense that only needs these hooks is a class
here (or in its own module of `defenses/`) plus its line in `TRAINING_DEFENSES`; its kind and
settings go in `defenses/__init__.py` (`DefenseKind`, `_SETTINGS`, `DP_KINDS`). The fine-tune loops
(`finetune/dreambooth_lora.py`, `finetune/batched.py`) call the hooks and know no defense by name.
`batchable = False` sends a defense's fine-tunes to the one-at-a-time path (K = 1, peft's own layers,
one torch optimiser): the K-per-pass path shares one loss and one optimiser step across K LoRAs.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import DP_KINDS, DefenseConfig
from .dp_sgd import LoraPrivacyEngine
from .dpgm import DPGMLoss


def defense_noise_seed(seed: int) -> int:
    """The seed of a fine-tune's DP noise: its own stream, apart from the data's (`seed` itself), so
    that the noise never shifts the batches, flips, timesteps or diffusion noise the recipe draws."""
    return int(hashlib.sha256(f"dp-noise:{seed}".encode()).hexdigest()[:15], 16)


@dataclass
class Update:
    """What one optimiser step of a one-at-a-time fine-tune needs: the optimiser over the LoRA
    parameters, those parameters, and fp16's loss scaler (disabled otherwise)."""

    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    scaler: torch.amp.GradScaler

    def apply(self, loss: torch.Tensor, grad_clip: float) -> None:
        """The plain recipe's step: backward, clip the batch gradient to `grad_clip`, AdamW."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class NoDefense:
    """The plain fine-tune: every hook is the DreamBooth-LoRA recipe's own."""

    kind = "none"
    batchable = True  # the K-per-pass fine-tune runs it (its own per-row loss and AdamW, the same recipe)

    def __init__(self, config: DefenseConfig, finetune: Any, num_images: int) -> None:
        self.config = config
        self.grad_clip = finetune.grad_clip  # the batch clip of the optimiser step

    @classmethod
    def check_finetune(cls, finetune: Any) -> None:
        """ValueError (one line) when `finetune` (a FinetuneConfig) cannot run under this defense."""

    def prepare(self, model: torch.nn.Module, update: Update) -> AbstractContextManager:
        """Around the whole loop, after the LoRA is added and its optimiser made."""
        return nullcontext()

    def before_step(self, rows: list[int], num_images: int, generator: torch.Generator) -> list[int]:
        """The private photo rows of a step, given the plain recipe's next batch (`rows`, shuffled)."""
        return rows

    def loss(self, pred: torch.Tensor, target: torch.Tensor, private_rows: int, prior_weight: float,
             class_rows: int) -> torch.Tensor:
        """The step's training loss: rows [:private_rows] are the photos, the `class_rows` after them public."""
        if class_rows:
            b = private_rows
            return F.mse_loss(pred[:b], target[:b]) + prior_weight * F.mse_loss(pred[b:], target[b:])
        return F.mse_loss(pred, target)

    def after_step(self, loss: torch.Tensor | None, update: Update) -> None:
        """Backward and optimiser step; `loss` None: a step that drew no rows at all."""
        update.apply(loss, self.grad_clip)

    def account(self, steps: int) -> dict[str, Any] | None:
        """What the defense cost after `steps` steps (finetune.json's `privacy`, a snapshot's
        `loraleak_dp`), or None for a defense that records nothing."""
        return None


class DPSGD(NoDefense):
    """DP-SGD (dp_sgd.py): Poisson-drawn private rows, per-record clipping and noise, public class rows."""

    kind = "dp_sgd"
    batchable = False  # per-record gradients through peft's own LoRA layers, its own batches

    def __init__(self, config: DefenseConfig, finetune: Any, num_images: int) -> None:
        super().__init__(config, finetune, num_images)
        self.engine = LoraPrivacyEngine.for_defense(config, num_images=num_images, batch_size=finetune.batch_size,
                                                    steps=finetune.steps, noise_seed=defense_noise_seed(finetune.seed))
        self.row_losses: torch.Tensor | None = None
        self.private_rows = 0

    @classmethod
    def check_finetune(cls, finetune: Any) -> None:
        # Per-sample gradients are taken on the UNet LoRA; fp16's loss scaler would scale them too.
        if finetune.train_text_encoder:
            raise ValueError("dp_sgd privatises the UNet LoRA only; set train_text_encoder: false")
        if finetune.mixed_precision == "fp16":
            raise ValueError("dp_sgd supports mixed_precision 'no' or 'bf16', not 'fp16'")

    def prepare(self, model: torch.nn.Module, update: Update) -> AbstractContextManager:
        return self.engine.attach(model, update.optimizer)  # per-sample gradient hooks, removed on exit

    def before_step(self, rows: list[int], num_images: int, generator: torch.Generator) -> list[int]:
        return self.engine.private_rows(rows, num_images, generator)  # drawn as its accounting assumes

    def loss(self, pred: torch.Tensor, target: torch.Tensor, private_rows: int, prior_weight: float,
             class_rows: int) -> torch.Tensor:
        """Each row's own loss is kept: the engine needs per-row gradients."""
        b = private_rows
        self.row_losses, self.private_rows = (pred - target).pow(2).flatten(1).mean(1), b
        self.public_weight = prior_weight / class_rows if class_rows else 0.0  # each class row's weight
        return (self.row_losses[:b].mean() if b else 0.0) + \
            (prior_weight * self.row_losses[b:].mean() if class_rows else 0.0)

    def after_step(self, loss: torch.Tensor | None, update: Update) -> None:
        if loss is None:  # no photo drawn and no class rows: the step is noise only
            self.engine.backward(torch.zeros(0, device=update.params[0].device), 0, 0.0)
        else:
            self.engine.backward(self.row_losses, self.private_rows, self.public_weight)
        self.engine.step(batch_clip=self.grad_clip)
        self.row_losses = None

    def account(self, steps: int) -> dict[str, Any] | None:
        return self.engine.record(steps)


class DPGM(NoDefense):
    """DPGM (dpgm.py): the paper's noisy kernel-MMD loss in place of both MSE terms."""

    kind = "dpgm"
    batchable = False  # its noisy loss is one fine-tune's, seeded per fine-tune

    def __init__(self, config: DefenseConfig, finetune: Any, num_images: int) -> None:
        super().__init__(config, finetune, num_images)
        self.dpgm = DPGMLoss.for_defense(config, num_images=num_images, batch_size=finetune.batch_size,
                                         steps=finetune.steps, noise_seed=defense_noise_seed(finetune.seed))
        self.grad_clip = config.max_grad_norm  # the paper's DPGM run clips the batch at this norm

    def loss(self, pred: torch.Tensor, target: torch.Tensor, private_rows: int, prior_weight: float,
             class_rows: int) -> torch.Tensor:
        b = private_rows
        loss = self.dpgm(pred[:b], target[:b])
        if class_rows:
            loss = loss + prior_weight * self.dpgm(pred[b:], target[b:])
        return loss

    def account(self, steps: int) -> dict[str, Any] | None:
        return self.dpgm.record(steps)


# kind -> the class that runs it in a fine-tune. A new training-time defense: one line here.
TRAINING_DEFENSES: dict[str, type[NoDefense]] = {"none": NoDefense, "dp_sgd": DPSGD, "dpgm": DPGM}
assert set(TRAINING_DEFENSES) == {"none", *DP_KINDS}, "every training-time kind needs its class"


def training_defense_class(kind: str) -> type[NoDefense]:
    """The class that runs a training-time defense of `kind` (ValueError for a post-hoc or unknown kind)."""
    if kind not in TRAINING_DEFENSES:
        raise ValueError(f"defense {kind!r} is post-hoc: apply it to the finished LoRA; a fine-tune "
                         f"takes training-time defenses ({', '.join(DP_KINDS)})")
    return TRAINING_DEFENSES[kind]


def training_defense(finetune: Any, num_images: int) -> NoDefense:
    """The defense of a fine-tune (a FinetuneConfig) on `num_images` photos, ready for its loop."""
    return training_defense_class(finetune.defense.kind)(finetune.defense, finetune, num_images)
