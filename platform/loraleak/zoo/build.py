"""Building a zoo with Ray Data: planned fine-tunes -> fine-tune actors -> LoRA files + manifest.

    ray.data.from_items(pending fine-tunes)
        .map_batches(FineTuneWorker, batch_size=fine_tunes_per_pass,
                     compute=ActorPoolStrategy(size=workers), num_cpus=..., num_gpus=...)

Each `FineTuneWorker` actor loads the base pipeline once and keeps it. It takes K =
`fine_tunes_per_pass` fine-tunes at a time; those whose settings can share a batch train together
in one UNet pass (`loraleak.finetune.batched`: the same LoRAs as one by one, up to float rounding),
the rest one by one. For every fine-tune it writes the LoRA snapshots (defended when the zoo has a
defense, staged, then published whole) and only then that fine-tune's manifest part, itself: work
that finished survives a dead driver, and a rerun skips it. A fine-tune that fails (unreadable
image, NaN loss) becomes a failed row and the build goes on; a pass of K that fails as a whole (out
of memory) is run again one by one; a worker process that dies is restarted by Ray and the
fine-tunes it was running retried (`max_retries`).

A build first records its config in the root (`zoo_config.json`), refusing a config whose identity
source differs from the recorded one: a zoo is one population. A zoo with a post-hoc defense given its
undefended twin (`undefended_twin`) copies and defends the fine-tunes the twin has finished instead of
training them (zoo.derive), and trains the rest.

Runs on a local `ray.init()` and unchanged on a cluster: `RAY_ADDRESS` or `ray job submit`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import statistics
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import diffusers
import pyarrow as pa
import torch

from ..base.loading import base_fingerprint, load_base_pipeline
from ..cluster import connect_ray, warn_if_short
from ..config import from_dict, to_dict
from ..errors import ConfigError, InputError, LoraleakError
from ..finetune.batched import SHARED_FIELDS, check_batchable, finetune_lora_batched
from ..finetune.class_images import pipeline_resolution
from ..finetune.config import FinetuneConfig
from ..finetune.dreambooth_lora import finetune_lora
from ..identities import image_sha256
from ..locking import folder_lock
from ..lora.io import loaded_adapters
from ..tracking import FOLDER_TAG, mlflow_run
from .class_images import node_class_images, sample_class_images_once
from .config import ZooConfig, check_identity_source, record_zoo_config
from .derive import derive_from_twin
from .inspect import zoo_info
from .manifest import DONE, FAILED, compact_manifest, delete_part, finished_lora_ids
from .plan import PlannedFineTune, ZooPlan, plan_zoo
from .progress import StepBar, StepCounter, polled, progress_actor_name, step_reporter
from .publish import loss_before, publish_snapshots, write_fine_tune_part
from .storage import ZooStore

logger = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema([("lora_id", pa.string()), ("identity_id", pa.string()), ("status", pa.string()),
                           ("error", pa.string()), ("final_loss", pa.float64()), ("wall_time_s", pa.float64())])


def fine_tune_record(ft: PlannedFineTune) -> dict[str, Any]:
    """A planned fine-tune as a Ray Data row: plain columns, the identity (its loader) pickled."""
    from ray import cloudpickle  # ray starts slowly: only the build's workers pay for it

    return {"lora_id": ft.lora_id, "identity_id": ft.identity_id, "split": ft.split, "variant": ft.variant,
            "finetune": json.dumps(to_dict(ft.finetune)), "image_keys": list(ft.image_keys),
            "image_hashes": list(ft.image_hashes), "identity": cloudpickle.dumps(ft.identity)}


def _first_line(error: BaseException, limit: int = 500) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


Outcome = tuple[list[dict[str, Any]], str | None, datetime, float]  # snapshot rows, error, start, wall time


def batch_key(ft: Any) -> tuple:
    """What fine-tunes must share to train in one UNet pass (loraleak.finetune.batched.SHARED_FIELDS)."""
    return tuple(getattr(ft, name) for name in SHARED_FIELDS)


def batch_groups(fts: list[Any]) -> list[list[int]]:
    """Indices of `fts` grouped into fine-tunes that can share UNet passes, in order of first appearance;
    a fine-tune the batched path does not take (text-encoder LoRA, fp16) is a group of its own."""
    by_key: dict[tuple, list[int]] = {}
    for i, ft in enumerate(fts):
        by_key.setdefault(batch_key(ft), []).append(i)
    groups: list[list[int]] = []
    for members in by_key.values():
        try:
            check_batchable([fts[i] for i in members])
            groups.append(members)
        except ConfigError:
            groups.extend([i] for i in members)
    return groups


class FineTuneWorker:
    """A Ray Data actor: holds the base pipeline, runs the planned fine-tunes of each batch of rows.

    With fine_tunes_per_pass K > 1 a batch holds up to K fine-tunes; those that can share a batch
    train together in one UNet pass (`finetune_lora_batched`), the others one by one.
    """

    def __init__(self, cfg: ZooConfig, base_hash: str, own_process: bool = True, progress: Any = None):
        if own_process:  # a Ray actor's process is the worker's alone to configure
            torch.set_num_threads(max(1, int(cfg.num_cpus_per_worker)))
            diffusers.utils.logging.disable_progress_bar()  # it loads the base once, then only fine-tunes
        self.cfg, self.base_hash = cfg, base_hash
        self.progress = progress  # where the steps of running fine-tunes go (zoo.progress), or None
        self.store = ZooStore(cfg.root)
        # Ray gives a GPU worker its device(s) through CUDA_VISIBLE_DEVICES; "cuda" is the first.
        self.device = "cuda" if cfg.num_gpus_per_worker > 0 else cfg.finetune.device
        if base_fingerprint(cfg.base) != base_hash:  # this node holds another copy of the base
            raise LoraleakError(f"base {cfg.base!r} on {socket.gethostname()} differs from the planned base "
                                f"{base_hash}")
        self.pipe = load_base_pipeline(cfg.base, device=self.device)
        self.resolution = pipeline_resolution(self.pipe)
        self.batched_options = cfg.batched_run_options() if cfg.fine_tunes_per_pass > 1 else None
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._class_images: dict[tuple, list] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.fine_tune_together(batch.to_pylist()), schema=RESULT_SCHEMA)

    def _class_images_for(self, ft: Any) -> list | None:
        """Prior-preservation images, sampled (or read from the cache) once per worker and setting."""
        if not ft.prior_preservation:
            return None
        key = (ft.class_prompt, ft.num_class_images, ft.class_images_seed, ft.class_inference_steps,
               ft.class_guidance_scale)
        if key not in self._class_images:
            self._class_images[key] = node_class_images(self.cfg, self.store, self.pipe, self.base_hash, ft)
        return self._class_images[key]

    def _finetune_config(self, row: dict[str, Any]) -> Any:
        return replace(from_dict(FinetuneConfig, json.loads(row["finetune"])), device=self.device)

    def _images(self, row: dict[str, Any]) -> list:
        """The identity's images, as the plan hashed them."""
        from ray import cloudpickle  # ray: see fine_tune_record


        images = cloudpickle.loads(row["identity"]).load(self.resolution)
        if [image_sha256(im) for im in images] != row["image_hashes"]:
            raise InputError(f"the images of {row['identity_id']} changed or became unreadable since the zoo was "
                             f"planned ({len(images)} of {len(row['image_hashes'])} load, hashes differ); "
                             "rerun the build to plan them afresh")
        return images

    def _publish(self, row: dict[str, Any], stage: Path, result: Any) -> list[dict[str, Any]]:
        """Defend the staged snapshots, publish them whole, return their rows (fields besides the common ones)."""
        return publish_snapshots(self.store, self.cfg, row["lora_id"], stage, result.snapshots,
                                 {step: loss_before(result.losses, step) for step, _ in result.snapshots},
                                 result.final_loss)

    def _single(self, row: dict[str, Any], ft: Any, images: list) -> list[dict[str, Any]]:
        with self.store.staging_dir(row["lora_id"]) as stage:
            result = finetune_lora(self.pipe, images, ft, stage, base_ref=self.cfg.base,
                                   base_fingerprint=self.base_hash, class_images=self._class_images_for(ft),
                                   show_progress=False, on_step=step_reporter(self.progress, [row["lora_id"]]))
            return self._publish(row, stage, result)

    def _together(self, rows: list[dict[str, Any]], fts: list[Any],
                  image_sets: list[list]) -> list[tuple[list[dict[str, Any]], str | None]]:
        """One UNet pass for all; a fine-tune that fails in it (diverged) fails alone."""
        with ExitStack() as stack:
            stages = [stack.enter_context(self.store.staging_dir(row["lora_id"])) for row in rows]
            results = finetune_lora_batched(
                self.pipe, image_sets, fts, stages, options=self.batched_options, base_ref=self.cfg.base,
                base_fingerprint=self.base_hash, class_images=[self._class_images_for(ft) for ft in fts],
                return_exceptions=True, show_progress=False,
                on_step=step_reporter(self.progress, [row["lora_id"] for row in rows]))
            outcomes = []
            for row, stage, result in zip(rows, stages, results):
                try:
                    if isinstance(result, BaseException):
                        raise result
                    outcomes.append((self._publish(row, stage, result), None))
                except Exception as e:
                    outcomes.append(self._failure(row, e))
            return outcomes

    def _failure(self, row: dict[str, Any], error: Exception) -> tuple[list[dict[str, Any]], str]:
        message = _first_line(error)
        logger.warning("fine-tune %s of %s failed: %s", row["lora_id"], row["identity_id"], message)
        self._recover()
        return [{}], message

    def _recover(self) -> None:
        """Leave the pipeline clean for the next fine-tune after one failed midway."""
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if loaded_adapters(self.pipe):
            self.pipe = load_base_pipeline(self.cfg.base, device=self.device)

    def fine_tune(self, row: dict[str, Any]) -> dict[str, Any]:
        """Run one planned fine-tune (a `fine_tune_record`); its part is written, done or failed."""
        return self.fine_tune_together([row])[0]

    def fine_tune_together(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run planned fine-tunes: in shared UNet passes where fine_tunes_per_pass and their settings
        allow, else one by one. Each becomes its own part, done or failed; one result per row."""
        fts = [self._finetune_config(row) for row in rows]
        outcomes: list[Outcome | None] = [None] * len(rows)
        loaded: dict[int, list] = {}
        for i, row in enumerate(rows):
            # The old part (failed, or pointing at files that went missing) goes first: while this
            # fine-tune replaces the files, no row lists them.
            delete_part(self.store, row["lora_id"])
            started_at, t0 = datetime.now(timezone.utc), time.perf_counter()
            try:
                loaded[i] = self._images(row)
            except Exception as e:  # one fine-tune's failure is a failed row, not a failed build
                outcomes[i] = (*self._failure(row, e), started_at, time.perf_counter() - t0)
        ready = list(loaded)
        if self.cfg.fine_tunes_per_pass > 1:
            groups = [[ready[j] for j in group] for group in batch_groups([fts[i] for i in ready])]
        else:
            groups = [[i] for i in ready]
        for members in groups:
            if len(members) > 1:
                started_at, t0 = datetime.now(timezone.utc), time.perf_counter()
                try:
                    together = self._together([rows[i] for i in members], [fts[i] for i in members],
                                              [loaded[i] for i in members])
                except Exception as e:  # the pass as a whole (out of memory...): one by one instead
                    logger.warning("zoo: a pass of %d fine-tunes failed (%s); running them one by one",
                                   len(members), _first_line(e))
                    self._recover()
                else:
                    wall_time_s = time.perf_counter() - t0
                    for i, (snapshot_rows, error) in zip(members, together):
                        outcomes[i] = (snapshot_rows, error, started_at, wall_time_s)
                    continue
            for i in members:
                started_at, t0 = datetime.now(timezone.utc), time.perf_counter()
                try:
                    snapshot_rows, error = self._single(rows[i], fts[i], loaded[i]), None
                except Exception as e:
                    snapshot_rows, error = self._failure(rows[i], e)
                outcomes[i] = (snapshot_rows, error, started_at, time.perf_counter() - t0)
        return [self._record(row, ft, *outcome) for row, ft, outcome in zip(rows, fts, outcomes)]

    def _record(self, row: dict[str, Any], ft: Any, snapshot_rows: list[dict[str, Any]], error: str | None,
                started_at: datetime, wall_time_s: float) -> dict[str, Any]:
        """Write the fine-tune's part; return its result row."""
        common = write_fine_tune_part(self.store, self.cfg, self.base_hash, row, ft, snapshot_rows, error,
                                      started_at, wall_time_s, self.name)
        return {"lora_id": row["lora_id"], "identity_id": row["identity_id"], "status": common["status"],
                "error": error, "final_loss": snapshot_rows[0].get("final_loss"), "wall_time_s": wall_time_s}


def _ray_results(cfg: ZooConfig, plan: ZooPlan, pending: list[PlannedFineTune],
                 counter: Any) -> Iterator[dict[str, Any]]:
    import ray  # ray starts slowly: only a build that fans out pays for it (cluster.connect_ray)
    import ray.data

    workers = min(cfg.workers, len(pending))
    warn_if_short("zoo", workers, {"CPU": workers * cfg.num_cpus_per_worker,
                                   "GPU": workers * cfg.num_gpus_per_worker})
    per_pass = cfg.fine_tunes_per_pass
    # One block per batch of K: a worker takes K fine-tunes at a time.
    ds = ray.data.from_items([fine_tune_record(ft) for ft in pending],
                             override_num_blocks=math.ceil(len(pending) / per_pass))
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor fault tolerance: max_restarts and
        # max_task_retries still travel as (deprecated) extra remote args.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        results = ds.map_batches(
            FineTuneWorker, batch_size=per_pass, batch_format="pyarrow",
            # One pass in flight per actor: with Ray Data's default (several), the first actor to start
            # takes every queued pass and the pool drops the idle one -- measured on 2 passes and 2
            # workers: one actor ran both, one after the other, while a CPU stayed free.
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs={"cfg": cfg, "base_hash": plan.base_hash, "progress": counter},
            num_cpus=cfg.num_cpus_per_worker, num_gpus=cfg.num_gpus_per_worker or None,
            max_restarts=cfg.max_retries, max_task_retries=cfg.max_retries)
    results.context.enable_progress_bars = False  # the build shows its own (done / failed / left, rate)
    return results.iter_rows()


