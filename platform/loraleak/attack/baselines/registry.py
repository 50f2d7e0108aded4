"""The baseline kinds: kind -> its settings class and how it is built from a zoo's attack_train split.

A baseline module ends with one line, e.g.

    register_baseline(KIND, PcaMapConfig, build, load)

(`build(settings, inputs)`: the attack fitted on `inputs`, a `FitInputs`; `load(directory, pipe)`: a
saved one, for `attack.api.load_attack`), and `attack/baselines/__init__.py` imports the module.
`fit.py` builds whatever is registered: it names no kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tqdm.auto import tqdm

from ...finetune.class_images import pipeline_resolution
from ...identities import make_source
from ...zoo.config import read_zoo_config
from ...zoo.storage import ZooStore
from ..api import register_attack
from ..data import PromptEmbeddings, SampleRow, private_images, read_state
from ..lora_inputs import LoraLayout
from .common import TrainingLora

# kind -> the typed config of its `settings` (what BaselineConfig checks them against)
BASELINE_KINDS: dict[str, type] = {}
_BUILDERS: dict[str, Callable[[Any, "FitInputs"], Any]] = {}


def register_baseline(kind: str, config_class: type, build: Callable[[Any, "FitInputs"], Any],
                      load: Callable[..., Any]) -> None:
    """Make `kind` a baseline: fitted by `build(settings, inputs)`, loaded by `load(directory, pipe)`."""
    BASELINE_KINDS[kind] = config_class
    _BUILDERS[kind] = build
    register_attack(kind, load)


def baseline_builder(kind: str) -> Callable[[Any, "FitInputs"], Any]:
    return _BUILDERS[kind]


@dataclass
class FitInputs:
    """What a baseline may be fitted on: the base pipeline, the attack_train fine-tunes' final LoRAs (one
    layout), and, read only when a baseline asks, the LoRA files, their owners' photos and the prompts."""

    cfg: Any  # the BaselineConfig
    pipe: Any
    layout: LoraLayout
    rows: list[SampleRow]  # the attack_train fine-tunes fitted on (final snapshots)
    show_progress: bool = True

    def loras(self) -> list[TrainingLora]:
        """Every row's LoRA, read from the zoo."""
        store = ZooStore(self.cfg.zoo)
        loras = []
        for row in tqdm(self.rows, desc=f"{self.cfg.kind}: read LoRAs", disable=not self.show_progress):
            state_dict, metadata = read_state(store, row.lora_path)
            loras.append(TrainingLora(row.lora_id, row.identity_id, row.instance_prompt, state_dict, metadata))
        return loras

    def photos(self) -> dict[str, list]:
        """Each identity's private photos at the base's resolution, from the zoo's identity source, checked
        against the manifest's hashes."""
        cfg = self.cfg
        source = cfg.identities if cfg.identities is not None else read_zoo_config(cfg.zoo).identities
        identities = {i.identity_id: i for i in make_source(source).identities()}
        resolution = pipeline_resolution(self.pipe)
        photos: dict[str, list] = {}
        for row in self.rows:
            if row.identity_id not in photos:
                photos[row.identity_id] = private_images(identities, row, resolution)
        return photos

    def prompt_embeddings(self) -> Any:
        """The rows' instance prompts through the base's text encoder, (rows, tokens, width), fp32 on the CPU."""
        return PromptEmbeddings(self.pipe, self.pipe.device)(self.rows).float().cpu()

