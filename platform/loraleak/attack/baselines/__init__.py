"""Baseline attacks, each behind `loraleak.attack.api.LeakageAttack`, each registered by importing it.

- `nearest_neighbour`: the photos of the attack-train identity whose LoRA update ΔW is closest;
- `pca_map`: PCA of attack-train LoRA updates + ridge map to the true prompt embedding (weights2weights);
- `matching_updates`: the paper's baseline, inverting the LoRA update (Geiping et al. / DLG);
- `finextract`: training-free, guided sampling from base towards the fine-tune + clustering (FineXtract).

`fit_baseline(BaselineConfig)` fits one of them on a zoo's attack_train split and saves it
(`build_baseline`: the same, returning the attack in memory).
"""

from . import finextract, matching_updates, nearest_neighbour, pca_map  # noqa: F401  (register the kinds)
from .fit import BASELINE_KINDS, BaselineConfig, build_baseline, fit_baseline
from .finextract import FineXtractAttack, FineXtractConfig
from .matching_updates import MatchingUpdatesAttack, MatchingUpdatesConfig
from .nearest_neighbour import NearestNeighbourAttack, NearestNeighbourConfig
from .pca_map import PcaMapAttack, PcaMapConfig

__all__ = [
    "BASELINE_KINDS", "BaselineConfig", "FineXtractAttack", "FineXtractConfig", "MatchingUpdatesAttack", "MatchingUpdatesConfig", "NearestNeighbourAttack",
    "NearestNeighbourConfig", "PcaMapAttack", "PcaMapConfig", "build_baseline", "fit_baseline",
]
