"""The evaluation stage: every held-out victim LoRA of a zoo, every condition, scored, summarised,
reported and tracked.

    victims      the zoo's done fine-tunes of the split, final snapshot each (sorted by lora_id)
    candidates   every identity of that split in the zoo: identification ranks the victim among them
    references   each candidate's private photos, embedded once by the scorer (here, on the driver)
    workers      Ray actors (EvaluationWorker): images of every condition + their scores, per victim
    results      out_dir/victims/<lora_id>.json (+ its images), written atomically as each victim ends
    summary      per condition: `summarise` (means over victims, clustered bootstrap 95% intervals)
    report       out_dir/report/report.html + PNG figures (`write_report`)
    MLflow       one run: params, every metric with its interval, the report and figures as artifacts

Resumable like the zoo: a victim whose result file exists with the same settings key (generation
and scoring settings, the attacks' files, the candidates) is not evaluated again; changing any of
them re-evaluates every victim. One victim that fails is reported and left for a rerun; the
others go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow.compute as pc
from PIL import Image
from tqdm.auto import tqdm

from ..base.loading import BUILTIN_BASES, base_fingerprint
from ..cluster import connect_ray
from ..config import to_dict
from ..errors import ConfigError, InputError, LoraleakError
from ..identities import make_source
from ..locking import LOCK_FILE, folder_lock
from ..scoring import make_scorer
from ..tracking import FOLDER_TAG, mlflow_run
from ..zoo.config import read_zoo_config
from ..zoo.manifest import done_rows, read_manifest
from .config import CONTROLS, EvaluationConfig
from .image_cache import ImageCache
from .metrics import ConditionMetrics, Estimate, ImageScores, similarity_mapping, summarise
from .regime import StudyRegime, study_regime
from .report import write_report
from .worker import EvaluationWorker, victim_record

logger = logging.getLogger(__name__)

RESULTS_DIR = "victims"
REPORT_DIR = "report"
SUMMARY_FILE = "evaluation.json"
HEADLINE_RATES = ("similarity", "verified", "top1_image", "top5_image", "top1_victim", "face_found")
NO_ATTACK = ("base", *CONTROLS)  # conditions that show what the victim's model gives without any attack


@dataclass
class EvaluationResult:
    out_dir: Path
    report: Path
    metrics: dict[str, ConditionMetrics]  # condition -> summary over victims
    headline: dict[str, float]  # the flat numbers a pipeline or a sweep compares (see headline_metrics)
    best_control: str | None  # the no-attack condition with the highest similarity
    victims: int
    candidates: int
    evaluated: int  # victims evaluated by this call
    reused: int  # victims whose results an earlier call left
    failures: list[dict[str, str]]  # {"lora_id", "error"} of victims that failed (a rerun retries them)
    mlflow_run_id: str | None
    wall_time_s: float
    regime: StudyRegime | None = None  # strength and binding of the victims (loraleak.evaluation.regime)
    # Condition image sets (one condition of one victim) of the victims evaluated by this call: "reused" from the
    # image cache (cfg.image_cache), "generated".
    image_sets: dict[str, int] | None = None


# --- what to evaluate -------------------------------------------------------------------------------------

def resolve_config(cfg: EvaluationConfig) -> EvaluationConfig:
    """cfg with the zoo's base and identity source filled in, and local paths absolute (for workers)."""
    base, identities = cfg.base, cfg.identities
    if base is None or identities is None:
        recorded = read_zoo_config(cfg.zoo)
        base = base or recorded.base
        identities = identities or recorded.identities
    absolute = lambda p: p.expanduser().resolve() if p is not None else None  # noqa: E731
    if identities.root is not None:
        identities = dataclasses.replace(identities, root=absolute(identities.root))
    local_base = Path(base).expanduser()
    if base not in BUILTIN_BASES and local_base.exists():  # a folder: absolute, for the workers
        base = str(local_base.resolve())
    return dataclasses.replace(
        cfg, base=base, identities=identities,
        zoo=cfg.zoo if "://" in cfg.zoo else str(Path(cfg.zoo).expanduser().resolve()),
        attack=absolute(cfg.attack), baselines={k: absolute(v) for k, v in cfg.baselines.items()},
        scorer_path=absolute(cfg.scorer_path), out_dir=absolute(cfg.out_dir), workdir=absolute(cfg.workdir),
        image_cache=absolute(cfg.image_cache))


