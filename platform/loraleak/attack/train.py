"""Training the attack over a LoRA zoo with Ray Train: `TorchTrainer` (DDP), checkpoints, resume, MLflow.

`train_loop_per_worker` is the whole algorithm, to be read top to bottom. Each step, on each worker:

    a batch of LoRAs θ_r of different victims (+ their steps r)
        -> encoder -> z (a prompt embedding per LoRA)
        -> each victim's own fine-tuned UNet (base + its LoRA, all in one batched pass) conditioned on z
        -> ε-prediction MSE on that victim's private images (+ KL, + MSE to the true prompt embedding)

Reproducible and resumable: model init from `seed`; epoch e's sample order from (seed, e); all
randomness of step s from (seed, rank, s). A checkpoint (encoder + optimizer + step) is all a resumed
run needs to continue exactly as an uninterrupted one would. A rerun with the same `run_name` and
storage resumes from the latest checkpoint (Ray Train V2 restores it from the storage folder).

`train_attack(cfg)` runs it (on a local `ray.init()` unless a cluster is reachable), logs an MLflow
run and writes the final model to out_dir/attack.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import diffusers
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..base.attention import attention_processor
from ..base.loading import BUILTIN_BASES, base_fingerprint, load_base_pipeline
from ..base.precision import warn_if_emulated_bf16
from ..cluster import connect_ray
from ..config import from_dict, load_yaml, to_dict
from ..errors import ConfigError, LoraleakError
from ..finetune.class_images import pipeline_resolution
from ..leftovers import remove_temporary, remove_unregistered_checkpoints
from ..locking import folder_lock
from ..lora.batched import epsilon_loss, install_batched_lora
from ..tracking import FOLDER_TAG, mlflow_run, resolve_tracking_uri
from ..zoo.plan import base_resolution
from ..zoo.storage import ZooStore
from .config import AttackTrainConfig
from .data import (ImageLatents, LoraSamples, PromptEmbeddings, check_identity_source, collate_samples, load_sample,
                   select_samples)
from .model import NetworkAutoencoder

if TYPE_CHECKING:
    from .data import ZooSelection

logger = logging.getLogger(__name__)

MODEL_DIR = "model"  # inside a checkpoint: the encoder, as save_pretrained writes it
TRAINER_STATE = "trainer.pt"  # inside a checkpoint: optimizer state and step
TRAINING_RECORD = "training.json"  # beside the final model: what reconstruct needs to know
EVAL_SEED = 12_345  # evaluations draw the same noise every time: their losses compare across steps and runs
EVAL_BATCH = 8  # LoRAs per evaluation pass
EVAL_IMAGES = 4  # noised images per LoRA in an evaluation


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of all randomness of one training step on one worker."""
    return (seed * 1_000_003 + rank) * 1_000_003 + step


