"""The evaluation report: one self-contained HTML file a person can open anywhere, plus its figures.

The HTML carries everything inline (images as base64 PNG, CSS in a <style> block, no scripts, no
external links), so it can be attached to an MLflow run, mailed or opened offline. The figures
(per-victim similarity histogram, rates with intervals against chance) are also written as PNG
files beside it. Figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so
the report changes no process-wide plotting state.
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ..imaging import make_grid
from .metrics import METRIC_LABELS, ConditionMetrics, Estimate, VictimSummary
from .regime import STRONG_BOUND, StudyRegime

REPORT_FILE = "report.html"
HISTOGRAM_FILE = "similarity_histogram.png"
RATES_FILE = "rates.png"
THUMB_PX = 64  # displayed height of one image in the per-victim grids (small images are upscaled)
GLANCE_PX = 96  # displayed side of one image in a victim's at-a-glance strip (large enough to see a face)
GLANCE_IMAGES = 4  # images per condition in that strip (2 x 2)
# The at-a-glance strip of each victim: its photos, the owner's images, the attack's, the best no-attack
# control's (that victim's own), the base's.
GLANCE_ORDER = ("private", "org", "rec", "best control", "base")

# Rates drawn in the rates figure, with the chance level they are compared with (if any).
RATE_CHANCE = {"face_found": None, "verified": None, "top1_image": "chance_top1",
               "top5_image": "chance_top5", "top1_victim": "chance_top1", "top5_victim": "chance_top5"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { margin-bottom: 4px; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: #f4f4f4; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.metrics td.num small { color: #777; }
.legend { color: #555; font-size: 0.9em; max-width: 60em; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; }
.figures img { max-width: 49%; border: 1px solid #eee; }
.victim { margin-bottom: 18px; }
.victim td.label { width: 14em; font-size: 0.9em; }
.victim td.label small { color: #666; }
img.strip { height: var(--h); image-rendering: pixelated; display: block; }
.verdict { border: 2px solid #2a7; background: #f2fbf5; padding: 10px 14px; margin: 12px 0; max-width: 60em; }
.verdict.warn { border-color: #c63; background: #fff5ef; }
.verdict h2 { margin: 0 0 6px; font-size: 1.15em; }
table.glance td { text-align: center; font-size: 0.85em; border: none; }
"""


def write_report(out_dir: str | Path, title: str, metrics_by_condition: Mapping[str, ConditionMetrics],
                 victims: Sequence[Mapping[str, Any]],
                 per_victim_similarity: Mapping[str, Sequence[float]] | None = None,
                 notes: Mapping[str, Any] | None = None, regime: StudyRegime | None = None,
                 verdict: Sequence[str] = ()) -> Path:
    """Write `report.html` and its PNG figures into `out_dir`; returns the HTML path.

    victims: one mapping per victim: {"identity_id": str, "private": [PIL], <condition>: [PIL], ...};
        image rows are shown in the mapping's order ("private", then e.g. "org", "rec", "base").
    per_victim_similarity: {condition: [per-victim mean similarity]} for the histogram; by default
        taken from `metrics_by_condition` for every condition.
    notes: free key/value facts shown at the top (scorer and its similarity mapping, seeds, sizes).
    regime: the study's regime (strength and binding, loraleak.evaluation.regime): a verdict box at the
        top, each victim's strength and binding, and its at-a-glance strip with its own best control.
    verdict: further lines for the verdict box (e.g. rec against the best control, with its interval).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if per_victim_similarity is None:
        per_victim_similarity = {name: [v.similarity for v in m.victims if v.similarity is not None]
                                 for name, m in metrics_by_condition.items()}
    # One colour per condition in both figures (matplotlib's default cycle, in condition order).
    names = list(dict.fromkeys([*metrics_by_condition, *per_victim_similarity]))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    histogram = _similarity_histogram(per_victim_similarity, colours)
    rates = _rates_figure(metrics_by_condition, colours)
    (out / HISTOGRAM_FILE).write_bytes(histogram)
    (out / RATES_FILE).write_bytes(rates)

    n_conditions = len(metrics_by_condition)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{len(victims)} victims, {n_conditions} conditions; generated {generated}</p>',
        _verdict_box(regime, verdict),
        _notes_table(notes or {}),
        "<h2>Metrics</h2>",
        _metrics_table(metrics_by_condition),
        _LEGEND,
        '<div class="figures">',
        f'<img src="{_data_uri(histogram)}" alt="per-victim identity similarity by condition">',
        f'<img src="{_data_uri(rates)}" alt="rates with 95% intervals and chance levels">',
        "</div>",
        "<h2>Victims</h2>",
        *(_victim_section(v, metrics_by_condition, regime) for v in victims),
        "</body></html>",
    ]
    path = out / REPORT_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


_LEGEND = """<p class="legend">Each number is a mean over victims with its clustered bootstrap 95% interval
(victims resampled). <b>face found</b>: images in which the scorer found a face.
<b>identity similarity</b> / <b>distance</b>: mean over images with a face of the image's mean
similarity / distance to the victim's private photos, averaged per victim, then over victims.
<b>verified</b>: images (of all, no face = not verified) within the scorer's threshold of the
victim's photos. <b>top-k (image)</b>: images whose k nearest candidate identities include the
victim. <b>top-k (victim)</b>: victims ranked within the k nearest candidates by the mean distance of
all their images. Ties count as random draws. Chance = k / number of candidates.</p>"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _notes_table(notes: Mapping[str, Any]) -> str:
    if not notes:
        return ""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in notes.items())
    return f'<table class="notes">{rows}</table>'


