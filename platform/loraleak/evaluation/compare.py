"""Side-by-side numbers of several MLflow runs: what `loraleak compare RUN...` prints.

A run is named by its id, by its run name (the newest run of that name, in any experiment) or by a
study's name (its experiment: the study's newest finished pipeline run). A sweep's name (the experiment of
`loraleak sweep`, whose pipeline runs are its trials) stands for every trial: each trial's newest finished
run, in the order the trials started, so `loraleak compare dp_epsilon` prints the privacy-utility frontier
(org against rec per ε). The table has one row per run:
id, name, experiment, status, the params that differ between the runs (or the ones asked for) as
`params.<key>`, and the metrics (all, or the ones asked for, e.g. `HEADLINE`) as `metrics.<key>`,
the column names `mlflow.search_runs` uses. `comparison_plot` draws the headline as bars.
`evaluation_folders` finds the evaluation each run reports, for the paired per-victim comparison
(`loraleak compare RUN... --against REF`, loraleak.evaluation.paired).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..errors import LoraleakError
from ..tracking import check_reachable
from .paired import evaluations_in

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
INTERVAL_SUFFIXES = ("_lo", "_hi")  # how ConditionMetrics.flat names an interval's ends
STUDY_TAG = "loraleak.study"  # a pipeline run's tag (loraleak.pipeline.tracking; not imported: no stage here)
TRIAL_TAG = "loraleak.trial_id"  # a sweep trial's pipeline run (loraleak.sweeps.tracking)
EVALUATION_TAG = "loraleak.evaluation"  # a pipeline run's evaluation folder (loraleak.pipeline.tracking)
LABEL_TAG = "loraleak.label"  # the trial's settings in words, e.g. "defense=dp_sgd epsilon=10"
# What `loraleak compare` shows by default: what the attack recovers against what needs no attack, the
# identification rates against chance, and whether the victims were worth attacking (the regime).
HEADLINE = ("rec.similarity", "org.similarity", "base.similarity", "rec_over_best_control.similarity",
            "rec.top1_image", "org.top1_image", "base.top1_image", "chance_top1", "org.strength", "org.binding",
            "regime.strong_and_bound", "rec_undefended.similarity")


def compare_runs(runs: Sequence[str], tracking_uri: str, params: Sequence[str] | None = None,
                 metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Metrics and key params of `runs` (ids, run names or study names) in the store at `tracking_uri`.

    params: the param keys to show; by default those whose values differ between the runs.
    metrics: the metrics to show (with their `_lo` / `_hi` interval ends); by default all. When none of them
    is in any run (runs of a stage, not of a study), all.
    """
    if not runs:
        raise LoraleakError("name at least one MLflow run (id or run name) to compare")
    client = _client(tracking_uri)
    try:
        found = [run for ref in runs for run in _find_runs(client, ref, tracking_uri)]
        experiments = {r.info.experiment_id: client.get_experiment(r.info.experiment_id).name for r in found}
    except LoraleakError:
        raise
    except Exception as e:  # MLflow raises many kinds; the user needs one line
        raise LoraleakError(f"reading MLflow store {tracking_uri} failed: {_first_line(e)}") from None

    if params is None:  # those that differ; a pipeline run's stage keys differ whenever a setting does: left out
        keys = sorted({k for r in found for k in r.data.params if not k.startswith("stage.keys.")})
        params = [k for k in keys if len({r.data.params.get(k) for r in found}) > 1]
    metric_keys = sorted({k for r in found for k in r.data.metrics})
    if metrics is not None:
        chosen = [k for m in metrics for k in (m, *(m + s for s in INTERVAL_SUFFIXES)) if k in metric_keys]
        metric_keys = chosen or metric_keys
    rows = []
    for r in found:
        row = {"run_id": r.info.run_id, "run_name": r.data.tags.get(LABEL_TAG) or r.info.run_name,
               "experiment": experiments[r.info.experiment_id], "status": r.info.status}
        row.update({f"params.{k}": r.data.params.get(k) for k in params})
        row.update({f"metrics.{k}": r.data.metrics.get(k, math.nan) for k in metric_keys})
        rows.append(row)
    return pd.DataFrame(rows)


