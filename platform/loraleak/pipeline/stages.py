"""The study's stages as one type: identities -> base -> zoo -> attack -> baselines -> evaluation.

A `Stage` knows its `key` (a content key over its own settings and the keys of the stages it reads,
`loraleak.keys.content_key`), its `folder` under the study's out_dir (`<prefix>-<key>`), whether its
output there `is_complete`, how to `run` (through the stage's own library entry point, which keeps
that stage's own resume) and how to `load_result` once it is complete. `plan_stages(cfg)` builds them
all without running anything: `run_pipeline` loops over them, and the sweeps ask them which folders
their trials share. Nothing else derives a stage's folder name or its "done" marker.

Settings that only say how to run a stage (Ray workers, CPUs and GPUs, fine-tunes per pass,
checkpoint cadence) are left out of the keys: changing them resumes the same stage. The attack's
max_steps is in its key but not in its *line*'s (every other setting): a larger max_steps makes a new
attack folder that continues from the latest checkpoint of the same line at or below it (the earlier
attack stays as it was, for its own evaluation); see `AttackStage`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, get_args

from ..attack.config import AttackTrainConfig
from ..attack.train import TRAINER_STATE, TRAINING_RECORD, train_attack
from ..base.pretrain import PretrainConfig, pretrain_base
from ..config import to_dict
from ..errors import ConfigError
from ..evaluation.config import EvaluationConfig
from ..evaluation.evaluate import SUMMARY_FILE, _hash_dir, evaluate
from ..identities import assign_splits, make_source
from ..keys import content_key
from ..leftovers import complete_checkpoints
from ..zoo.build import build_zoo
from ..zoo.config import ZooConfig, check_identity_source
from ..zoo.manifest import finished_lora_ids
from ..zoo.plan import base_resolution, plan_zoo
from ..zoo.storage import ZooStore
from . import config as pipeline_config
from .config import (UNDEFENDED_CONDITION, PipelineConfig, stage_config, with_absolute_paths, with_overrides,
                     without_added_defaults)
from .tracking import StudyRun, earlier_run, nested, study_experiment, study_tracking_uri, study_workdir

logger = logging.getLogger(__name__)

# Every stage in the order it runs (what progress lines count), and those that build an output folder
# (what a sweep's `rerun` names).
STAGES = ("identities", "base", "zoo", "attack", "baselines", "evaluation", "report")
BuiltStage = Literal["base", "zoo", "attack", "baselines", "evaluation"]
BUILT_STAGES: tuple[str, ...] = get_args(BuiltStage)
KEY_CHARS = 8  # a stage folder's key: zoo-e583c7f2
# Beside an evaluation's summary: the inputs it was computed from. The folder's key names the upstream
# settings, but not what is in the upstream folders when the evaluation runs (a zoo with victims still
# failing, an attack trained further since): the evaluation is complete only for the inputs recorded here.
EVALUATION_INPUTS = "pipeline_inputs.json"
# Under out_dir: the condition images every evaluation of the study (a sweep: of every trial sharing its stages)
# reads and adds to (evaluation/image_cache.py). Not a stage: where images come from, not what they are (no key).
IMAGE_CACHE = "image-cache"
# In an attack folder: the key of its training line and its max_steps (how a longer attack finds it).
ATTACK_LINE = "attack_line.json"
# How to run a stage, not what it computes: left out of the stage keys (a change resumes the stage).
HOW_TO_RUN = {
    "zoo": ("workers", "num_cpus_per_worker", "num_gpus_per_worker", "max_retries", "fine_tunes_per_pass",
            "batched_options"),
    "attack": ("max_steps", "use_gpu", "resources_per_worker", "loader_workers", "max_failures",
               "checkpoints_to_keep", "checkpoint_every", "val_every", "log_every"),
    "evaluation": ("workers", "num_cpus_per_worker", "num_gpus_per_worker", "max_retries", "report_victims",
                   "report_images"),
}


def stage_key(*parts: Any) -> str:
    """A stage's key: its settings and the keys of the stages it reads, hashed together."""
    return content_key(parts, KEY_CHARS)


