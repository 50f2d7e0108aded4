"""LoRA files from other tools, read into the project's one form, and project LoRAs written out for them.

The project's form is what its own fine-tunes write (`finetune/dreambooth_lora.py`), loadable by
`load_lora_weights`: one safetensors file, component-prefixed PEFT keys (`unet.<module>.lora_A.weight`;
the fine-tunes' `.lora.down.weight` spelling means the same) and the adapter's LoraConfig in the
metadata (`lora_adapter_metadata`: `unet.r`, `unet.lora_alpha`, ...). Every other part of the
project (generation, the attacks, the evaluation) reads that form. Three formats come in:

- diffusers: the form itself (a file without the LoraConfig gets alpha = rank recorded, which is
  what diffusers assumes when it loads one);
- PEFT: a folder with `adapter_config.json` + `adapter_model.safetensors` (`base_model.model.<module>
  .lora_A.weight`, what `PeftModel.save_pretrained` writes), one model's adapter (the UNet's);
- kohya / A1111: `lora_unet_<module_with_underscores>.lora_down.weight` with a `.alpha` per module.

Key renaming is diffusers' own (`StableDiffusionPipeline.lora_state_dict` for kohya, the converters
of `diffusers.utils.state_dict_utils` for the rest), fed a state dict that `lora.io.read_lora` has
already read safely: diffusers never opens a file here, so nothing can be unpickled.

One scale per LoRA. The attacks read alpha / r once per file (`lora.batched.lora_scale`).
A file whose modules have different ranks or alphas (kohya's per-module `.alpha`, PEFT's
rank_pattern / alpha_pattern) is normalised exactly: every module is zero-padded to the largest rank
and its own scale is folded into its up factor B, recorded as alpha = r (scale 1). ΔW = s·B·A of
every module is unchanged; only the factorisation differs.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from ..errors import InputError
from .io import ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME, COMPONENTS, adapter_metadata, lora_factors, \
    check_lora, read_lora, resolve_lora_file, save_lora_file

Format = Literal["diffusers", "peft", "kohya"]
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every module path
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
SOURCE_METADATA_KEY = "loraleak_source_format"  # where a converted file says what it came from


@dataclass(frozen=True)
class SharedLora:
    """A LoRA in the project's form, whatever file it came from."""

    state_dict: dict[str, torch.Tensor]  # component-prefixed PEFT keys (see the module doc)
    metadata: dict[str, str]  # safetensors metadata; always holds the UNet's LoraConfig
    source_format: Format
    source: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)  # what the conversion assumed or changed

    @property
    def config(self) -> dict[str, Any]:
        """The stored LoraConfig fields (`unet.r`, `unet.lora_alpha`, ...)."""
        return adapter_metadata(self.metadata)

    def save(self, path: str | Path) -> Path:
        """Write the project's form: a `.safetensors` file, or `pytorch_lora_weights.safetensors` in a folder."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / LORA_WEIGHT_NAME
        return save_lora_file(self.state_dict, self.metadata, path)


# --- reading ------------------------------------------------------------------------------------------------

def detect_format(path: str | Path) -> Format:
    """Which of the three formats a file or folder holds (from its layout and keys, not its name)."""
    path = Path(path)
    if path.is_dir() and (path / PEFT_CONFIG_NAME).is_file():
        return "peft"
    if path.is_file() and path.name == PEFT_WEIGHT_NAME and (path.parent / PEFT_CONFIG_NAME).is_file():
        return "peft"
    state_dict, _ = read_lora(path, layout=False)  # the layout is what is being detected
    if all(k.startswith(KOHYA_PREFIXES) for k in state_dict):
        return "kohya"
    if any(k.startswith(PEFT_PREFIX) for k in state_dict):
        raise InputError(f"{path} holds PEFT keys ({PEFT_PREFIX}...) but no {PEFT_CONFIG_NAME} beside it: "
                         "pass the adapter's folder")
    return "diffusers"


def read_shared_lora(path: str | Path) -> SharedLora:
    """Any supported LoRA file or folder, in the project's form (safetensors only, never pickle)."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "peft":
        return _read_peft(path.parent if path.is_file() else path)
    state_dict, metadata = read_lora(path, layout=kind == "diffusers")  # other layouts: checked after conversion
    source = resolve_lora_file(path)
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in state_dict):
        raise InputError(f"{source} is a DoRA, not a LoRA: its update is not s·B·A, which the attacks read")
    if kind == "kohya":
        return _from_kohya(state_dict, metadata, source)
    return _from_diffusers(state_dict, metadata, source)