def evaluation_folders(refs: Sequence[str], tracking_uri: str) -> list[tuple[str, Path]]:
    """(name, evaluation folder) of each ref: a folder (an evaluation, a study's or a sweep's out folder:
    `paired.evaluations_in`), else the evaluation a study's (or each of a sweep's trials') pipeline run
    reports. The store is opened only when a ref is not a folder."""
    out: list[tuple[str, Path]] = []
    client = None
    for ref in refs:
        if Path(ref).is_dir():
            out.extend(evaluations_in(ref))
            continue
        client = client or _client(tracking_uri)
        try:
            runs = _find_runs(client, ref, tracking_uri, study_first=True)
        except LoraleakError:
            raise
        except Exception as e:
            raise LoraleakError(f"reading MLflow store {tracking_uri} failed: {_first_line(e)}") from None
        for run in runs:
            name = run.data.tags.get(LABEL_TAG) or run.info.run_name or run.info.run_id[:8]
            folder = run.data.tags.get(EVALUATION_TAG)
            if folder is None:
                experiment = client.get_experiment(run.info.experiment_id).name
                raise LoraleakError(f"run {name} ({run.info.run_id}) reports no evaluation: name a study or a sweep "
                                    f"by its experiment (its out folder's name, e.g. {experiment}), a trial's run "
                                    f"or an evaluation folder")
            out.append((name, Path(folder)))
    return out