def settings_of(section: Any, stage: str) -> dict[str, Any]:
    """A section's settings that decide its result (its key's part)."""
    return without_added_defaults(stage, {k: v for k, v in to_dict(section).items()
                                          if k not in HOW_TO_RUN.get(stage, ())})


def tracking_wiring(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """The MLflow fields the pipeline sets in each stage's own config: the study's store and experiment
    (the stage runs nest under the pipeline run, which the MLflow UI shows only within one experiment)."""
    return {"tracking": cfg.tracking, "tracking_uri": study_tracking_uri(cfg, out) if cfg.tracking else None,
            "experiment": study_experiment(cfg, out), "workdir": study_workdir(out)}


@dataclass(frozen=True)
class RunContext:
    """What every stage's run shares: the study's folder, its MLflow store and run, whether to show progress."""

    out: Path  # the study's out_dir, resolved
    tracking: bool
    uri: str  # the MLflow store, resolved
    show_progress: bool = True
    study: StudyRun | None = None  # the pipeline run the stage runs nest under (None: not tracked)

    def run_of(self, folder: Path | str) -> str | None:
        """The MLflow run that built a stage folder (None when not tracked, or built before runs were tagged)."""
        return earlier_run(self.uri, folder) if self.tracking else None


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a half-written file counts as missing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Ran:
    """What a stage's run says: its progress line, and the MLflow run it logged when its entry point returns it."""

    detail: str
    mlflow_run_id: str | None = None


# eq=False: stages compare and hash by identity (a defended study has two zoo stages, equal or not).
@dataclass(frozen=True, eq=False)
class Stage:
    """One stage of one study. `describe` is its progress line before it runs; `run` returns the line after;
    `summary` is the line when it was complete already (then `run` is not called); `load_result` is what the
    later stages and the report read, once it is complete (given this run's `Ran`, if it ran).

    A stage answers from its folder as it finds it when first asked (`is_complete` does not change its
    mind within one `run_pipeline`): plan the stages again to look again."""

    name: ClassVar[str]
    prefix: ClassVar[str | None] = None  # its folder's name before the key; None: no folder
    cfg: PipelineConfig
    out: Path
    key: str | None
    note: str = ""  # said before describe() (the undefended study's stages)

    @property
    def folder(self) -> Path | None:
        return None if self.prefix is None else self.out / f"{self.prefix}-{self.key}"

    @property
    def label(self) -> str:
        """Its name in the lists of stages skipped: the undefended study's (the only stages with a note) are
        told apart from the defended study's own, so that reusing them is not read as reusing the others."""
        return f"undefended {self.name}" if self.note else self.name

    def describe(self) -> str:
        raise NotImplementedError

    def is_complete(self) -> bool:
        raise NotImplementedError

    def summary(self) -> str:
        raise NotImplementedError

    def run(self, ctx: RunContext) -> Ran:
        raise NotImplementedError

    def load_result(self, ctx: RunContext, ran: Ran | None = None) -> Any:
        return None


@dataclass(frozen=True, eq=False)
class IdentitiesStage(Stage):
    """A check, no output: the identity source gives enough held-out victims and some to train on."""

    name = "identities"

    def describe(self) -> str:
        return f"{self.cfg.identities.kind} source"

    def is_complete(self) -> bool:
        return False  # checked on every run: it costs nothing and a source folder may have changed

    def run(self, ctx: RunContext) -> Ran:
        cfg = self.cfg
        identities = make_source(cfg.identities).identities()
        ids = sorted(i.identity_id for i in identities)
        split = assign_splits(cfg.identities, identities)
        used = ids[: cfg.zoo.max_identities]
        heldout = sum(split[i] == "heldout" for i in used)
        if heldout < 2 or heldout == len(used):
            raise ConfigError(f"identities: {len(used)} identities give {heldout} held-out victims: the study "
                              "needs at least 2 held out (candidates to identify among) and some to train the "
                              "attack on")
        return Ran(f"{len(used)} identities: {len(used) - heldout} attack_train, {heldout} heldout")


@dataclass(frozen=True, eq=False)
class BaseStage(Stage):
    """The base every later stage uses: a reference (nothing to do) or a tiny base pretrained first."""

    name = "base"
    prefix = "base"

    @property
    def folder(self) -> Path | None:
        return None if self.cfg.base.pretrain is None else super().folder

    @property
    def ref(self) -> str:
        """The base reference the later stages use."""
        return self.cfg.base.ref if self.folder is None else str(self.folder)

    def describe(self) -> str:
        return self.cfg.base.ref if self.folder is None else f"pretrain a tiny base -> {self.folder}"

    def is_complete(self) -> bool:
        return self.folder is None or (self.folder / "training.json").is_file()

    def summary(self) -> str:
        if self.folder is None:
            return f"{self.cfg.base.ref} ({base_resolution(self.cfg.base.ref)} px), nothing to pretrain"
        return f"pretrained base in {self.folder}"

    def run(self, ctx: RunContext) -> Ran:
        pretrain_base(stage_config(PretrainConfig, self.cfg.base.pretrain, "base.pretrain", out_dir=self.folder))
        return Ran(f"pretrained base in {self.folder}")

    def load_result(self, ctx: RunContext, ran: Ran | None = None) -> str:
        return self.ref


@dataclass(frozen=True)
class ZooResult:
    config: ZooConfig
    mlflow_run_id: str | None


@dataclass(frozen=True, eq=False)
class ZooStage(Stage):
    """The LoRA zoo: every planned fine-tune of the identities, from the base."""

    name = "zoo"
    prefix = "zoo"
    base: BaseStage | None = None

    @cached_property
    def config(self) -> ZooConfig:
        return stage_config(ZooConfig, self.cfg.zoo, "zoo", root=str(self.folder), base=self.base.ref,
                            identities=self.cfg.identities, **tracking_wiring(self.cfg, self.out))

    @cached_property
    def _counts(self) -> tuple[int, int]:
        """(planned fine-tunes, those not finished yet)."""
        zoo = self.config
        check_identity_source(zoo)
        plan = plan_zoo(zoo, show_progress=False)
        pending = len({ft.lora_id for ft in plan.fine_tunes} - finished_lora_ids(ZooStore(zoo.root)))
        return len(plan.fine_tunes), pending

    @cached_property
    def twin(self) -> ZooStage | None:
        """This zoo without its defense (the zoo of the same study with `defense: none`, beside this one under
        out_dir) when the defense is post-hoc: the build copies the fine-tunes it has finished and defends them
        instead of training them again (zoo.derive). None for any other zoo."""
        if not self.cfg.zoo.defense.post_hoc:
            return None
        return plan_stages(with_overrides(self.cfg, {"zoo.defense": {"kind": "none"}}), self.out).zoo

    @property
    def undefended_twin(self) -> Path | None:
        return self.twin.folder if self.twin is not None else None

    def describe(self) -> str:
        planned, pending = self._counts
        ft = self.cfg.zoo.finetune
        derived = f" (those {self.twin.folder.name} has: copied and defended)" if self.twin is not None and pending else ""
        return f"{planned} fine-tunes ({ft.steps} steps, rank {ft.rank}), {pending} to run{derived} -> {self.folder}"

    def is_complete(self) -> bool:
        return self._counts[1] == 0

    def summary(self) -> str:
        return f"{self._counts[0]} fine-tunes in {self.folder}"

    def run(self, ctx: RunContext) -> Ran:
        twin = self.twin
        if twin is not None and undefended_study(self.cfg) is not None and not twin.is_complete():
            # The study builds the undefended zoo anyway (its attack is the rec_undefended condition): built
            # first, its fine-tunes are trained once, and this zoo copies and defends them.
            build_zoo(nested(twin.config, ctx.study), show_progress=ctx.show_progress)
        summary = build_zoo(nested(self.config, ctx.study), show_progress=ctx.show_progress,
                            undefended_twin=str(twin.folder) if twin is not None else None)
        derived = f", {summary['derived']} of them derived from {twin.folder.name}" if summary["derived"] else ""
        return Ran(f"{summary['done']} done, {summary['failed']} failed of {summary['planned']}{derived}")

    def load_result(self, ctx: RunContext, ran: Ran | None = None) -> ZooResult:
        return ZooResult(self.config, ctx.run_of(self.folder))


@dataclass(frozen=True)
class AttackResult:
    directory: Path  # the trained attack (what load_attack reads)
    mlflow_run_id: str | None


@dataclass(frozen=True)
class Continuation:
    """Where a longer attack starts: the latest checkpoint of an attack of the same line (every setting but
    max_steps) at or below this one's max_steps."""

    folder: Path  # the earlier attack's folder (left as it is)
    checkpoint: Path  # its checkpoint directory (the encoder and the optimizer state)
    step: int


def _read_step(checkpoint: Path) -> int | None:
    import torch

    try:
        return int(torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)["step"])
    except Exception:  # a checkpoint being written, or damaged: not one to continue from
        return None


