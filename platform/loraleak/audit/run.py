"""`loraleak audit`: does this LoRA file give away the person it was trained on? A verdict per file,
without the private photos.

Each file (diffusers, PEFT folder or kohya, see `lora.formats`) is read through the safe path,
checked against the base (a project LoRA whose metadata names another base fingerprint is refused in
one line; its trigger is shown in the verdict), and attacked by FineXtract (training-free, always)
and, with `--attack`, by a saved learned attack; a LoRA of another rank or target set than that
attack's zoo is adapted to it by SVD re-factorisation (`lora.adapt`; the record's notes say how). The score needs no reference photos: a LoRA fine-tuned on one person
pulls the guided samples towards that person, so their identities agree with each other more than
the base model's samples do. With `spread` = the mean pairwise embedding distance of the samples
under the face scorer,

    leakage = 1 − spread(FineXtract samples of base + LoRA) / spread(the same samples of the base alone)

Both use the same seeds and guidance, so a zero-update LoRA scores exactly 0; a LoRA whose samples
all show one identity approaches 1 (negative: more varied than the base). The number is relative to
this base and these sampling settings. `calibration` (run by `benchmarks/audit_calibration.py`) measures
its ROC AUC on a zoo against zero- and random-update LoRAs of the same layout (README, "Auditing a LoRA
file": 1.000 at rank 16, 0.899 at rank 1, where a random update of a fine-tune's norm also scores).

Output in --out: `audit.json` (every number, for machines), `index.html` (the samples of every file
beside the base's) and the PNGs; one verdict line per file on stdout; exit status 1 when a score is
above `--fail-above` (a hub or CI can gate uploads on it).
"""

from __future__ import annotations

import html
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from ..attack.api import LoraInput
from ..attack.baselines.finextract import FineXtractConfig, guided_samples, image_features, mean_pairwise_distance
from ..attack.loading import load_attack
from ..attack.lora_inputs import fit_to_layout
from ..attack.reconstruct import lora_step
from ..base.loading import base_fingerprint, load_base_pipeline
from ..config import to_dict
from ..errors import InputError, LoraleakError
from ..generate import generate_images
from ..lora.formats import read_shared_lora
from ..lora.io import check_lora_fits, lora_provenance, lora_summary

REPORT_JSON, REPORT_HTML = "audit.json", "index.html"


@dataclass(frozen=True)
class AuditConfig:
    base: str = "tiny"
    attack: Path | None = None  # a saved learned attack for this base (its LoRA layout), optional
    out_dir: Path = Path("runs/audit")
    fail_above: float | None = None  # exit status 1 when any file's leakage is above this
    scorer: Literal["synthetic", "dlib"] = "synthetic"  # the identity embedding the spread is measured in
    finextract: FineXtractConfig = field(default_factory=FineXtractConfig)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.scorer not in ("synthetic", "dlib"):
            raise ValueError(f"scorer must be 'synthetic' or 'dlib', got {self.scorer!r}")
        if self.finextract.num_candidates < 2:
            raise ValueError("finextract.num_candidates must be >= 2: the spread needs pairs")


@dataclass(frozen=True)
class FileAudit:
    file: str
    leakage: float | None  # None: the scorer found fewer than two faces
    spread: float | None
    record: dict[str, Any]  # everything in audit.json for this file

    def above(self, threshold: float | None) -> bool:
        return threshold is not None and self.leakage is not None and self.leakage > threshold


def _slug(path: Path, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name if path.name != "pytorch_lora_weights.safetensors"
                  else path.parent.name or "lora").strip("_") or "lora"
    slug, k = stem, 1
    while slug in taken:
        k += 1
        slug = f"{stem}-{k}"
    taken.add(slug)
    return slug


