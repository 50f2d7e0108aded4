"""Split identities into attack-train and held-out by person, so nothing of a held-out person is
ever seen by attack training."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Iterable, Literal

Split = Literal["attack_train", "heldout"]


def split_identities(identity_ids: Iterable[str], heldout_fraction: float = 0.2,
                     seed: int = 0) -> dict[str, Split]:
    """Map each id to "attack_train" or "heldout".

    Deterministic and independent of input order: ids are ranked by sha256(f"{seed}:{id}") and the
    first round(n * heldout_fraction) are held out. For a fraction strictly between 0 and 1 and
    n >= 2 both sides get at least one id, so a small experiment always has something to train on
    and something to evaluate; 0 and 1 mean what they say.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    ids = list(identity_ids)
    duplicates = [i for i, count in Counter(ids).items() if count > 1]
    if duplicates:
        raise ValueError(f"identity ids must be unique; {duplicates[0]!r} appears more than once")
    ids.sort(key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    n_heldout = round(len(ids) * heldout_fraction)
    if len(ids) >= 2 and 0.0 < heldout_fraction < 1.0:
        n_heldout = min(max(n_heldout, 1), len(ids) - 1)
    return {iid: ("heldout" if rank < n_heldout else "attack_train") for rank, iid in enumerate(ids)}