def latest_checkpoint(folder: Path) -> tuple[Path, int] | None:
    """An attack folder's latest Ray Train checkpoint (its directory and step) in its storage, folder/ray: of
    the complete ones, those Ray registered (one a killed run was writing is not one to continue from)."""
    runs = [run for run in (folder / "ray").glob("*") if run.is_dir()]
    found = [(c, step) for run in runs for c in complete_checkpoints(run)
             if (c / TRAINER_STATE).is_file() and (step := _read_step(c)) is not None]
    return max(found, key=lambda item: item[1], default=None)


@dataclass(frozen=True, eq=False)
class AttackStage(Stage):
    """The network autoencoder, trained on the zoo's attack_train LoRAs to attack.max_steps.

    Its key is its `line`'s (the key over every setting but max_steps, which is what the attack's folder
    was named by before max_steps was in it) and max_steps. An attack with a larger max_steps than an
    earlier one of the same line continues from the earlier one's latest checkpoint (`continuation`) into
    its own folder, so the earlier attack, and the evaluation made of it, stay as they were; resuming from
    a checkpoint continues exactly as an uninterrupted run would (loraleak.attack.train). A folder of the
    line named before max_steps was in the key (`attack-<line>`, no ATTACK_LINE file) is still this
    stage's folder when its attack stopped at this max_steps: the studies run before keep their attack."""

    name = "attack"
    prefix = "attack"
    zoo: ZooStage | None = None
    line: str | None = None

    @cached_property
    def folder(self) -> Path:  # type: ignore[override]
        earlier = self.out / f"{self.prefix}-{self.line}"
        record = _read_json(earlier / "attack" / TRAINING_RECORD) or {}
        if not (earlier / ATTACK_LINE).exists() and record.get("step") == self.cfg.attack.max_steps:
            return earlier
        return self.out / f"{self.prefix}-{self.key}"

    @cached_property
    def config(self) -> AttackTrainConfig:
        zoo = self.zoo.config
        return stage_config(AttackTrainConfig, self.cfg.attack, "attack", zoo=zoo.root, base=zoo.base,
                            identities=self.cfg.identities, out_dir=self.folder, run_name=self.folder.name,
                            **tracking_wiring(self.cfg, self.out))

    @property
    def directory(self) -> Path:
        return self.folder / "attack"  # AttackTrainConfig.attack_dir

    @cached_property
    def continuation(self) -> Continuation | None:
        """The checkpoint this attack starts from: none when its own folder has one (a rerun resumes from
        that), else the latest one of the same line at or below max_steps in another attack folder."""
        if latest_checkpoint(self.folder) is not None:
            return None
        best = None
        for folder in sorted(self.out.glob(f"{self.prefix}-*")):
            if folder == self.folder or not folder.is_dir():
                continue
            recorded = _read_json(folder / ATTACK_LINE)
            line = recorded.get("line") if isinstance(recorded, dict) else \
                (self.line if folder.name == f"{self.prefix}-{self.line}" else None)
            found = latest_checkpoint(folder) if line == self.line else None
            if found is not None and found[1] <= self.cfg.attack.max_steps and (best is None or found[1] > best.step):
                best = Continuation(folder, *found)
        return best

    def describe(self) -> str:
        attack, start = self.config, self.continuation
        since = f", continuing {start.folder.name} from step {start.step}" if start is not None else ""
        return (f"network autoencoder, {attack.max_steps} steps on {attack.num_workers} Ray Train worker(s){since} "
                f"-> {attack.attack_dir}")

    def is_complete(self) -> bool:
        record = _read_json(self.directory / TRAINING_RECORD)
        return isinstance(record, dict) and record.get("step", 0) >= self.cfg.attack.max_steps

    def summary(self) -> str:
        return f"trained attack in {self.directory}"

    def run(self, ctx: RunContext) -> Ran:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / ATTACK_LINE).write_text(json.dumps({"line": self.line,
                                                           "max_steps": self.cfg.attack.max_steps}))
        config, start = nested(self.config, ctx.study), self.continuation
        if start is not None:
            config = dataclasses.replace(config, resume_from=str(start.checkpoint))
        result = train_attack(config, show_progress=ctx.show_progress)
        final = result.evaluations.get(result.step, {})
        since = f" (continued from {start.folder.name} at step {start.step})" if start is not None else ""
        return Ran(f"step {result.step}{since}" + "".join(f", {k} {v:.4f}" for k, v in sorted(final.items())),
                   result.mlflow_run_id)

    def load_result(self, ctx: RunContext, ran: Ran | None = None) -> AttackResult:
        attack = self.config
        if ran is not None:  # this run's own id, not a lookup
            return AttackResult(attack.attack_dir, ran.mlflow_run_id)
        return AttackResult(attack.attack_dir, ctx.run_of(self.folder))


