"""Settings of a LoRA zoo build: which identities, which base, how each victim fine-tunes, how the
fine-tunes vary, and how many Ray workers run them.

Each identity gets `fine_tunes_per_identity` fine-tunes (more with a grid). Every fine-tune draws
its own seed (hence its own trigger word and LoRA initialisation) from (finetune.seed, identity,
variant), and optionally its own values of the `vary` fields:

    vary: {rank: [4, 8, 16], lr: [1.0e-4, 3.0e-4], steps: [200, 400]}

`vary_mode: random` draws one value per field for each fine-tune (seeded by the identity, so adding
identities never changes another's draws), as the CelebA-LoRA set randomises its settings;
`vary_mode: grid` runs every combination, `fine_tunes_per_identity` times each.

A build records its config in the root (`zoo_config.json`, see `record_zoo_config`), so that later
stages recover the identity source from the zoo alone (`read_zoo_config(root)`). One root holds one
population: a rerun may change any setting (new settings give new lora ids), but not `identities`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import from_dict, to_dict
from ..defenses import DP_KINDS, DefenseConfig
from ..errors import ConfigError, InputError
from ..finetune.config import FinetuneConfig
from ..identities import IdentitiesConfig
from .storage import CONFIG_FILE, ZooStore

# Fields a variant may not set: seeds and triggers are drawn per fine-tune, snapshots come from
# `num_snapshots`, the device and class-image cache are properties of the worker, not the LoRA, and
# the defense is the zoo's (`defense`), one per zoo.
FIXED_FIELDS = ("seed", "trigger", "snapshot_steps", "device", "class_images_dir", "defense")


@dataclass(frozen=True)
class ZooConfig:
    root: str  # local path or pyarrow filesystem URI (s3://bucket/zoo, gs://...)
    base: str = "tiny"  # "tiny", "tiny-lfw", a pipeline directory or a hub id
    identities: IdentitiesConfig = field(default_factory=IdentitiesConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Only the first N identities of the source (by id): a small zoo from a big folder. Their
    # attack_train / heldout split is the one they have in the whole source, whatever N is.
    max_identities: int | None = None
    # Trajectory: this many snapshots evenly spaced up to each fine-tune's last step, plus step 0
    # (the initial LoRA θ_0, kept so that Δθ_r = θ_r - θ_0 can be read back). None: the
    # finetune.snapshot_steps as given (plus 0 and the last step).
    num_snapshots: int | None = 5
    fine_tunes_per_identity: int = 1
    vary: dict[str, list[Any]] = field(default_factory=dict)
    vary_mode: Literal["random", "grid"] = "random"
    # The zoo holds the LoRAs as shared, defended. Training-time kinds (dp_sgd, dpgm) go into every
    # fine-tune's config (`finetune.defense`) and run one fine-tune at a time (the K-per-pass batched
    # path refuses them); post-hoc kinds (output_noise, rank_truncation) are applied to every snapshot
    # file before it is published. The manifest's `defense` column records it; it gives new lora ids.
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    # Ray: one actor per worker holds the base pipeline; GPUs may be fractional (0.25 = 4 per GPU).
    # workers 0 runs the fine-tunes one by one in this process, without Ray (for debugging).
    workers: int = 2
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    max_retries: int = 3  # restarts of a dead worker, and retries of the fine-tunes it was running
    # K: each worker takes K fine-tunes at a time and trains those that can share a batch in one
    # UNet pass (loraleak.finetune.batched; same LoRAs up to float rounding, so the same lora ids).
    # batched_options: BatchedOptions fields for those passes (compile, gradient_checkpointing...;
    # bf16 comes from finetune.mixed_precision).
    fine_tunes_per_pass: int = 1
    batched_options: dict[str, Any] = field(default_factory=dict)
    # MLflow: tracking_uri None -> $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str = "loraleak-zoo"
    workdir: Path = Path("runs")
    parent_run_id: str | None = None  # nest this stage's run under another (the pipeline's run)

    def __post_init__(self) -> None:
        if not self.root.strip():
            raise ValueError("root must not be empty")
        if self.max_identities is not None and self.max_identities < 1:
            raise ValueError(f"max_identities must be >= 1 (or null), got {self.max_identities}")
        if self.num_snapshots is not None and self.num_snapshots < 1:
            raise ValueError(f"num_snapshots must be >= 1 (or null), got {self.num_snapshots}")
        if self.fine_tunes_per_identity < 1:
            raise ValueError(f"fine_tunes_per_identity must be >= 1, got {self.fine_tunes_per_identity}")
        if self.workers < 0 or self.max_retries < 0:
            raise ValueError(f"workers and max_retries must be >= 0, got {self.workers}, {self.max_retries}")
        if self.num_cpus_per_worker <= 0 or self.num_gpus_per_worker < 0:
            raise ValueError("num_cpus_per_worker must be > 0 and num_gpus_per_worker >= 0")
        if self.num_gpus_per_worker > 1 and self.num_gpus_per_worker != int(self.num_gpus_per_worker):
            raise ValueError(f"num_gpus_per_worker above 1 must be whole, got {self.num_gpus_per_worker}")
        if not self.experiment:
            raise ValueError("experiment must not be empty")
        if self.fine_tunes_per_pass < 1:
            raise ValueError(f"fine_tunes_per_pass must be >= 1, got {self.fine_tunes_per_pass}")
        if self.batched_options:
            if self.fine_tunes_per_pass == 1:
                raise ValueError("batched_options apply only with fine_tunes_per_pass > 1")
            options = self.batched_run_options()  # validates them: a ConfigError naming the bad key
            import torch  # only with batched_options, as batched_run_options: the torch-free path stays so

            from ..finetune.loop import AMP_DTYPES

            try:  # and with the fine-tunes' precision (some kernels do not train under some compilers)
                device, amp_dtype = torch.device(self.finetune.device), AMP_DTYPES[self.finetune.mixed_precision]
                options.attention_processor(device, amp_dtype)
            except ValueError as e:
                raise ValueError(f"batched_options: {e}") from None
        if self.finetune.defense.kind != "none":
            raise ValueError("set the zoo's `defense`, not finetune.defense: the zoo gives it to every fine-tune "
                             "and records it in the manifest")
        if self.defense.kind in DP_KINDS and self.finetune.train_text_encoder:
            raise ValueError(f"a {self.defense.kind!r} zoo trains the UNet LoRA only; "
                             "set finetune.train_text_encoder: false")
        known = {f.name for f in dataclasses.fields(FinetuneConfig)}
        for name, values in self.vary.items():
            if name not in known:
                raise ValueError(f"vary: {name!r} is not a finetune setting (known: {', '.join(sorted(known))})")
            if name in FIXED_FIELDS:
                raise ValueError(f"vary: {name!r} cannot vary ({', '.join(FIXED_FIELDS)} are set per fine-tune)")
            if not values:
                raise ValueError(f"vary: {name!r} needs at least one value")
            for i, value in enumerate(values):  # each value must be a valid setting on its own
                from_dict(FinetuneConfig, {name: value}, where=f"vary.{name}[{i}]")

    def batched_run_options(self):
        """`batched_options` as loraleak.finetune.batched.BatchedOptions (imported only when used: torch,
        diffusers)."""
        from ..finetune.batched import BatchedOptions

        return from_dict(BatchedOptions, self.batched_options, where="batched_options")


# --- the config a zoo records -----------------------------------------------------------------------

def _identity_source(identities: IdentitiesConfig) -> IdentitiesConfig:
    """The source with a folder root made absolute: a zoo names its photos wherever it is read from."""
    root = identities.root
    return dataclasses.replace(identities, root=root.expanduser().resolve()) if root is not None else identities


def read_zoo_config(root: str | ZooStore) -> ZooConfig:
    """The config the zoo at `root` was last built with (its `root` set to where it is read from now)."""
    store = root if isinstance(root, ZooStore) else ZooStore(root)
    if not store.exists(store.config_path):
        raise InputError(f"zoo {store.uri} records no config (no {CONFIG_FILE}: not a zoo, or built before zoos "
                         "recorded one; rerun its build to record it)")
    try:
        data = json.loads(store.read_bytes(CONFIG_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"zoo {store.uri}: its recorded config is not valid JSON") from None
    if not isinstance(data, dict):
        raise InputError(f"zoo {store.uri}: its recorded config is not a mapping")
    return from_dict(ZooConfig, {**data, "root": store.uri}, where=store.config_path)


def check_identity_source(cfg: ZooConfig) -> None:
    """ConfigError when cfg's identity source is not the one recorded in its root (a zoo is one population)."""
    store = ZooStore(cfg.root)
    if not store.exists(store.config_path):
        return
    recorded = _identity_source(read_zoo_config(store).identities)
    current = _identity_source(cfg.identities)
    if recorded == current:
        return
    name = next(f.name for f in dataclasses.fields(IdentitiesConfig)
                if getattr(recorded, f.name) != getattr(current, f.name))
    raise ConfigError(f"zoo {store.uri} was built from another identity source (identities.{name}: recorded "
                      f"{to_dict(recorded)[name]!r}, this config {to_dict(current)[name]!r}); a zoo holds one "
                      "population: use a new root, or the recorded identities")


def record_zoo_config(cfg: ZooConfig) -> None:
    """Write cfg as the root's `zoo_config.json` (atomically), after checking its identity source."""
    check_identity_source(cfg)
    data = to_dict(dataclasses.replace(cfg, identities=_identity_source(cfg.identities)))
    ZooStore(cfg.root).write_bytes(CONFIG_FILE, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
