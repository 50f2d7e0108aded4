"""What a sweep shows a reader besides its numbers: the same victims' images in every trial, and one page.

    <sweep>/strips_by_trial.png  one row per finished trial (in the swept value's order): for a few victims
                                 (the same identities in every trial), a private photo, the owner's image
                                 (org: the victim's LoRA with its trigger) and the attack's (rec)
    <sweep>/report.html          the table, each trial paired per victim with the reference trial, the three
                                 figures, and a link to each trial's own report

The images are those the trials' evaluations saved (evaluation/<victim>/{private,org,rec}-000.png): nothing is
generated here. Victims are matched across trials by identity, since a LoRA's id changes with its settings.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import LoraleakError
from ..evaluation.paired import (MEASURES, PairedDifference, VictimFigures, difference_text, format_paired,
                                 paired_differences)
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


def paired_with_reference(records: Sequence[Mapping[str, Any]], reference_id: str
                          ) -> tuple[str, list[tuple[str, list[PairedDifference]]]] | None:
    """Each other finished trial paired victim by victim with the reference trial: (the reference's label, one
    row per trial); None when the reference has no finished evaluation to pair with."""
    def evaluation(record: Mapping[str, Any]) -> VictimFigures | None:
        folder = (record.get("stage_dirs") or {}).get("evaluation")
        if record.get("status") != FINISHED or folder is None:
            return None
        try:
            return VictimFigures.read(folder)
        except LoraleakError:
            return None  # an evaluation folder removed since: the trial is left out of the pairing

    reference = next((r for r in records if r.get("trial_id") == reference_id), None)
    figures = evaluation(reference) if reference is not None else None
    if figures is None:
        return None
    rows = []
    for record in records:
        other = evaluation(record) if record is not reference else None
        if other is not None:
            rows.append((str(record["label"]), paired_differences(other, figures)))
    return str(reference["label"]), rows


def format_paired_text(paired: tuple[str, list] | None) -> str:
    if paired is None or not paired[1]:
        return ""
    return f"paired per victim with the reference trial ({paired[0]}):\n" + format_paired(paired[1], "reference")


def _paired_html(paired: tuple[str, list] | None) -> str:
    if paired is None or not paired[1]:
        return ""
    label, rows = paired
    head = "".join(f"<th>{m}</th>" for m in MEASURES)
    body = "".join(f"<tr><td>{html.escape(name)}</td>{''.join(f'<td>{html.escape(difference_text(p))}</td>' for p in diffs)}</tr>"
                   for name, diffs in rows)
    return (f"<h2>paired per victim with {html.escape(label)}</h2><p>Each trial's per-victim figure minus the "
            f"reference trial's, mean over the victims both scored [bootstrap 95% over victims], and how many went "
            f"down. leak = rec − best control, strength = org − base, binding = org − the victim's best control "
            f"(loraleak compare SWEEP --against REF prints the same).</p><table><tr><th>trial</th>{head}</tr>"
            f"{body}</table>")


def write_sweep_report(directory: Path, name: str, table_html: str, figures: Sequence[Path | None],
                       records: Sequence[Mapping[str, Any]],
                       paired: tuple[str, list[tuple[str, list[PairedDifference]]]] | None = None) -> Path:
    """The sweep's one page: its table, the paired comparison with the reference trial, its figures and each
    finished trial's own report (relative links)."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>sweep {html.escape(name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style>",
             f"<h1>sweep {html.escape(name)}</h1>", table_html, _paired_html(paired)]
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
