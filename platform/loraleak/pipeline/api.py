"""The study from Python: `load_pipeline_config` and `run_study`, what `loraleak run` does, as a library.

    from loraleak import load_pipeline_config, run_study

    cfg = load_pipeline_config("quick", out="runs/quick-rank8", overrides={"zoo.finetune.rank": 8})
    result = run_study(cfg)
    print(result.headline(), result.report, result.mlflow_run_ids["pipeline"])

Both are re-exported by the `loraleak` package (lazily: `import loraleak` stays light); this module imports
nothing heavy itself either (`loraleak --help` reads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..config import load_yaml, parse_yaml
from ..errors import ConfigError
from .profiles import PROFILES, profile_path

if TYPE_CHECKING:
    from .config import PipelineConfig
    from .run import PipelineResult


def _assignment(text: str) -> tuple[str, Any]:
    """KEY=VALUE with a YAML value: zoo.finetune.steps=100, attack.model.step_embedding=false."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. zoo.finetune.steps=100")
    return key.strip(), parse_yaml(value, f"--set {text!r}")


def load_pipeline_config(profile: str | None = None, config: str | Path | None = None,
                         out: str | Path | None = None, assignments: Sequence[str] | None = None,
                         overrides: Mapping[str, Any] | None = None,
                         tracking_uri: str | None = None) -> PipelineConfig:
    """The config of a profile (default quick) or a YAML file, with `out` (the study's folder), `assignments`
    ("KEY=VALUE" strings, as `--set`), `overrides` ({dotted key: value}) and `tracking_uri` applied; a bad
    value is a ConfigError (one line)."""
    from .config import PipelineConfig, local_folder, with_overrides  # every stage's config, and torch

    if config is not None and profile is not None:
        raise ConfigError("give a profile or a config file, not both")
    if profile is not None and profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; one of {', '.join(sorted(PROFILES))}")
    path = Path(config) if config is not None else profile_path(profile or "quick")
    if out is not None:  # named as the caller gave it, not as the profile's file
        try:
            out = local_folder(Path(str(out)), "out")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    cfg = load_yaml(PipelineConfig, path, {"out_dir": str(out)} if out is not None else None)
    changes = {**dict(_assignment(a) for a in assignments or []), **(overrides or {})}
    if tracking_uri is not None:
        changes["tracking_uri"] = tracking_uri
    return with_overrides(cfg, changes) if changes else cfg


def run_study(cfg: PipelineConfig | None = None, *, show_progress: bool = True, **load: Any) -> PipelineResult:
    """Run (or resume) the study `cfg` (default: `load_pipeline_config(**load)`, e.g. profile="quick",
    out="runs/x"); returns its `PipelineResult` (headline metrics, report, stage folders, MLflow run ids).
    Takes the out folder's lock, as `loraleak run` does."""
    from .config import PipelineConfig  # see load_pipeline_config
    from .run import run_pipeline

    if cfg is None:
        cfg = load_pipeline_config(**load)
    elif load:
        raise TypeError(f"run_study: give a config or {', '.join(load)}, not both")
    if not isinstance(cfg, PipelineConfig):
        raise TypeError(f"run_study: expected a PipelineConfig, got {type(cfg).__name__}")
    return run_pipeline(cfg, show_progress=show_progress)