def _local_results(cfg: ZooConfig, plan: ZooPlan, pending: list[PlannedFineTune],
                   bar: StepBar | None) -> Iterator[dict[str, Any]]:
    worker = FineTuneWorker(cfg, plan.base_hash, own_process=False, progress=bar)  # reports in this thread
    per_pass = cfg.fine_tunes_per_pass
    for start in range(0, len(pending), per_pass):
        yield from worker.fine_tune_together([fine_tune_record(ft) for ft in pending[start:start + per_pass]])


def run_fine_tunes(cfg: ZooConfig, plan: ZooPlan, pending: list[PlannedFineTune],
                   show_progress: bool = True) -> Iterator[dict[str, Any]]:
    """Run `pending` on Ray actors (or here, with workers 0); yield one result per fine-tune as it ends."""
    import ray  # see _ray_results
    from ray.data.exceptions import SystemException

    if cfg.fine_tunes_per_pass > 1:  # fine-tunes that can share a pass side by side, so that batches fill
        pending = sorted(pending, key=lambda ft: repr(batch_key(ft.finetune)))
    # In fine-tune steps, from the workers' reports (zoo.progress); started after the class images, which
    # have their own bar, so its rate and ETA are the fine-tunes' alone.
    totals = {ft.lora_id: ft.finetune.steps for ft in pending}
    bar = StepBar(totals, show_progress)
    counter = None
    try:
        watching: Any = nullcontext()
        if cfg.workers:
            connect_ray()
            # The workers report their steps to an actor the driver reads, named after the zoo so that a sweep's
            # driver can read it too (zoo.progress.read_progress); one build per root at a time (the lock).
            counter = ray.remote(StepCounter).options(num_cpus=0, name=progress_actor_name(cfg.root),
                                                      get_if_exists=True).remote()
            ray.get(counter.start.remote(totals))
            if show_progress:
                watching = polled(counter, bar)
            results = _ray_results(cfg, plan, pending, counter)
        else:
            results = _local_results(cfg, plan, pending, bar if show_progress else None)
        with watching:
            for row in results:
                bar.finished(row["lora_id"], row["status"])  # DONE or FAILED
                yield row
    except (ray.exceptions.RayError, SystemException) as e:
        ended = sum(bar.counts.values())
        raise LoraleakError(f"zoo build stopped: {_first_line(e, 300)} ({ended} fine-tunes finished and are kept; "
                            "rerun the build to resume)") from e
    finally:
        bar.close()
        if counter is not None:
            ray.kill(counter)