def select_victims(cfg: EvaluationConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """The victims (final snapshots of done fine-tunes of the split) and the candidate identities."""
    table = read_manifest(cfg.zoo)
    table = table.filter(pc.equal(table["split"], cfg.split))
    candidates = sorted(set(table["identity_id"].to_pylist()))
    done = done_rows(table)
    rows = [r for r in done.to_pylist() if r["snapshot_step"] == r["steps"]
            and (cfg.rank is None or r["rank"] == cfg.rank)]
    if not rows:
        raise InputError(f"zoo {cfg.zoo} has no finished {cfg.split} fine-tunes"
                         + (f" of rank {cfg.rank}" if cfg.rank is not None else "") + " to evaluate")
    rows.sort(key=lambda r: r["lora_id"])
    if cfg.max_victims is not None:
        rows = rows[: cfg.max_victims]
    return [victim_record(r, cfg.seed, cfg.victim_noise) for r in rows], candidates


def reference_embeddings(cfg: EvaluationConfig, scorer: Any, candidates: Sequence[str]) -> dict[str, list]:
    """Each candidate's private photos, embedded; candidates in whose photos the scorer finds no face
    are left out (they could never be ranked), with a warning."""
    source = {i.identity_id: i for i in make_source(cfg.identities).identities()}
    missing = [c for c in candidates if c not in source]
    if missing:
        raise InputError(f"identity {missing[0]!r} of zoo {cfg.zoo} is not in the identity source "
                         f"({len(missing)} missing); evaluate with the zoo's identities")
    references = {}
    for candidate in candidates:
        embeddings = [e for e in scorer.embed(source[candidate].load(cfg.reference_size)) if e is not None]
        if embeddings:
            references[candidate] = embeddings
        else:
            logger.warning("evaluation: the %s scorer finds no face in any photo of %s; it is not a candidate",
                           cfg.scorer, candidate)
    if len(references) < 2:
        raise InputError(f"the {cfg.scorer} scorer finds faces for {len(references)} of the {len(candidates)} "
                         "candidate identities: identification needs at least 2")
    return references


def _hash_dir(directory: Path) -> str:
    digest = hashlib.sha256()
    # The lock file names its last holder, not what the attack computes.
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != LOCK_FILE):
        digest.update(path.relative_to(directory).as_posix().encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def attack_keys(cfg: EvaluationConfig) -> dict[str, str]:
    """condition -> the content hash of its saved attack's folder ("rec" and every baseline)."""
    attacks = {"rec": cfg.attack, **cfg.baselines}
    for name, directory in attacks.items():
        if directory is not None and not directory.is_dir():
            raise ConfigError(f"{'attack' if name == 'rec' else f'baselines.{name}'}: no saved attack at {directory}")
    return {name: _hash_dir(d) for name, d in attacks.items() if d is not None}


def settings_key(cfg: EvaluationConfig, candidates: Sequence[str], attacks: Mapping[str, str] | None = None) -> str:
    """What a victim's stored result depends on besides the victim itself (`attacks`: attack_keys(cfg), when
    the caller has them). Not the image cache: it changes where images come from, not what they are."""
    key = {"base": base_fingerprint(cfg.base), "seed": cfg.seed, "n_images": cfg.n_images,
           "sample_steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale, "controls": list(cfg.controls),
           "scorer": cfg.scorer, "scorer_path": str(cfg.scorer_path), "reference_size": cfg.reference_size,
           "candidates": list(candidates), "attacks": dict(attacks if attacks is not None else attack_keys(cfg))}
    if cfg.mixed_precision != "no":  # only then: results evaluated before the setting existed stay current
        key["mixed_precision"] = cfg.mixed_precision
    if cfg.victim_noise != "lora":  # idem
        key["victim_noise"] = cfg.victim_noise
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --- per-victim results on disk ---------------------------------------------------------------------------

class ResultStore:
    """out_dir/victims/<lora_id>.json (scores, seed, prompts) and out_dir/victims/<lora_id>/*.png.

    The images go in first (a staged folder renamed into place), the JSON last (written to a
    temporary name and renamed): a result whose JSON exists is complete. One evaluation per out_dir
    at a time: opening the store removes what an interrupted one left half-written.
    """

    def __init__(self, out_dir: Path, key: str):
        self.dir, self.key = out_dir / RESULTS_DIR, key
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.dir.glob(".*.tmp-*"):  # what an interrupted write left
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def _json(self, lora_id: str) -> Path:
        return self.dir / f"{lora_id}.json"

    def done(self, lora_id: str) -> bool:
        path = self._json(lora_id)
        if not path.is_file() or not (self.dir / lora_id).is_dir():
            return False
        try:
            return json.loads(path.read_text()).get("settings_key") == self.key
        except (OSError, json.JSONDecodeError):
            return False

    def write(self, victim: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        lora_id = victim["lora_id"]
        stage = self.dir / f".{lora_id}.tmp-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        counts = {}
        for name, images in {"private": result["private"], **result["images"]}.items():
            counts[name] = len(images)
            for i, data in enumerate(images):
                (stage / f"{name}-{i:03d}.png").write_bytes(data)
        final = self.dir / lora_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
        record = {"lora_id": lora_id, "identity_id": victim["identity_id"], "settings_key": self.key,
                  "seed": victim["seed"], "step": victim["step"], "lora_path": victim["lora_path"],
                  "prompts": result["prompts"], "images": counts, "wall_s": result.get("wall_s"),
                  "scores": result["scores"]}
        tmp = self.dir / f".{lora_id}.json.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._json(lora_id))

    def load(self, lora_id: str) -> dict[str, Any]:
        return json.loads(self._json(lora_id).read_text())

    def images(self, lora_id: str, name: str, limit: int) -> list:
        out = []
        for path in sorted((self.dir / lora_id).glob(f"{name}-*.png"))[:limit]:
            with Image.open(path) as image:
                out.append(image.convert("RGB"))
        return out


# --- running the victims ----------------------------------------------------------------------------------

def _one_line(error: BaseException) -> str:
    """A Ray error's user-facing cause in one line (a worker's LoraleakError as it was raised)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, LoraleakError):
            return str(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _ray_results(cfg: EvaluationConfig, references: Mapping[str, list], attacks: Mapping[str, str],
                 victims: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    import ray  # ray starts slowly: only an evaluation that fans out imports it
    from ray.util import ActorPool

    connect_ray()
    worker = ray.remote(EvaluationWorker).options(
        num_cpus=cfg.num_cpus_per_worker, num_gpus=cfg.num_gpus_per_worker or None,
        max_restarts=cfg.max_retries, max_task_retries=cfg.max_retries)
    shared = ray.put(dict(references))
    actors = [worker.remote(cfg, shared, dict(attacks)) for _ in range(min(cfg.workers, len(victims)))]
    try:
        yield from ActorPool(actors).map_unordered(lambda actor, victim: actor.evaluate.remote(victim), victims)
    finally:
        for actor in actors:
            ray.kill(actor)


def _local_results(cfg: EvaluationConfig, references: Mapping[str, list], attacks: Mapping[str, str],
                   victims: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    worker = EvaluationWorker(cfg, references, attacks, own_process=False)
    for victim in victims:
        yield worker.evaluate(victim)


def run_victims(cfg: EvaluationConfig, references: Mapping[str, list], attacks: Mapping[str, str],
                victims: list[dict[str, Any]], store: ResultStore,
                show_progress: bool = True) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Evaluate `victims` on Ray actors (or here, with workers 0), writing each result as it ends;
    returns the failures and the condition image sets read from the image cache ("reused") or generated."""
    import ray  # see _ray_results

    by_id = {v["lora_id"]: v for v in victims}
    failures: list[dict[str, str]] = []
    image_sets = {"reused": 0, "generated": 0}
    progress = tqdm(total=len(victims), desc="evaluate", unit="victim", disable=not show_progress)
    try:
        run = _ray_results if cfg.workers else _local_results
        results = run(cfg, references, attacks, victims)
        for result in results:
            if result.get("error"):
                failures.append({"lora_id": result["lora_id"], "error": result["error"]})
                logger.warning("evaluation of victim %s failed: %s", result["lora_id"], result["error"])
            else:
                store.write(by_id[result["lora_id"]], result)
                for k in image_sets:
                    image_sets[k] += result["image_sets"][k]
            progress.update()
            progress.set_postfix(failed=len(failures))
    except ray.exceptions.RayError as e:
        raise LoraleakError(f"evaluation stopped: {_one_line(e)} ({progress.n - len(failures)} victims finished "
                            "and are kept; rerun to resume)") from e
    finally:
        progress.close()
    return failures, image_sets


# --- the numbers ------------------------------------------------------------------------------------------

def paired_difference(a: ConditionMetrics, b: ConditionMetrics, metric: str = "similarity",
                      n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Mean over victims of a's per-victim `metric` minus b's, with a clustered bootstrap 95% interval.

    Both conditions must summarise the same victims in the same order (as one evaluation does).
    Victims where either is unmeasured (no face) are left out.
    """
    if [v.victim_id for v in a.victims] != [v.victim_id for v in b.victims]:
        raise ValueError("paired_difference needs the same victims in the same order")
    to_array = lambda m: np.array([np.nan if getattr(v, metric) is None else getattr(v, metric)  # noqa: E731
                                   for v in m.victims], dtype=np.float64)
    d = to_array(a) - to_array(b)
    measured = ~np.isnan(d)
    if not measured.any():
        return Estimate(None, None, None)
    index = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    counts = measured[index].sum(axis=1)
    sums = np.where(measured, d, 0.0)[index].sum(axis=1)
    boot = sums[counts > 0] / counts[counts > 0]
    low, high = np.percentile(boot, [2.5, 97.5])
    return Estimate(float(d[measured].mean()), float(low), float(high))


def best_control(metrics: Mapping[str, ConditionMetrics]) -> str | None:
    """The no-attack condition whose images are most like the victims: what an attack must beat."""
    scored = [(m.similarity.value, name) for name, m in metrics.items()
              if name in NO_ATTACK and m.similarity.value is not None]
    return max(scored)[1] if scored else None


def headline_metrics(metrics: Mapping[str, ConditionMetrics], n_boot: int = 1000,
                     seed: int = 0) -> tuple[dict[str, float], str | None]:
    """Flat numbers: `<condition>.<rate>` for the headline rates, `chance_top1` / `chance_top5`, and
    `rec_over_best_control.similarity` (+ `_lo` / `_hi`): rec's paired gain over the best control."""
    out: dict[str, float] = {}
    for name, m in metrics.items():
        for rate in HEADLINE_RATES:
            value = getattr(m, rate).value
            if value is not None:
                out[f"{name}.{rate}"] = value
    first = next(iter(metrics.values()))
    out["chance_top1"], out["chance_top5"] = first.chance_top1, first.chance_top5
    control = best_control(metrics)
    if "rec" in metrics and control is not None:
        gain = paired_difference(metrics["rec"], metrics[control], "similarity", n_boot, seed)
        if gain.value is not None:
            out.update({"rec_over_best_control.similarity": gain.value,
                        "rec_over_best_control.similarity_lo": gain.low,
                        "rec_over_best_control.similarity_hi": gain.high})
    return out, control


def format_regime(regime: StudyRegime | None) -> str:
    """The regime lines of the printed summary: verdict, warning, and strength / binding per victim."""
    if regime is None:
        return ""
    fmt = lambda x: "-" if x is None else f"{x:+.3f}"  # noqa: E731
    lines = [regime.summary_line()]
    if regime.warning:
        lines.append(regime.warning)
    lines.append("per victim: strength (org − base) / binding (org − its best control)")
    lines += [f"  {v.victim_id:<28}{fmt(v.strength):>8} / {fmt(v.binding):>7}  ({v.best_control or '-'})"
              for v in regime.victims]
    return "\n".join(lines)


def format_headline(metrics: Mapping[str, ConditionMetrics], headline: Mapping[str, float],
                    control: str | None) -> str:
    """The table `loraleak evaluate` and `loraleak run` print."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"{'condition':<22}{'face':>6}  {'similarity [95% CI]':<24}{'verified':>9}{'top-1':>8}"
             f"{'top-5':>8}{'top-1 victim':>14}"]
    for name, m in metrics.items():
        sim = m.similarity
        cell = "-" if sim.value is None else f"{sim.value:.3f} [{sim.low:.3f}, {sim.high:.3f}]"
        lines.append(f"{name:<22}{fmt(m.face_found.value):>6}  {cell:<24}{fmt(m.verified.value):>9}"
                     f"{fmt(m.top1_image.value):>8}{fmt(m.top5_image.value):>8}{fmt(m.top1_victim.value):>14}")
    first = next(iter(metrics.values()))
    lines.append(f"chance: top-1 {first.chance_top1:.3f}, top-5 {first.chance_top5:.3f} "
                 f"({first.n_candidates} candidate identities, {first.n_victims} victims, "
                 f"{first.n_images // max(1, first.n_victims)} images each)")
    if "rec_over_best_control.similarity" in headline:
        lines.append(f"rec - best control ({control}): similarity "
                     f"{headline['rec_over_best_control.similarity']:+.3f} "
                     f"[{headline['rec_over_best_control.similarity_lo']:+.3f}, "
                     f"{headline['rec_over_best_control.similarity_hi']:+.3f}]")
    return "\n".join(lines)


# --- the stage --------------------------------------------------------------------------------------------

def evaluate(cfg: EvaluationConfig, show_progress: bool = True) -> EvaluationResult:
    """Evaluate every victim not yet evaluated with these settings, then summarise, report and track.
    One evaluation per out_dir at a time (its folder lock)."""
    with folder_lock(cfg.out_dir, f"evaluate {cfg.out_dir}"):
        return _evaluate(cfg, show_progress)


def _evaluate(cfg: EvaluationConfig, show_progress: bool) -> EvaluationResult:
    started = time.perf_counter()
    cfg = resolve_config(cfg)
    with _tracking_run(cfg) as run:
        if run is not None:  # the settings first: a run that fails still says what it was asked to do
            run.log_params(to_dict(cfg))
        plan = _plan(cfg)
        if run is not None:
            run.log_params({"data": {"candidates": len(plan.references), "settings_key": plan.key}})
        failures, image_sets = _run_pending(cfg, plan, show_progress)
        records = _finished_records(plan, failures)
        found = _findings(cfg, records)
        report = _write_report(cfg, plan.store, records, found.metrics, found.headline, found.control, found.regime,
                               plan.scorer.threshold, len(plan.unscorable), failures)
        summary = _summary(cfg, plan, records, failures, image_sets, found, report)
        if run is not None:
            _track(run, summary, found, len(records), failures, image_sets, report)
        summary["mlflow_run_id"] = run.run_id if run is not None else None
        wall = time.perf_counter() - started
        summary["wall_time_s"] = wall
        (cfg.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str))
    return EvaluationResult(cfg.out_dir, report, found.metrics, found.headline, found.control, len(records),
                            len(plan.references), len(plan.pending) - len(failures), plan.reused, failures,
                            summary["mlflow_run_id"], wall, found.regime, image_sets)


def _tracking_run(cfg: EvaluationConfig) -> Any:
    """The evaluation's MLflow run (a no-op context without tracking).

    The run opens before the work and closes after it, as the zoo's and the attack's do: its duration is the
    evaluation's, and it ends FAILED (an error) or KILLED (Ctrl-C, SIGTERM) when the evaluation does not finish."""
    if not cfg.tracking:
        return nullcontext()
    return mlflow_run(cfg.experiment, cfg.run_name or f"evaluate {cfg.out_dir.name}", cfg.tracking_uri,
                      cfg.workdir, cfg.parent_run_id, {FOLDER_TAG: str(cfg.out_dir)})


@dataclass(frozen=True)
class _Plan:
    """Whom this evaluation covers, against whom, and which of them are still to run."""

    scorer: Any
    references: dict[str, list]        # candidate identity -> its photos' embeddings
    victims: list[dict[str, Any]]      # the victims the scorer can score (a face in their own photos)
    unscorable: list[dict[str, Any]]   # the others: reported, never evaluated
    attacks: dict[str, str]
    key: str                           # settings_key: a result with another key is stale
    store: ResultStore
    pending: list[dict[str, Any]]      # victims with no result under `key` yet

    @property
    def reused(self) -> int:
        return len(self.victims) - len(self.pending)


def _plan(cfg: EvaluationConfig) -> _Plan:
    victims, candidates = select_victims(cfg)
    scorer = make_scorer(cfg.scorer, cfg.scorer_path)
    references = reference_embeddings(cfg, scorer, candidates)
    # A victim without references (no face found in its own photos) has nothing to be recognised as.
    unscorable = [v for v in victims if v["identity_id"] not in references]
    victims = [v for v in victims if v["identity_id"] in references]
    if not victims:
        raise InputError(f"the {cfg.scorer} scorer finds no face in the photos of any victim")
    attacks = attack_keys(cfg)
    key = settings_key(cfg, sorted(references), attacks)
    store = ResultStore(cfg.out_dir, key)
    pending = [v for v in victims if not store.done(v["lora_id"])]
    logger.info("evaluation %s: %d victims, %d candidates; %d already evaluated, %d to run %s", cfg.out_dir,
                len(victims), len(references), len(victims) - len(pending), len(pending),
                f"on {cfg.workers} Ray worker(s)" if cfg.workers else "in this process")
    return _Plan(scorer, references, victims, unscorable, attacks, key, store, pending)


def _run_pending(cfg: EvaluationConfig, plan: _Plan,
                 show_progress: bool) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Evaluate the pending victims: their failures, and how many condition image sets came from the cache."""
    if cfg.image_cache is not None:
        ImageCache(cfg.image_cache).remove_stale()
    failures, image_sets = run_victims(cfg, plan.references, plan.attacks, plan.pending, plan.store, show_progress) \
        if plan.pending else ([], {"reused": 0, "generated": 0})
    logger.info("evaluation %s: %d condition image sets read from the image cache, %d generated%s", cfg.out_dir,
                image_sets["reused"], image_sets["generated"],
                f" ({cfg.image_cache})" if cfg.image_cache is not None else " (no image cache)")
    return failures, image_sets


def _finished_records(plan: _Plan, failures: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The results of every victim that did not fail (this time), in the victims' order."""
    failed = {f["lora_id"] for f in failures}
    finished = [v for v in plan.victims if v["lora_id"] not in failed]
    if not finished:
        raise LoraleakError(f"every victim failed to evaluate; the first: {failures[0]['error']}")
    return [plan.store.load(v["lora_id"]) for v in finished]


@dataclass(frozen=True)
class _Findings:
    """What the finished victims' scores say: per condition, against the best control, and the regime."""

    metrics: dict[str, ConditionMetrics]
    headline: dict[str, float]
    control: str | None
    regime: StudyRegime | None


def _findings(cfg: EvaluationConfig, records: list[dict[str, Any]]) -> _Findings:
    metrics = {name: summarise([ImageScores.from_dict(r["scores"][name]) for r in records],
                               n_boot=cfg.n_boot, seed=cfg.seed) for name in cfg.conditions}
    headline, control = headline_metrics(metrics, cfg.n_boot, cfg.seed)
    regime = study_regime(metrics, cfg.n_boot, cfg.seed)
    if regime is not None:
        headline.update(regime.headline())
    return _Findings(metrics, headline, control, regime)


def _summary(cfg: EvaluationConfig, plan: _Plan, records: list[dict[str, Any]], failures: list[dict[str, str]],
             image_sets: dict[str, int], found: _Findings, report: Path) -> dict[str, Any]:
    """evaluation.json (less the run id and wall time, known only at the end), also the run's summary artifact."""
    return {"victims": len(records), "candidates": len(plan.references),
            "evaluated": len(plan.pending) - len(failures), "reused": plan.reused,
            "failures": failures, "unscorable": [v["lora_id"] for v in plan.unscorable], "settings_key": plan.key,
            "image_sets": image_sets,
            "best_control": found.control, "headline": found.headline,
            "table": "\n".join(filter(None, [format_headline(found.metrics, found.headline, found.control),
                                             format_regime(found.regime)])),
            "regime": found.regime.to_dict() if found.regime is not None else None,
            "metrics": {k: m.to_dict() for k, m in found.metrics.items()},
            "report": str(report), "config": to_dict(cfg)}


def _track(run: Any, summary: Mapping[str, Any], found: _Findings, victims: int, failures: list[dict[str, str]],
           image_sets: Mapping[str, int], report: Path) -> None:
    """The results into the MLflow run: counts, every metric, the report and its figures, the summary."""
    run.log_params({"data": {"victims": victims, "best_control": found.control or "-",
                             "image_sets_reused": image_sets["reused"],
                             "image_sets_generated": image_sets["generated"]}})
    flat = {k: v for name, m in found.metrics.items() for k, v in m.flat(f"{name}.").items()}
    run.log_metrics({**flat, **found.headline, "failed_victims": len(failures)})
    for path in sorted(report.parent.iterdir()):
        run.log_artifact(path, REPORT_DIR)
    run.log_dict(summary, SUMMARY_FILE)


def _write_report(cfg: EvaluationConfig, store: ResultStore, records: list[dict[str, Any]],
                  metrics: Mapping[str, ConditionMetrics], headline: Mapping[str, float], control: str | None,
                  regime: StudyRegime | None, threshold: float, unscorable: int,
                  failures: list[dict[str, str]]) -> Path:
    """The HTML report and its figures (out_dir/report); returns the report's path."""
    shown = [{"identity_id": r["identity_id"],
              **{name: store.images(r["lora_id"], name, cfg.report_images) for name in ("private", *cfg.conditions)}}
             for r in records[: cfg.report_victims]]
    notes = {"zoo": cfg.zoo, "split": cfg.split, "base": cfg.base, "attack (rec)": cfg.attack or "-",
             **{f"baseline {k}": v for k, v in cfg.baselines.items()},
             "scorer": f"{cfg.scorer} (threshold {threshold:.3f})",
             "similarity": similarity_mapping(cfg.scorer),
             "images": f"{cfg.n_images} per condition and victim, {cfg.sample_steps} DPM-Solver++ steps, "
                       f"guidance {cfg.guidance_scale}; seed {cfg.seed} (per victim: see victims/<lora_id>.json)",
             "controls": ", ".join(cfg.controls) or "-",
             "best control": control or "-"}
    if "rec_over_best_control.similarity" in headline:
        notes["rec - best control (similarity)"] = (
            f"{headline['rec_over_best_control.similarity']:+.3f} "
            f"[{headline['rec_over_best_control.similarity_lo']:+.3f}, "
            f"{headline['rec_over_best_control.similarity_hi']:+.3f}]")
    verdict = []
    if "rec_over_best_control.similarity" in headline:
        verdict.append(f"rec − best control ({control}), similarity: {notes['rec - best control (similarity)']}"
                       + (f"; rec / org {headline['rec.similarity'] / headline['org.similarity']:.2f}"
                          if headline.get("org.similarity") and "rec.similarity" in headline else ""))
    if unscorable:
        notes["victims left out"] = f"{unscorable} (no face in their photos)"
    if failures:
        notes["victims failed"] = f"{len(failures)} (rerun to retry): {failures[0]['error']}"
    # The histogram compares what the attack recovers with what needs no attack: rec against base and
    # the best control, org (the owner's images) as the ceiling; the other conditions are in the table.
    histogram = {name: [v.similarity for v in metrics[name].victims if v.similarity is not None]
                 for name in dict.fromkeys(["org", "rec", "base", control]) if name in metrics}
    return write_report(cfg.out_dir / REPORT_DIR, f"LoRA identity leakage: {len(records)} {cfg.split} victims",
                        metrics, shown, per_victim_similarity=histogram, notes=notes, regime=regime,
                        verdict=verdict)