@dataclass(frozen=True, eq=False)
class BaselinesStage(Stage):
    """Every configured baseline attack, each fitted on the zoo into its own folder baseline-<name>-<key>."""

    name = "baselines"
    zoo: ZooStage | None = None
    keys: dict[str, str] = field(default_factory=dict)  # baseline name -> its key

    @property
    def folders(self) -> dict[str, Path]:
        return {spec.name: self.out / f"baseline-{spec.name}-{self.keys[spec.name]}" for spec in self.cfg.baselines}

    def _pending(self) -> list[Any]:
        return [spec for spec in self.cfg.baselines if not (self.folders[spec.name] / "config.json").is_file()]

    def describe(self) -> str:
        return ", ".join(f"{b.name} ({b.kind})" for b in self.cfg.baselines) or "none configured"

    def is_complete(self) -> bool:
        return not self._pending()

    def summary(self) -> str:
        if not self.cfg.baselines:
            return "none configured"
        return f"0 fitted, {len(self.cfg.baselines)} already fitted"

    def run(self, ctx: RunContext) -> Ran:
        fit, config_class = pipeline_config.fit_baseline, pipeline_config.BaselineConfig
        if fit is None:
            raise ConfigError("baselines are configured, but this build has no loraleak.attack.baselines.fit_baseline")
        zoo, fitted = self.zoo.config, []
        for spec in self._pending():
            baseline = config_class(kind=spec.kind, zoo=zoo.root, base=zoo.base, out_dir=self.folders[spec.name],
                                    settings=spec.settings, identities=self.cfg.identities,
                                    **tracking_wiring(self.cfg, self.out))
            fit(nested(baseline, ctx.study), show_progress=ctx.show_progress)
            fitted.append(spec.name)
        return Ran(f"{len(fitted)} fitted, {len(self.cfg.baselines) - len(fitted)} already fitted")

    def load_result(self, ctx: RunContext, ran: Ran | None = None) -> dict[str, Path]:
        return self.folders