def _loss_stats(losses: list[float]) -> dict[str, float]:
    if not losses:
        return {}
    return {"final_loss_mean": statistics.fmean(losses), "final_loss_min": min(losses),
            "final_loss_max": max(losses), "final_loss_std": statistics.pstdev(losses)}


def run_plan(cfg: ZooConfig, plan: ZooPlan, show_progress: bool = True,
             undefended_twin: str | None = None) -> dict[str, Any]:
    """Record the config in the root, run what the plan still lacks, compact the manifest, and summarise.

    `undefended_twin`: the root of the same zoo without the defense; a post-hoc-defended zoo derives the
    fine-tunes it has finished from it instead of training them again (zoo.derive)."""
    store = ZooStore(cfg.root)
    record_zoo_config(cfg)
    finished = finished_lora_ids(store)
    pending = [ft for ft in plan.fine_tunes if ft.lora_id not in finished]
    logger.info("zoo %s: %d fine-tunes planned, %d already done, %d to run %s", store.uri, len(plan.fine_tunes),
                len(plan.fine_tunes) - len(pending), len(pending),
                f"on {cfg.workers} Ray worker(s)" if cfg.workers else "in this process")
    started = time.perf_counter()
    to_train, derived, train_s = pending, 0, 0.0
    if pending:
        # One build per root at a time: what a killed one left half-written is removed, never resumed.
        if removed := store.remove_leftovers():
            logger.info("zoo %s: removed %d half-written file(s) of an interrupted build", store.uri, removed)
        store.delete_file(store.manifest_path)  # the compaction is stale from the first new part on
        if undefended_twin is not None and cfg.defense.post_hoc:
            to_train, derived = derive_from_twin(cfg, plan, pending, undefended_twin)
    if to_train:
        train_started = time.perf_counter()
        sample_class_images_once(cfg, plan, to_train, show_progress)
        for _ in run_fine_tunes(cfg, plan, to_train, show_progress):
            pass
        train_s = time.perf_counter() - train_started
    run_s = time.perf_counter() - started
    table = compact_manifest(store)

    planned = {ft.lora_id for ft in plan.fine_tunes}
    by_id: dict[str, dict[str, Any]] = {}
    for row in table.select(["lora_id", "identity_id", "status", "error", "final_loss"]).to_pylist():
        if row["lora_id"] in planned:
            by_id.setdefault(row["lora_id"], row)
    done = [r for r in by_id.values() if r["status"] == DONE]
    failed = [r for r in by_id.values() if r["status"] == FAILED]
    return {
        "root": store.uri,
        "planned": len(plan.fine_tunes),
        "already_done": len(plan.fine_tunes) - len(pending),
        "ran": len(pending),
        "derived": derived,  # of those that ran: copied from the undefended twin and defended, not trained
        "trained": len(to_train),
        "done": len(done),
        "failed": len(failed),
        "skipped_identities": [{"identity_id": i, "reason": why} for i, why in plan.skipped_identities],
        "run_time_s": run_s,
        "fine_tunes_per_minute": len(to_train) / train_s * 60 if to_train else None,  # trained ones
        **_loss_stats([r["final_loss"] for r in done]),
        "manifest_rows": table.num_rows,
        "zoo_fine_tunes": len(set(table["lora_id"].to_pylist())),
        "failures": [{"lora_id": r["lora_id"], "identity_id": r["identity_id"], "error": r["error"]}
                     for r in failed[:20]],
    }


