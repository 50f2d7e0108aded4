"""The attack: the paper's variational network autoencoder, reading a shared LoRA's weights.

- `lora_inputs`: a LoRA state dict -> the ordered per-matrix inputs (delta / raw / GL-invariant).
- `model`: `NetworkAutoencoder` (matrix encoders + frozen CLIP transformer -> z, a prompt embedding).
- `batched_lora`: decoding z through each sample's own victim UNet in one pass, and the loss.
"""

from .batched_lora import (BatchedLoRALinear, LossTerms, batched_lora, epsilon_loss, install_batched_lora,
                           lora_scale, stack_lora_factors)
from .lora_inputs import (LoraLayout, MatrixSpec, canonical_factors, check_layout, collate_lora_matrices,
                          lora_layout, lora_matrices)
from .model import AttackModelConfig, EncoderOutput, NetworkAutoencoder

__all__ = [
    "AttackModelConfig", "BatchedLoRALinear", "EncoderOutput", "LoraLayout", "LossTerms", "MatrixSpec",
    "NetworkAutoencoder", "batched_lora", "canonical_factors", "check_layout", "collate_lora_matrices",
    "epsilon_loss", "install_batched_lora", "lora_layout", "lora_matrices", "lora_scale", "stack_lora_factors",
]
