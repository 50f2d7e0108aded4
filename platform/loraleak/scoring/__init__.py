"""Face-identity scoring: is a generated image the same person as the private photos?

`make_scorer("dlib" | "synthetic")` gives a `Scorer`; `match_against` / `verify` compare faces,
and `pairs.verification_accuracy` validates a scorer on same/different pairs.
"""

from .base import Match, Scorer, match_against, verify
from .registry import make_scorer

__all__ = ["Match", "Scorer", "make_scorer", "match_against", "verify"]
