"""The paper's network autoencoder behind the common attack interface (`api.LeakageAttack`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .api import AttackOutput, LoraInput, register_attack
from .lora_inputs import check_layout, collate_lora_matrices, lora_layout, lora_matrices
from .model import NetworkAutoencoder
from .reconstruct import _initial_lora, read_attack_record

logger = logging.getLogger(__name__)

KIND = "network_autoencoder"


class NetworkAutoencoderAttack:
    """z = μ(encoder(LoRA, r)); the evaluation decodes z through the victim's own model."""

    kind = KIND

    def __init__(self, model: NetworkAutoencoder, record: dict[str, Any], directory: Path | None = None):
        self.model, self.record, self.directory = model.eval(), record, directory

    @property
    def default_step(self) -> int | None:
        return self.record.get("lora_steps")

    @torch.no_grad()
    def reconstruct(self, lora: LoraInput, n: int = 1, seed: int = 0) -> AttackOutput:
        # n and seed do not matter here: z is the posterior mean, the same for every image.
        check_layout(lora_layout(lora.state_dict), self.model.layout, what=f"LoRA {lora.path or ''}".strip())
        step = lora.step if lora.step is not None else self.default_step
        if self.model.config.step_embedding and step is None:
            raise ValueError("this attack embeds the fine-tuning step r: give the LoRA's step")
        initial = None
        if self.model.config.input_mode == "delta" and self.record.get("use_initial_lora") and lora.path:
            initial = _initial_lora(lora.path)
        device = next(self.model.parameters()).device
        matrices = collate_lora_matrices([lora_matrices(lora.state_dict, self.model.config.input_mode,
                                                        initial, self.model.layout)])
        matrices = [m.to(device) for m in matrices]
        steps = torch.tensor([step], device=device) if self.model.config.step_embedding else None
        return AttackOutput(prompt_embeds=self.model.encode_mean(matrices, steps)[0].float().cpu())

    def save_pretrained(self, directory: str | Path) -> Path:
        return self.model.save_pretrained(directory)


def load(directory: Path, pipe: Any) -> NetworkAutoencoderAttack:
    _, record = read_attack_record(directory)
    model = NetworkAutoencoder.from_pretrained(directory, pipe.text_encoder).to(pipe.device)
    return NetworkAutoencoderAttack(model, record, directory)


register_attack(KIND, load)
