"""What a killed process leaves half-written in a study's folders, and its removal on resume.

Every writer of loraleak writes under a private name and renames into place, so a file or folder
under its final name is complete; what a kill -9 leaves is only those private names (and a Ray Train
checkpoint Ray had not registered yet):

    .<name>.tmp-<pid>-<id>        an atomic write: zoo files (zoo/storage.py), a class-image cache
                                  (finetune/class_images.py), an evaluation's files (evaluation/evaluate.py)
    .stage-<lora_id>-<pid>-<id>   a zoo fine-tune's staging folder (zoo/storage.py)
    .attack-<random>              the trained attack being exported (attack/train.py, export_model)
    <storage>/<run>/checkpoint_*  a Ray Train checkpoint not in the run's checkpoint_manager_snapshot.json:
                                  being uploaded (or deleted) when its process died; Ray itself resumes
                                  from the registered ones only, and so must a longer attack that
                                  continues from another's latest checkpoint (`registered_checkpoints`)
    <zoo>/loras/<lora_id>         a fine-tune published without its part (parts/<lora_id>.parquet): the
                                  build records a fine-tune after publishing it, and redoes one without a part
    <evaluation>/victims/<id>     a victim's images without their record (victims/<id>.json): the evaluation
                                  writes the record last, and evaluates a victim without one again

Not here: an image cache's private folders (<out>/image-cache/<xx>/.<key>.tmp-*, evaluation/image_cache.py).
Evaluations of other studies or trials may be writing them while this folder is locked; the evaluation
removes those older than an hour itself (`ImageCache.remove_stale`).

`remove_study_leftovers(out)` removes all of them under a study's folder; call it only while holding
the folder's lock (loraleak.locking), when no live process can be writing them. Local folders only.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .locking import LOCK_FILE

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folders in a run's storage
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's registered checkpoints
ZOO_LORAS, ZOO_PARTS, ZOO_CLASS_IMAGES = "loras", "parts", "class_images"  # zoo/storage.py, zoo/build.py
RAY_STORAGE = "ray"  # an attack folder's Ray Train storage (attack/config.py, AttackTrainConfig.storage)
EVALUATION_VICTIMS = "victims"  # an evaluation's per-victim results (evaluation/evaluate.py, ResultStore)


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is a writer's private name (see the table above)."""
    return name.startswith((".stage-", ".attack-")) or (name.startswith(".") and ".tmp-" in name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_temporary(directory: str | Path) -> list[Path]:
    """Remove the private names directly in `directory` (not below); returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [entry for entry in sorted(directory.iterdir()) if is_temporary(entry.name)]
    for entry in removed:
        _remove(entry)
    return removed


def registered_checkpoints(run_dir: str | Path) -> set[str] | None:
    """The checkpoint folder names Ray Train registered for the run stored in `run_dir` (its snapshot's
    kept and latest checkpoints); empty when it registered none yet, None when the snapshot is unreadable
    (nothing can be said; Ray refuses to resume such a run itself)."""
    path = Path(run_dir) / RAY_SNAPSHOT
    if not path.exists():
        return set()
    try:
        state = json.loads(path.read_text())
        results = [*state.get("checkpoint_results", []), state.get("latest_checkpoint_result") or {},
                   *state.get("pending_training_results", [])]
        return {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()) if run_dir.is_dir() else []


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders that are complete: registered by Ray (all of them when the snapshot is
    unreadable, the best that can be said)."""
    registered = registered_checkpoints(run_dir)
    return [p for p in checkpoint_folders(run_dir) if registered is None or p.name in registered]


def remove_unregistered_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint folders of one Ray Train run (`<storage>/<run name>`) that Ray did not register."""
    registered = registered_checkpoints(run_dir)
    if registered is None:
        logger.warning("%s: unreadable %s; its checkpoints are left as they are", run_dir, RAY_SNAPSHOT)
        return []
    removed = [checkpoint for checkpoint in checkpoint_folders(run_dir) if checkpoint.name not in registered]
    for checkpoint in removed:
        _remove(checkpoint)
    return removed


def remove_zoo_leftovers(root: str | Path) -> list[Path]:
    """A local zoo's private names (root, parts, loras, class images) and its fine-tunes published without
    a part."""
    root = Path(root)
    removed = [*remove_temporary(root), *remove_temporary(root / ZOO_PARTS), *remove_temporary(root / ZOO_LORAS),
               *remove_temporary(root / ZOO_CLASS_IMAGES)]
    loras = root / ZOO_LORAS
    if loras.is_dir():
        for lora in sorted(p for p in loras.iterdir() if p.is_dir()):
            if not (root / ZOO_PARTS / f"{lora.name}.parquet").is_file():
                _remove(lora)
                removed.append(lora)
    return removed


def remove_evaluation_leftovers(folder: str | Path) -> list[Path]:
    """An evaluation folder's private names and its victims' images without a record."""
    victims = Path(folder) / EVALUATION_VICTIMS
    removed = remove_temporary(victims)
    if victims.is_dir():
        for images in sorted(p for p in victims.iterdir() if p.is_dir()):
            if not (victims / f"{images.name}.json").is_file():
                _remove(images)
                removed.append(images)
    return removed


def remove_study_leftovers(out: str | Path) -> list[Path]:
    """Everything a killed run left half-written in the study folder `out` and the stage folders in it
    (each stage locks its own folder, so a stage folder is one with a lock file; a zoo: one with a loras/ or
    parts/ folder; an attack: one with Ray Train storage, ray/; an evaluation: one with victims/): nothing
    else of a folder given as --out is touched. Call it with `out`'s lock held. Returns what was removed."""
    out = Path(out)
    removed = remove_temporary(out)
    if not out.is_dir():
        return removed
    for folder in sorted(p for p in out.iterdir() if (p / LOCK_FILE).is_file() and not p.is_symlink()):
        removed += remove_temporary(folder)
        if (folder / ZOO_LORAS).is_dir() or (folder / ZOO_PARTS).is_dir():
            removed += remove_zoo_leftovers(folder)
        if (folder / RAY_STORAGE).is_dir():  # the attack's own storage: its runs are this stage's
            for run_dir in sorted(p for p in (folder / RAY_STORAGE).iterdir() if p.is_dir()):
                removed += remove_unregistered_checkpoints(run_dir)
        if (folder / EVALUATION_VICTIMS).is_dir():
            removed += remove_evaluation_leftovers(folder)
    for path in removed:
        logger.debug("removed %s, left half-written by a killed run", path)
    return removed
