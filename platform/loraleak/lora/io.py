"""Reading shared LoRA files safely, and checking that one belongs to a given base model.

A LoRA downloaded from a model hub is untrusted input. Pickle files (`.bin`, `.pt`, `.ckpt`) can
run code when loaded, so only safetensors files are read; anything else is refused before a single
byte of it is deserialised. Files in diffusers format (what `save_lora_weights` writes:
`unet.<module>.lora.down.weight`, `...lora_linear_layer.up.weight`) and PEFT format
(`<module>.lora_A.weight`) are both understood.

`read_lora` is the one gate every command reads a LoRA through (generate, attack reconstruct and
training, evaluation, defenses, zoo verify): before anything uses a file it checks, each failure one
`InputError` line naming the file, that it is a safetensors file of sane size; that every tensor is
float32/float16/bfloat16 (from the header, before loading), finite and below `MAX_ABS_VALUE` (NaN,
Inf or 1e30 would give black images with exit 0); that the metadata JSON parses; that every factor has
its partner with a matching rank, as the metadata states it; and that it is not DoRA (diffusers'
loader would end in a traceback). `check_lora_fits` adds the shapes of a given base.

`save_lora_file` is the one writer of the project's LoRA files: the same tensors and metadata give
the same bytes in any process (metadata keys sorted, tensors in a fixed order; safetensors' own
writer orders the metadata as a hash map does, differently per process), so a file's sha256 is
reproducible. A project fine-tune's file also says where it came from (`LoraProvenance`: trigger,
instance prompt, base fingerprint, rank / alpha / targets, step, format version) in `loraleak_*`
metadata keys, which `lora_provenance` reads back (None for other tools' files).
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import InputError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers stores the LoraConfig (alpha...)
COMPONENTS = ("unet", "text_encoder")

# Key suffix -> which LoRA factor it holds: "down" = A (rank x in), "up" = B (out x rank).
_FACTOR_SUFFIXES = {
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# SD-XL LoRAs at rank 256 are about 1.7 GB; a larger file is refused before it is read into memory.
MAX_LORA_BYTES = 2 * 1024**3
# LoRA factors are O(0.01..1); values this large overflow half precision and blacken every image.
MAX_ABS_VALUE = 1e4
ALLOWED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors name -> torch
# Metadata values that are JSON, and of which kind (diffusers' LoraConfig; loraleak's defense and DP records).
_JSON_METADATA = {ADAPTER_METADATA_KEY: dict, "loraleak_defenses": list, "loraleak_dp": dict,
                  "loraleak_targets": list}


def _refusal(path: Path) -> InputError:
    return InputError(f"{path} is not a safetensors file; refusing to unpickle untrusted LoRA weights")


def resolve_lora_file(path: str | Path) -> Path:
    """A `.safetensors` LoRA file, or a directory holding `pytorch_lora_weights.safetensors`.

    The suffix matters beyond taste: diffusers' loader unpickles any weight file whose name does
    not end in `.safetensors`, so a safe file must also be named like one.
    """
    path = Path(path)
    if path.is_dir():
        pickles = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if not (path / LORA_WEIGHT_NAME).is_file() and pickles:
            raise _refusal(pickles[0])
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise InputError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise _refusal(path)
    return path


def _check_safetensors_header(path: Path) -> None:
    """Refuse anything whose first bytes are not a safetensors header (length + JSON object), too large a
    file, and tensors of a dtype no LoRA has (read from the header: nothing is loaded yet)."""
    refuse = _refusal(path)
    size = path.stat().st_size
    if size > MAX_LORA_BYTES:
        raise InputError(f"{path} is {size / 1024**3:.1f} GiB, more than a LoRA file can be "
                         f"({MAX_LORA_BYTES / 1024**3:.0f} GiB); refusing to read it")
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise refuse
        header_len = int.from_bytes(prefix, "little")
        if not 2 <= header_len <= min(size - 8, _MAX_HEADER_BYTES):
            raise refuse
        header = f.read(header_len)
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise refuse from None
    if not isinstance(parsed, dict):
        raise refuse
    for name, entry in parsed.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise InputError(f"{path} is a corrupt safetensors file: tensor {name!r} has no valid header entry")
        if entry.get("dtype") not in ALLOWED_DTYPES:
            raise InputError(f"{path}: tensor {name!r} is {entry.get('dtype')}; a LoRA's factors are "
                             f"{', '.join(ALLOWED_DTYPES.values())}")


def read_lora(path: str | Path, layout: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a LoRA's tensors and its safetensors metadata (safetensors only, never pickle).

    layout=False checks the file and every value but not the key layout: for readers of other tools'
    layouts (kohya, lora.formats), which convert the keys and then check the result with `check_lora`.
    """
    path = resolve_lora_file(path)
    _check_safetensors_header(path)
    try:
        state_dict = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path} is a corrupt safetensors file: {e}") from None
    if not state_dict:
        raise InputError(f"{path} holds no tensors")
    if layout:
        check_lora(state_dict, metadata, path)
    else:
        for key, tensor in state_dict.items():
            _check_values(key, tensor, path)
        _stored_config(metadata, path)
    return state_dict, metadata