def _metrics_table(metrics_by_condition: Mapping[str, ConditionMetrics]) -> str:
    head = "".join(f"<th>{_e(label)}</th>" for label in METRIC_LABELS.values())
    rows = []
    for name, m in metrics_by_condition.items():
        cells = "".join(_estimate_cell(est) for est in m.estimates().values())
        rows.append(f"<tr><th>{_e(name)}</th>{cells}"
                    f'<td class="num">{m.chance_top1:.3f} / {m.chance_top5:.3f}</td>'
                    f'<td class="num">{m.n_victims}<br><small>{m.n_victims_with_face} with a face</small></td>'
                    f'<td class="num">{m.n_images}</td></tr>')
    candidates = sorted({m.n_candidates for m in metrics_by_condition.values()})
    return (f'<table class="metrics"><tr><th>condition</th>{head}'
            f"<th>chance top-1 / top-5<br><small>{'/'.join(map(str, candidates))} candidates</small></th>"
            f"<th>victims</th><th>images</th></tr>{''.join(rows)}</table>")


def _estimate_cell(est: Estimate) -> str:
    if est.value is None:
        return '<td class="num">-</td>'
    return f'<td class="num">{est.value:.3f}<br><small>[{est.low:.3f}, {est.high:.3f}]</small></td>'


def _verdict_box(regime: StudyRegime | None, lines: Sequence[str]) -> str:
    if regime is None and not lines:
        return ""
    items = list(lines)
    title = "Verdict"
    warn = False
    if regime is not None:
        warn = regime.regime != STRONG_BOUND
        title = f"Verdict: victims are {regime.regime}" + (" — the attack is not measured here" if warn else "")
        items = [regime.summary_line().removeprefix("regime: "), *items, regime.meaning]
        items += [f"{name} − base: {_signed(est)}" for name, est in regime.control_over_base.items()]
    body = "".join(f"<li>{_e(line)}</li>" for line in items)
    return f'<div class="verdict{" warn" if warn else ""}"><h2>{_e(title)}</h2><ul>{body}</ul></div>'


def _signed(est: Estimate) -> str:
    return "-" if est.value is None else f"{est.value:+.3f} [{est.low:+.3f}, {est.high:+.3f}]"


def _glance(victim: Mapping[str, Any], best_control: str | None) -> str:
    """One row a reader takes in at once: private | org | rec | best control | base, 2 x 2 images each."""
    cells = []
    for name in GLANCE_ORDER:
        key = best_control if name == "best control" else name
        images = victim.get(key) if key else None
        if not images:
            continue
        shown = list(images[:GLANCE_IMAGES])
        grid = make_grid(shown, ncols=2, pad=2)
        scale = max(1.0, GLANCE_PX / shown[0].height)
        label = name if name != "best control" else f"best control<br><small>{_e(key)}</small>"
        cells.append(f'<td><img class="strip" style="--h:{round(grid.height * scale)}px" '
                     f'src="{_data_uri(_png(grid))}" alt="{_e(key)}"><b>{label}</b></td>')
    return f'<table class="glance"><tr>{"".join(cells)}</tr></table>' if cells else ""