def _to_peft_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers (old and new) keys -> PEFT `.lora_A/.lora_B` keys, per component, by diffusers' tables."""
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    out: dict[str, torch.Tensor] = {}
    unet = {k: v for k, v in state_dict.items() if not k.startswith("text_encoder")}
    text = {k: v for k, v in state_dict.items() if k.startswith("text_encoder")}
    out.update(convert_unet_state_dict_to_peft(unet))
    if text:
        old = any("_lora." in k for k in text)  # `to_q_lora.down`: the attention-processor era
        out.update(convert_state_dict_to_peft(
            text, StateDictType.DIFFUSERS_OLD if old else StateDictType.DIFFUSERS))
    return {(k if k.startswith(COMPONENTS) else f"unet.{k}"): v for k, v in out.items()}


def _to_project_keys(peft_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The form's keys: PEFT's `.lora_A/.lora_B` under a component prefix, for every module.

    Not `convert_state_dict_to_diffusers`' `.lora.down` names: those exist for the attention
    projections only, and diffusers' loader, seeing `lora_A` keys beside them (a LoRA that also adapts
    `proj_in`), takes the file for PEFT-format and silently drops the `.lora.down` modules.
    """
    return dict(peft_state_dict)


def _module_of(peft_key: str) -> tuple[str, str]:
    """`unet.<module>.lora_A.weight` -> ("unet", "<module>")."""
    component, _, rest = peft_key.partition(".")
    return component, rest.rsplit(".lora_", 1)[0]


def _normalise(peft_state_dict: dict[str, torch.Tensor], alphas: Mapping[tuple[str, str], float],
               use_rslora: bool, metadata: Mapping[str, str], source_format: Format, source: Path | None,
               notes: list[str]) -> SharedLora:
    """Per-module (rank, alpha) -> one LoraConfig per component, exactly (see the module doc)."""
    from peft import LoraConfig

    factors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state_dict.items():
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            factors.setdefault(_module_of(key), {})["A" if ".lora_A." in key else "B"] = tensor
        else:
            raise InputError(f"unrecognised LoRA key {key!r} after conversion: not a LoRA this project reads")
    unpaired = sorted(".".join(m) for m, f in factors.items() if len(f) != 2)
    if unpaired:
        raise InputError(f"LoRA module {unpaired[0]!r} has only one of its two factors (down/up)")
    if not any(c == "unet" for c, _ in factors):
        raise InputError("the LoRA holds no UNet LoRA matrices")

    out: dict[str, torch.Tensor] = {}
    adapter: dict[str, Any] = {}
    for component in COMPONENTS:
        modules = {m: f for (c, m), f in factors.items() if c == component}
        if not modules:
            continue
        ranks = {m: f["A"].shape[0] for m, f in modules.items()}
        scales = {m: alphas.get((component, m), ranks[m]) / (math.sqrt(ranks[m]) if use_rslora else ranks[m])
                  for m in modules}
        uniform = len(set(ranks.values())) == 1 and len(set(scales.values())) == 1
        rank = max(ranks.values())
        if uniform:
            alpha = next(iter(alphas.get((component, m), rank) for m in modules))
            for m, f in modules.items():
                out[f"{component}.{m}.lora_A.weight"], out[f"{component}.{m}.lora_B.weight"] = f["A"], f["B"]
        else:
            alpha, use_rslora_here = rank, False
            for m, f in modules.items():
                down, up = f["A"], f["B"]
                pad = rank - down.shape[0]
                down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])]) if pad else down
                up = torch.cat([up.float() * scales[m], up.new_zeros(up.shape[0], pad, *up.shape[2:]).float()], 1)
                out[f"{component}.{m}.lora_A.weight"], out[f"{component}.{m}.lora_B.weight"] = down, up.to(f["B"].dtype)
            notes.append(f"{component}: per-module ranks/alphas folded into one scale (zero-padded to rank {rank})")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted({_target(m) for m in modules}),
                            use_rslora=use_rslora if uniform else use_rslora_here)
        adapter.update({f"{component}.{k}": sorted(v) if isinstance(v, (set, frozenset)) else v
                        for k, v in config.to_dict().items()})
    kept = {k: v for k, v in metadata.items() if k not in (ADAPTER_METADATA_KEY, "format")}
    new_metadata = {**kept, "format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, indent=2, sort_keys=True),
                    SOURCE_METADATA_KEY: source_format}
    state_dict = _to_project_keys(out)
    check_lora(state_dict, new_metadata, source)  # the gate's layout checks on what the conversion made
    return SharedLora(state_dict, new_metadata, source_format, source, tuple(notes))


def _target(module_path: str) -> str:
    parts = module_path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _from_diffusers(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], source: Path) -> SharedLora:
    peft = _to_peft_keys(state_dict)
    stored = adapter_metadata(metadata)
    notes: list[str] = []
    alphas: dict[tuple[str, str], float] = {}
    use_rslora = bool(stored.get("unet.use_rslora"))
    if stored.get("text_encoder.use_rslora", use_rslora) != use_rslora:
        raise InputError(f"{source}: rsLoRA on one component and not the other is not supported")
    for component in COMPONENTS:
        modules = {_module_of(k)[1] for k in peft if k.startswith(f"{component}.")}
        if modules and f"{component}.lora_alpha" not in stored:
            notes.append(f"{component}: no LoraConfig in the file; alpha = rank assumed, as diffusers does")
            continue
        for m in modules:
            alphas[(component, m)] = _pattern_value(stored, component, "alpha", m, "lora_alpha")
    return _normalise(peft, alphas, use_rslora, metadata, "diffusers", source, notes)


def _pattern_value(config: Mapping[str, Any], component: str, kind: str, module: str, default_key: str) -> float:
    """A module's r or lora_alpha under a LoraConfig's rank/alpha pattern, matched as peft matches it."""
    from peft.utils.other import get_pattern_key

    prefix = f"{component}." if component else ""
    pattern = config.get(f"{prefix}{kind}_pattern") or {}
    key = get_pattern_key(list(pattern), module)
    return float(pattern.get(key, config[f"{prefix}{default_key}"]))


def _read_peft(directory: Path) -> SharedLora:
    config_path, weights = directory / PEFT_CONFIG_NAME, directory / PEFT_WEIGHT_NAME
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{config_path} is not a readable PEFT adapter config: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{config_path} is a {config.get('peft_type') if isinstance(config, dict) else '?'} "
                         "adapter, not a LoRA")
    if config.get("use_dora"):
        raise InputError(f"{config_path} is a DoRA adapter: its update is not s·B·A, which the attacks read")
    if not weights.is_file():
        pickled = directory / "adapter_model.bin"
        if pickled.is_file():
            raise InputError(f"{pickled} is not a safetensors file; refusing to unpickle untrusted LoRA weights")
        raise InputError(f"PEFT adapter {directory} has no {PEFT_WEIGHT_NAME}")
    state_dict, metadata = read_lora(weights, layout=False)  # PEFT keys: checked after conversion
    peft: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module_key = key.removeprefix(PEFT_PREFIX)
        if module_key.startswith("text_model.") or module_key.startswith("text_encoder."):
            raise InputError(f"{weights} is a text-encoder adapter; audit reads the UNet's (key {key!r})")
        peft[f"unet.{module_key}"] = tensor
    for name in ("r", "lora_alpha"):
        if not isinstance(config.get(name), (int, float)):
            raise InputError(f"{config_path} lacks a numeric {name!r}")
    alphas = {("unet", _module_of(k)[1]): _pattern_value(config, "", "alpha", _module_of(k)[1], "lora_alpha")
              for k in peft}
    return _normalise(peft, alphas, bool(config.get("use_rslora")), metadata, "peft", directory, [])


def _from_kohya(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], source: Path) -> SharedLora:
    from diffusers import StableDiffusionPipeline

    if any(k.startswith("lora_te2_") for k in state_dict):
        raise InputError(f"{source} is an SDXL LoRA (a second text encoder): not a Stable Diffusion 1.x/2.x LoRA")
    try:
        converted, network_alphas = StableDiffusionPipeline.lora_state_dict(dict(state_dict))
    except (ValueError, KeyError) as e:
        raise InputError(f"{source}: kohya LoRA keys diffusers cannot convert: {' '.join(str(e).split())[:200]}") \
            from None
    peft = _to_peft_keys(converted)
    # network_alphas are keyed by each module's *down* key in diffusers' old naming + ".alpha":
    # the same renaming as the factors gives the module.
    alphas: dict[tuple[str, str], float] = {}
    for key, alpha in (network_alphas or {}).items():
        down_key = key.removesuffix(".alpha")
        renamed = next(iter(_to_peft_keys({down_key: torch.zeros(0)})))
        alphas[_module_of(renamed)] = float(alpha)
    missing = sorted({_module_of(k)[1] for k in peft} - {m for _, m in alphas})
    notes = [f"{len(missing)} modules without .alpha: alpha = rank"] if missing else []
    return _normalise(peft, alphas, False, metadata, "kohya", source, notes)


# --- writing ------------------------------------------------------------------------------------------------

def _unet_peft_factors(lora: SharedLora) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config = lora.config
    if config.get("unet.rank_pattern") or config.get("unet.alpha_pattern"):
        raise InputError("this LoRA has per-module rank/alpha patterns; read it through read_shared_lora first")
    peft = _to_peft_keys(lora.state_dict)
    return {k: v for k, v in peft.items() if k.startswith("unet.")}, config


def export_peft(lora: SharedLora, directory: str | Path) -> Path:
    """The UNet adapter as a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`), as
    `PeftModel.save_pretrained` writes it for the UNet; `PeftModel.from_pretrained(unet, directory)` loads it."""
    from peft import LoraConfig

    unet, config = _unet_peft_factors(lora)
    if any(k.startswith("text_encoder.") for k in lora.state_dict):
        raise InputError("a PEFT folder holds one model's adapter; this LoRA also adapts the text encoder")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=int(config["unet.r"]), lora_alpha=config["unet.lora_alpha"],
               target_modules=sorted(config.get("unet.target_modules") or []),
               use_rslora=bool(config.get("unet.use_rslora"))).save_pretrained(str(directory))
    tensors = {PEFT_PREFIX + k.removeprefix("unet."): v.contiguous() for k, v in unet.items()}
    save_lora_file(tensors, {"format": "pt"}, directory / PEFT_WEIGHT_NAME)
    return directory


def export_kohya(lora: SharedLora, path: str | Path) -> Path:
    """A kohya / A1111 file (`lora_unet_...lora_down.weight` + `.alpha`), via diffusers' converter.

    diffusers' `convert_state_dict_to_kohya` writes alpha = rank; the LoRA's own alpha is written
    instead (alpha / √r under rsLoRA is expressed as the kohya alpha that gives the same scale).
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    config = lora.config
    peft = _to_peft_keys(lora.state_dict)
    kohya = convert_state_dict_to_kohya(peft)
    scales = {c: _scale(config, c) for c in COMPONENTS if f"{c}.r" in config}
    for key in [k for k in kohya if k.endswith(".alpha")]:
        component = "unet" if key.startswith("lora_unet_") else "text_encoder"
        rank = kohya[key.removesuffix(".alpha") + ".lora_down.weight"].shape[0]
        kohya[key] = torch.tensor(float(scales[component] * rank))
    return save_lora_file(kohya, {"ss_network_module": "networks.lora"}, Path(path))


def _scale(config: Mapping[str, Any], component: str) -> float:
    rank = float(config[f"{component}.r"])
    return float(config[f"{component}.lora_alpha"]) / (math.sqrt(rank) if config.get(f"{component}.use_rslora")
                                                        else rank)


def delta_weights(lora: SharedLora, component: str = "unet") -> dict[str, torch.Tensor]:
    """Module -> ΔW = s·B·A (float64; convolutions flattened over their kernel), for comparing LoRAs."""
    scale = _scale(lora.config, component)
    out = {}
    for module, (down, up) in lora_factors(lora.state_dict, component).items():
        out[module] = scale * up.double().flatten(1) @ down.double().flatten(1)
    return out