def _check_values(key: str, tensor: torch.Tensor, path: Path) -> None:
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"{path}: tensor {key!r} is {tensor.dtype}; a LoRA's factors are float32, float16, bfloat16")
    if tensor.numel() == 0:
        raise InputError(f"{path}: tensor {key!r} is empty (shape {tuple(tensor.shape)})")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        what = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise InputError(f"{path}: tensor {key!r} holds {what} values; refusing a LoRA that would give black images")
    largest = float(tensor.abs().max())
    if largest >= MAX_ABS_VALUE:
        raise InputError(f"{path}: tensor {key!r} holds values up to {largest:.3g}, beyond any LoRA's "
                         f"(|x| < {MAX_ABS_VALUE:g}); refusing it")


def _stored_config(metadata: dict[str, str], path: Path) -> dict[str, Any]:
    """The metadata's JSON values parsed (one line naming the file when one does not), and the LoraConfig."""
    for key, kind in _JSON_METADATA.items():
        if metadata.get(key):
            try:
                value = json.loads(metadata[key])
            except (json.JSONDecodeError, RecursionError):
                raise InputError(f"{path}: metadata {key!r} is not valid JSON") from None
            if not isinstance(value, kind):
                raise InputError(f"{path}: metadata {key!r} is a JSON {type(value).__name__}, not a {kind.__name__}")
    lora_provenance(metadata, path)
    return adapter_metadata(metadata)


def _check_stated(stored: dict[str, Any], component: str, ranks: dict[str, int], path: Path) -> None:
    """The LoraConfig the file states for `component` against its tensors: no DoRA, a positive integer rank
    every module has (unless a rank_pattern varies it), a finite alpha."""
    absent = object()  # a field the file leaves out takes the loader's default; one stated as null breaks it

    def get(field: str) -> Any:
        return stored.get(f"{component}.{field}", stored.get(field, absent) if component == "unet" else absent)

    if get("use_dora") not in (absent, None, False):
        raise InputError(f"{path}: a DoRA LoRA ({component}.use_dora); only plain LoRA factors are supported")
    r, alpha = get("r"), get("lora_alpha")
    if r is not absent:
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 65536:
            raise InputError(f"{path}: metadata {component}.r is {r!r}, not a rank")
        if get("rank_pattern") in (absent, None, {}):
            other = next(((m, k) for m, k in ranks.items() if k != r), None)
            if other is not None:
                raise InputError(f"{path}: the metadata states {component} rank {r}, but {other[0]} has rank {other[1]}")
    if alpha is not absent and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or abs(alpha) >= MAX_ABS_VALUE):
        raise InputError(f"{path}: metadata {component}.lora_alpha is {alpha!r}, not a usable LoRA alpha")


