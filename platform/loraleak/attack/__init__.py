"""The attack: the paper's variational network autoencoder, reading a shared LoRA's weights.

- `lora_inputs`: a LoRA state dict -> the ordered per-matrix inputs (delta / raw / GL-invariant).
- `model`: `NetworkAutoencoder` (matrix encoders + frozen CLIP transformer -> z, a prompt embedding).

Decoding z through each sample's own victim UNet in one pass, and the loss, is the shared kernel's
`loraleak.lora.batched` (the batched fine-tune trains through the same layer).
"""

from .lora_inputs import (LoraLayout, MatrixSpec, canonical_factors, check_layout, collate_lora_matrices,
                          lora_layout, lora_matrices)
from .model import AttackModelConfig, EncoderOutput, NetworkAutoencoder

__all__ = [
    "AttackModelConfig", "EncoderOutput", "LoraLayout", "MatrixSpec", "NetworkAutoencoder", "canonical_factors",
    "check_layout", "collate_lora_matrices", "lora_layout", "lora_matrices",
]
