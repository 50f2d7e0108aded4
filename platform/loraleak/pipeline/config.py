"""The whole study's settings: one typed, nested config from which `run_pipeline` derives every stage's.

    out_dir: runs/quick
    identities: {kind: synthetic, num_identities: 60}
    base: {ref: tiny}                          # or {pretrain: {...}}: pretrain one first
    zoo: {finetune: {rank: 4, steps: 200}, fine_tunes_per_pass: 4}
    attack: {model: {step_embedding: true}, max_steps: 300}
    baselines: [{name: nearest_neighbour, kind: nearest_neighbour, settings: {}}]
    evaluation: {scorer: synthetic, n_images: 6}

Each stage section holds the fields of that stage's own config (`ZooConfig`, `AttackTrainConfig`,
`BaselineConfig`, `EvaluationConfig`, `PretrainConfig`) except those the pipeline wires itself
(roots, bases, identity sources, output folders, MLflow): the sections are derived from the stage
configs, so a stage setting is never missing here or documented twice. Bad values are refused when
the config is loaded, in one line naming the key.

`with_overrides(cfg, {"zoo.finetune.rank": 8, "attack.model.step_embedding": False})` is how sweeps
vary it: `run_pipeline` is a pure function of this config.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..attack.config import AttackTrainConfig
from ..base.pretrain import PretrainConfig
from ..config import from_dict, to_dict
from ..errors import ConfigError
from ..evaluation.config import RESERVED, EvaluationConfig
from ..identities import IdentitiesConfig
from ..zoo.config import ZooConfig

try:  # the baseline attacks (nearest neighbour, PCA map, matching updates), when this build has them
    from ..attack.baselines import BASELINE_KINDS, BaselineConfig, fit_baseline
except ImportError:  # pragma: no cover - depends on the build
    BASELINE_KINDS, BaselineConfig, fit_baseline = {}, None, None

# The evaluation condition of the attack trained on undefended LoRAs (PipelineConfig.undefended_attack).
UNDEFENDED_CONDITION = "rec_undefended"
TRACKING_FIELDS = ("tracking", "tracking_uri", "experiment", "workdir", "parent_run_id")
# Settings added after studies were run, with the value that means "as before": left out of the stage keys
# (pipeline.stages) and the sweeps' trial ids while they have it, so that the folders and trials of those
# studies keep their names (a rerun would redo them).
_PRETRAIN_DEFAULTS = {f.name: (f.default if f.default is not MISSING else f.default_factory())
                      for f in dataclasses.fields(PretrainConfig) if f.init and f.name != "out_dir"}
ADDED_SETTINGS = {
    "attack": {"train_identities": None},
    "evaluation": {"mixed_precision": "no", "victim_noise": "lora"},
    "identities": {"train_min_images": None},
    "pretrain": {k: _PRETRAIN_DEFAULTS[k] for k in ("images_per_identity", "captions", "named_prompt",
                                                     "named_fraction", "train_text_encoder", "text_encoder_lr",
                                                     "init_from")},
}


def without_added_defaults(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A section's settings (as a dict) less the ADDED_SETTINGS that still have their "as before" value."""
    added = ADDED_SETTINGS.get(section, {})
    return {k: v for k, v in values.items() if not (k in added and v == added[k])}


# Per stage: the fields the pipeline sets itself (left out of its section).
WIRED = {
    PretrainConfig: ("out_dir",),
    ZooConfig: ("root", "base", "identities", *TRACKING_FIELDS),
    AttackTrainConfig: ("zoo", "base", "identities", "out_dir", "storage_path", "run_name", "resume_from",
                        *TRACKING_FIELDS),
    EvaluationConfig: ("zoo", "out_dir", "attack", "baselines", "base", "identities", "run_name", "image_cache",
                       *TRACKING_FIELDS),
}


def _section(name: str, stage: type, doc: str) -> type:
    """A frozen dataclass with `stage`'s fields (types and defaults) minus those the pipeline wires."""
    hints = typing.get_type_hints(stage)
    fields = []
    for f in dataclasses.fields(stage):
        if f.name in WIRED[stage] or not f.init:
            continue
        if f.default is not MISSING:
            spec = field(default=f.default)
        elif f.default_factory is not MISSING:
            spec = field(default_factory=f.default_factory)
        else:
            raise TypeError(f"{stage.__name__}.{f.name} has no default: wire it in the pipeline")
        fields.append((f.name, hints[f.name], spec))
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__module__, cls.__doc__ = __name__, doc  # picklable as this module's attribute `name`
    return cls


PretrainSettings = _section("PretrainSettings", PretrainConfig, "PretrainConfig without out_dir.")
ZooSettings = _section("ZooSettings", ZooConfig, "ZooConfig without root, base, identities and MLflow settings.")
AttackSettings = _section("AttackSettings", AttackTrainConfig,
                          "AttackTrainConfig without zoo, base, identities, output folders and MLflow settings.")
EvaluationSettings = _section("EvaluationSettings", EvaluationConfig,
                              "EvaluationConfig without zoo, attacks, base, identities, out_dir, image_cache and "
                              "MLflow settings.")