def check_lora(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path = "LoRA") -> None:
    """The LoRA gate's checks on loaded tensors and metadata (see the module docstring); InputError naming
    `path` and the first problem."""
    path = Path(path)
    for key, tensor in state_dict.items():
        _check_values(key, tensor, path)
    stored = _stored_config(metadata, path)
    found = False
    for component in COMPONENTS:
        try:
            factors = lora_factors(state_dict, component)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        found = found or bool(factors)
        ranks = {}
        for module, (down, up) in factors.items():
            if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] \
                    or (down.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
                raise InputError(f"{path}: {component} module {module!r} has factors of shapes {tuple(down.shape)} "
                                 f"(down) and {tuple(up.shape)} (up), which do not make a rank-r pair")
            ranks[module] = down.shape[0]
        _check_stated(stored, component, ranks, path)
    if not found:
        raise InputError(f"{path} holds no UNet or text-encoder LoRA matrices")


def lora_factors(state_dict: dict[str, torch.Tensor],
                 component: str = "unet") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (down A: rank x in, up B: out x rank) for one component's LoRA matrices.

    Keys without a component prefix count as UNet keys, as diffusers reads them.
    """
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        owner, _, rest = key.partition(".")
        if owner not in COMPONENTS:
            owner, rest = "unet", key
        if owner != component or key.endswith(".alpha"):  # kohya-style network alphas carry no factor
            continue
        for suffix, factor in _FACTOR_SUFFIXES.items():
            if rest.endswith(suffix):
                halves.setdefault(rest[: -len(suffix)], {})[factor] = tensor
                break
        else:
            raise InputError(f"unrecognised LoRA key {key!r}: not a diffusers- or PEFT-format LoRA")
    unpaired = sorted(module for module, h in halves.items() if len(h) != 2)
    if unpaired:
        raise InputError(f"LoRA module {unpaired[0]!r} has only one of its two factors (down/up)")
    return {module: (h["down"], h["up"]) for module, h in sorted(halves.items())}


def _target_name(module_path: str) -> str:
    """The LoRA target a module path was matched by: `...attn1.to_q` -> `to_q`, `...to_out.0` -> `to_out.0`."""
    parts = module_path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def module_order_key(path: str) -> list[Any]:
    """"up_blocks.10" after "up_blocks.2": numbers compare as numbers, so the order follows the UNet."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def adapter_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The LoraConfig fields diffusers stored in the file (`unet.lora_alpha`, `unet.r`, ...), if any."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"LoRA metadata {ADAPTER_METADATA_KEY!r} is not valid JSON") from None
    return parsed if isinstance(parsed, dict) else {}


