"""One interface for every attack on a shared LoRA: the paper's network autoencoder and the baselines.

An attack sees what a downloader of a shared LoRA sees: the file's UNet LoRA factors, its metadata
and the fine-tuning step r. It answers in one of two ways:

- `prompt_embeds` (77 × text width): decoded through the *victim's own model* (base + that LoRA)
  by the evaluation stage, as the paper does for its "rec" images;
- `images`: pictures returned directly (nearest neighbour returns the photos of the attack-train
  identity whose LoRA is closest).

Every attack is a directory: `config.json` with a `"kind"` names the class that reads it back
(`loraleak.attack.loading.load_attack`), diffusers-style, so Ray tasks on other machines rebuild it
from a URI. Each attack module registers its kind here on import (`register_attack`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from PIL import Image

from ..errors import InputError
from ..lora.io import read_lora, resolve_lora_file
from .model import FORMAT


@dataclass
class LoraInput:
    """A shared LoRA as the adversary holds it."""

    state_dict: dict[str, torch.Tensor]  # UNet LoRA factors as `read_lora` returns them
    metadata: dict[str, str] = field(default_factory=dict)
    step: int | None = None  # the fine-tuning step r (None: the attack's default)
    path: Path | None = None  # the file itself: the victim's model is base + this file

    @classmethod
    def from_file(cls, path: str | Path, step: int | None = None) -> "LoraInput":
        path = resolve_lora_file(path)
        state_dict, metadata = read_lora(path)
        return cls(state_dict, metadata, step, path)


@dataclass
class AttackOutput:
    prompt_embeds: torch.Tensor | None = None  # (77, width): decode through the victim's model
    images: list[Image.Image] | None = None  # or pictures returned as they are

    def __post_init__(self) -> None:
        if (self.prompt_embeds is None) == (self.images is None):
            raise ValueError("an attack answers with exactly one of prompt_embeds or images")


@runtime_checkable
class LeakageAttack(Protocol):
    kind: str

    def reconstruct(self, lora: LoraInput, n: int, seed: int) -> AttackOutput: ...

    def save_pretrained(self, directory: str | Path) -> Path: ...


# kind -> loader(directory, pipe) ; each attack module registers itself on import.
LOADERS: dict[str, Callable[[Path, Any], LeakageAttack]] = {}


def register_attack(kind: str, loader: Callable[[Path, Any], LeakageAttack]) -> None:
    LOADERS[kind] = loader


def attack_kind(directory: str | Path) -> str:
    path = Path(directory) / "config.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{directory} is not a saved attack: cannot read config.json ({e})") from None
    # The network autoencoder's config predates this interface: its format names it.
    return record.get("kind") or ("network_autoencoder" if record.get("format") == FORMAT else "?")
