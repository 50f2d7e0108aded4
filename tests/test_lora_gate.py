"""The LoRA-loading gate under fuzzed input: every malformed file is one clear line (InputError naming the
file) or, when it is a valid LoRA after all, loads and generates; never another exception type, never a
pickle load.

The files are generated: a valid rank-2 LoRA of the shipped tiny base, then every mutation of a seeded
generator (tensor dtypes, values, shapes, missing or extra tensors, metadata, file bytes) applied to it.
"""

import json
import os
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from loraleak.cli import main
from loraleak.errors import InputError
from loraleak.lora.io import (ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME, check_lora_fits, loaded_adapters,
                                       lora_summary, read_lora)
from loraleak.generate import generate_images

RANK = 2


@pytest.fixture(scope="module")
def pipe():
    from loraleak.base.loading import load_base_pipeline

    return load_base_pipeline("tiny")


@pytest.fixture(scope="module")
def valid(pipe, tmp_path_factory):
    """(state_dict, metadata) of a valid diffusers-format rank-2 LoRA of the tiny base, as the victim saves one."""
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in pipe.unet.peft_config["default"].to_dict().items()}
    out = tmp_path_factory.mktemp("valid")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(out, unet_lora_layers=layers, unet_lora_adapter_metadata=meta)
    pipe.unet.delete_adapters("default")
    state_dict, metadata = read_lora(out / LORA_WEIGHT_NAME)
    return state_dict, metadata