def _victim_section(victim: Mapping[str, Any], metrics_by_condition: Mapping[str, ConditionMetrics],
                    regime: StudyRegime | None = None) -> str:
    victim_id = victim["identity_id"]
    own = next((v for v in regime.victims if v.victim_id == victim_id), None) if regime is not None else None
    heading = _e(victim_id)
    if own is not None:
        fmt = lambda x: "-" if x is None else f"{x:+.3f}"  # noqa: E731
        heading += (f' <small>strength (org − base) {fmt(own.strength)}, binding (org − {_e(own.best_control or "-")})'
                    f" {fmt(own.binding)}</small>")
    glance = _glance(victim, own.best_control if own is not None else None)
    rows = []
    for name, images in victim.items():
        if name == "identity_id":
            continue
        label = f"<b>{_e(name)}</b>"
        summary = _victim_summary(metrics_by_condition.get(name), victim_id)
        if summary is not None:
            label += f"<br><small>{_e(_describe(summary))}</small>"
        rows.append(f'<tr><td class="label">{label}</td><td>{_strip(images)}</td></tr>')
    return f'<div class="victim"><h3>{heading}</h3>{glance}<table>{"".join(rows)}</table></div>'


def _victim_summary(metrics: ConditionMetrics | None, victim_id: str) -> VictimSummary | None:
    if metrics is None:
        return None
    return next((v for v in metrics.victims if v.victim_id == victim_id), None)


def _describe(v: VictimSummary) -> str:
    sim = "-" if v.similarity is None else f"{v.similarity:.3f}"
    rank = "-" if v.rank is None else f"{v.rank:g} of {v.n_candidates}"
    return (f"similarity {sim}, face {v.face_found:.0%}, verified {v.verified:.0%}, "
            f"top-1 {v.top1_image:.0%}, rank {rank}")


def _strip(images: Sequence[Image.Image]) -> str:
    """One row of images as a single embedded PNG at native size, upscaled for display by CSS."""
    if not images:
        return "<small>(no images)</small>"
    pad = 2
    grid = make_grid(list(images), ncols=len(images), pad=pad)
    scale = max(1.0, THUMB_PX / images[0].height)
    return (f'<img class="strip" style="--h:{round(grid.height * scale)}px" '
            f'src="{_data_uri(_png(grid))}" alt="{len(images)} images">')


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fig_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _similarity_histogram(per_victim_similarity: Mapping[str, Sequence[float]],
                          colours: Mapping[str, str]) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    values = {name: np.asarray(v, dtype=np.float64) for name, v in per_victim_similarity.items()}
    values = {name: v[~np.isnan(v)] for name, v in values.items()}
    everything = np.concatenate([v for v in values.values()] or [np.zeros(0)])
    if everything.size:
        lo, hi = float(everything.min()), float(everything.max())
        margin = max(0.02, (hi - lo) * 0.05)
        bins = np.linspace(max(0.0, lo - margin), min(1.0, hi + margin), 21)
        for name, v in values.items():
            colour = colours.get(name, "gray")
            if not v.size:
                continue
            # Filled and outlined steps: overlapping conditions stay readable (no blended colours).
            ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.2, color=colour)
            ax.hist(v, bins=bins, histtype="step", linewidth=1.8, color=colour,
                    label=f"{name} (n={v.size}, mean {v.mean():.3f})")
            ax.axvline(v.mean(), color=colour, linestyle="--", linewidth=1.2)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    else:
        ax.text(0.5, 0.5, "no victim had a face in any image", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("per-victim mean identity similarity")
    ax.set_ylabel("victims")
    ax.set_title("Identity similarity per victim (dashed: mean)")
    return _fig_png(fig)


def _rates_figure(metrics_by_condition: Mapping[str, ConditionMetrics], colours: Mapping[str, str]) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    names = list(metrics_by_condition)
    x = np.arange(len(RATE_CHANCE))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        m = metrics_by_condition[name]
        ests = [getattr(m, rate) for rate in RATE_CHANCE]
        value = np.array([e.value if e.value is not None else math.nan for e in ests])
        low = np.array([e.low if e.low is not None else math.nan for e in ests])
        high = np.array([e.high if e.high is not None else math.nan for e in ests])
        ax.bar(x + (i - (len(names) - 1) / 2) * width, value, width,
               yerr=np.vstack([value - low, high - value]), capsize=2, label=name, color=colours[name])
    # Chance depends only on the number of candidates, shared by the conditions of one evaluation.
    first = next(iter(metrics_by_condition.values()), None)
    chance_levels = [(j, getattr(first, c)) for j, c in enumerate(RATE_CHANCE.values())
                     if c is not None and first is not None]
    for n, (j, level) in enumerate(chance_levels):
        ax.hlines(level, j - 0.45, j + 0.45, colors="black", linestyles=":", linewidth=1.5, zorder=3,
                  label="chance" if n == 0 else None)
    # "top-1 (image)" on two lines: six labels side by side fit the axis.
    ax.set_xticks(x, [METRIC_LABELS[rate].replace(" (", "\n(") for rate in RATE_CHANCE], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate (mean over victims, 95% CI)")
    ax.set_title("Rates by condition")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=min(3, len(names) + 1),
              frameon=False)
    return _fig_png(fig)
