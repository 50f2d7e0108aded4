"""Victim end to end at tiny size: base on disk -> fine-tune -> LoRA file -> a fresh pipeline loads it
through diffusers' own `load_lora_weights` -> the same weights act on attention -> images."""

import copy
import json

import numpy as np
import torch
from PIL import Image, ImageDraw

from loraleak.base.loading import base_fingerprint, load_base_pipeline
from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.lora.io import lora_factors, read_lora
from loraleak.generate import generate_images


def person_images(n: int = 3, size: int = 40) -> list[Image.Image]:
    images = []
    for i in range(n):
        im = Image.new("RGB", (size, size), (40, 80 + 10 * i, 120))
        ImageDraw.Draw(im).ellipse((9, 5 + i, 31, 33 + i), fill=(225, 180, 150))
        images.append(im)
    return images


def test_finetune_save_reload_in_a_fresh_pipeline_and_generate(tmp_path):
    base_dir = tmp_path / "base"
    build_tiny_pipeline(TinyBaseConfig(), seed=0).save_pretrained(base_dir, safe_serialization=True)

    victim = load_base_pipeline(str(base_dir))
    cfg = FinetuneConfig(steps=15, lr=1e-3, num_class_images=4, class_inference_steps=2, class_guidance_scale=1.0,
                         class_images_dir=tmp_path / "class-images")
    result = finetune_lora(victim, person_images(), cfg, tmp_path / "lora", base_ref=str(base_dir),
                           show_progress=False)
    lora_file = result.snapshots[-1][1]
    record = json.loads((tmp_path / "lora" / "finetune.json").read_text())
    assert record["base"] == {"ref": str(base_dir), "fingerprint": base_fingerprint(str(base_dir)),
                              "pipeline": "StableDiffusionPipeline"}

    # A freshly loaded pipeline takes the LoRA through diffusers' own loader.
    fresh = load_base_pipeline(str(base_dir))
    fresh.load_lora_weights(lora_file.parent)
    saved, _ = read_lora(lora_file)
    factors = lora_factors(saved)
    assert factors
    for module_path, (down, up) in factors.items():
        layer = fresh.unet.get_submodule(module_path)
        (adapter,) = layer.lora_A.keys()
        assert torch.equal(layer.lora_A[adapter].weight, down) and torch.equal(layer.lora_B[adapter].weight, up)
        assert layer.scaling[adapter] == 27 / 16  # alpha survived the round trip

    # Attention with the loaded LoRA == base attention with W + (alpha/r) B A merged by hand.
    base = load_base_pipeline(str(base_dir))
    path = "mid_block.attentions.0.transformer_blocks.0.attn2"
    merged = copy.deepcopy(base.unet.get_submodule(path))
    for proj in ("to_q", "to_v"):
        down, up = factors[f"{path}.{proj}"]
        getattr(merged, proj).weight.data += (27 / 16) * up @ down
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, merged.to_q.in_features, generator=g)
    context = torch.randn(1, 77, base.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        with_lora = fresh.unet.get_submodule(path)(hidden, context)
        by_hand = merged(hidden, context)
        without = base.unet.get_submodule(path)(hidden, context)
    torch.testing.assert_close(with_lora, by_hand, atol=1e-5, rtol=1e-4)
    assert (with_lora - without).abs().max() > 1e-3

    # Images: the fresh pipeline with the LoRA == generate_images loading the file; both != the base.
    args = dict(n=2, seed=0, num_inference_steps=3)
    from_fresh = generate_images(fresh, result.instance_prompt, **args)
    via_file = generate_images(base, result.instance_prompt, lora=lora_file, **args)
    from_base = generate_images(base, result.instance_prompt, **args)
    as_array = lambda ims: np.stack([np.asarray(im, dtype=np.int16) for im in ims])  # noqa: E731
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in from_fresh)
    assert np.array_equal(as_array(from_fresh), as_array(via_file))
    assert np.abs(as_array(from_fresh) - as_array(from_base)).mean() > 0.1