def _client(tracking_uri: str):
    """An MlflowClient for a store that exists and answers; LoraleakError otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        # Opening a missing sqlite file would silently create an empty store.
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise LoraleakError(f"no MLflow store at {tracking_uri} ({db} does not exist)")
    check_reachable(tracking_uri)
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except Exception as e:
        raise LoraleakError(f"cannot open MLflow store {tracking_uri}: {_first_line(e)}") from None


def _find_runs(client, ref: str, tracking_uri: str, study_first: bool = False) -> list:
    """The run(s) `ref` names: one run, or every trial of a sweep. A run name is looked for before a study's
    name unless `study_first` (a sweep's parent run carries the sweep's name; its evaluations are its trials')."""
    from mlflow.exceptions import MlflowException

    if RUN_ID.match(ref):
        try:
            return [client.get_run(ref)]
        except MlflowException:
            pass  # not an id after all: try it as a name
    study = client.get_experiment_by_name(ref) if study_first else None
    matches = _study_runs(client, study) if study is not None else []
    if not matches:
        quote = "'" if "'" not in ref else '"'
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        matches = client.search_runs(experiment_ids, filter_string=f"attributes.run_name = {quote}{ref}{quote}",
                                     order_by=["attributes.start_time DESC"], max_results=100) if experiment_ids else []
        study = client.get_experiment_by_name(ref) if not matches else None
        if study is not None:
            matches = _study_runs(client, study)
    if not matches:
        raise LoraleakError(f"no MLflow run with id or name {ref!r}, and no study of that name with a finished run, "
                            f"in {tracking_uri}")
    if len(matches) > 1 and study is None:
        log.info("%d runs are named %r; comparing the newest (%s)", len(matches), ref, matches[0].info.run_id)
        return [matches[0]]
    return matches


def _study_runs(client, study) -> list:
    """A study's newest finished pipeline run, or a sweep's: each trial's (its experiment's runs are its trials')."""
    finished = f"tags.`{STUDY_TAG}` != '' and attributes.status = 'FINISHED'"
    newest = ["attributes.start_time DESC"]
    matches = client.search_runs([study.experiment_id], filter_string=finished, order_by=newest, max_results=1)
    if matches and TRIAL_TAG in matches[0].data.tags:  # a sweep's: every trial's run is needed
        return _newest_per_trial(client.search_runs([study.experiment_id], filter_string=finished,
                                                    order_by=newest, max_results=5000))
    return matches


def _newest_per_trial(runs: list) -> list:
    """Of a sweep's finished pipeline runs (newest first), each trial's newest, ordered by when the trial first
    ran (the sweep's order); [] when the runs are not a sweep's trials."""
    newest: dict[str, Any] = {}
    first_start: dict[str, int] = {}
    for run in runs:
        trial = run.data.tags.get(TRIAL_TAG)
        if trial is None:
            continue
        newest.setdefault(trial, run)
        first_start[trial] = min(first_start.get(trial, run.info.start_time), run.info.start_time)
    return [newest[t] for t in sorted(newest, key=lambda t: first_start[t])]


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def format_table(df: pd.DataFrame, digits: int = 3) -> str:
    """`compare_runs`' table as text, one column per run (headed by its name): with dozens of
    metrics, runs side by side read better than one wide row per run.

    A metric `x` with `x_lo` / `x_hi` columns is shown as one row "value [lo, hi]"; missing
    values as "-".
    """
    if df.empty:
        return "(no runs)"
    columns = [c for c in df.columns if not _is_interval_end(c, df.columns)]
    header = [name if isinstance(name, str) and name else run_id[:8]
              for name, run_id in zip(df["run_name"], df["run_id"])]
    table = {col: [_cell(df, i, col, digits) for i in range(len(df))] for col in columns if col != "run_name"}
    return pd.DataFrame.from_dict(table, orient="index", columns=_unique(header)).to_string()


def _is_interval_end(col: str, columns) -> bool:
    return any(col.endswith(s) and col[: -len(s)] in columns for s in INTERVAL_SUFFIXES)


def _cell(df: pd.DataFrame, i: int, col: str, digits: int) -> str:
    value = df[col].iloc[i]
    text = _number(value, digits)
    lo, hi = f"{col}_lo", f"{col}_hi"
    if text != "-" and lo in df.columns and hi in df.columns:
        low, high = _number(df[lo].iloc[i], digits), _number(df[hi].iloc[i], digits)
        if low != "-" and high != "-":
            text += f" [{low}, {high}]"
    return text


def _number(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _unique(names: list[str]) -> list[str]:
    """Column headers, with repeated run names told apart by a counter."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def comparison_plot(df: pd.DataFrame, path: str | Path, metrics: Sequence[str] = HEADLINE) -> Path:
    """The runs' `metrics` (those they have) as grouped bars, one group per metric, with the intervals as
    error bars; written to `path` (PNG, PDF or SVG by its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [m for m in metrics if f"metrics.{m}" in df.columns and df[f"metrics.{m}"].notna().any()]
    if df.empty or not shown:
        raise LoraleakError(f"nothing to plot: the runs have none of the metrics {', '.join(metrics)}")
    names = _unique([n if isinstance(n, str) and n else i[:8] for n, i in zip(df["run_name"], df["run_id"])])
    width = 0.8 / len(df)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(shown) + 1), 4.0))
    for i, name in enumerate(names):
        values = np.array([df[f"metrics.{m}"].iloc[i] for m in shown], dtype=float)
        errors = np.zeros((2, len(shown)))
        for j, m in enumerate(shown):
            lo, hi = f"metrics.{m}_lo", f"metrics.{m}_hi"
            if lo in df.columns and hi in df.columns and not math.isnan(values[j]):
                low, high = float(df[lo].iloc[i]), float(df[hi].iloc[i])
                if not (math.isnan(low) or math.isnan(high)):
                    errors[:, j] = [values[j] - low, high - values[j]]
        ax.bar(np.arange(len(shown)) + (i - (len(df) - 1) / 2) * width, np.nan_to_num(values), width,
               yerr=errors, capsize=2, label=name)
    ax.set_xticks(np.arange(len(shown)), shown, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    ax.set_title("loraleak compare: headline metrics (95% intervals)", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