@dataclass(frozen=True, eq=False)
class EvaluationStage(Stage):
    """The held-out victims attacked by the attack, each baseline and (defended studies) the attack trained
    without the defense; complete only for the inputs it was computed from (EVALUATION_INPUTS)."""

    name = "evaluation"
    prefix = "evaluation"
    zoo: ZooStage | None = None
    attack: AttackStage | None = None
    baselines: BaselinesStage | None = None
    undefended_attack: AttackStage | None = None
    upstream: dict[str, Any] = field(default_factory=dict)  # the keys it reads (its inputs' part of its key)

    @property
    def attacks(self) -> dict[str, Path]:
        """condition -> attack folder, besides "rec" (the attack itself)."""
        found = dict(self.baselines.folders)
        if self.undefended_attack is not None:
            found[UNDEFENDED_CONDITION] = self.undefended_attack.directory
        return found

    @cached_property
    def config(self) -> EvaluationConfig:
        zoo = self.zoo.config
        return stage_config(EvaluationConfig, self.cfg.evaluation, "evaluation", zoo=zoo.root, out_dir=self.folder,
                            attack=self.attack.directory, baselines=self.attacks, base=zoo.base,
                            identities=self.cfg.identities, run_name=f"evaluation-{self.key}",
                            image_cache=self.out / IMAGE_CACHE, **tracking_wiring(self.cfg, self.out))

    def inputs(self) -> dict[str, Any]:
        """What the evaluation is computed from: the upstream stage keys, the zoo's finished LoRAs and the content
        of the attack and every baseline folder (a digest each)."""
        loras = content_key(sorted(finished_lora_ids(ZooStore(self.zoo.config.root))), 16)
        attacks = {"rec": self.attack.directory, **self.attacks}
        return {"keys": self.upstream, "zoo_loras": loras,
                "attacks": {name: _hash_dir(Path(d)) if Path(d).is_dir() else None
                            for name, d in sorted(attacks.items())}}

    def describe(self) -> str:
        evaluation = self.config
        return (f"{len(evaluation.conditions)} conditions x {evaluation.n_images} images per held-out victim, "
                f"{evaluation.scorer} scorer -> {evaluation.out_dir}")

    def is_complete(self) -> bool:
        summary = _read_json(self.folder / SUMMARY_FILE)
        return summary is not None and not summary.get("failures") \
            and _read_json(self.folder / EVALUATION_INPUTS) == self.inputs()

    def summary(self) -> str:
        return f"{self.load_result()['victims']} victims"

    def run(self, ctx: RunContext) -> Ran:
        inputs, inputs_path = self.inputs(), self.folder / EVALUATION_INPUTS
        inputs_path.unlink(missing_ok=True)  # not complete for any inputs until this evaluation ends
        evaluate(nested(self.config, ctx.study), show_progress=ctx.show_progress)
        summary = self.load_result(ctx)
        inputs_path.write_text(json.dumps(inputs, indent=1))
        failed = f", {len(summary['failures'])} failed (rerun to retry)" if summary["failures"] else ""
        return Ran(f"{summary['victims']} victims among {summary['candidates']} candidates{failed}",
                   summary.get("mlflow_run_id"))

    def load_result(self, ctx: RunContext | None = None, ran: Ran | None = None) -> dict[str, Any]:
        """The evaluation's summary (headline, table, report path, its MLflow run id)."""
        return json.loads((self.folder / SUMMARY_FILE).read_text())


