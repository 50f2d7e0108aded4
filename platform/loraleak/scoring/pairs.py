"""Validate a scorer on verification pairs ("same person or not?"), e.g. LFW's official pairs."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Hashable, Sequence, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import InputError
from .base import Embedding, Scorer, verify

Item = TypeVar("Item", bound=Hashable)

PAIRS_COLUMNS = ("path_a", "path_b", "same_person")


@dataclass(frozen=True)
class Pair(Generic[Item]):
    """Two images to compare (paths, generator indices, ...) and whether they show one person."""

    a: Item
    b: Item
    same: bool


@dataclass(frozen=True)
class VerificationResult:
    n_pairs: int
    found_rate: float        # fraction of distinct images in which a face was found
    accuracy_all: float      # over all pairs; a pair missing a face counts as "different"
    accuracy_found: float    # over the pairs where both faces were found (nan if none)
    n_found_pairs: int
    mean_distance_same: float       # over found same-person pairs (nan if none)
    mean_distance_different: float  # over found different-person pairs (nan if none)


def read_lfw_pairs(path_tsv: str | Path, root: str | Path | None = None) -> list[Pair[Path]]:
    """Read a `path_a  path_b  same_person` TSV; paths are relative to `root` (default: its folder)."""
    path_tsv = Path(path_tsv)
    root = Path(root) if root is not None else path_tsv.parent
    if not path_tsv.is_file():
        raise InputError(f"pairs file not found: {path_tsv}")
    with path_tsv.open(newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or tuple(rows[0]) != PAIRS_COLUMNS:
        raise InputError(f"{path_tsv}: expected a header {' '.join(PAIRS_COLUMNS)!r} (tab-separated)")
    pairs = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 3 or row[2] not in ("0", "1"):
            raise InputError(f"{path_tsv}:{line}: expected 'path_a<TAB>path_b<TAB>0|1', got {row!r}")
        pairs.append(Pair(root / row[0], root / row[1], row[2] == "1"))
    return pairs


def balanced_subset(pairs: Sequence[Pair[Item]], n_pairs: int) -> list[Pair[Item]]:
    """The first n/2 same-person and the first n/2 different-person pairs (same ones first)."""
    same = [p for p in pairs if p.same][: n_pairs // 2]
    different = [p for p in pairs if not p.same][: n_pairs - n_pairs // 2]
    return same + different


def embed_items(scorer: Scorer, items: Sequence[Item], preprocess: Callable[[Item], Image.Image],
                batch_size: int = 32, progress: bool = True) -> dict[Item, Embedding | None]:
    """Embed each distinct item once (preprocess turns an item into the image the scorer sees)."""
    unique = list(dict.fromkeys(items))
    embeddings: dict[Item, Embedding | None] = {}
    with tqdm(total=len(unique), desc=f"embedding ({scorer.name})", unit="img", disable=not progress) as bar:
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            embeddings.update(zip(chunk, scorer.embed([preprocess(item) for item in chunk])))
            bar.update(len(chunk))
    return embeddings


def verification_accuracy(scorer: Scorer, pairs: Sequence[Pair[Item]],
                          preprocess: Callable[[Item], Image.Image], progress: bool = True) -> VerificationResult:
    """Found-rate and verification accuracy of `scorer` at its own threshold on `pairs`."""
    if not pairs:
        raise InputError("no verification pairs to score")
    embeddings = embed_items(scorer, [x for p in pairs for x in (p.a, p.b)], preprocess, progress=progress)
    correct_all, correct_found, n_found = 0, 0, 0
    distances: dict[bool, list[float]] = {True: [], False: []}
    for p in pairs:
        a, b = embeddings[p.a], embeddings[p.b]
        same = verify(scorer, a, b)
        if same is None:
            correct_all += not p.same  # no face: judged "different"
            continue
        n_found += 1
        correct_all += same == p.same
        correct_found += same == p.same
        distances[p.same].append(scorer.distance(a, b))
    found = [e is not None for e in embeddings.values()]
    return VerificationResult(
        n_pairs=len(pairs),
        found_rate=float(np.mean(found)),
        accuracy_all=correct_all / len(pairs),
        accuracy_found=correct_found / n_found if n_found else float("nan"),
        n_found_pairs=n_found,
        mean_distance_same=float(np.mean(distances[True])) if distances[True] else float("nan"),
        mean_distance_different=float(np.mean(distances[False])) if distances[False] else float("nan"),
    )


def best_threshold(distances: Sequence[float], same: Sequence[bool]) -> tuple[float, float]:
    """The distance threshold (same person iff d <= t) with the best accuracy, and that accuracy.

    Candidates are midpoints between consecutive sorted distances, so the threshold does not sit
    exactly on a calibration sample.
    """
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    if d.size == 0:
        raise InputError("no distances to calibrate a threshold on")
    order = np.argsort(d)
    d, y = d[order], y[order]
    # Threshold below the k-th smallest distance accepts the first k pairs:
    # correct = same pairs accepted + different pairs rejected.
    same_accepted = np.concatenate([[0], np.cumsum(y)])
    different_rejected = (~y).sum() - np.concatenate([[0], np.cumsum(~y)])
    correct = same_accepted + different_rejected
    k = int(np.argmax(correct))
    candidates = np.concatenate([[d[0] - 1e-6], (d[:-1] + d[1:]) / 2, [d[-1] + 1e-6]])
    return float(candidates[k]), float(correct[k] / d.size)