def build_zoo(cfg: ZooConfig, show_progress: bool = True, undefended_twin: str | None = None) -> dict[str, Any]:
    """Plan the zoo, run every fine-tune not yet done, compact the manifest; tracked in MLflow.

    A post-hoc-defended zoo derives what `undefended_twin` (the root of the same zoo with `defense: none`)
    has finished instead of training it (`run_plan`). One build per local root at a time (its folder lock);
    an object-store root has no lock."""
    if not ZooStore(cfg.root).is_local:
        return _build_zoo(cfg, show_progress, undefended_twin)
    with folder_lock(ZooStore(cfg.root).path, f"zoo build {cfg.root}"):
        return _build_zoo(cfg, show_progress, undefended_twin)


def _build_zoo(cfg: ZooConfig, show_progress: bool, undefended_twin: str | None) -> dict[str, Any]:
    check_identity_source(cfg)  # before planning, which hashes every image
    started = time.perf_counter()
    store = ZooStore(cfg.root)
    folder = str(Path(store.path).resolve()) if store.is_local else cfg.root
    tracked = mlflow_run(cfg.experiment, f"zoo {cfg.root}", cfg.tracking_uri, cfg.workdir, cfg.parent_run_id,
                         {FOLDER_TAG: folder}) if cfg.tracking else nullcontext()
    with tracked as run:
        if run is not None:
            run.log_params(to_dict(cfg))
        plan = plan_zoo(cfg, show_progress)
        summary = run_plan(cfg, plan, show_progress, undefended_twin)
        summary["wall_time_s"] = time.perf_counter() - started
        if run is not None:
            run.log_metrics({k: v for k, v in summary.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
            run.log_dict(summary, "build_summary.json")
            run.log_dict(zoo_info(cfg.root), "zoo_summary.json")
    logger.info("zoo %s: %d done, %d failed of %d planned (%d ran: %d trained, %d derived; %s fine-tunes/min)",
                summary["root"], summary["done"], summary["failed"], summary["planned"], summary["ran"],
                summary["trained"], summary["derived"],
                f"{summary['fine_tunes_per_minute']:.1f}" if summary["fine_tunes_per_minute"] else "-")
    return summary
