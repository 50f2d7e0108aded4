"""Settings of one evaluation: which zoo's victims, which attacks, how many images, which scorer.

    zoo: runs/quick/zoo                    # the held-out victims: each fine-tune's final snapshot
    attack: runs/quick/attack/attack       # the network autoencoder ("rec"); optional
    baselines: {nearest_neighbour: runs/quick/baselines/nn}   # more saved attacks, by condition name
    scorer: synthetic
    n_images: 8

Conditions per victim LoRA (see /work/shared/docs/design.md, section 5):

    org                    the true instance prompt through the victim's model (the owner's utility)
    rec                    the attack's z through the victim's model (base + that LoRA)
    <baseline>             each baseline: its z through the victim's model, or its own images
    base                   the base model with the class prompt (no leak)
    victim_class_prompt    the victim's model with the class prompt       } controls that need no
    victim_empty_prompt    the victim's model with an empty prompt         } attack: what a drifted
    victim_wrong_trigger   the victim's model with a random wrong trigger  } fine-tune shows anyway

Every condition of one victim samples from the same per-victim seed (paired noise), so the
conditions differ only in what conditions the model. `victim_noise` says what that seed is drawn from:
the victim's LoRA (its lora_id, the default, as every study so far) or its identity, so that two
evaluations of one victim under different settings (a defense, a rank, another zoo) sample the same
noise and the same wrong trigger: common random numbers, for comparisons paired victim by victim
(loraleak.evaluation.paired) and base images read back from the image cache in every trial.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..identities import IdentitiesConfig

CONTROLS = ("victim_class_prompt", "victim_empty_prompt", "victim_wrong_trigger")
# Names the evaluation gives its own conditions (and the report its photo row): not for baselines.
RESERVED = ("org", "rec", "base", "private", *CONTROLS)


@dataclass(frozen=True)
class EvaluationConfig:
    zoo: str  # zoo root: a local path or a pyarrow filesystem URI
    out_dir: Path = Path("runs/evaluation")
    attack: Path | None = None  # a saved network autoencoder (train_attack's out_dir/attack): "rec"
    baselines: dict[str, Path] = field(default_factory=dict)  # condition name -> saved attack directory
    base: str | None = None  # None: the base the zoo records
    identities: IdentitiesConfig | None = None  # None: the identity source the zoo records
    split: Literal["heldout", "attack_train"] = "heldout"  # attack_train: a sanity check on seen identities
    rank: int | None = None  # only victims of this LoRA rank (a zoo that varies it)
    max_victims: int | None = None  # the first N victim LoRAs by lora_id
    controls: tuple[str, ...] = CONTROLS
    # Images: n per condition and victim, sampled as the attack's decoder samples.
    n_images: int = 8
    sample_steps: int = 25
    guidance_scale: float = 3.0
    # "bf16": sample under bf16 autocast (the frozen weights stay fp32; on a CPU the UNet attends with the
    # unfused kernel, loraleak.base.attention says why). Faster on CPUs with bf16 units (AMX) and on GPUs;
    # the images differ from fp32's by rounding, so they are cached under their own keys.
    mixed_precision: Literal["no", "bf16"] = "no"
    seed: int = 1234  # each victim's seed is drawn from (seed, lora_id) and recorded with its results
    # What each victim's seed is drawn from besides `seed`: "lora" (its lora_id, which any setting of its
    # fine-tune changes) or "identity" (the same noise for that person in every evaluation).
    victim_noise: Literal["lora", "identity"] = "lora"
    # A folder of condition images kept by content (evaluation/image_cache.py), shared by every evaluation
    # that names it: a condition whose inputs are unchanged is read back, not generated. None: no cache
    # (`loraleak evaluate` writes only its out_dir); the pipeline wires its study's <out>/image-cache.
    image_cache: Path | None = None
    # Scoring against each candidate's private photos, given to the scorer at reference_size px.
    scorer: Literal["synthetic", "dlib", "facenet"] = "synthetic"
    scorer_path: Path | None = None  # synthetic: a saved scorer (default: the shipped one)
    reference_size: int = 64
    n_boot: int = 1000  # bootstrap resamples of the victims for the 95% intervals
    # Report: victims shown image by image, and images per condition in each row.
    report_victims: int = 12
    report_images: int = 8
    # Ray: one actor per worker holds the base pipeline, the attacks and the scorer. workers 0 runs
    # every victim in this process, without Ray (for debugging).
    workers: int = 2
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    max_retries: int = 2  # restarts of a dead worker, and retries of the victims it was running
    # MLflow: tracking_uri None -> $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str = "loraleak-evaluation"
    run_name: str | None = None  # None: "evaluate <out_dir name>"
    workdir: Path = Path("runs")
    parent_run_id: str | None = None  # nest this stage's run under another (the pipeline's run)

    def __post_init__(self) -> None:
        if not self.zoo.strip():
            raise ValueError("zoo must not be empty")
        for name in ("n_images", "sample_steps", "reference_size", "n_boot", "report_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.report_victims < 0 or self.workers < 0 or self.max_retries < 0:
            raise ValueError("report_victims, workers and max_retries must be >= 0")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.victim_noise not in ("lora", "identity"):
            raise ValueError(f"victim_noise must be 'lora' or 'identity', got {self.victim_noise!r}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1 (or null), got {self.rank}")
        if self.max_victims is not None and self.max_victims < 1:
            raise ValueError(f"max_victims must be >= 1 (or null), got {self.max_victims}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ValueError(f"controls: unknown control {unknown[0]!r} (known: {', '.join(CONTROLS)})")
        for name in self.baselines:
            if name in RESERVED or not name or "/" in name or name != name.strip():
                raise ValueError(f"baselines: {name!r} cannot name a baseline (reserved: {', '.join(RESERVED)}; "
                                 "no '/' or surrounding spaces)")
        if self.num_cpus_per_worker <= 0 or self.num_gpus_per_worker < 0:
            raise ValueError("num_cpus_per_worker must be > 0 and num_gpus_per_worker >= 0")
        if not self.experiment:
            raise ValueError("experiment must not be empty")

    @property
    def conditions(self) -> tuple[str, ...]:
        """Every condition in report order: the owner's images, the attacks, then what needs no attack."""
        attacks = (("rec",) if self.attack is not None else ()) + tuple(self.baselines)
        return ("org", *attacks, "base", *self.controls)
