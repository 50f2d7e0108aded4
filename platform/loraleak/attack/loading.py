"""`load_attack(directory, pipe)`: any saved attack, whatever its kind, ready to reconstruct.

Its own module above every attack: the attack modules import `api` to register their kind, and this
module imports them all so that every kind is registered before a directory is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from . import baselines, nae_attack  # noqa: F401  (importing them registers their kinds)
from .api import LOADERS, LeakageAttack, attack_kind


def load_attack(directory: str | Path, pipe: Any) -> LeakageAttack:
    """The attack saved in `directory`, ready to reconstruct with the base pipeline `pipe`."""
    kind = attack_kind(directory)
    if kind not in LOADERS:
        raise InputError(f"{directory} holds an attack of unknown kind {kind!r} (known: {', '.join(sorted(LOADERS))})")
    return LOADERS[kind](Path(directory), pipe)
