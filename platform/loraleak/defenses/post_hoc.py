"""`apply_post_hoc`: a post-hoc defense (output noise, rank truncation) applied to a LoRA file.

Its own module above the package: the defenses' config and writer live in the package, which both
post-hoc modules import, so the dispatch to them cannot live there too (an import cycle).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from . import POST_HOC_KINDS, DefenseConfig, output_perturbation, rank_truncation


def apply_post_hoc(defense: DefenseConfig, in_path: str | Path, out_path: str | Path) -> Path:
    """Apply a post-hoc defense to the LoRA at `in_path` and write it to `out_path`."""
    if defense.kind == "output_noise":
        return output_perturbation.apply_to_file(in_path, out_path, relative_noise=defense.relative_noise,
                                                 seed=defense.seed)
    if defense.kind == "rank_truncation":
        return rank_truncation.apply_to_file(in_path, out_path, rank=defense.rank)
    raise ConfigError(f"a {defense.kind!r} defense is not applied to a finished LoRA "
                      f"(post-hoc defenses: {', '.join(POST_HOC_KINDS)})")
