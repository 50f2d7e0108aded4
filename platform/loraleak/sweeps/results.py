"""A sweep's results: each trial's record, the results table (CSV + printed) and the privacy-utility plot.

Every trial writes `<sweep>/trials/<trial_id>/result.json` when it ends (status finished or failed);
a finished record is what lets a rerun skip the trial. The table has one row per trial: its
label, the varied settings, its status, and every headline metric of its evaluation. The plot has one
panel per privacy metric: x = utility (what the owner still gets: org similarity), y = what the
attack recovers, one labelled point per trial, with the no-leak levels (the base model with the class
prompt, top-1 chance) drawn as lines. A second figure puts the trials side by side (in the order of the
swept values when one numeric setting varies: a learning curve, a rank sweep) with the leak the attack
adds over the best no-attack control and the victims' strength, each with its interval over victims.
Figures are drawn on matplotlib's Agg canvas, never through pyplot.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from .trials import format_value

TRIALS_DIR = "trials"
RECORD_FILE = "result.json"
TABLE_FILE = "results.csv"
PLOT_FILE = "privacy_utility.png"
CURVE_FILE = "leak_by_trial.png"
# Per trial, what the attack adds over every no-attack control, and what the owner's model holds (both with
# their 95% intervals over victims, from the evaluation's headline): metric -> (label, colour).
CURVE_PANELS = {"rec_over_best_control.similarity": ("rec - best no-attack control (the leak the attack adds)", "C3"),
                "org.strength": ("org - base (the victims' strength)", "C0"),
                "org.binding": ("org - best control (bound to the trigger)", "C2")}
FINISHED, FAILED, NOT_RUN = "finished", "failed", "not run"


def record_path(directory: Path, trial_id: str) -> Path:
    return directory / TRIALS_DIR / trial_id / RECORD_FILE


def write_record(path: Path, record: Mapping[str, Any]) -> None:
    """Written beside, then renamed: a record is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged record: the trial runs again
    return record if isinstance(record, dict) else None


def is_finished(record: Mapping[str, Any] | None) -> bool:
    return bool(record) and record.get("status") == FINISHED and isinstance(record.get("metrics"), dict)


# --- the table ------------------------------------------------------------------------------------------------

def results_frame(records: Sequence[Mapping[str, Any]], varied: Sequence[str], metric: str, mode: str):
    """One row per trial: trial_id, label, the varied settings, status, every metric; best `metric` first."""
    import pandas as pd

    rows = []
    for record in records:
        row = {"trial_id": record["trial_id"], "label": record["label"]}
        row.update({path: format_value(record["overrides"][path]) if path in record["overrides"] else "-"
                    for path in varied})
        row["status"] = record.get("status", NOT_RUN)
        row.update({k: v for k, v in sorted((record.get("metrics") or {}).items())})
        row["wall_time_s"] = record.get("wall_time_s")
        row["mlflow_run_id"] = record.get("mlflow_run_id")
        row["error"] = record.get("error")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if metric in frame.columns:
        frame = frame.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable")
    return frame.reset_index(drop=True)


def table_columns(frame, utility: str, privacy: Sequence[str], metric: str) -> list[str]:
    """The columns worth printing: label, status, utility, privacy, the score, the no-leak levels."""
    wanted = ["label", "status", utility, *privacy, metric]
    for name in privacy:  # the no-leak level of each privacy metric
        condition, _, rate = name.partition(".")
        wanted.append(f"base.{rate}")
        if rate.startswith("top1"):
            wanted.append("chance_top1")
    wanted.append("rec_over_best_control.similarity")
    return [c for c in dict.fromkeys(wanted) if c in frame.columns]


def format_table(frame, utility: str, privacy: Sequence[str], metric: str) -> str:
    if frame.empty:
        return "(no trials)"
    view = frame[table_columns(frame, utility, privacy, metric)]
    return view.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


