"""A sweep's settings: which study to vary, over what, and how to run the trials.

    name: rank                      # the sweep's folder (runs/sweeps/rank) and MLflow parent run
    pipeline: quick                 # a packaged profile (quick | lfw | paper) or a PipelineConfig YAML file
    overrides: {zoo.workers: 1}     # dotted paths set in every trial
    search_space:                   # dotted paths into PipelineConfig -> the values to try
      zoo.finetune.rank: [1, 4, 16, 64]
      zoo.defense: [{kind: none}, {kind: dp_sgd, epsilon: 1.0}]
      "zoo.finetune.rank, zoo.finetune.alpha": [[1, 1], [4, 4]]   # paths that vary together
    search: grid                    # every combination; or random: num_samples draws (seeded)
    rerun: [zoo, attack, baselines, evaluation]   # the stages trials may not share (checked)
    metric: rec.similarity          # what Tune reports as the trial's score; the table is sorted by it

A path is checked against PipelineConfig when the sweep is loaded (an unknown one is one line of
error), and every value when the trials are expanded, both before anything runs. `out_dir`, `stages_dir`,
`tracking_uri` and `experiment` are the sweep's to set: trials share its stage folder, its MLflow store and
its experiment (loraleak.sweeps.tracking).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from ..config import from_dict, read_yaml
from ..errors import ConfigError
from ..pipeline.config import PipelineConfig
from ..pipeline.profiles import PROFILES, profile_path
from ..pipeline.stages import BuiltStage

PROFILE_NAMES = tuple(PROFILES)
# Set by the sweep for every trial: trials share its stage folder, its MLflow store and experiment.
SWEEP_OWNED = ("out_dir", "tracking_uri", "experiment")
# "rec.similarity" etc. come from the evaluation's headline (loraleak.evaluation.evaluate.headline_metrics).
METRIC_EXAMPLES = "rec.similarity, rec.top1_image, org.similarity, chance_top1"


MAX_TRIALS = 10_000

@dataclass(frozen=True)
class SweepConfig:
    name: str  # the sweep's name: its folder (runs/sweeps/<name>) and its MLflow parent run
    search_space: dict[str, list[Any]]  # "path" or "path_a, path_b" (linked) -> values
    pipeline: str = "quick"  # a packaged profile (quick, lfw, paper) or a PipelineConfig YAML file
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted paths set in every trial
    search: Literal["grid", "random"] = "grid"
    num_samples: int = 1  # random: how many draws (duplicates are one trial); grid: must be 1
    seed: int = 0  # random: the draws' seed
    # The stages whose output trials may not share (None: whatever the search space changes). A
    # search space that changes a stage not listed is refused before anything runs: it catches,
    # say, an attack sweep that would rebuild the zoo for every trial.
    rerun: tuple[BuiltStage, ...] | None = None
    # True: trials share one stage folder, where the pipeline keys each stage's output by the settings
    # it depends on, so trials that agree on a stage's settings build it once (an attack sweep reuses
    # one zoo). False: each trial its own folder (every stage runs for every trial).
    share_stages: bool = True
    out_dir: Path | None = None  # None: runs/sweeps/<name>
    # The stage folder the trials share (None: <sweep folder>/stages). Stage outputs are keyed by their
    # settings, so sweeps (or a `loraleak run --out`) pointed at one folder reuse each other's zoo, attacks
    # and evaluations: an attack ablation on the learning curve's zoo builds no zoo. The sweep holds the
    # folder's lock while it runs: one writer at a time.
    stages_dir: Path | None = None
    # What Ray Tune reserves for each trial's driver (the process running `run_pipeline`). The
    # stages' Ray workers (zoo, attack, evaluation) ask the cluster for their own resources.
    # None: {CPU: 1} when a stage runs inside the driver (workers: 0), else nothing.
    resources_per_trial: dict[str, float] | None = None
    # Trials at once. None: from resources (how many trials' peak needs fit the cluster at once).
    max_concurrent_trials: int | None = None
    max_failures: int = 0  # Tune's retries of a failed trial (the pipeline resumes where it stopped)
    metric: str = "rec.similarity"  # the trial's score: reported to Tune, sorts the table
    mode: Literal["min", "max"] = "min"  # min: the best trial leaks least
    utility: str = "org.similarity"  # the plot's x axis: what the owner still gets
    privacy: tuple[str, ...] = ("rec.similarity", "rec.top1_image")  # the plot's y axes: what leaks
    # The trial every other is paired with victim by victim in the report (loraleak.evaluation.paired): the
    # search-space values that pick it, e.g. {zoo.defense: {kind: none}}; the first trial that has them.
    # None: the first trial.
    reference: dict[str, Any] | None = None
    # MLflow, chosen as `loraleak run` chooses it: tracking_uri None -> $MLFLOW_TRACKING_URI, else the store
    # beside the sweep's folder, sqlite:///<its parent>/mlflow.db (runs/sweeps/mlflow.db by default).
    tracking_uri: str | None = None
    experiment: str | None = None  # None: the sweep folder's name (its name, by default)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        if not self.search_space:
            raise ValueError("search_space is empty: name at least one setting to vary")
        for key, values in self.search_space.items():
            paths = split_paths(key)
            for path in paths:
                check_override_path(path, "search_space")
            if not values:
                raise ValueError(f"search_space: {key!r} needs at least one value")
            if len(paths) > 1:
                for i, value in enumerate(values):
                    if not isinstance(value, (list, tuple)) or len(value) != len(paths):
                        raise ValueError(f"search_space: {key!r} links {len(paths)} paths, so each value is a list "
                                         f"of {len(paths)}; value {i} is {value!r}")
        varied = [p for key in self.search_space for p in split_paths(key)]
        if len(set(varied)) != len(varied):
            raise ValueError(f"search_space: a path appears twice ({', '.join(varied)})")
        for path in self.overrides:
            check_override_path(path, "overrides")
            if path in varied:
                raise ValueError(f"overrides: {path!r} is also in search_space; set it in one place")
        for path in self.reference or {}:
            if path not in varied:
                raise ValueError(f"reference: {path!r} is not in search_space; pick the reference trial by the "
                                 f"values it varies ({', '.join(varied)})")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        # Every trial is a whole study, planned (stage keys, resources) before anything runs.
        points = math.prod(len(v) for v in self.search_space.values()) if self.search == "grid" else self.num_samples
        if points > MAX_TRIALS:
            raise ValueError(f"the search space has {points:,} points, more than a sweep runs ({MAX_TRIALS:,}): "
                             "vary fewer settings at once, or use search: random with num_samples")
        if self.search == "grid" and self.num_samples != 1:
            raise ValueError("a grid runs each combination once (the pipeline is deterministic): num_samples must be "
                             "1; to repeat, sweep a seed (e.g. attack.seed: [0, 1, 2])")
        if self.rerun is not None and len(set(self.rerun)) != len(self.rerun):
            raise ValueError(f"rerun lists a stage twice: {list(self.rerun)}")
        if self.resources_per_trial is not None and any(
                not (0 <= v < math.inf) for v in self.resources_per_trial.values()):
            raise ValueError(f"resources_per_trial must be finite and >= 0, got {self.resources_per_trial}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"max_concurrent_trials must be >= 1 (or null: from resources), got "
                             f"{self.max_concurrent_trials}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1: retry forever), got {self.max_failures}")
        named = [("metric", self.metric), ("utility", self.utility), *(("privacy", m) for m in self.privacy)]
        for name, metric in named:
            if not metric or " " in metric:
                raise ValueError(f"{name}: {metric!r} is not a metric name (e.g. {METRIC_EXAMPLES})")
        if not self.privacy:
            raise ValueError("privacy: name at least one metric for the plot's y axis (e.g. rec.similarity)")
        if self.stages_dir is not None and not self.share_stages:
            raise ValueError("stages_dir is the folder the trials share: it needs share_stages: true")
        if self.experiment is not None and not self.experiment.strip():
            raise ValueError("experiment must not be empty (leave it out for the sweep folder's name)")

    @property
    def directory(self) -> Path:
        """The sweep's folder: stage outputs, trial records, results, Ray Tune state, MLflow store."""
        return (self.out_dir or Path("runs/sweeps") / self.name).expanduser().resolve()

    @property
    def stages_directory(self) -> Path:
        """The pipeline folder the trials share (share_stages)."""
        return (self.stages_dir or self.directory / "stages").expanduser().resolve()


