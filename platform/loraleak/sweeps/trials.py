"""The trials a sweep expands to: one PipelineConfig per point of the search space.

A trial's id is a key over its whole pipeline config (all but where it writes), so a rerun of the
sweep finds the trials it finished, a changed fixed setting gives new trials, and a trial's record
can never describe other settings than its own. Every value is checked here, before anything runs:
each search-space value on its own (so the error names it), then each combination.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import load_yaml, to_dict
from ..errors import ConfigError
from ..keys import content_key
from ..pipeline.config import PipelineConfig, with_absolute_paths, with_overrides, without_added_defaults
from .config import SweepConfig, resolve_pipeline_file, split_paths
from .tracking import sweep_experiment


@dataclass(frozen=True)
class Trial:
    trial_id: str  # a key over the trial's pipeline settings (see the module docstring)
    label: str  # the varied settings, short: "rank=4 alpha=4", "defense=dp_sgd epsilon=1"
    overrides: dict[str, Any]  # this trial's search-space values, dotted path -> value
    config: Any  # its PipelineConfig (out_dir, tracking_uri and experiment set by the sweep)


def _key(data: Any) -> str:
    return content_key(data, 10)


def base_pipeline_config(cfg: SweepConfig):
    """The sweep's pipeline config (profile or file) with its fixed `overrides` applied."""
    path = resolve_pipeline_file(cfg, None)
    base = load_yaml(PipelineConfig, path)
    if not cfg.overrides:
        return base
    try:
        return with_overrides(base, cfg.overrides)
    except ConfigError as e:
        raise ConfigError(f"sweep {cfg.name}: overrides: {e}") from None


def points(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The search space's points in order (grid: every combination; random: seeded draws, deduplicated),
    each as dotted path -> value."""
    keys = list(cfg.search_space)

    def expand(key: str, value: Any) -> dict[str, Any]:
        paths = split_paths(key)
        return {paths[0]: value} if len(paths) == 1 else dict(zip(paths, value))

    if cfg.search == "grid":
        combos = itertools.product(*(cfg.search_space[k] for k in keys))
    else:
        rng = random.Random(cfg.seed)
        combos = ([rng.choice(cfg.search_space[k]) for k in keys] for _ in range(cfg.num_samples))
    found: dict[str, dict[str, Any]] = {}
    for combo in combos:
        point: dict[str, Any] = {}
        for key, value in zip(keys, combo):
            point.update(expand(key, value))
        found.setdefault(_key(point), point)  # a random draw repeated is one trial
    return list(found.values())


def format_value(value: Any) -> str:
    """A setting's value, short: 1e-05, inf, dp_sgd epsilon=1, [to_q,to_v]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:g}"
    if isinstance(value, dict):
        rest = [f"{k}={format_value(v)}" for k, v in value.items() if k != "kind" and v is not None]
        return " ".join([str(value["kind"]), *rest]) if "kind" in value else ",".join(rest)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def short_names(paths: list[str]) -> dict[str, str]:
    """Each path's last part, or the whole path where two paths end alike."""
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: (name if last.count(name) == 1 else p) for p, name in zip(paths, last)}


def trial_label(overrides: dict[str, Any]) -> str:
    names = short_names(list(overrides))
    return " ".join(f"{names[p]}={format_value(v)}" for p, v in overrides.items())


def _apply(base, overrides: dict[str, Any], what: str):
    try:
        return with_overrides(base, overrides)
    except ConfigError as e:
        message = str(e).removeprefix("overrides.")  # with_overrides' own prefix: `what` names the values
        if len(overrides) == 1:
            message = message.removeprefix(f"{next(iter(overrides))}: ")
        raise ConfigError(f"{what}: {message}") from None


def pipeline_dir(cfg: SweepConfig, trial_id: str) -> Path:
    """Where a trial's pipeline writes its stages: one folder for all (shared), else its own."""
    return cfg.stages_directory if cfg.share_stages else cfg.directory / "trials" / trial_id / "stages"


def expand_trials(cfg: SweepConfig, tracking_uri: str) -> list:
    """Every trial of the sweep, validated; ConfigError (one line, naming the value) on the first bad one.
    Each trial's study logs to the sweep's store (`tracking_uri`) and experiment."""
    base = base_pipeline_config(cfg)
    for key, values in cfg.search_space.items():  # each value alone: the error names it
        for value in values:
            single = {p: v for p, v in zip(split_paths(key), value)} if len(split_paths(key)) > 1 else {key: value}
            _apply(base, single, f"sweep {cfg.name}: search_space: {key} = {format_value(value)}")
    trials, seen = [], set()
    experiment = sweep_experiment(cfg.experiment, cfg.directory)
    for point in points(cfg):
        config = _apply(base, point, f"sweep {cfg.name}: trial {trial_label(point)}")
        # The id is over the settings as the pipeline file gave them (its experiment too, usually unset), so
        # the ids of trials run before the sweep set the experiment are unchanged.
        settings = {k: v for k, v in to_dict(config).items() if k not in ("out_dir", "tracking_uri")}
        for section in ("attack", "identities", "evaluation"):  # ids of earlier sweeps kept
            settings[section] = without_added_defaults(section, settings[section])
        trial_id = _key(settings)
        if trial_id in seen:  # two points that name the same settings (a value equal to the default...)
            continue
        seen.add(trial_id)
        config = dataclasses.replace(with_absolute_paths(config), out_dir=pipeline_dir(cfg, trial_id),
                                     tracking_uri=tracking_uri, experiment=experiment)
        trials.append(Trial(trial_id, trial_label(point), point, config))
    return trials


def reference_trial(cfg: SweepConfig, trials: list[Trial]) -> Trial:
    """The trial the report pairs every other with: the first whose values are `cfg.reference`'s."""
    if not cfg.reference:
        return trials[0]
    for trial in trials:
        if all(trial.overrides.get(path) == value for path, value in cfg.reference.items()):
            return trial
    raise ConfigError(f"sweep {cfg.name}: reference {cfg.reference} matches no trial (the trials: "
                      f"{'; '.join(t.label for t in trials[:5])}{' ...' if len(trials) > 5 else ''})")
