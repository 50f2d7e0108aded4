"""Fit a baseline attack on a zoo's attack_train split and save it as an attack directory.

    cfg = from_dict(BaselineConfig, {"kind": "pca_map", "zoo": "runs/zoo", "base": "tiny",
                                     "out_dir": "runs/baselines/pca_map", "settings": {"components": 16}})
    attack_dir = fit_baseline(cfg)            # then loraleak.attack.api.load_attack(attack_dir, pipe)

Only the final snapshot of each attack_train fine-tune is read (what a shared LoRA is); the
"heldout" split is never read. The zoo records the identity source its photos came from (read here
for the nearest-neighbour photos, each checked against the hashes in the manifest).
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...base.loading import base_fingerprint, load_base_pipeline
from ...config import from_dict, to_dict
from ...identities import IdentitiesConfig
from ...locking import folder_lock
from ...tracking import FOLDER_TAG, mlflow_run
from ..config import AttackTrainConfig
from ..data import SampleRow, select_samples
from ..model import text_encoder_sha256
from .common import CONFIG_NAME
from .registry import BASELINE_KINDS, FitInputs, baseline_builder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineConfig:
    kind: str  # a registered baseline kind (BASELINE_KINDS: each baseline module registers its own)
    zoo: str  # zoo root (local path or pyarrow URI); its attack_train split only
    base: str = "tiny"  # the base the zoo was fine-tuned from (checked against the manifest)
    out_dir: Path = Path("runs/baseline")  # the attack directory written (config.json + safetensors)
    settings: dict[str, Any] = field(default_factory=dict)  # the kind's config (e.g. PcaMapConfig fields)
    max_samples: int | None = None  # at most this many attack-train fine-tunes (a seeded subset)
    rank: int | None = None  # read only LoRAs of this rank (a zoo that varies it)
    identities: IdentitiesConfig | None = None  # None: the identity source the zoo records
    seed: int = 0  # picks the max_samples subset
    device: str = "cpu"  # where the base runs (prompt embeddings; matching updates keeps the pipeline)
    # MLflow: tracking_uri None -> $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
    tracking: bool = False
    tracking_uri: str | None = None
    experiment: str = "loraleak-baselines"
    workdir: Path = Path("runs")
    parent_run_id: str | None = None  # nest this stage's run under another (the pipeline's run)

    def __post_init__(self) -> None:
        if self.kind not in BASELINE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(BASELINE_KINDS)}, got {self.kind!r}")
        if not self.zoo.strip():
            raise ValueError("zoo must not be empty")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 (or null), got {self.max_samples}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1 (or null), got {self.rank}")
        self.baseline_settings()  # one line naming a bad key of the kind's settings

    def baseline_settings(self) -> Any:
        """`settings` as the kind's typed config."""
        return from_dict(BASELINE_KINDS[self.kind], self.settings, where="settings")


def _subset(rows: list[SampleRow], max_samples: int | None, seed: int) -> list[SampleRow]:
    if max_samples is None or len(rows) <= max_samples:
        return rows
    keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:max_samples]
    return [rows[i] for i in sorted(keep.tolist())]


def build_baseline(cfg: BaselineConfig, pipe: Any = None, show_progress: bool = True) -> Any:
    """Fit baseline `cfg.kind` on the final attack_train LoRAs of `cfg.zoo`: the attack, in memory.

    `pipe`: the loaded base pipeline, when the caller has it (else `cfg.base` is loaded on `cfg.device`).
    """
    settings = cfg.baseline_settings()
    fingerprint = base_fingerprint(cfg.base)
    selection = select_samples(AttackTrainConfig(zoo=cfg.zoo, base=cfg.base, snapshots="final", val_fraction=0.0,
                                                 rank=cfg.rank), base_hash=fingerprint)
    rows = _subset(selection.train, cfg.max_samples, cfg.seed)
    pipe = pipe if pipe is not None else load_base_pipeline(cfg.base, device=cfg.device)
    attack = baseline_builder(cfg.kind)(settings, FitInputs(cfg, pipe, selection.layout, rows, show_progress))
    attack.record.update({
        "zoo": cfg.zoo, "base": cfg.base, "base_fingerprint": fingerprint,
        "text_encoder_sha256": text_encoder_sha256(pipe.text_encoder),
        "fit": {**attack.record.get("fit", {}), "num_loras": len(rows),
                "num_identities": len({r.identity_id for r in rows}), "lora_steps": selection.lora_steps},
    })
    logger.info("fitted %s on %d attack-train LoRAs", cfg.kind, len(rows))
    return attack


def fit_baseline(cfg: BaselineConfig, pipe: Any = None, show_progress: bool = True) -> Path:
    """`build_baseline`, saved to `cfg.out_dir` (logged to MLflow when cfg.tracking); returns cfg.out_dir,
    an attack directory for `loraleak.attack.api.load_attack(directory, pipe)`."""
    with folder_lock(cfg.out_dir, f"baseline {cfg.kind} {cfg.out_dir}"):
        return _fit_baseline(cfg, pipe, show_progress)


def _fit_baseline(cfg: BaselineConfig, pipe: Any, show_progress: bool) -> Path:
    folder = str(Path(cfg.out_dir).expanduser().resolve())
    tracked = mlflow_run(cfg.experiment, f"baseline {cfg.kind}", cfg.tracking_uri, cfg.workdir, cfg.parent_run_id,
                         {FOLDER_TAG: folder}) if cfg.tracking else nullcontext()
    with tracked as run:
        attack = build_baseline(cfg, pipe, show_progress)
        attack.save_pretrained(cfg.out_dir)
        if run is not None:
            fit = attack.record["fit"]
            run.log_params({**to_dict(cfg), "settings": to_dict(cfg.baseline_settings())})
            run.log_metrics({k: v for k, v in fit.items() if isinstance(v, (int, float))})
            run.log_dict(json.loads((Path(cfg.out_dir) / CONFIG_NAME).read_text()), "baseline_config.json")
    return Path(cfg.out_dir)
