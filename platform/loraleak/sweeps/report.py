"""What a sweep shows a reader besides its numbers: the same victims' images in every trial, and one page.

    <sweep>/strips_by_trial.png  one row per finished trial (in the swept value's order): for a few victims
                                 (the same identities in every trial), a private photo, the owner's image
                                 (org: the victim's LoRA with its trigger) and the attack's (rec)
    <sweep>/report.html          the table, the three figures, and a link to each trial's own report

The images are those the trials' evaluations saved (evaluation/<victim>/{private,org,rec}-000.png): nothing is
generated here. Victims are matched across trials by identity, since a LoRA's id changes with its settings.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .results import FINISHED, _figure, trial_order

STRIPS_FILE = "strips_by_trial.png"
REPORT_FILE = "report.html"
CONDITIONS = ("private", "org", "rec")  # what each victim shows: the truth, the owner's model, the attack


def _victim_folders(evaluation: Path) -> dict[str, Path]:
    """identity_id -> the folder of that victim's images in an evaluation."""
    found = {}
    for record in sorted((evaluation / "victims").glob("*.json")):
        try:
            identity = json.loads(record.read_text())["identity_id"]
        except (OSError, ValueError, KeyError):
            continue  # a record being written, or damaged: that victim is left out of the strips
        folder = record.with_suffix("")
        if folder.is_dir():
            found[identity] = folder
    return found


def strips_by_trial(records: Sequence[Mapping[str, Any]], varied: Sequence[str], path: Path, title: str,
                    victims: int = 4) -> Path | None:
    """The strips figure (see the module docstring); None when no finished trial has saved images."""
    from PIL import Image

    position = {trial_id: i for i, trial_id in enumerate(trial_order(records, varied))}
    finished = sorted((r for r in records if r.get("status") == FINISHED and (r.get("stage_dirs") or {}).get("evaluation")),
                      key=lambda r: position.get(r["trial_id"], len(position)))
    folders = [(r, _victim_folders(Path(r["stage_dirs"]["evaluation"]))) for r in finished]
    folders = [(r, f) for r, f in folders if f]
    if not folders:
        return None
    common = sorted(set.intersection(*(set(f) for _, f in folders)))[:victims]
    if not common:
        return None
    columns = [(identity, condition) for identity in common for condition in CONDITIONS]
    fig = _figure(0.9 * len(columns) + 1.6, 0.95 * len(folders) + 0.8)
    axes = fig.subplots(len(folders), len(columns), squeeze=False)
    for row, (record, by_identity) in enumerate(folders):
        for col, (identity, condition) in enumerate(columns):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            image = by_identity[identity] / f"{condition}-000.png"
            if image.is_file():
                with Image.open(image) as im:
                    ax.imshow(im.convert("RGB"))
            if row == 0:
                ax.set_title(f"{condition}\n{identity[-5:]}" if condition == "private" else condition, fontsize=7)
            if col == 0:
                ax.set_ylabel(str(record["label"]), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"{title}\neach victim: a private photo, the owner's model (org), the attack (rec)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_sweep_report(directory: Path, name: str, table_html: str, figures: Sequence[Path | None],
                       records: Sequence[Mapping[str, Any]]) -> Path:
    """The sweep's one page: its table, its figures and each finished trial's own report (relative links)."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>sweep {html.escape(name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style>",
             f"<h1>sweep {html.escape(name)}</h1>", table_html]
    for figure in figures:
        if figure is not None and figure.is_file():
            parts.append(f"<h2>{html.escape(figure.stem.replace('_', ' '))}</h2><img src='{html.escape(figure.name)}'>")
    links = [(r["label"], r.get("report")) for r in records if r.get("status") == FINISHED and r.get("report")]
    if links:
        parts.append("<h2>each trial's report</h2><ul>")
        for label, report in links:
            href = os.path.relpath(report, directory) if os.path.isabs(report) else report
            parts.append(f"<li><a href='{html.escape(href)}'>{html.escape(str(label))}</a></li>")
        parts.append("</ul>")
    path = directory / REPORT_FILE
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path
