"""One trial in Ray Tune: the whole study (`run_pipeline`) for one point of the search space.

`trial_trainable` is the Tune function. It does not run the pipeline in its own actor: Tune starts
that actor in the trial's placement group with child capture on, so the actors the pipeline starts
(the zoo's Ray Data workers, the evaluation workers) would have to fit into the trial's reservation
and Tune refuses them. Instead the trainable runs `run_trial` as a Ray task in the trial's
reserved bundle with capture off: the driver's own work runs on what Tune reserved for it, and the
stages' workers ask the cluster for their own resources, as in `loraleak run`. The attack stage's
`TorchTrainer.fit()` (Ray Train V2) runs inside that task, so inside the trial: Ray Train places its
workers in a placement group of its own, which is how Train V2 runs under Tune.

The trial's MLflow run is its study's pipeline run (its config as params and config.yaml, the headline
numbers as metrics, its report), nested under the sweep's parent run and tagged with the trial's id and
label, its stage runs nested under it (loraleak.sweeps.tracking); its record (`results.write_record`) is
what a rerun of the sweep finds.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from ..config import from_dict, to_dict
from ..pipeline.config import PipelineConfig
from ..pipeline.run import run_pipeline
from ..pipeline.tracking import NestUnder
from .results import FAILED, FINISHED, record_path, write_record
from .stages import driver_resources
from .tracking import LABEL_TAG, SWEEP_TAG, TRIAL_TAG

# The memory of an empty reservation: Tune needs a non-empty bundle to place the driver task in, and
# one byte of memory takes nothing from the CPUs and GPUs the stages' workers need.
EMPTY_BUNDLE = {"memory": 1.0}


def driver_bundle(resources: Mapping[str, float]) -> dict[str, float]:
    return dict(resources) if any(resources.values()) else dict(EMPTY_BUNDLE)


def _task_options(bundle: Mapping[str, float]) -> dict[str, Any]:
    rest = dict(bundle)
    options: dict[str, Any] = {"num_cpus": rest.pop("CPU", 0.0), "num_gpus": rest.pop("GPU", 0.0)}
    memory = rest.pop("memory", 0.0)
    if memory > EMPTY_BUNDLE["memory"]:  # a real reservation (bytes); the empty bundle's byte is not asked for
        options["memory"] = int(memory)
    options["resources"] = rest
    return options


def trial_payload(trial: Any, resources_per_trial: Mapping[str, float] | None) -> dict[str, Any]:
    """What a trial sends to its Ray task: plain data (the config as a dict, rebuilt there)."""
    return {"trial_id": trial.trial_id, "label": trial.label, "overrides": trial.overrides,
            "config": to_dict(trial.config),
            "driver_bundle": driver_bundle(driver_resources(trial.config, resources_per_trial))}


def run_trial(trial: Mapping[str, Any], common: Mapping[str, Any]) -> dict[str, Any]:
    """Run one trial's pipeline, its run nested under the sweep's; write and return its record."""
    path = record_path(Path(common["directory"]), trial["trial_id"])
    cfg = from_dict(PipelineConfig, trial["config"], where=f"trial {trial['trial_id']}")
    record: dict[str, Any] = {"trial_id": trial["trial_id"], "label": trial["label"], "overrides": trial["overrides"],
                              "sweep": common["sweep"], "pipeline_dir": str(cfg.out_dir)}
    started = time.perf_counter()
    parent = NestUnder(common["parent_run_id"], f"{common['sweep']} {trial['label']}",
                       {SWEEP_TAG: common["sweep"], TRIAL_TAG: trial["trial_id"], LABEL_TAG: trial["label"]})
    try:
        result = run_pipeline(cfg, show_progress=False, lock=False, parent=parent)  # the sweep holds its folder
        # The trial's run: its pipeline run (of an earlier attempt when this one found the study complete).
        record.update(status=FINISHED, metrics=result.metrics, best_control=result.best_control,
                      stage_dirs=result.stage_dirs, skipped=result.skipped,
                      mlflow_run_id=result.mlflow_run_ids.get("pipeline"),
                      report=str(result.report),  # the trial's own: its evaluation's (trials share OUT)
                      wall_time_s=time.perf_counter() - started)
    except BaseException as e:
        lines = str(e).strip().splitlines()
        record.update(status=FAILED, error=f"{type(e).__name__}: {lines[0] if lines else ''}",
                      traceback=traceback.format_exc(), wall_time_s=time.perf_counter() - started)
        write_record(path, record)
        raise
    write_record(path, record)
    return record


def trial_trainable(config: dict[str, Any], common: dict[str, Any]) -> None:
    """The Tune function: run the trial in the trial's reserved bundle (see the module docstring), report."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    trial = config["trial"]
    group = ray.util.get_current_placement_group()
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=False) if group else "DEFAULT"
    task = ray.remote(run_trial).options(scheduling_strategy=strategy, max_retries=0,
                                         **_task_options(trial["driver_bundle"]))
    record = ray.get(task.remote(trial, common))
    metrics = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))}
    tune.report({"trial_id": trial["trial_id"], "wall_time_s": record["wall_time_s"], **metrics})


def describe_record(record: Mapping[str, Any], utility: str, privacy: tuple[str, ...]) -> str:
    """One line for the progress of a sweep: the trial, its status, its headline numbers."""
    if record.get("status") != FINISHED:
        return f"{record['label']}: {record.get('status', 'not run')}: {record.get('error', '')}"
    m = record["metrics"]
    numbers = ", ".join(f"{name} {m[name]:.3f}" for name in (utility, *privacy) if name in m)
    # Stages found complete, i.e. built by an earlier trial (the pipeline also "skips" the shipped base
    # and baselines when none are configured: those are not reuse).
    has_baselines = any(k.startswith("baseline ") for k in record.get("stage_dirs") or {})
    reused = [s for s in record.get("skipped") or [] if s.removeprefix("undefended ") in ("zoo", "attack", "evaluation")
              or (s == "baselines" and has_baselines)]
    return f"{record['label']}: {numbers}" + (f" (reused: {', '.join(reused)})" if reused else "") \
        + f" [{record.get('wall_time_s', 0.0):.0f} s]"
