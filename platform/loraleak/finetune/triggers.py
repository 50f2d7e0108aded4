"""The victim's private trigger word: 4-11 random lowercase letters, as in the paper."""

from __future__ import annotations

import random
import string

MIN_TRIGGER_LENGTH = 4
MAX_TRIGGER_LENGTH = 11


def random_trigger(rng_or_seed: random.Random | int) -> str:
    """A random trigger word of 4-11 lowercase letters; the same seed always gives the same word."""
    rng = rng_or_seed if isinstance(rng_or_seed, random.Random) else random.Random(rng_or_seed)
    length = rng.randint(MIN_TRIGGER_LENGTH, MAX_TRIGGER_LENGTH)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
