"""Every fine-tune snapshot carries its provenance in its metadata (trigger, instance prompt, base
fingerprint, rank / alpha / targets, step, format version), and the same LoRA is the same bytes in
any process, so a zoo's lora_sha256 is reproducible."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loraleak.base.loading import base_fingerprint, load_base_pipeline
from loraleak.errors import InputError
from loraleak.finetune.batched import finetune_lora_batched
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.finetune.record import LoraLayers, save_snapshot
from loraleak.lora.io import (LORA_FORMAT_VERSION, LoraProvenance, lora_file_bytes, lora_provenance, read_lora,
                              save_lora_file)
from test_finetune import person_images

REPO = Path(__file__).resolve().parents[1]
CFG = dict(rank=2, alpha=3, targets=("to_v", "to_q", "ff.net.2"), lr=1e-2, steps=2, snapshot_steps=(0, 2),
           prior_preservation=False)


@pytest.fixture(scope="module")
def pipe():
    return load_base_pipeline("tiny")


@pytest.mark.parametrize("path", ["single", "batched"])
def test_every_snapshot_states_its_provenance(pipe, tmp_path, path):
    cfg = FinetuneConfig(**CFG, trigger="zqxv")
    if path == "single":
        result = finetune_lora(pipe, person_images(), cfg, tmp_path, base_ref="tiny", show_progress=False)
    else:
        (result,) = finetune_lora_batched(pipe, [person_images()], [cfg], [tmp_path], base_ref="tiny",
                                          show_progress=False)
    assert [step for step, _ in result.snapshots] == [0, 2]
    for step, file in result.snapshots:
        _, metadata = read_lora(file)
        assert lora_provenance(metadata, file) == LoraProvenance(
            trigger="zqxv", instance_prompt=cfg.instance_prompt_text, base_fingerprint=base_fingerprint("tiny"),
            rank=2, alpha=3, targets=("ff.net.2", "to_q", "to_v"), step=step, format_version=LORA_FORMAT_VERSION)
        config = json.loads(metadata["lora_adapter_metadata"])
        assert config["unet.target_modules"] == ["ff.net.2", "to_q", "to_v"]  # sorted, not a set's order
    assert lora_provenance({"format": "pt"}) is None  # another tool's file states none


def write_snapshot_script(out: Path) -> str:
    """A snapshot from fixed tensors, with peft's set of targets and the dicts in a seed-dependent order."""
    return f"""
import os, random, sys, torch
from pathlib import Path
from loraleak.finetune.record import LoraLayers, save_snapshot
from loraleak.lora.io import LoraProvenance
g = torch.Generator().manual_seed(0)
modules = ["down.attn1.to_q", "down.attn1.to_v", "up.proj_in", "up.ff.net.2"]
state = {{}}
for m in modules:
    state[f"{{m}}.lora_A.weight"] = torch.randn(2, 8, generator=g)
    state[f"{{m}}.lora_B.weight"] = torch.randn(8, 2, generator=g)
keys = list(state); random.Random(int(os.environ["ORDER"])).shuffle(keys)
config = {{"r": 2, "lora_alpha": 3, "target_modules": {{"to_q", "to_v", "proj_in", "ff.net.2"}}, "use_dora": False}}
items = list(config.items()); random.Random(int(os.environ["ORDER"])).shuffle(items)
provenance = LoraProvenance("sks", "A face of sks.", "abc123", 2, 3, ("to_v", "ff.net.2", "proj_in", "to_q"), 7)
path = save_snapshot(Path({str(out)!r}) / os.environ["ORDER"], 7, LoraLayers({{k: state[k] for k in keys}}, dict(items)),
                     provenance)
print(path)
"""


def test_the_same_lora_is_the_same_bytes_in_two_processes(tmp_path):
    script = write_snapshot_script(tmp_path)
    digests = []
    for order, hash_seed in (("1", "1"), ("2", "2")):  # other dict orders, other set orders
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'platform'}", "ORDER": order, "PYTHONHASHSEED": hash_seed,
               "OMP_NUM_THREADS": "1"}
        printed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        digests.append(hashlib.sha256(Path(printed.stdout.strip()).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    state, metadata = read_lora(tmp_path / "1" / "step-000007" / "pytorch_lora_weights.safetensors")
    assert lora_provenance(metadata).step == 7 and len(state) == 8


def test_lora_file_bytes_are_a_function_of_the_contents_and_read_back_by_safetensors(tmp_path):
    tensors = {"unet.b.lora.up.weight": torch.randn(4, 2), "unet.a.lora.down.weight": torch.randn(2, 3).half(),
               "unet.c.alpha": torch.tensor(2.0), "unet.d.lora.down.weight": torch.randn(2, 5).bfloat16()}
    metadata = {"z": "1", "format": "pt", "a": json.dumps({"k": [1, 2]})}
    one = lora_file_bytes(tensors, metadata)
    two = lora_file_bytes(dict(reversed(tensors.items())), dict(reversed(metadata.items())))
    assert one == two
    path = save_lora_file(tensors, metadata, tmp_path / "x.safetensors")
    assert path.read_bytes() == one and not list(tmp_path.glob(".*"))  # written atomically, nothing left beside
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == metadata


def test_a_malformed_or_newer_provenance_is_one_line(tmp_path, pipe):
    cfg = FinetuneConfig(**{**CFG, "snapshot_steps": (2,)})
    file = finetune_lora(pipe, person_images(), cfg, tmp_path / "ft", show_progress=False).snapshots[-1][1]
    state, metadata = read_lora(file)
    assert "loraleak_base_fingerprint" not in metadata  # no base named: none recorded (not a pipeline hash)
    for change, message in (({"loraleak_format_version": "99"}, "newer"),
                            ({"loraleak_rank": "two"}, "malformed loraleak provenance"),
                            ({"loraleak_targets": "{}"}, "loraleak_targets")):
        bad = save_lora_file(state, {**metadata, **change}, tmp_path / "bad.safetensors")
        with pytest.raises(InputError, match=message) as e:
            read_lora(bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)