class Exploit:
    """Unpickling this makes a directory: the proof that a pickle was loaded."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.mkdir, (self.sentinel,)


# --- the mutations ------------------------------------------------------------------------------------------

def _with_config(metadata, **changes):
    config = json.loads(metadata[ADAPTER_METADATA_KEY])
    config.update(changes)
    return {**metadata, ADAPTER_METADATA_KEY: json.dumps(config)}


def tensor_mutations(rng: random.Random, keys: list[str]):
    """(name, function(state_dict) -> state_dict) for mutations of one tensor at a time."""
    values = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "1e30": 1e30, "-1e5": -1e5,
              "1e4": 1e4}
    dtypes = [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.float64, torch.float8_e4m3fn]

    def at(key, fn):
        return lambda sd: {**sd, key: fn(sd[key])}

    for key in rng.sample(keys, 4):
        short = key.rsplit(".", 4)[-4:]
        for name, value in values.items():
            def put(t, value=value):
                t = t.clone()
                t.view(-1)[rng.randrange(t.numel())] = value
                return t
            yield f"{name} in {'.'.join(short)}", at(key, put)
        for dtype in dtypes:
            yield f"{dtype} {'.'.join(short)}", at(key, lambda t, d=dtype: t.to(d))
        yield f"transposed {'.'.join(short)}", at(key, lambda t: t.t().contiguous())
        yield f"flattened {'.'.join(short)}", at(key, lambda t: t.reshape(-1).clone())
        yield f"extra dim {'.'.join(short)}", at(key, lambda t: t[None].clone())
        down = ".down." in key  # the rank is down's first dimension, up's second
        yield f"rank+1 {'.'.join(short)}", at(key, lambda t, down=down: torch.cat([t, t[:1]] if down else [t, t[:, :1]],
                                                                                 dim=0 if down else 1))
        yield f"out+1 {'.'.join(short)}", at(key, lambda t, down=down: torch.cat([t, t[:, :1]] if down else [t, t[:1]],
                                                                                dim=1 if down else 0))
        yield f"empty {'.'.join(short)}", at(key, lambda t: t[:0].clone())
        yield f"dropped {'.'.join(short)}", lambda sd, key=key: {k: v for k, v in sd.items() if k != key}
        yield f"renamed {'.'.join(short)}", lambda sd, key=key: {
            **{k: v for k, v in sd.items() if k != key}, key.replace("lora", "loar"): sd[key]}
    yield "extra unknown key", lambda sd: {**sd, "unet.mystery.weight": torch.zeros(2, 2)}
    yield "kohya alpha tensor Inf", lambda sd: {**sd, f"{keys[0].rsplit('.', 3)[0]}.alpha": torch.tensor(float("inf"))}
    yield "every up factor dropped", lambda sd: {k: v for k, v in sd.items() if ".up." not in k}
    yield "a scalar factor", lambda sd: {**sd, keys[0]: torch.tensor(1.0)}


def metadata_mutations(metadata):
    raw = metadata[ADAPTER_METADATA_KEY]
    yield "metadata not JSON", {**metadata, ADAPTER_METADATA_KEY: raw[: len(raw) // 2]}
    yield "metadata a list", {**metadata, ADAPTER_METADATA_KEY: "[1, 2]"}
    yield "metadata a number", {**metadata, ADAPTER_METADATA_KEY: "7"}
    yield "metadata deeply nested", {**metadata, ADAPTER_METADATA_KEY: "[" * 100000 + "]" * 100000}
    for r in (RANK + 2, 0, -1, "2", True, 2.5, None, 10**12):
        yield f"metadata r={r!r}", _with_config(metadata, **{"unet.r": r})
    for alpha in (float("nan"), float("inf"), 1e30, "2", None):
        yield f"metadata alpha={alpha!r}", _with_config(metadata, **{"unet.lora_alpha": alpha})
    yield "metadata use_dora", _with_config(metadata, **{"unet.use_dora": True})
    yield "loraleak_defenses not JSON", {**metadata, "loraleak_defenses": "{oops"}
    yield "loraleak_dp a string", {**metadata, "loraleak_dp": '"eps"'}


def file_mutations(data: bytes, rng: random.Random, sentinel: Path, state_dict):
    header_len = struct.unpack("<Q", data[:8])[0]
    yield "empty file", b""
    yield "seven bytes", data[:7]
    for cut in sorted(rng.sample(range(9, len(data) - 1), 6)) + [8 + header_len, 8 + header_len - 1]:
        yield f"truncated at {cut}", data[:cut]
    yield "header length huge", struct.pack("<Q", 2**62) + data[8:]
    yield "header length zero", struct.pack("<Q", 0) + data[8:]
    yield "header a JSON list", struct.pack("<Q", 2) + b"[]"
    yield "header not UTF-8", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc"
    yield "header offsets past the end", data.replace(b'"data_offsets":[0,', b'"data_offsets":[9999999,', 1)
    yield "garbage appended", data + os.urandom(1000)
    for i in range(4):
        flipped = bytearray(data)
        pos = rng.randrange(8, 8 + header_len)
        flipped[pos] ^= 1 << rng.randrange(8)
        yield f"header bit flip {i}", bytes(flipped)
    yield "random bytes", bytes(rng.randrange(256) for _ in range(4096))
    yield "pickle of an exploit", pickle.dumps(Exploit(sentinel))
    yield "pickle of the state dict", pickle.dumps(dict(state_dict))
    import io

    buffer = io.BytesIO()
    torch.save({"exploit": Exploit(sentinel)}, buffer)
    yield "torch.save zip with an exploit", buffer.getvalue()


def valid_variants(state_dict, metadata):
    yield "valid", state_dict, metadata
    yield "valid fp16", {k: v.half() for k, v in state_dict.items()}, metadata
    yield "valid bf16", {k: v.bfloat16() for k, v in state_dict.items()}, metadata
    yield "valid without metadata", state_dict, {}


def cases(valid, tmp_path: Path, sentinel: Path):
    """Every generated file: (name, path)."""
    state_dict, metadata = valid
    rng = random.Random(18)
    files = []

    def write(name, sd, meta):
        path = tmp_path / f"{len(files):03d}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
        files.append((name, path))

    for name, sd, meta in valid_variants(state_dict, metadata):
        write(name, sd, meta)
    for name, mutate in tensor_mutations(rng, sorted(state_dict)):
        write(name, mutate(state_dict), metadata)
    for name, meta in metadata_mutations(metadata):
        write(name, state_dict, meta)
    data = files[0][1].read_bytes()
    for name, raw in file_mutations(data, rng, sentinel, state_dict):
        path = tmp_path / f"{len(files):03d}.safetensors"
        path.write_bytes(raw)
        files.append((name, path))
    # Pickles under their usual names, alone in a folder: refused by name, never opened.
    for suffix in (".bin", ".pt", ".ckpt"):
        folder = tmp_path / f"pickle{suffix[1:]}"
        folder.mkdir()
        (folder / f"pytorch_lora_weights{suffix}").write_bytes(pickle.dumps(Exploit(sentinel)))
        files += [(f"pickle folder {suffix}", folder), (f"pickle file {suffix}", folder / f"pytorch_lora_weights{suffix}")]
    files.append(("a missing file", tmp_path / "missing.safetensors"))
    return files


def outcome(path: Path, pipe) -> str:
    """"ok" or the one-line error; anything but an InputError propagates (and fails the test)."""
    try:
        state_dict, metadata = read_lora(path)
        lora_summary(state_dict, metadata)
        check_lora_fits(state_dict, pipe, path)
    except InputError as e:
        return f"error: {e}"
    return "ok"


def test_every_malformed_lora_is_one_clear_line_never_a_traceback_never_a_pickle_load(valid, pipe, tmp_path):
    sentinel = tmp_path / "PICKLE-WAS-LOADED"
    (tmp_path / "cases").mkdir()
    files = cases(valid, tmp_path / "cases", sentinel)
    results = {}
    for name, path in files:
        results[name] = outcome(path, pipe)
        if results[name] != "ok":
            message = results[name].removeprefix("error: ")
            assert "\n" not in message and str(path) in message, (name, message)
    passed = sorted(name for name, r in results.items() if r == "ok")
    if os.environ.get("LORALEAK_SHOW_FUZZ"):
        print("\n".join(f"{name}: {r}" for name, r in results.items()))
    assert set(passed) == {"valid", "valid fp16", "valid bf16", "valid without metadata"}, passed
    # Whatever passed the gate generates finite images through diffusers' loader, and unloads.
    for name in passed:
        path = dict(files)[name]
        images = generate_images(pipe, "A human face.", n=1, num_inference_steps=1, lora=path)
        assert np.isfinite(np.asarray(images[0], dtype=np.float32)).all() and not loaded_adapters(pipe)
    assert not sentinel.exists()
    print(f"\nLoRA gate fuzz: {len(files)} files, {len(files) - len(passed)} clear errors, {len(passed)} loaded, "
          "0 tracebacks, 0 pickle loads")


def test_the_generate_command_answers_bad_loras_in_one_line(valid, tmp_path, capsys):
    """The CLI end to end, for one file of each family (the library test covers the rest)."""
    state_dict, metadata = valid
    key = sorted(state_dict)[0]
    bad = {"nan": ({**state_dict, key: state_dict[key] * float("nan")}, metadata),
           "int8": ({**state_dict, key: state_dict[key].to(torch.int8)}, metadata),
           "dora": (state_dict, _with_config(metadata, **{"unet.use_dora": True})),
           "rank": (state_dict, _with_config(metadata, **{"unet.r": RANK + 1}))}
    for name, (sd, meta) in bad.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
        code = main(["generate", "--lora", str(path), "--prompt", "A face.", "--n", "1", "--steps", "1",
                     "--out", str(tmp_path / "grid.png")])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("loraleak: error: ")]  # beside load bars
        assert code == 2 and len(errors) == 1 and str(path) in errors[0] and "Traceback" not in err, (name, err)
    assert not (tmp_path / "grid.png").exists()