def undefended_study(cfg: PipelineConfig) -> PipelineConfig | None:
    """The same study without the zoo's defense, whose attack is also evaluated against the defended victims
    (`UNDEFENDED_CONDITION`); None when the zoo is undefended or `cfg.undefended_attack` is off.

    Rank truncation to k < r changes the shared LoRA's rank, which an attack trained on rank-r LoRAs
    refuses to read, so it gets no such condition."""
    defense = cfg.zoo.defense
    if not cfg.undefended_attack or defense.kind == "none":
        return None
    if defense.kind == "rank_truncation" and defense.rank is not None and defense.rank < cfg.zoo.finetune.rank:
        return None
    return with_overrides(cfg, {"zoo.defense": {"kind": "none"}})


@dataclass(frozen=True)
class StudyStages:
    """Every stage of one study, keyed and placed, in the order they run."""

    identities: IdentitiesStage
    base: BaseStage
    zoo: ZooStage
    attack: AttackStage
    baselines: BaselinesStage
    evaluation: EvaluationStage
    undefended: tuple[ZooStage, AttackStage] | None = None  # a defended study's undefended zoo and attack

    def __iter__(self) -> Iterator[Stage]:
        yield from (self.identities, self.base, self.zoo, self.attack, self.baselines)
        if self.undefended is not None:
            yield from self.undefended
        yield self.evaluation

    def keys(self) -> dict[str, Any]:
        """Every stage's key: "base", "zoo", "attack", "baselines" (name -> key), "evaluation",
        "pretrained_base" (bool), "upstream" (what the evaluation reads), and for a defended study
        "undefended_zoo", "undefended_attack"."""
        keys: dict[str, Any] = {"base": self.base.key, "pretrained_base": self.base.folder is not None,
                                "zoo": self.zoo.key, "attack": self.attack.key, "baselines": dict(self.baselines.keys)}
        if self.undefended is not None:
            keys["undefended_zoo"], keys["undefended_attack"] = self.undefended[0].key, self.undefended[1].key
        keys["upstream"] = self.evaluation.upstream
        keys["evaluation"] = self.evaluation.key
        return keys

    def folders(self) -> dict[str, str]:
        """stage -> its folder's name under out_dir. "base" only when the base is pretrained; "baselines" is
        the baselines' folders joined (one entry for all); a defended study also uses the undefended study's
        zoo and attack ("undefended zoo", "undefended attack")."""
        folders: dict[str, str] = {}
        if self.base.folder is not None:
            folders["base"] = self.base.folder.name
        folders["zoo"], folders["attack"] = self.zoo.folder.name, self.attack.folder.name
        if self.baselines.keys:
            folders["baselines"] = " ".join(path.name for path in self.baselines.folders.values())
        if self.undefended is not None:
            folders["undefended zoo"] = self.undefended[0].folder.name
            folders["undefended attack"] = self.undefended[1].folder.name
        folders["evaluation"] = self.evaluation.folder.name
        return folders


