"""Settings of one victim fine-tune: DreamBooth-LoRA exactly as the paper's victim runs it.

Defaults are the paper's (SD 1.4, UNet LoRA r=16 alpha=27 on to_q/to_v, AdamW lr 1e-4, 1000 steps,
batch 1, prior preservation with 200 class images of "A human face.", fp32). Everything that changes
what the LoRA learns lives here so that `finetune.json` can record it completely, the training-time
defense included (`defense`: DP-SGD or DPGM, see loraleak.defenses; none by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..defenses import DefenseConfig
from ..defenses.training import training_defense_class
from .triggers import random_trigger

MixedPrecision = Literal["no", "bf16", "fp16"]


@dataclass(frozen=True)
class FinetuneConfig:
    # UNet LoRA (the matrices the attack reads).
    rank: int = 16
    alpha: int = 27
    targets: tuple[str, ...] = ("to_q", "to_v")
    # Optimisation: AdamW at a constant learning rate, gradient norm clipped.
    lr: float = 1e-4
    steps: int = 1000
    batch_size: int = 1
    seed: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # DreamBooth prompts; trigger None -> 4-11 random lowercase letters drawn from `seed`.
    trigger: str | None = None
    instance_prompt: str = "A face of {trigger}."
    class_prompt: str = "A human face."
    # Prior preservation: class images sampled once from the base and cached (see class_images.py).
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    # Wrong triggers shown with the class images (see prior_prompts.py): 0 = the paper's prior (class
    # prompt only); N > 0 binds the person to its own trigger on a base that cannot tell names apart.
    prior_negative_triggers: int = 0
    prior_negative_fraction: float = 0.5  # of the class rows, those shown with a wrong trigger
    num_class_images: int = 200
    class_images_dir: Path | None = None  # cache root; None -> sample afresh for every fine-tune
    class_images_seed: int = 0  # separate from `seed` so that one cache serves every fine-tune
    class_inference_steps: int = 50  # the SD pipeline's defaults, as the paper's code samples them
    class_guidance_scale: float = 7.5
    # Text-encoder LoRA (the paper trains it too; the attack ignores it).
    train_text_encoder: bool = False
    text_rank: int = 16
    text_alpha: int = 17
    text_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # Trajectory: steps r at which to save the LoRA (0 = the initial LoRA); the last step always is.
    snapshot_steps: tuple[int, ...] = ()
    hflip: bool = False
    device: str = "cpu"
    mixed_precision: MixedPrecision = "no"
    # Training-time defense: "none", "dp_sgd" (per-record clipping + noise on the LoRA, Opacus) or
    # "dpgm" (the paper's noisy kernel-MMD loss; its max_grad_norm replaces grad_clip). Post-hoc
    # defenses are applied to the finished LoRA instead (loraleak.defenses.post_hoc.apply_post_hoc, zoo defense).
    defense: DefenseConfig = field(default_factory=DefenseConfig)

    def __post_init__(self) -> None:
        positive_ints = {"rank": self.rank, "alpha": self.alpha, "steps": self.steps,
                         "batch_size": self.batch_size, "text_rank": self.text_rank,
                         "text_alpha": self.text_alpha, "class_inference_steps": self.class_inference_steps}
        for name, value in positive_ints.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.seed < 0 or self.class_images_seed < 0:
            raise ValueError(f"seeds must be >= 0, got seed={self.seed} class_images_seed={self.class_images_seed}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must lie in [0, 1), got {self.adam_betas}")
        if self.weight_decay < 0 or self.prior_loss_weight < 0:
            raise ValueError("weight_decay and prior_loss_weight must be >= 0")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.class_guidance_scale < 1.0:
            raise ValueError(f"class_guidance_scale must be >= 1 (1 = no guidance), got {self.class_guidance_scale}")
        for name, targets in (("targets", self.targets), ("text_targets", self.text_targets)):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"{name} must be a non-empty list of module names, got {targets!r}")
        if self.trigger is not None and (not self.trigger or any(c.isspace() for c in self.trigger)):
            raise ValueError(f"trigger must be one word without spaces, got {self.trigger!r}")
        if "{trigger}" not in self.instance_prompt:
            raise ValueError(f"instance_prompt must contain '{{trigger}}', got {self.instance_prompt!r}")
        try:
            self.instance_prompt.format(trigger="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"instance_prompt may use only the placeholder {{trigger}}, "
                             f"got {self.instance_prompt!r}") from None
        if not self.class_prompt.strip():
            raise ValueError("class_prompt must not be empty")
        if not 0 <= self.prior_negative_triggers <= 100_000:
            raise ValueError(f"prior_negative_triggers must lie in [0, 100000], got {self.prior_negative_triggers}")
        if not 0.0 < self.prior_negative_fraction <= 1.0:
            raise ValueError(f"prior_negative_fraction must lie in (0, 1], got {self.prior_negative_fraction}")
        if self.prior_negative_triggers and not self.prior_preservation:
            raise ValueError("prior_negative_triggers shows wrong triggers with the class images: it needs "
                             "prior_preservation: true")
        if self.prior_preservation and self.num_class_images < 1:
            raise ValueError(f"num_class_images must be >= 1 with prior preservation, got {self.num_class_images}")
        bad_steps = [r for r in self.snapshot_steps if not 0 <= r <= self.steps]
        if bad_steps:
            raise ValueError(f"snapshot_steps must lie in [0, steps={self.steps}], got {bad_steps}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device {self.device!r} is not a torch device") from None
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.mixed_precision == "fp16" and device.type == "cpu":
            raise ValueError("mixed_precision 'fp16' needs a GPU device; use 'bf16' or 'no' on CPU")
        # A post-hoc or unknown kind is refused; a training-time defense checks the fine-tune it runs in.
        training_defense_class(self.defense.kind).check_finetune(self)

    @property
    def trigger_word(self) -> str:
        return self.trigger if self.trigger is not None else random_trigger(self.seed)

    @property
    def instance_prompt_text(self) -> str:
        return self.instance_prompt.format(trigger=self.trigger_word)

    @property
    def save_steps(self) -> tuple[int, ...]:
        """The steps whose LoRA is saved: the requested snapshots plus the final step."""
        return tuple(sorted({*self.snapshot_steps, self.steps}))
