"""Settings of one attack training run: which zoo, which model variant, how to optimise, where to run.

    zoo: runs/zoo                 # the LoRA zoo (its attack_train split only; "heldout" is never read)
    base: tiny                    # the base the zoo was fine-tuned from (checked against the manifest)
    identities: {kind: synthetic, num_identities: 64}   # the identity source the zoo was built from
    model: {input_mode: delta, step_embedding: true}
    snapshots: all                # every trajectory snapshot r, or only each fine-tune's final one
    max_steps: 2000
    num_workers: 2                # Ray Train workers (DDP); use_gpu: true for one GPU each

Validation uses the final snapshots of a fixed subset of the attack_train identities (val_fraction
of them, chosen by `split_identities` with seed 0 whatever `seed` is), never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..identities import IdentitiesConfig
from .model import AttackModelConfig


@dataclass(frozen=True)
class AttackTrainConfig:
    zoo: str  # zoo root: a local path or a pyarrow filesystem URI (s3://bucket/zoo)
    base: str = "tiny"  # "tiny", "tiny-lfw", a pipeline directory or a hub id
    # The zoo records each fine-tune's image keys and hashes, not where the images live: this is
    # the source the zoo was built from. Every identity's images are checked against the hashes.
    identities: IdentitiesConfig = field(default_factory=IdentitiesConfig)
    model: AttackModelConfig = field(default_factory=AttackModelConfig)
    # Which samples: every trajectory snapshot r > 0 (the paper's paradigm), or only each fine-tune's
    # final snapshot (one sample per fine-tune: the baseline the step embedding is measured against).
    snapshots: Literal["all", "final"] = "all"
    rank: int | None = None  # read only the LoRAs of this rank (a zoo that varies the rank)
    # Input mode "delta": subtract the fine-tune's initial LoRA θ_0 (the zoo stores it). A shared LoRA
    # comes without θ_0, so by default A is fed raw and B as ΔB (exact: B_0 = 0), as at attack time.
    use_initial_lora: bool = False
    images_per_sample: int = 1  # images of the victim each LoRA is decoded against per step
    val_fraction: float = 0.1  # attack_train identities kept aside for validation (0: none)
    # Train on only this many of the (non-validation) attack_train identities: the attacker's learning
    # curve over training-set size. They are the first of one fixed order (seed 0, whatever `seed` is),
    # so a smaller set is a subset of a larger one. None: all of them.
    train_identities: int | None = None
    val_max_samples: int = 64  # validation LoRAs (final snapshots of the validation identities)
    # Optimisation (the paper's encoder optimiser: AdamW lr 5e-3, weight decay 5e-4).
    lr: float = 5e-3
    weight_decay: float = 5e-4
    grad_clip: float | None = None  # max gradient norm; None = no clipping (the paper's code)
    batch_size: int = 8  # LoRAs per step on each worker
    max_steps: int = 1000
    checkpoint_every: int = 100
    val_every: int = 100
    log_every: int = 10  # MLflow writes of the per-step losses are batched this many steps at a time
    mixed_precision: Literal["no", "bf16"] = "no"
    seed: int = 0
    # Ray Train: workers, each with its own data shard; a rerun of the same run_name in the same
    # storage resumes from the latest checkpoint.
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None  # e.g. {CPU: 4, GPU: 1}
    loader_workers: int = 0  # DataLoader processes per worker reading LoRA files (0: in the worker)
    max_failures: int = 0  # restarts from the latest checkpoint after a worker failure
    checkpoints_to_keep: int = 2
    out_dir: Path = Path("runs/attack")  # the final model goes to out_dir/attack
    storage_path: str | None = None  # Ray Train checkpoints (path or URI); None: out_dir/ray
    run_name: str = "attack"
    # A checkpoint directory (an earlier run's, of the same model and data) to start from when this run's
    # storage has none: continuing an attack to more steps in a new folder (loraleak.pipeline.stages).
    resume_from: str | None = None
    # MLflow: tracking_uri None -> $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str = "loraleak-attack"
    workdir: Path = Path("runs")
    parent_run_id: str | None = None  # nest this stage's run under another (the pipeline's run)

    def __post_init__(self) -> None:
        if not self.zoo.strip():
            raise ValueError("zoo must not be empty")
        positive = {"batch_size": self.batch_size, "max_steps": self.max_steps,
                    "checkpoint_every": self.checkpoint_every, "val_every": self.val_every,
                    "log_every": self.log_every, "num_workers": self.num_workers,
                    "images_per_sample": self.images_per_sample, "val_max_samples": self.val_max_samples,
                    "checkpoints_to_keep": self.checkpoints_to_keep}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.train_identities is not None and self.train_identities < 1:
            raise ValueError(f"train_identities must be >= 1 (or null: all), got {self.train_identities}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1 (or null), got {self.rank}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or null), got {self.grad_clip}")
        if self.seed < 0 or self.loader_workers < 0 or self.max_failures < -1:
            raise ValueError("seed and loader_workers must be >= 0, max_failures >= -1")
        if self.resources_per_worker is not None and any(v < 0 for v in self.resources_per_worker.values()):
            raise ValueError(f"resources_per_worker must be >= 0, got {self.resources_per_worker}")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name must be a non-empty name without '/', got {self.run_name!r}")
        if not self.experiment:
            raise ValueError("experiment must not be empty")

    @property
    def storage(self) -> str:
        """Where Ray Train keeps this run's checkpoints (absolute: Ray resolves paths on its workers)."""
        return self.storage_path or str((self.out_dir / "ray").expanduser().resolve())

    @property
    def attack_dir(self) -> Path:
        return self.out_dir / "attack"