def stage_keys(cfg: PipelineConfig) -> dict[str, Any]:
    """The key of every stage's output folder for `cfg`, computed without running anything (StudyStages.keys)."""
    return plan_stages(cfg).keys()


def plan_stages(cfg: PipelineConfig, out: Path | None = None) -> StudyStages:
    """The stages of the study `cfg`, keyed and placed under `out` (default: cfg.out_dir, resolved), without
    running anything."""
    out = out if out is not None else cfg.out_dir.expanduser().resolve()
    cfg = with_absolute_paths(cfg)  # one key per folder of photos, however the command spelled it
    base_key = stage_key(cfg.base.ref) if cfg.base.pretrain is None else stage_key(without_added_defaults("pretrain", to_dict(cfg.base.pretrain)))
    base = BaseStage(cfg, out, base_key)
    identities = without_added_defaults("identities", to_dict(cfg.identities))
    zoo = ZooStage(cfg, out, stage_key(base_key, identities, settings_of(cfg.zoo, "zoo")), base=base)
    line = stage_key(zoo.key, settings_of(cfg.attack, "attack"))  # every setting but max_steps (HOW_TO_RUN)
    attack = AttackStage(cfg, out, stage_key(line, {"max_steps": cfg.attack.max_steps}), zoo=zoo, line=line)
    baselines = BaselinesStage(cfg, out, None, zoo=zoo,
                               keys={spec.name: stage_key(zoo.key, to_dict(spec)) for spec in cfg.baselines})
    # The attack as its line and max_steps: the same key as the attack's own, in the form evaluation keys had
    # before max_steps was in the attack's key (the studies run before keep their evaluation folders).
    upstream = {"zoo": zoo.key, "attack": attack.line, "attack_steps": cfg.attack.max_steps,
                "baselines": dict(baselines.keys)}
    undefended, plain_cfg = None, undefended_study(cfg)
    if plain_cfg is not None:  # the attack trained on undefended LoRAs, against the same defended victims
        note = "undefended study, for the attack trained without the defense: "
        plain = plan_stages(plain_cfg, out)
        plain_zoo = ZooStage(plain_cfg, out, plain.zoo.key, note, base=base)
        undefended = (plain_zoo, AttackStage(plain_cfg, out, plain.attack.key, note, zoo=plain_zoo,
                                             line=plain.attack.line))
        upstream["undefended_attack"] = plain.attack.line
    evaluation = EvaluationStage(cfg, out, stage_key(upstream, settings_of(cfg.evaluation, "evaluation")), zoo=zoo,
                                 attack=attack, baselines=baselines,
                                 undefended_attack=undefended[1] if undefended else None, upstream=upstream)
    return StudyStages(IdentitiesStage(cfg, out, None), base, zoo, attack, baselines, evaluation, undefended)