def stage_config(stage: type, settings: Any, where: str, **wired: Any) -> Any:
    """The stage's own config from its section and the values the pipeline wires in."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)} if settings is not None else {}
    try:
        return stage(**values, **wired)
    except (ValueError, TypeError) as e:  # the stage's range checks
        raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class BaseStage:
    ref: str = "tiny"  # "tiny", "tiny-lfw", a pipeline directory or a hub id (CompVis/stable-diffusion-v1-4)
    pretrain: PretrainSettings | None = None  # set: pretrain a tiny base first (then ref is not used)


@dataclass(frozen=True)
class BaselineSpec:
    name: str  # the condition's name in the evaluation and the report
    kind: str  # nearest_neighbour | pca_map | matching_updates
    settings: dict[str, Any] = field(default_factory=dict)  # the kind's own settings

    def __post_init__(self) -> None:
        if not self.name or self.name in RESERVED or "/" in self.name:
            raise ValueError(f"baseline name {self.name!r} is empty, has '/', or is reserved ({', '.join(RESERVED)})")
        if BaselineConfig is None:
            return  # refused at run time, with the reason, if the pipeline reaches the baselines
        if self.kind not in BASELINE_KINDS:
            raise ValueError(f"baseline {self.name!r}: kind {self.kind!r} is not one of {', '.join(BASELINE_KINDS)}")
        try:
            BaselineConfig(kind=self.kind, zoo="-", settings=self.settings)  # checks the settings' keys
        except ConfigError as e:
            raise ValueError(f"baseline {self.name!r}: {e}") from None


@dataclass(frozen=True)
class PipelineConfig:
    out_dir: Path = Path("runs/quick")
    identities: IdentitiesConfig = field(default_factory=IdentitiesConfig)
    base: BaseStage = field(default_factory=BaseStage)
    zoo: ZooSettings = field(default_factory=ZooSettings)
    attack: AttackSettings = field(default_factory=AttackSettings)
    baselines: tuple[BaselineSpec, ...] = ()
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    # A defended zoo (zoo.defense) is attacked twice: by the attack retrained on LoRAs with the same
    # defense ("rec": the adaptive adversary) and, with this on, by the attack trained on the same
    # study's undefended LoRAs ("rec_undefended": an adversary who ignores the defense). The latter
    # needs the undefended zoo and attack, built here unless a run of the undefended study made them.
    undefended_attack: bool = True
    # MLflow (loraleak.pipeline.tracking): tracking_uri None -> $MLFLOW_TRACKING_URI, else the store shared
    # by the studies beside this one, sqlite:///<out_dir's parent>/mlflow.db. `experiment` (None: the out
    # folder's name, the study's name) holds the pipeline run and, nested under it, each stage's run.
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", local_folder(self.out_dir, "out_dir"))
        names = [b.name for b in self.baselines]
        if len(set(names)) != len(names):
            raise ValueError(f"baselines: names must be unique, got {names}")
        if UNDEFENDED_CONDITION in names:
            raise ValueError(f"baselines: {UNDEFENDED_CONDITION!r} is reserved (the attack trained without the defense)")
        if self.experiment is not None and not self.experiment.strip():
            raise ValueError("experiment must not be empty (leave it out for the out folder's name)")
        # Each stage's own checks, now rather than when the pipeline reaches it (as a ValueError:
        # from_dict puts the file's name in front).
        try:
            stage_config(ZooConfig, self.zoo, "zoo", root="-", identities=self.identities)
            stage_config(AttackTrainConfig, self.attack, "attack", zoo="-", identities=self.identities)
            stage_config(EvaluationConfig, self.evaluation, "evaluation", zoo="-",
                         baselines={name: Path("-") for name in names})
            if self.base.pretrain is not None:
                stage_config(PretrainConfig, self.base.pretrain, "base.pretrain", out_dir=Path("-"))
        except ConfigError as e:
            raise ValueError(str(e)) from None


# scheme:// (a Path has folded it to scheme:/); two letters at least, so that C:/ stays a path.
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


def local_folder(path: Path, what: str) -> Path:
    """`path` as a local folder: a file:// URI becomes its path; any other URI (s3://, gs://, hdfs://...) is
    refused: every stage reads and writes its folder as local files (locks, Ray Train storage, reports), so an
    object store would silently become a local folder named "s3:". Shared storage is a path every node mounts
    (NFS, EFS, a bucket through a FUSE mount)."""
    text = str(path)
    found = _URI.match(text)
    if found is None:
        return path
    scheme, rest = found.group(1), text[found.end():].lstrip("/")
    if scheme.lower() == "file":
        return Path("/" + rest)
    raise ValueError(f"{what} {scheme}://{rest}: a study's folder must be a local path or file:// URI on storage "
                     f"every Ray node sees (NFS, a mounted bucket); {scheme}:// is not supported")


def with_absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """cfg with its local input paths (the identities' root, a base given as a folder) made absolute. A stage's
    key covers its settings, paths included: `../shared/datasets/lfw/private` and the same folder spelled from
    `/` would otherwise key two zoos of one population, and `loraleak run` would not find the stages a sweep
    (whose trials run in Ray tasks with another working directory, so always absolute) built, nor the other
    way round."""
    identities, base = cfg.identities, cfg.base
    if identities.root is not None:
        identities = dataclasses.replace(identities, root=identities.root.expanduser().resolve())
    if base.pretrain is None and Path(base.ref).expanduser().exists():
        base = dataclasses.replace(base, ref=str(Path(base.ref).expanduser().resolve()))
    if identities == cfg.identities and base == cfg.base:
        return cfg
    return dataclasses.replace(cfg, identities=identities, base=base)


def with_overrides(cfg: PipelineConfig, overrides: Mapping[str, Any]) -> PipelineConfig:
    """cfg with dotted keys replaced: {"zoo.finetune.rank": 8, "attack.model.step_embedding": False}."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for i, key in enumerate(parents):
            if not isinstance(node.get(key), dict):
                if key in node and node[key] is not None:
                    raise ConfigError(f"override {dotted!r}: {'.'.join(parents[:i + 1])} is not a section")
                node[key] = {}  # an optional section left unset (base.pretrain): start it
            node = node[key]
        node[leaf] = value
    return from_dict(PipelineConfig, data, where="overrides")