def split_paths(key: str) -> list[str]:
    """A search-space key: one dotted path, or several separated by commas (they vary together)."""
    return [part.strip() for part in key.split(",")]


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def check_override_path(dotted: str, where: str) -> None:
    """ValueError naming the first unknown part when `dotted` is not a setting of PipelineConfig.

    A path ends at a setting, or inside a free-form mapping (attack.resources_per_worker.CPU,
    zoo.vary.lr); a list-valued setting (baselines) is replaced whole.
    """
    parts = dotted.split(".")
    if not dotted or any(not p for p in parts):
        raise ValueError(f"{where}: {dotted!r} is not a dotted path like zoo.finetune.rank")
    if parts[0] in SWEEP_OWNED:
        raise ValueError(f"{where}: {dotted!r} is set by the sweep (trials share its folder, MLflow store and "
                         "experiment); set the sweep's out_dir / tracking_uri / experiment instead")
    tp: Any = PipelineConfig
    for i, part in enumerate(parts):
        tp = _unwrap_optional(tp)
        here = ".".join(parts[:i]) or "the pipeline config"
        if dataclasses.is_dataclass(tp):
            known = [f.name for f in dataclasses.fields(tp) if f.init]
            if part not in known:
                raise ValueError(f"{where}: {dotted!r} is not a setting: {here} has no {part!r} "
                                 f"(known: {', '.join(known)})")
            tp = typing.get_type_hints(tp)[part]
        elif tp is Any or get_origin(tp) is dict or tp is dict:
            return  # a free-form mapping: its keys are the owner's to check (the value check does)
        else:
            raise ValueError(f"{where}: {dotted!r} goes inside {here}, which is a single setting, not a section")


def resolve_pipeline_file(cfg: SweepConfig, relative_to: Path | None) -> Path:
    """The PipelineConfig file of `cfg.pipeline`: a packaged profile, or a path (relative to the sweep file)."""
    if cfg.pipeline in PROFILE_NAMES:
        return profile_path(cfg.pipeline)
    try:
        path = Path(cfg.pipeline).expanduser()
        if not path.is_absolute() and relative_to is not None and not path.exists():
            path = relative_to / path
        found = path.is_file()
    except (OSError, ValueError):  # a name the OS refuses (too long, a NUL character)
        found = False
    if not found:
        raise ConfigError(f"pipeline: {cfg.pipeline!r} is neither a profile ({', '.join(PROFILE_NAMES)}) nor a file")
    return path.resolve()


def load_sweep_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """A sweep YAML file as a SweepConfig, its pipeline file resolved (relative to the sweep file)."""
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict) and overrides:
        data = {**data, **overrides}
    cfg = from_dict(SweepConfig, data, where=str(path))
    pipeline = resolve_pipeline_file(cfg, path.resolve().parent)
    if cfg.pipeline not in PROFILE_NAMES:
        cfg = dataclasses.replace(cfg, pipeline=str(pipeline))
    return cfg