# ---------------------------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train  # ray starts slowly: only Ray Train's workers and the driver's fit import it
    import ray.train.torch

    cfg = from_dict(AttackTrainConfig, config["cfg"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    # Setup: the frozen base, the encoder and its optimizer (from the latest checkpoint when there is one),
    # this worker's batches, the fixed evaluation sets.
    decoder = _Decoder.load(cfg, device)
    encoder, state, start_step = _restore_or_init(cfg, decoder)
    model = ray.train.torch.prepare_model(encoder)  # to the device; DDP when there are several workers
    optimizer = torch.optim.AdamW(encoder.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    load = functools.partial(load_sample, mode=cfg.model.input_mode, use_initial=cfg.use_initial_lora,
                             layout=decoder.selection.layout)  # picklable: DataLoader processes call it
    batches = _training_batches(cfg, load, decoder.selection, rank, world_size, start_step)
    evaluator = _Evaluator(cfg, decoder, encoder, model, load, rank, device)
    # Where this run starts: step 0, or the checkpoint's step (its losses confirm what was restored).
    summary: dict[str, Any] = {"start_step": start_step, "losses": [], "references": evaluator.references,
                               "evaluations": {start_step: evaluator.losses()}}
    log = _TrainingLog(cfg, rank, world_size, start_step, config)  # its window of steps starts now
    log.record(start_step, {**evaluator.references, **summary["evaluations"][start_step]})

    # The loop: a step per batch; validation every val_every steps, a checkpoint every checkpoint_every.
    generator = torch.Generator()
    model.train()
    for step in range(start_step + 1, cfg.max_steps + 1):
        generator.manual_seed(step_seed(cfg.seed, rank, step))
        batch = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            terms = decoder.loss(batch, model(batch.matrices, batch.steps, generator), generator)
        terms.total.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(encoder.trainable_parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = terms.as_floats()
        if not all(math.isfinite(v) for v in metrics.values()):
            raise LoraleakError(f"attack training diverged at step {step}: {metrics} (lower lr, or set grad_clip)")
        summary["losses"].append(metrics["loss"])
        log.step(step, metrics)

        validate_now = step % cfg.val_every == 0 or step == cfg.max_steps
        checkpoint_now = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if validate_now or checkpoint_now:
            report = log.window_report(step)
            if validate_now and rank == 0:
                summary["evaluations"][step] = evaluation = evaluator.losses()
                report.update(evaluation)
                log.record(step, evaluation)
            log.flush()
            _report(report, encoder, optimizer, step, save=checkpoint_now and rank == 0)
            log.new_window()
        elif step % cfg.log_every == 0:
            log.flush()
    if start_step >= cfg.max_steps:
        # Nothing to train (continued from a checkpoint at max_steps): report that checkpoint as this run's.
        _report({"step": start_step, **summary["evaluations"][start_step]}, encoder, optimizer, start_step,
                save=rank == 0)
    log.close()
    return summary


# --- the loop's parts, in the order it uses them


@dataclass
class _Decoder:
    """The frozen base as the attack's decoder: its UNet decodes each sample through that sample's own LoRA
    (all in one batched pass), its VAE encodes the victims' images, its CLIP text transformer sits inside
    the encoder."""

    cfg: AttackTrainConfig
    pipe: Any
    selection: ZooSelection
    unet: torch.nn.Module
    noise_scheduler: DDPMScheduler
    images: ImageLatents
    prompts: PromptEmbeddings | None  # the true prompts' embeddings, when the loss reads them

    @classmethod
    def load(cls, cfg: AttackTrainConfig, device: torch.device) -> _Decoder:
        diffusers.utils.logging.disable_progress_bar()
        pipe = load_base_pipeline(cfg.base, device=device)
        selection = select_samples(cfg, base_hash=base_fingerprint(cfg.base))
        unet = pipe.unet.eval()
        install_batched_lora(unet, sorted({spec.module for spec in selection.layout}))  # once, for the whole run
        # bf16 on a CPU: the unfused attention (loraleak.base.attention says why).
        amp_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
        warn_if_emulated_bf16(device, amp_dtype, "attack training")
        unet.set_attn_processor(attention_processor("auto", device, amp_dtype))
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        images = ImageLatents(pipe.vae, cfg.identities, pipeline_resolution(pipe), device)
        prompts = PromptEmbeddings(pipe, device) if cfg.model.embedding_mse_weight else None
        return cls(cfg, pipe, selection, unet, noise_scheduler, images, prompts)

    def loss(self, batch: Any, out: Any, generator: torch.Generator) -> Any:
        """The training loss of a batch given the encoder's output: ε-MSE (+ KL, + MSE to the true prompt)."""
        cfg = self.cfg
        latents = self.images.sample(batch.rows, cfg.images_per_sample, generator)
        return epsilon_loss(self.unet, self.noise_scheduler, latents, out.z, batch.factors, batch.scales, generator,
                            kl=out.kl, kl_weight=cfg.model.kl_weight,
                            target_embeds=self.prompts(batch.rows) if self.prompts is not None else None,
                            embedding_mse_weight=cfg.model.embedding_mse_weight)


def _restore_or_init(cfg: AttackTrainConfig, decoder: _Decoder) -> tuple[NetworkAutoencoder, dict | None, int]:
    """The encoder, the trainer state (optimizer, step) and the step to start from: those of the latest
    checkpoint when there is one (this run's own, else the earlier run's it continues), else a fresh
    encoder and step 0."""
    import ray.train  # see train_loop_per_worker

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(cfg.resume_from)
    if checkpoint is None:
        torch.manual_seed(cfg.seed)  # the same initial weights on every worker and every rerun
        encoder = NetworkAutoencoder.from_pipeline(decoder.pipe, decoder.selection.layout, cfg.model,
                                                   base_fingerprint=decoder.selection.base_hash)
        return encoder, None, 0
    with checkpoint.as_directory() as directory:
        encoder = NetworkAutoencoder.from_pretrained(Path(directory) / MODEL_DIR, decoder.pipe.text_encoder)
        state = torch.load(Path(directory) / TRAINER_STATE, map_location="cpu", weights_only=True)
    if encoder.config != cfg.model or encoder.layout != decoder.selection.layout:
        raise ConfigError(f"run {cfg.run_name!r} in {cfg.storage} holds a checkpoint of another attack model "
                          f"({to_dict(encoder.config)}); give this one a new run_name")
    return encoder, state, int(state["step"])


def _training_batches(cfg: AttackTrainConfig, load: Callable, selection: ZooSelection, rank: int, world_size: int,
                      start_step: int) -> Iterator[Any]:
    """This worker's shard of the training samples, in batches, continuing where the checkpoint stopped."""
    stream = LoraSamples(cfg.zoo, selection.train, load, cfg.seed, rank, world_size,
                         start=start_step * cfg.batch_size)
    return iter(torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, collate_fn=collate_samples,
                                            num_workers=cfg.loader_workers))


class _Evaluator:
    """Fixed evaluation sets, measured by rank 0 with z = μ (as at attack time), the same batches and the
    same noise every time, whatever the batch size, workers or seed: losses compare across steps and
    across runs. The validation LoRAs, and as many training LoRAs (the gap between the two is what the
    encoder fails to generalise). Other ranks measure nothing (empty sets).

    `references`: the same losses with two fixed z, what an attack's losses are read against: the
    victim's true instance prompt (the trigger the fine-tune learned) and the empty prompt (nothing about
    the victim). Their gap is how much z can matter at all on this zoo: when the victim's UNet shows its
    person under any prompt, the gap is small, and so is any difference between attacks."""

    def __init__(self, cfg: AttackTrainConfig, decoder: _Decoder, encoder: NetworkAutoencoder,
                 model: torch.nn.Module, load: Callable, rank: int, device: torch.device) -> None:
        self.decoder, self.encoder, self.model = decoder, encoder, model
        store = ZooStore(cfg.zoo)

        def fixed_batches(rows):
            return [collate_samples([load(store, row) for row in rows[i:i + EVAL_BATCH]])
                    for i in range(0, len(rows), EVAL_BATCH)]

        self.sets: dict[str, list[Any]] = {}
        self.references: dict[str, float] = {}
        if rank != 0:
            return
        selection = decoder.selection
        self.sets["train_eval_loss"] = fixed_batches(selection.train[: cfg.val_max_samples])
        if selection.val:
            self.sets["val_loss"] = fixed_batches(selection.val)
        true_prompts = decoder.prompts or PromptEmbeddings(decoder.pipe, device)
        empty = decoder.pipe.encode_prompt([""], device, 1, False)[0].float()
        self.references = {**self.losses(lambda batch: true_prompts(batch.rows), ".true_prompt"),
                           **self.losses(lambda batch: empty.expand(len(batch), -1, -1), ".empty_prompt")}

    @torch.no_grad()
    def losses(self, z_of: Callable[[Any], torch.Tensor] | None = None, suffix: str = "") -> dict[str, float]:
        """Mean ε-MSE of each evaluation set, with z = μ (or z_of(batch): the reference losses)."""
        decoder = self.decoder
        self.model.eval()
        results = {}
        for name, fixed in self.sets.items():
            generator = torch.Generator().manual_seed(EVAL_SEED)
            total, count = 0.0, 0
            for batch in fixed:
                latents = decoder.images.sample(batch.rows, EVAL_IMAGES, generator)
                z = self.encoder.encode_mean(batch.matrices, batch.steps) if z_of is None else z_of(batch)
                terms = epsilon_loss(decoder.unet, decoder.noise_scheduler, latents, z, batch.factors, batch.scales,
                                     generator)
                total += float(terms.epsilon) * len(batch)
                count += len(batch)
            results[name + suffix] = total / count
        self.model.train()
        return results


class _TrainingLog:
    """What a worker shows and records of its steps: the progress bar (rank 0's), the metrics of rank 0 to
    the driver's MLflow run (`_MetricsLog`), and the window of steps since the last report (mean loss,
    samples per second)."""

    def __init__(self, cfg: AttackTrainConfig, rank: int, world_size: int, start_step: int,
                 config: dict[str, Any]) -> None:
        self.samples_per_step = cfg.batch_size * world_size
        self.tracker = _MetricsLog(config.get("tracking")) if rank == 0 else None
        self.progress = tqdm(total=cfg.max_steps, initial=start_step, desc="attack", unit="step",
                             disable=rank != 0 or not config.get("show_progress", True))
        self.samples_per_s = 0.0
        self.new_window()

    def new_window(self) -> None:
        self.window_loss, self.window_steps, self.window_started = 0.0, 0, time.perf_counter()

    def record(self, step: int, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.add(step, metrics)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.window_loss, self.window_steps = self.window_loss + metrics["loss"], self.window_steps + 1
        self.samples_per_s = self.window_steps * self.samples_per_step / (time.perf_counter() - self.window_started)
        self.progress.update()
        self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{self.samples_per_s:.1f}")
        self.record(step, {**metrics, "samples_per_s": self.samples_per_s})

    def window_report(self, step: int) -> dict[str, float]:
        return {"step": step, "loss": self.window_loss / self.window_steps, "samples_per_s": self.samples_per_s}

    def flush(self) -> None:
        if self.tracker is not None:
            self.tracker.flush()

    def close(self) -> None:
        self.progress.close()
        self.flush()


def _report(metrics: dict[str, Any], encoder: NetworkAutoencoder, optimizer: torch.optim.Optimizer, step: int,
            save: bool) -> None:
    """Report `metrics` to Ray Train, with a checkpoint (encoder + optimizer + step) when `save`. Every
    worker reports (it is a barrier); only rank 0 saves."""
    import ray.train  # see train_loop_per_worker

    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if save:
            encoder.save_pretrained(Path(directory) / MODEL_DIR)
            torch.save({"step": step, "optimizer": optimizer.state_dict()}, Path(directory) / TRAINER_STATE)
            saved = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=saved)


class _MetricsLog:
    """Per-step metrics of rank 0, written to the driver's MLflow run a batch at a time."""

    def __init__(self, tracking: dict[str, str] | None) -> None:
        self.pending: list[Any] = []
        self.client = self.run_id = None
        if tracking:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri=tracking["uri"]), tracking["run_id"]

    def add(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if self.client is not None:
            now = int(time.time() * 1000)
            self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # MLflow's limit on metrics per batch
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        self.pending = []


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class AttackTrainResult:
    attack_dir: Path  # the final model (save_pretrained) and its training record
    step: int  # the step it was saved at
    start_step: int  # where this run started (> 0: resumed from a checkpoint)
    # By step, of this run: "val_loss" (validation LoRAs) and "train_eval_loss" (as many training
    # LoRAs), both with z = μ and fixed noise; the first entry is the run's starting point.
    evaluations: dict[int, dict[str, float]]
    # The same losses with z = the true instance prompt / the empty prompt ("val_loss.true_prompt",
    # "val_loss.empty_prompt", "train_eval_loss.<...>"): how much z matters on this zoo.
    references: dict[str, float]
    losses: list[float]  # training loss of every step of this run
    checkpoint_path: str  # the latest checkpoint in Ray Train's storage
    mlflow_run_id: str | None


def _absolute(ref: str) -> str:
    """Ray Train workers run in their own directory: local paths must not be relative."""
    if ref in BUILTIN_BASES or "://" in ref or not Path(ref).expanduser().exists():
        return ref  # a built-in base, a URI or a hub id
    return str(Path(ref).expanduser().resolve())


def for_workers(cfg: AttackTrainConfig) -> AttackTrainConfig:
    identities = cfg.identities
    if identities.root is not None:
        identities = dataclasses.replace(identities, root=identities.root.expanduser().resolve())
    resume_from = _absolute(cfg.resume_from) if cfg.resume_from else None
    return dataclasses.replace(cfg, zoo=_absolute(cfg.zoo), base=_absolute(cfg.base), identities=identities,
                               out_dir=cfg.out_dir.expanduser().resolve(), storage_path=cfg.storage,
                               workdir=cfg.workdir.expanduser().resolve(), resume_from=resume_from)


def _user_error(error: Exception) -> LoraleakError:
    """A worker's LoraleakError, as it was raised there (one line); anything else in one line too."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        cause: BaseException | None = failure
        while cause is not None:
            if isinstance(cause, LoraleakError):
                return type(cause)(str(cause))
            cause = cause.__cause__
    # A worker's failure prints as its traceback; the last line is the exception itself.
    lines = next((str(f) for f in failures.values()), str(error)).strip().splitlines()
    return LoraleakError(f"attack training failed: {lines[-1] if lines else type(error).__name__} "
                         "(a rerun resumes from the latest checkpoint)")


def export_model(checkpoint_dir: Path, cfg: AttackTrainConfig, selection: ZooSelection, step: int,
                 evaluation: dict[str, float], references: dict[str, float]) -> Path:
    """Copy the checkpoint's encoder to out_dir/attack (replacing an older one) with its training record."""
    final = cfg.attack_dir
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".attack-", dir=final.parent))
    shutil.copytree(checkpoint_dir / MODEL_DIR, staging, dirs_exist_ok=True)
    record = {"zoo": cfg.zoo, "base": cfg.base, "base_fingerprint": selection.base_hash, "step": step,
              "lora_steps": selection.lora_steps, "lora_alpha": selection.lora_alpha,
              "use_initial_lora": cfg.use_initial_lora,
              "snapshots": cfg.snapshots, "train_samples": len(selection.train),
              "train_identities": selection.train_identities, "val_identities": selection.val_identities,
              **evaluation, "references": references, "config": to_dict(cfg)}
    (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=1))
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def train_attack(cfg: AttackTrainConfig, show_progress: bool = True) -> AttackTrainResult:
    """Train the attack on the zoo's attack_train LoRAs with Ray Train; resume the run if it exists.
    One training per out_dir at a time (its folder lock)."""
    with folder_lock(cfg.out_dir, f"attack train {cfg.run_name}") as out:
        # What a killed training left: its export's staging folder, a checkpoint Ray had not registered.
        removed = remove_temporary(out)
        if "://" not in cfg.storage:
            removed += remove_unregistered_checkpoints(Path(cfg.storage) / cfg.run_name)
        if removed:
            logger.info("attack %s: removed %d folder(s) left by a killed run", cfg.run_name, len(removed))
        return _train_attack(cfg, show_progress)