def lora_summary(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Rank, alpha (when recorded), targets and which UNet modules a LoRA adapts."""
    unet = lora_factors(state_dict, "unet")
    text = lora_factors(state_dict, "text_encoder")
    if not unet and not text:
        raise InputError("the LoRA holds no UNet or text-encoder LoRA matrices")
    ranks = Counter(down.shape[0] for down, _ in unet.values())
    stored = adapter_metadata(metadata or {})
    return {
        "rank": ranks.most_common(1)[0][0] if ranks else None,
        "ranks": sorted(ranks),
        "alpha": stored.get("unet.lora_alpha"),
        "targets": sorted({_target_name(m) for m in unet}),
        "num_matrices": 2 * len(unet),
        "num_parameters": sum(d.numel() + u.numel() for d, u in unet.values()),
        "unet_modules": list(unet),
        "text_encoder_modules": list(text),
    }


def loaded_adapters(pipe: Any) -> list[str]:
    """Names of the LoRA adapters currently loaded into any component of the pipeline."""
    return sorted({name for names in pipe.get_list_adapters().values() for name in names})


def _factor_mismatch(module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why (down, up) cannot adapt `module`, or None when the shapes fit."""
    layer = getattr(module, "base_layer", module)  # a module that already carries a PEFT adapter
    if isinstance(layer, torch.nn.Linear):
        fits = down.ndim == 2 and up.ndim == 2 and down.shape[1] == layer.in_features \
            and up.shape[0] == layer.out_features and up.shape[1] == down.shape[0]
        expected = f"in={layer.in_features}, out={layer.out_features}"
    elif isinstance(layer, torch.nn.Conv2d):
        fits = down.ndim == 4 and up.ndim == 4 and down.shape[1] == layer.in_channels \
            and up.shape[0] == layer.out_channels and up.shape[1] == down.shape[0]
        expected = f"in={layer.in_channels}, out={layer.out_channels}"
    else:
        return f"is a {type(layer).__name__}, which LoRA cannot adapt"
    if fits:
        return None
    return f"has {expected} but the LoRA factors are {tuple(down.shape)} and {tuple(up.shape)}"


def check_lora_fits(state_dict: dict[str, torch.Tensor], pipe: Any, path: str | Path | None = None) -> None:
    """Raise InputError when the LoRA names modules the pipeline lacks or shapes differ (another base);
    the message starts with `path` when given."""
    where = f"{path}: " if path is not None else ""
    factors_by_component = {c: lora_factors(state_dict, c) for c in COMPONENTS}
    if not any(factors_by_component.values()):
        raise InputError(f"{where}the LoRA holds no UNet or text-encoder LoRA matrices")
    problems: list[str] = []
    for component, factors in factors_by_component.items():
        model = getattr(pipe, component, None)
        if factors and model is None:
            problems.append(f"the pipeline has no {component}")
            continue
        for module_path, (down, up) in factors.items():
            if component == "text_encoder" and not hasattr(model, "text_model"):
                # transformers 5 flattened CLIPTextModel; LoRAs made before still say "text_model."
                module_path = module_path.removeprefix("text_model.")
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                problems.append(f"{component} has no module {module_path!r}")
                continue
            why = _factor_mismatch(module, down, up)
            if why:
                problems.append(f"{component}.{module_path} {why}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{where}LoRA does not fit this base model, it was trained for another one: "
                         f"{problems[0]}{more}")


# --- writing, and where a project LoRA came from --------------------------------------------------------------

LORA_FORMAT_VERSION = 1  # of the `loraleak_*` provenance keys below
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def lora_file_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of a LoRA, a function of its tensors and metadata only: metadata keys
    sorted, tensors by (element size, largest first, then name) — the order safetensors itself uses,
    which keeps every tensor aligned — and the header as compact JSON padded to 8 bytes."""
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in metadata.items()):
        raise InputError("LoRA metadata keys and values must be strings")
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(state_dict, key=lambda n: (-state_dict[n].element_size(), n)):
        tensor = state_dict[name].detach().cpu().contiguous()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise InputError(f"LoRA tensor {name!r} is {tensor.dtype}; a LoRA's factors are float32, float16, bfloat16")
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks)


def save_lora_file(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path) -> Path:
    """Write `lora_file_bytes` to `path` atomically (beside it, then renamed: `path` may be the input)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(lora_file_bytes(state_dict, metadata))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class LoraProvenance:
    """Where a project fine-tune's LoRA file came from, in its own metadata (it travels with the file)."""

    trigger: str
    instance_prompt: str
    base_fingerprint: str | None  # `base.loading.base_fingerprint` of the base it was fine-tuned from
    rank: int
    alpha: float
    targets: tuple[str, ...]
    step: int
    format_version: int = LORA_FORMAT_VERSION

    def metadata(self) -> dict[str, str]:
        out = {"loraleak_format_version": str(self.format_version), "loraleak_trigger": self.trigger,
               "loraleak_instance_prompt": self.instance_prompt, "loraleak_rank": str(int(self.rank)),
               "loraleak_alpha": json.dumps(self.alpha), "loraleak_targets": json.dumps(sorted(self.targets)),
               "loraleak_step": str(int(self.step))}
        if self.base_fingerprint is not None:
            out["loraleak_base_fingerprint"] = self.base_fingerprint
        return out


def lora_provenance(metadata: dict[str, str], path: str | Path = "LoRA") -> LoraProvenance | None:
    """The provenance a project LoRA file states (None when it states none: another tool's file);
    InputError naming `path` when it is malformed or of a newer format version."""
    if "loraleak_format_version" not in metadata:
        return None
    try:
        version = int(metadata["loraleak_format_version"])
        if version > LORA_FORMAT_VERSION:
            raise InputError(f"{path}: LoRA metadata format version {version} is newer than this loraleak "
                             f"reads ({LORA_FORMAT_VERSION})")
        targets = json.loads(metadata["loraleak_targets"])
        alpha = json.loads(metadata["loraleak_alpha"])
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) \
                or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError
        return LoraProvenance(trigger=metadata["loraleak_trigger"], instance_prompt=metadata["loraleak_instance_prompt"],
                              base_fingerprint=metadata.get("loraleak_base_fingerprint"),
                              rank=int(metadata["loraleak_rank"]), alpha=alpha, targets=tuple(targets),
                              step=int(metadata["loraleak_step"]), format_version=version)
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        missing = f" (no {e.args[0]!r})" if isinstance(e, KeyError) else ""
        raise InputError(f"{path}: malformed loraleak provenance metadata{missing}") from None
