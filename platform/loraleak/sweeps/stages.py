"""Which stage outputs the trials of a sweep share, in what order they must run, and how many at once.

`run_pipeline` names each stage's folder by a key over what its result depends on (its settings and
the keys of the stages before it); `stage_folders` asks the same stages for those names without running anything,
so the sweep knows before it starts which trials share a zoo, an attack or a baseline. Trials that
share a stage output must not build it at the same time: `waves` puts the first trial to need each
output (its builder) in an earlier wave than every other trial that uses it; trials within a wave
share nothing unbuilt and run concurrently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from ..pipeline.stages import BUILT_STAGES, plan_stages


def stage_folders(cfg: Any) -> dict[str, str]:
    """stage -> the folder name `run_pipeline` gives its output under cfg.out_dir, as the study's stages
    say (loraleak.pipeline.stages.StudyStages.folders)."""
    return plan_stages(cfg).folders()


def _outputs(trial: Any) -> dict[str, str]:
    """stage -> an id of the output the trial uses (its folder, made absolute: unshared trials never collide)."""
    root = str(trial.config.out_dir)
    # The attack folder's key leaves out max_steps (more steps continue the same attack), but two
    # trials training it to different step counts must not run at once.
    out = {stage: f"{root}/{folder}" for stage, folder in stage_folders(trial.config).items()}
    for stage in ("attack", "undefended attack"):
        if stage in out:
            out[stage] += f"@{trial.config.attack.max_steps}"
    # A defended trial's "undefended zoo" is the folder an undefended trial builds as its "zoo" (the same
    # id), so `waves` never has two trials build it at once; likewise the undefended attack.
    return out


def builds_per_stage(trials: Sequence[Any]) -> dict[str, int]:
    """stage -> how many distinct outputs the trials need (1 = built once, shared by all)."""
    seen: dict[str, set[str]] = {}
    for trial in trials:
        for stage, output in _outputs(trial).items():
            seen.setdefault(stage, set()).add(output)
    return {stage: len(seen[stage]) for stage in BUILT_STAGES if stage in seen}


def check_rerun(rerun: Sequence[str] | None, trials: Sequence[Any], where: str) -> None:
    """ConfigError when the trials change a stage that `rerun` does not list."""
    if rerun is None:
        return
    for stage, count in builds_per_stage(trials).items():
        if count > 1 and stage not in rerun:
            raise ConfigError(f"{where}: the search space gives {count} different {stage} outputs, but rerun lists "
                              f"only {', '.join(rerun) or 'nothing'}: add {stage} to rerun, or keep its settings fixed")


def waves(trials: Sequence[Any]) -> list[list[Any]]:
    """The trials in waves: no two trials of a wave share an output that neither found built before."""
    builder: dict[str, int] = {}  # output -> index of the first trial that needs it
    wave_of: list[int] = []
    for i, trial in enumerate(trials):
        wave = 0
        for output in _outputs(trial).values():
            if output in builder:
                wave = max(wave, wave_of[builder[output]] + 1)
            else:
                builder[output] = i
        wave_of.append(wave)
    grouped: list[list[Any]] = [[] for _ in range(max(wave_of, default=-1) + 1)]
    for trial, wave in zip(trials, wave_of):
        grouped[wave].append(trial)
    return grouped


# --- resources ------------------------------------------------------------------------------------------------

def _add(into: dict[str, float], resources: Mapping[str, float], times: float = 1.0) -> None:
    for name, value in resources.items():
        if value:
            into[name] = into.get(name, 0.0) + value * times


def _workers(count: int, cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": count * cpus, "GPU": count * gpus}


def driver_runs_stages(cfg: Any) -> bool:
    """True when a stage runs inside the trial's driver process (workers: 0) rather than on Ray workers."""
    return cfg.zoo.workers == 0 or cfg.evaluation.workers == 0


def driver_resources(cfg: Any, resources_per_trial: Mapping[str, float] | None) -> dict[str, float]:
    """What Tune reserves for a trial's driver: as configured, else {CPU: 1} when stages run in it."""
    if resources_per_trial is not None:
        return {k: float(v) for k, v in resources_per_trial.items() if v}
    return {"CPU": 1.0} if driver_runs_stages(cfg) else {}


def peak_need(cfg: Any, driver: Mapping[str, float]) -> dict[str, float]:
    """A trial's most resources at any time: its driver plus its hungriest stage (stages run in turn)."""
    # Ray Train's default worker: 1 CPU (and 1 GPU with use_gpu).
    default_worker = {"CPU": 1.0, **({"GPU": 1.0} if cfg.attack.use_gpu else {})}
    attack_worker = dict(cfg.attack.resources_per_worker or default_worker)
    stages = [
        _workers(cfg.zoo.workers, cfg.zoo.num_cpus_per_worker, cfg.zoo.num_gpus_per_worker),
        {k: v * cfg.attack.num_workers for k, v in attack_worker.items()},
        _workers(cfg.evaluation.workers, cfg.evaluation.num_cpus_per_worker, cfg.evaluation.num_gpus_per_worker),
    ]
    need = dict(driver)
    hungriest: dict[str, float] = {}
    for stage in stages:
        for name, value in stage.items():
            hungriest[name] = max(hungriest.get(name, 0.0), value)
    _add(need, hungriest)
    return {k: v for k, v in need.items() if v}


@dataclass(frozen=True)
class Concurrency:
    trials: int  # trials at once
    need: dict[str, float]  # one trial's peak need
    cluster: dict[str, float]  # what the cluster had
    short: list[str]  # resources a single trial needs more of than the cluster has (it waits for nodes)

    @property
    def oversubscribed(self) -> bool:
        """True when `trials` trials at their peak need more than the cluster has."""
        return any(self.trials * value > self.cluster.get(name, 0) + 1e-9 for name, value in self.need.items())

    def describe(self) -> str:
        def fmt(resources: Mapping[str, float]) -> str:
            return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) or "nothing"

        return (f"{self.trials} trial(s) at once (a trial needs {fmt(self.need)} at its peak; the cluster has "
                f"{fmt(self.cluster)})")


def concurrency(needs: Sequence[Mapping[str, float]], cluster: Mapping[str, float],
                configured: int | None) -> Concurrency:
    """How many trials run at once: as configured, else as many of the neediest trial as the cluster holds."""
    need: dict[str, float] = {}
    for n in needs:
        for name, value in n.items():
            need[name] = max(need.get(name, 0.0), value)
    short = [f"{name} {value:g} (cluster has {cluster.get(name, 0):g})" for name, value in need.items()
             if value > cluster.get(name, 0)]
    if configured is not None:
        return Concurrency(configured, need, dict(cluster), short)
    fits = [math.floor(cluster.get(name, 0) / value + 1e-9) for name, value in need.items() if value > 0]
    return Concurrency(max(1, min(fits, default=1)), need, dict(cluster), short)