def write_table(frame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


# --- the plot -------------------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(frame, column: str) -> float | None:
    if column not in frame.columns:
        return None
    values = [v for v in frame[column].tolist() if _finite(v)]
    return sum(values) / len(values) if values else None


def privacy_utility_plot(frame, utility: str, privacy: Sequence[str], path: Path, title: str) -> Path:
    """One panel per privacy metric: x = `utility`, y = the metric, one labelled point per finished trial."""
    done = frame[frame["status"] == FINISHED] if "status" in frame.columns else frame
    fig = _figure(5.2 * len(privacy), 4.4)
    axes = fig.subplots(1, len(privacy), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(done))]
    for ax, name in zip(axes, privacy):
        plotted = 0
        if utility in done.columns and name in done.columns:
            at: dict[tuple[float, float], list[str]] = {}  # trials with the same numbers share one label
            for colour, (_, row) in zip(colours, done.iterrows()):
                x, y = row[utility], row[name]
                if not (_finite(x) and _finite(y)):
                    continue
                ax.scatter([x], [y], color=colour, s=42, zorder=3)
                at.setdefault((round(float(x), 9), round(float(y), 9)), []).append(str(row["label"]))
                plotted += 1
            for (x, y), labels in at.items():
                ax.annotate("\n".join(labels), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                            va="bottom")
        condition, _, rate = name.partition(".")
        levels = [(f"base.{rate}", "base model, class prompt (no attack)", "gray")]
        if rate.startswith("top1"):
            levels.append(("chance_top1", "chance", "black"))
        for column, text, colour in levels:
            level = _mean(done, column)
            if level is not None and column != name:
                ax.axhline(level, color=colour, linestyle="--", linewidth=1, label=f"{text}: {level:.3f}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        if not plotted:
            ax.text(0.5, 0.5, "no finished trial has both metrics", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"utility: {utility}")
        ax.set_ylabel(f"privacy loss: {name}")
        ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\nright: the owner gets more of the person; up: the attack recovers more", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _order_key(value: Any) -> tuple[int, float]:
    """Numbers in order, then null ("all", "none": the setting's largest or absent case), then the rest in the
    order the sweep lists them (the sort is stable: a list of defenses is ordered by its author, not alphabetically)."""
    if _finite(value):
        return (0, float(value))
    return (1, 0.0) if value is None else (2, 0.0)


def trial_order(records: Sequence[Mapping[str, Any]], varied: Sequence[str]) -> list[str]:
    """The trials' ids along a figure's x axis: by the varied value when one setting varies, else as given."""
    if len(varied) != 1:
        return [r["trial_id"] for r in records]
    return [r["trial_id"] for r in sorted(records, key=lambda r: _order_key(r["overrides"].get(varied[0])))]


def leak_by_trial_plot(frame, records: Sequence[Mapping[str, Any]], varied: Sequence[str], path: Path,
                       title: str) -> Path:
    """Two panels, the finished trials along x (sorted by the varied value when only one setting varies):
    rec - best control, and org's strength and binding, as points with their 95% intervals over victims."""
    done = frame[frame["status"] == FINISHED] if "status" in frame.columns else frame
    position = {trial_id: i for i, trial_id in enumerate(trial_order(records, varied))}
    rows = sorted(done.iterrows(), key=lambda item: position.get(item[1]["trial_id"], len(position)))
    fig = _figure(max(6.0, 1.3 * len(rows) + 3.0) * 2 / 1.6, 4.4)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    panels = (("rec_over_best_control.similarity",), ("org.strength", "org.binding"))
    titles = ("what the attack recovers beyond every no-attack control", "what the victims' models hold")
    for ax, names, panel_title in zip(axes, panels, titles):
        ax.set_title(panel_title, fontsize=9)
        for offset, name in zip((0.0, 0.12), names):
            text, colour = CURVE_PANELS[name]
            xs, ys, err = [], [], [[], []]
            for x, (_, row) in enumerate(rows):
                y, lo, hi = (row.get(name), row.get(f"{name}_lo"), row.get(f"{name}_hi"))
                if not _finite(y):
                    continue
                xs.append(x + offset)
                ys.append(y)
                err[0].append(y - lo if _finite(lo) else 0.0)
                err[1].append(hi - y if _finite(hi) else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=err, fmt="o-", color=colour, capsize=4, label=text)
        ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(rows)), [str(row["label"]) for _, row in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("similarity difference (95% interval over victims)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no finished trial has these metrics", ha="center", va="center", transform=ax.transAxes)
        ax.margins(x=0.12)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