def _train_attack(cfg: AttackTrainConfig, show_progress: bool) -> AttackTrainResult:
    import ray.train  # see train_loop_per_worker
    from ray.train.torch import TorchTrainer

    cfg = for_workers(cfg)
    # Bad input fails here, at once, rather than on a worker after Ray has started.
    if cfg.resume_from and not (Path(cfg.resume_from) / TRAINER_STATE).is_file():
        raise ConfigError(f"resume_from: {cfg.resume_from} is not an attack checkpoint (no {TRAINER_STATE} in it)")
    selection = select_samples(cfg, base_hash=base_fingerprint(cfg.base))
    check_identity_source(cfg, selection, base_resolution(cfg.base))
    logger.info("attack: %d training samples of %d identities, %d validation LoRAs of %d identities",
                len(selection.train), selection.train_identities, len(selection.val), selection.val_identities)
    connect_ray()
    tracked = mlflow_run(cfg.experiment, f"attack {cfg.run_name}", cfg.tracking_uri, cfg.workdir, cfg.parent_run_id,
                         {FOLDER_TAG: str(cfg.out_dir)}) if cfg.tracking else nullcontext()
    with tracked as run:
        tracking = None
        if run is not None:
            run.log_params({**to_dict(cfg), "data": {
                "train_samples": len(selection.train), "train_identities": selection.train_identities,
                "val_samples": len(selection.val), "val_identities": selection.val_identities,
                "layout_matrices": len(selection.layout), "base_fingerprint": selection.base_hash}})
            tracking = {"uri": resolve_tracking_uri(cfg.tracking_uri, cfg.workdir), "run_id": run.run_id}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": to_dict(cfg), "tracking": tracking, "show_progress": show_progress},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                                   resources_per_worker=cfg.resources_per_worker),
            run_config=ray.train.RunConfig(
                name=cfg.run_name, storage_path=cfg.storage,
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep)))
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise _user_error(e) from e
        if result.checkpoint is None:
            raise LoraleakError(f"attack training of {cfg.run_name} ended without a checkpoint")
        summary = result.return_value or {}
        evaluations = {int(step): values for step, values in summary.get("evaluations", {}).items()}
        with result.checkpoint.as_directory() as directory:
            step = int(torch.load(Path(directory) / TRAINER_STATE, map_location="cpu", weights_only=True)["step"])
            evaluation = evaluations.get(step) or {k: v for k, v in (result.metrics or {}).items()
                                                   if k in ("val_loss", "train_eval_loss")}
            references = dict(summary.get("references", {}))
            attack_dir = export_model(Path(directory), cfg, selection, step, evaluation, references)
        if run is not None:
            run.log_metrics({f"final_{k}": v for k, v in evaluation.items()}, step=step)
            run.log_dict(json.loads((attack_dir / TRAINING_RECORD).read_text()), "attack_training.json")
    logger.info("attack model (step %d, %s) saved to %s", step, evaluation, attack_dir)
    return AttackTrainResult(attack_dir, step, int(summary.get("start_step", step)), evaluations, references,
                             list(summary.get("losses", [])), result.checkpoint.path,
                             run.run_id if run is not None else None)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> AttackTrainConfig:
    return load_yaml(AttackTrainConfig, path, overrides)