def _save_images(images: list[Image.Image], folder: Path, prefix: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, im in enumerate(images):
        im.save(folder / f"{prefix}-{i:03d}.png")
        names.append(f"{folder.name}/{prefix}-{i:03d}.png")
    return names


def _spread(images: list[Image.Image], scorer: str) -> tuple[float | None, int]:
    features = image_features(images, scorer)
    return mean_pairwise_distance(features), sum(f is not None for f in features)


class Auditor:
    """The base pipeline, the base's own spread (computed once) and the optional learned attack."""

    def __init__(self, cfg: AuditConfig) -> None:
        self.cfg = cfg
        self.pipe = load_base_pipeline(cfg.base, device=cfg.device)
        self.attack = load_attack(cfg.attack, self.pipe) if cfg.attack is not None else None
        try:
            self.fingerprint: str | None = base_fingerprint(cfg.base)
        except LoraleakError:  # a base loaded from somewhere it cannot be fingerprinted: no check
            self.fingerprint = None
        fx = cfg.finextract
        self.base_images = guided_samples(self.pipe, None, fx, fx.num_candidates, cfg.seed)
        self.base_spread, self.base_faces = _spread(self.base_images, cfg.scorer)
        if self.base_spread is None or self.base_spread <= 0:
            raise LoraleakError(f"the {cfg.scorer} scorer finds fewer than two distinct faces in the base model's "
                                "samples: no reference spread to compare with (another --scorer?)")

    def audit(self, path: Path, folder: Path) -> FileAudit:
        started = time.perf_counter()
        cfg, fx = self.cfg, self.cfg.finextract
        lora = read_shared_lora(path)
        provenance = lora_provenance(lora.metadata, path)
        stated = provenance.base_fingerprint if provenance is not None else None
        if stated is not None and self.fingerprint is not None and stated != self.fingerprint:
            raise InputError(f"{path} was fine-tuned from another base (fingerprint {stated}, from its metadata) "
                             f"than {cfg.base!r} ({self.fingerprint})")
        check_lora_fits(lora.state_dict, self.pipe)  # one line when it belongs to another base
        summary = lora_summary(lora.state_dict, lora.metadata)
        project_file = lora.save(folder / "lora.safetensors")  # the project's form: what every attack reads
        images = guided_samples(self.pipe, project_file, fx, fx.num_candidates, cfg.seed)
        spread, faces = _spread(images, cfg.scorer)
        leakage = None if spread is None else 1.0 - spread / self.base_spread
        record: dict[str, Any] = {
            "file": str(path), "format": lora.source_format, "notes": list(lora.notes),
            "trigger": provenance.trigger if provenance is not None else None,
            "base_fingerprint": stated, "step": provenance.step if provenance is not None else None,
            "rank": summary["rank"], "targets": summary["targets"], "modules": len(summary["unet_modules"]),
            "leakage": leakage, "spread": spread, "faces": faces,
            "images": {"finextract": _save_images(images, folder, "finextract")}, "attacks": {}}
        if self.attack is not None:
            try:
                step = provenance.step if provenance is not None else self._step(lora.source)
                lora_input, adapted = self._fitted(LoraInput.from_file(project_file, step), lora)
                answer = self.attack.reconstruct(lora_input, fx.num_candidates, cfg.seed)
                learned = answer.images if answer.images is not None else generate_images(
                    self.pipe, prompt_embeds=answer.prompt_embeds, n=fx.num_candidates, seed=cfg.seed,
                    num_inference_steps=fx.sample_steps, lora=project_file)
                learned_spread, learned_faces = _spread(learned, cfg.scorer)
                record["attacks"]["learned"] = {
                    "kind": self.attack.kind, "spread": learned_spread, "faces": learned_faces, "adapted": adapted,
                    "leakage": None if learned_spread is None else 1.0 - learned_spread / self.base_spread}
                record["images"]["learned"] = _save_images(learned, folder, "learned")
            except (LoraleakError, ValueError) as e:  # e.g. another rank or targets than it reads: refused, said why
                record["attacks"]["learned"] = {"kind": self.attack.kind, "error": " ".join(str(e).split())}
        record["wall_s"] = time.perf_counter() - started
        return FileAudit(str(path), leakage, spread, record)

    def _fitted(self, lora: LoraInput, shared: Any) -> tuple[LoraInput, list[str]]:
        """The LoRA as the learned attack reads it: adapted to its zoo's layout by SVD when the rank or
        targets differ (`fit_to_layout`), with the warning lines; as it is for an attack of no layout.
        The victim's model stays base + the file itself (`lora.path`)."""
        layout = getattr(self.attack, "layout", None) or getattr(getattr(self.attack, "model", None), "layout", None)
        if layout is None:
            return lora, []
        zoo_alpha = (getattr(self.attack, "record", None) or {}).get("lora_alpha")
        state_dict, metadata, notes = fit_to_layout(lora.state_dict, shared.metadata, layout, zoo_alpha,
                                                    what=f"LoRA {shared.source or lora.path}")
        if not notes:
            return lora, []
        return LoraInput(state_dict, metadata, lora.step, lora.path), notes

    def _step(self, source: Path | None) -> int | None:
        """The fine-tuning step r a step-embedding attack asks for: from the file's snapshot folder or
        finetune.json, else the attack's usual one; None when neither tells (the attack then says so)."""
        if source is None:
            return None
        try:
            return lora_step(source if source.is_file() else source / "adapter_model.safetensors",
                             getattr(self.attack, "default_step", None))[0]
        except InputError:
            return None


def verdict_line(result: FileAudit, threshold: float | None) -> str:
    r = result.record
    if result.leakage is None:
        score = f"no score (the scorer found {r['faces']} faces in the samples)"
    else:
        score = f"leakage {result.leakage:+.3f} (identity spread {result.spread:.3f})"
    status = "FAIL" if result.above(threshold) else ("ok" if threshold is not None else "-")
    trigger = f", trigger {r['trigger']!r}" if r.get("trigger") else ""
    learned = r["attacks"].get("learned")
    extra = ""
    if learned is not None:
        extra = f"; learned attack: {learned['error']}" if "error" in learned else \
            f"; learned attack leakage {learned['leakage']:+.3f}" if learned["leakage"] is not None else ""
        if learned.get("adapted"):
            extra += " (LoRA adapted to its zoo by SVD)"
    return (f"{status:<4} {r['file']}: {score}; {r['format']}, rank {r['rank']}, {r['modules']} modules{trigger}"
            f"{extra} [{r['wall_s']:.1f}s]")


def _write_html(out: Path, base_images: list[str], base_spread: float, results: list[FileAudit],
                threshold: float | None) -> Path:
    def row(title: str, images: list[str]) -> str:
        cells = "".join(f'<img src="{html.escape(s)}" width="64" height="64">' for s in images)
        return f"<tr><th>{html.escape(title)}</th><td>{cells}</td></tr>"

    rows = [row(f"base alone (spread {base_spread:.3f})", base_images)]
    for result in results:
        r = result.record
        score = "-" if result.leakage is None else f"{result.leakage:+.3f}"
        flag = " FAIL" if result.above(threshold) else ""
        rows.append(row(f"{Path(r['file']).name}: leakage {score}{flag} (FineXtract)", r["images"]["finextract"]))
        if "learned" in r["images"]:
            rows.append(row(f"{Path(r['file']).name}: learned attack", r["images"]["learned"]))
    page = ("<!doctype html><meta charset='utf-8'><title>loraleak audit</title>"
            "<style>body{font-family:sans-serif}th{text-align:left;padding-right:1em}img{image-rendering:pixelated;"
            "margin:1px}</style><h1>LoRA identity leakage audit</h1>"
            "<p>leakage = 1 − identity spread of FineXtract samples through the LoRA / the same for the base alone "
            f"(0: no more consistent than the base; 1: one identity). Threshold: {threshold if threshold is not None else '-'}."
            f"</p><table>{''.join(rows)}</table>")
    path = out / REPORT_HTML
    path.write_text(page)
    return path


def run_audit(cfg: AuditConfig, files: list[Path], echo: Any = print) -> list[FileAudit]:
    """Audit every file, printing a verdict line as each ends; writes audit.json and index.html."""
    if not files:
        raise LoraleakError("no LoRA files to audit")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    auditor = Auditor(cfg)
    base_images = _save_images(auditor.base_images, out / "base", "finextract")
    taken: set[str] = {"base"}
    results = []
    for path in files:
        folder = out / _slug(Path(path), taken)
        try:
            result = auditor.audit(Path(path), folder)
        except LoraleakError as e:  # one bad file is reported; the others are still audited
            result = FileAudit(str(path), None, None, {"file": str(path), "error": str(e)})
            echo(f"ERR  {path}: {e}")
        else:
            echo(verdict_line(result, cfg.fail_above))
        results.append(result)
    good = [r for r in results if "error" not in r.record]
    (out / REPORT_JSON).write_text(json.dumps({
        "config": to_dict(cfg), "base_spread": auditor.base_spread, "base_faces": auditor.base_faces,
        "base_images": base_images, "files": [r.record for r in results]}, indent=1, default=str))
    _write_html(out, base_images, auditor.base_spread, good, cfg.fail_above)
    return results


def exit_status(results: list[FileAudit], threshold: float | None) -> int:
    """0: every file audited and none above the threshold; 1: some file above it; 2: some file unreadable."""
    if any("error" in r.record for r in results):
        return 2
    return 1 if any(r.above(threshold) for r in results) else 0
