"""Baseline: a PCA space of LoRA weights and a linear map to the prompt embedding (weights2weights style).

weights2weights (Dravid et al. 2024) finds that identity LoRAs span a low-dimensional linear space.
Here: the attack-train LoRAs' GL(r)-invariant ΔW features (`features.py`) -> PCA to k components
(whitened: each coefficient has unit variance over the training LoRAs) -> ridge regression to the
embedding of each fine-tune's true instance prompt "A face of {trigger}." under the base's text
encoder. For a shared LoRA the predicted embedding (prompt_length x width) is decoded through the
victim's own model, like the network autoencoder's z. The target is the trigger's embedding, not
the face: the map learns where in prompt space a LoRA's trigger sits, as the paper's optional
embedding-MSE term does.

Ridge in closed form: W = (CᵀC + λI)⁻¹ Cᵀ (Y − Ȳ), prediction Ȳ + c W; with λ > 0 it is defined
for any number of LoRAs, and it falls back to the mean embedding as λ grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ...errors import InputError
from ..api import AttackOutput, LoraInput
from ..lora_inputs import LoraLayout
from ..model import text_encoder_sha256
from .common import TrainingLora, check_lora, layout_from_json, layout_to_json, load_baseline, require_tensors, \
    save_baseline
from .features import SKETCH_PREFIX, delta_w_features, sketch_matrices
from .registry import FitInputs, register_baseline

KIND = "pca_map"
TENSORS = ["mean", "components", "coefficient_std", "weight", "intercept"]


@dataclass(frozen=True)
class PcaMapConfig:
    components: int = 32  # k; fewer when there are fewer training LoRAs (at most N - 1)
    ridge: float = 1.0  # λ on whitened coefficients
    normalise: bool = False  # scale each LoRA's ΔW features to unit norm before the PCA
    sketch_size: int | None = 64
    sketch_seed: int = 0

    def __post_init__(self) -> None:
        if self.components < 1:
            raise ValueError(f"components must be >= 1, got {self.components}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.sketch_size is not None and self.sketch_size < 1:
            raise ValueError(f"sketch_size must be >= 1 (or null), got {self.sketch_size}")


class PcaMapAttack:
    kind = KIND

    def __init__(self, config: PcaMapConfig, layout: LoraLayout, tensors: Mapping[str, torch.Tensor],
                 prompt_shape: tuple[int, int], record: Mapping[str, Any] | None = None) -> None:
        self.config, self.layout, self.prompt_shape = config, layout, tuple(prompt_shape)
        self.mean = tensors["mean"]  # (D,)
        self.components = tensors["components"]  # (k, D), orthonormal rows
        self.coefficient_std = tensors["coefficient_std"]  # (k,)
        self.weight = tensors["weight"]  # (k, P·W)
        self.intercept = tensors["intercept"]  # (P·W,)
        self.sketches = {k: v for k, v in tensors.items() if k.startswith(SKETCH_PREFIX)}
        self.record = dict(record or {})

    # --- fitting -----------------------------------------------------------------------------

    @classmethod
    def fit(cls, config: PcaMapConfig, layout: LoraLayout, loras: Sequence[TrainingLora],
            prompt_embeds: torch.Tensor, show_progress: bool = False) -> "PcaMapAttack":
        """`prompt_embeds` (N, P, W): each LoRA's true instance-prompt embedding, in `loras` order."""
        if len(loras) < 2:
            raise InputError(f"the PCA map needs at least 2 attack-train LoRAs, got {len(loras)}")
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != len(loras):
            raise InputError(f"expected ({len(loras)}, prompt length, width) prompt embeddings, got "
                             f"{tuple(prompt_embeds.shape)}")
        sketches = sketch_matrices(layout, config.sketch_size, config.sketch_seed)
        rows = []
        for lora in tqdm(loras, desc="PCA map: features", disable=not show_progress):
            check_lora(LoraInput(lora.state_dict, lora.metadata), layout, KIND)
            rows.append(delta_w_features(lora.state_dict, lora.metadata, layout, sketches, config.normalise))
        features = torch.stack(rows).double()  # (N, D)
        n = features.shape[0]
        mean = features.mean(0)
        # Thin SVD of the centred data: rows of vh are the principal axes. N x D with N small.
        _, s, vh = torch.linalg.svd(features - mean, full_matrices=False)
        spread = int((s > s.max() * 1e-6).sum()) if s.max() > 0 else 0  # directions the data really spans
        k = min(config.components, n - 1, spread)
        if k < 1:
            raise InputError("the attack-train LoRAs have identical ΔW features: no principal component to fit")
        components = vh[:k]
        coefficient_std = s[:k] / (n - 1) ** 0.5
        coefficients = (features - mean) @ components.T / coefficient_std  # (N, k), unit variance
        targets = prompt_embeds.reshape(n, -1).double()
        intercept = targets.mean(0)
        gram = coefficients.T @ coefficients + config.ridge * torch.eye(k, dtype=torch.float64)
        weight = torch.linalg.solve(gram, coefficients.T @ (targets - intercept))  # (k, P·W)
        fitted = intercept + coefficients @ weight
        residual = ((fitted - targets) ** 2).sum() / ((targets - intercept) ** 2).sum().clamp_min(1e-30)
        explained = float((s[:k] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30))
        record = {"fit": {"num_loras": n, "components": k, "explained_variance": explained,
                          "train_r2": float(1 - residual)}}
        tensors = {"mean": mean.float(), "components": components.float(),
                   "coefficient_std": coefficient_std.float(), "weight": weight.float(),
                   "intercept": intercept.float(), **sketches}
        return cls(config, layout, tensors, tuple(prompt_embeds.shape[1:]), record)

    # --- the attack ------------------------------------------------------------------------------

    def coefficients(self, lora: LoraInput) -> torch.Tensor:
        """(k,) whitened PCA coefficients of the LoRA's ΔW features."""
        check_lora(lora, self.layout, KIND)
        x = delta_w_features(lora.state_dict, lora.metadata, self.layout, self.sketches, self.config.normalise)
        return ((x.double() - self.mean.double()) @ self.components.double().T) / self.coefficient_std.double()

    @torch.no_grad()
    def reconstruct(self, lora: LoraInput, n: int = 1, seed: int = 0) -> AttackOutput:
        # n and seed do not matter: one embedding per LoRA, decoded n times by the evaluation.
        embeds = self.intercept.double() + self.coefficients(lora) @ self.weight.double()
        return AttackOutput(prompt_embeds=embeds.float().reshape(self.prompt_shape))

    # --- persistence -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        record = {**self.record, "layout": layout_to_json(self.layout), "prompt_shape": list(self.prompt_shape)}
        tensors = {"mean": self.mean, "components": self.components, "coefficient_std": self.coefficient_std,
                   "weight": self.weight, "intercept": self.intercept, **self.sketches}
        return save_baseline(directory, KIND, self.config, record, tensors)

    @classmethod
    def from_pretrained(cls, directory: str | Path, text_encoder: torch.nn.Module | None = None) -> "PcaMapAttack":
        """Load; with `text_encoder`, refuse one other than the base's whose prompt space it maps into."""
        directory = Path(directory)
        config, record, tensors = load_baseline(directory, KIND, PcaMapConfig)
        require_tensors(tensors, TENSORS, directory)
        layout, shape = layout_from_json(record.get("layout")), record.get("prompt_shape")
        k, d = tensors["components"].shape
        if layout is None or not isinstance(shape, list) or len(shape) != 2 or tensors["mean"].shape != (d,) \
                or tensors["coefficient_std"].shape != (k,) or tensors["weight"].shape != (k, shape[0] * shape[1]) \
                or tensors["intercept"].shape != (shape[0] * shape[1],):
            raise InputError(f"{directory} is an inconsistent PCA-map baseline (config.json and "
                             "baseline.safetensors disagree)")
        expected = record.get("text_encoder_sha256")
        if text_encoder is not None and expected is not None and text_encoder_sha256(text_encoder) != expected:
            raise InputError(f"the PCA map in {directory} maps into another base's prompt space (fitted on base "
                             f"fingerprint {record.get('base_fingerprint')})")
        extra = {k: v for k, v in record.items() if k not in ("kind", "format_version", "config", "layout",
                                                              "prompt_shape")}
        return cls(config, layout, tensors, (shape[0], shape[1]), extra)


def load(directory: Path, pipe: Any) -> PcaMapAttack:
    return PcaMapAttack.from_pretrained(directory, getattr(pipe, "text_encoder", None))


def build(settings: PcaMapConfig, inputs: FitInputs) -> PcaMapAttack:
    """Fitted on the attack_train LoRAs' updates and their true prompt embeddings."""
    loras = inputs.loras()
    return PcaMapAttack.fit(settings, inputs.layout, loras, inputs.prompt_embeddings(), inputs.show_progress)


register_baseline(KIND, PcaMapConfig, build, load)
