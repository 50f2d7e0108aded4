"""The victim's DreamBooth-LoRA fine-tune, LoRA file safety and image generation, on the tiny base."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
from loraleak.config import from_dict
from loraleak.errors import ConfigError, InputError, LoraleakError
from loraleak.finetune.class_images import load_or_sample_class_images
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.lora.io import check_lora_fits, loaded_adapters, lora_factors, lora_summary, read_lora
from loraleak.finetune.triggers import random_trigger
from loraleak.generate import generate_images
from loraleak.identities.base import image_sha256

# Short and cheap, but every part of the recipe on: prior preservation, class-image cache, snapshots.
FAST = dict(steps=12, lr=1e-3, num_class_images=4, class_inference_steps=2, class_guidance_scale=1.0)


def tiny_pipe(**overrides):
    return build_tiny_pipeline(TinyBaseConfig(**overrides), seed=0)


def person_images(n: int = 3, size: int = 40) -> list[Image.Image]:
    """A stand-in person: the same coloured 'face' on a background, a little shifted per photo."""
    images = []
    for i in range(n):
        im = Image.new("RGB", (size, size), (30 + 20 * i, 60, 90))
        ImageDraw.Draw(im).ellipse((8 + i, 6, 30 + i, 34), fill=(220, 170, 140))
        images.append(im)
    return images


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def pipeline_is_clean(pipe) -> bool:
    return not loaded_adapters(pipe) and not any("lora" in name for name, _ in pipe.unet.named_modules())


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    pipe = tiny_pipe()
    base_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    images = person_images()
    cfg = FinetuneConfig(**FAST, snapshot_steps=(0, 4, 8), class_images_dir=tmp / "class-images")
    result = finetune_lora(pipe, images, cfg, tmp / "out", show_progress=False)
    return SimpleNamespace(pipe=pipe, cfg=cfg, result=result, out=tmp / "out", images=images,
                           base_unet=base_unet, tmp=tmp)


# --- configuration -------------------------------------------------------------------------------


def test_defaults_are_the_papers_victim_settings():
    cfg = FinetuneConfig()
    assert (cfg.rank, cfg.alpha, cfg.targets) == (16, 27, ("to_q", "to_v"))
    assert (cfg.lr, cfg.steps, cfg.batch_size, cfg.adam_betas, cfg.weight_decay, cfg.grad_clip) == \
        (1e-4, 1000, 1, (0.9, 0.999), 0.01, 1.0)
    assert (cfg.prior_preservation, cfg.prior_loss_weight, cfg.num_class_images) == (True, 1.0, 200)
    assert (cfg.class_prompt, cfg.instance_prompt) == ("A human face.", "A face of {trigger}.")
    assert (cfg.text_rank, cfg.text_alpha, cfg.text_targets) == (16, 17, ("q_proj", "v_proj"))
    assert cfg.mixed_precision == "no" and cfg.save_steps == (1000,)


@pytest.mark.parametrize("bad, field", [
    ({"rank": 0}, "rank"), ({"lr": 0.0}, "lr"), ({"steps": 4, "snapshot_steps": (5,)}, "snapshot_steps"),
    ({"instance_prompt": "A face."}, "instance_prompt"), ({"instance_prompt": "{x} {trigger}"}, "instance_prompt"),
    ({"trigger": "two words"}, "trigger"), ({"mixed_precision": "fp16"}, "fp16"),
    ({"adam_betas": (0.9, 1.0)}, "adam_betas"), ({"targets": ()}, "targets"), ({"device": "nonsense"}, "device"),
    ({"grad_clip": 0.0}, "grad_clip"), ({"batch_size": 0}, "batch_size"),
])
def test_config_rejects_bad_values(bad, field):
    with pytest.raises(ValueError, match=field):
        FinetuneConfig(**bad)


def test_config_from_dict_validates_at_the_edge(tmp_path):
    cfg = from_dict(FinetuneConfig, {"targets": ["to_q", "to_k"], "snapshot_steps": [0, 10],
                                     "class_images_dir": str(tmp_path), "lr": "1e-3"})
    assert cfg.targets == ("to_q", "to_k") and cfg.snapshot_steps == (0, 10)
    assert cfg.class_images_dir == tmp_path and cfg.lr == 1e-3
    with pytest.raises(ConfigError, match="rank"):
        from_dict(FinetuneConfig, {"rank": "16"})
    with pytest.raises(ConfigError, match="rnak"):
        from_dict(FinetuneConfig, {"rnak": 16})
    with pytest.raises(ConfigError, match="steps"):
        from_dict(FinetuneConfig, {"steps": -1})


def test_random_trigger_is_4_to_11_lowercase_letters_and_seeded():
    triggers = [random_trigger(seed) for seed in range(300)]
    assert all(re.fullmatch(r"[a-z]{4,11}", t) for t in triggers)
    assert {len(t) for t in triggers} == set(range(4, 12))
    assert len(set(triggers)) == len(triggers)
    assert random_trigger(7) == random_trigger(7)


def test_trigger_comes_from_the_seed_unless_given():
    assert FinetuneConfig(seed=3).trigger_word == random_trigger(3)
    assert FinetuneConfig(seed=3).instance_prompt_text == f"A face of {random_trigger(3)}."
    assert FinetuneConfig(trigger="sks").instance_prompt_text == "A face of sks."
    assert FinetuneConfig(steps=12, snapshot_steps=(8, 0, 8)).save_steps == (0, 8, 12)


# --- the fine-tune -------------------------------------------------------------------------------


def test_snapshots_appear_at_the_requested_steps(finetuned):
    res = finetuned.result
    assert [r for r, _ in res.snapshots] == [0, 4, 8, 12]
    for r, path in res.snapshots:
        assert path == finetuned.out / f"step-{r:06d}" / "pytorch_lora_weights.safetensors" and path.is_file()
    assert not [p for p in finetuned.out.iterdir() if ".tmp" in p.name]  # no half-written snapshot left


def test_lora_weights_change_and_the_initial_lora_is_gaussian(finetuned):
    start, _ = read_lora(finetuned.result.snapshots[0][1])
    end, _ = read_lora(finetuned.result.snapshots[-1][1])
    start_factors, end_factors = lora_factors(start), lora_factors(end)
    assert start_factors.keys() == end_factors.keys() and len(start_factors) > 0
    for module, (down0, up0) in start_factors.items():
        down, up = end_factors[module]
        assert torch.count_nonzero(up0) == 0 and down0.std() > 0  # B = 0, A ~ N(0, 1/r) at step 0
        assert torch.count_nonzero(up) > 0 and not torch.equal(down, down0)


def test_losses_are_finite_and_everything_is_recorded(finetuned):
    res, cfg = finetuned.result, finetuned.cfg
    assert len(res.losses) == cfg.steps and all(math.isfinite(x) for x in res.losses)
    assert math.isfinite(res.final_loss) and res.wall_time_s > 0
    record = json.loads((finetuned.out / "finetune.json").read_text())
    assert record["trigger"] == res.trigger == cfg.trigger_word
    assert record["instance_prompt"] == res.instance_prompt == f"A face of {res.trigger}."
    assert record["losses"] == res.losses and record["config"]["alpha"] == 27
    assert record["instance_images"]["sha256"] == [image_sha256(im) for im in finetuned.images]
    assert record["class_images"]["count"] == cfg.num_class_images
    assert Path(record["class_images"]["cache_dir"]).parent == cfg.class_images_dir
    assert record["base"]["fingerprint"]  # hashed from the weights when no base reference is given
    assert {"torch", "diffusers", "peft"} <= record["versions"].keys()
    assert [s["step"] for s in record["snapshots"]] == [0, 4, 8, 12]


def test_finetune_leaves_the_base_pipeline_clean(finetuned):
    pipe = finetuned.pipe
    assert pipeline_is_clean(pipe)
    after = pipe.unet.state_dict()
    assert after.keys() == finetuned.base_unet.keys()
    assert all(torch.equal(after[k], v) for k, v in finetuned.base_unet.items())
    assert all(p.requires_grad for p in pipe.unet.parameters())  # tiny's UNet starts trainable


def test_same_seed_same_lora_other_seed_other_lora(finetuned):
    torch.manual_seed(12345)  # the global random stream must play no part
    again = finetune_lora(finetuned.pipe, finetuned.images, finetuned.cfg, finetuned.tmp / "again",
                          show_progress=False)
    other_cfg = FinetuneConfig(**{**FAST, "seed": 1}, class_images_dir=finetuned.cfg.class_images_dir)
    other = finetune_lora(finetuned.pipe, finetuned.images, other_cfg, finetuned.tmp / "other", show_progress=False)
    first, _ = read_lora(finetuned.result.snapshots[-1][1])
    second, _ = read_lora(again.snapshots[-1][1])
    third, _ = read_lora(other.snapshots[-1][1])
    assert again.losses == finetuned.result.losses
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert other.trigger != again.trigger and not all(torch.equal(first[k], third[k]) for k in first)


def test_class_images_are_cached_once_and_atomically(tmp_path):
    pipe = tiny_pipe()
    settings = dict(prompt="A human face.", count=3, seed=0, num_inference_steps=2, guidance_scale=1.0,
                    base_fingerprint="base-a", show_progress=False)
    # A killed run's leftover must not pass for a finished cache.
    (tmp_path / ".a-human-face-3-0123456789abcdef.tmp-1-x").mkdir()
    images, directory = load_or_sample_class_images(pipe, tmp_path, **settings)
    assert directory.parent == tmp_path and len(list(directory.glob("*.png"))) == 3
    stamp = (directory / "manifest.json").stat().st_mtime_ns
    again, directory_again = load_or_sample_class_images(pipe, tmp_path, **settings)
    assert directory_again == directory and (directory / "manifest.json").stat().st_mtime_ns == stamp
    assert [image_sha256(im) for im in again] == [image_sha256(im) for im in images]
    _, other_base = load_or_sample_class_images(pipe, tmp_path, **{**settings, "base_fingerprint": "base-b"})
    assert other_base != directory
    (directory / "00001.png").unlink()
    with pytest.raises(InputError, match="delete"):
        load_or_sample_class_images(pipe, tmp_path, **settings)


def test_nan_loss_raises_naming_the_step_and_leaves_pipe_clean(tmp_path):
    pipe = tiny_pipe()
    cfg = FinetuneConfig(steps=6, lr=1e30, prior_preservation=False)
    with pytest.raises(LoraleakError, match=r"at step \d+ of 6"):
        finetune_lora(pipe, person_images(), cfg, tmp_path, show_progress=False)
    assert pipeline_is_clean(pipe)


def test_targets_missing_from_the_unet_are_a_config_error(tmp_path):
    pipe = tiny_pipe()
    with pytest.raises(ConfigError, match="targets"):
        finetune_lora(pipe, person_images(), FinetuneConfig(steps=1, prior_preservation=False,
                                                            targets=("no_such_proj",)), tmp_path, show_progress=False)
    assert pipeline_is_clean(pipe)


def test_text_encoder_lora_hflip_bf16_batch(tmp_path):
    pipe = tiny_pipe()
    cfg = FinetuneConfig(steps=2, batch_size=2, lr=1e-3, hflip=True, mixed_precision="bf16",
                         train_text_encoder=True, prior_preservation=False)
    res = finetune_lora(pipe, person_images(), cfg, tmp_path, show_progress=False)
    assert all(math.isfinite(x) for x in res.losses)
    state_dict, metadata = read_lora(res.snapshots[-1][1])
    summary = lora_summary(state_dict, metadata)
    text_modules = summary["text_encoder_modules"]
    assert text_modules and all(m.endswith(("q_proj", "v_proj")) for m in text_modules)
    pipe.load_lora_weights(res.snapshots[-1][1].parent)
    layer = pipe.text_encoder.get_submodule(text_modules[0])
    assert list(layer.scaling.values()) == [17 / 16]  # text alpha travels in the file's metadata
    pipe.unload_lora_weights()


# --- LoRA files ----------------------------------------------------------------------------------


def test_lora_summary_describes_the_unet_lora(finetuned):
    state_dict, metadata = read_lora(finetuned.result.snapshots[-1][1])
    summary = lora_summary(state_dict, metadata)
    assert (summary["rank"], summary["alpha"], summary["targets"]) == (16, 27, ["to_q", "to_v"])
    assert summary["num_matrices"] == 2 * len(summary["unet_modules"]) == len(state_dict)
    for module in summary["unet_modules"]:
        finetuned.pipe.unet.get_submodule(module)
    assert summary["text_encoder_modules"] == []


def test_pickled_or_fake_lora_files_are_refused(tmp_path, finetuned):
    state_dict, _ = read_lora(finetuned.result.snapshots[-1][1])
    torch.save(state_dict, tmp_path / "pytorch_lora_weights.bin")
    (tmp_path / "renamed.safetensors").write_bytes((tmp_path / "pytorch_lora_weights.bin").read_bytes())
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 7)
    for bad in ("pytorch_lora_weights.bin", "renamed.safetensors", "garbage.safetensors", "."):
        with pytest.raises(InputError, match="is not a safetensors file; refusing to unpickle"):
            read_lora(tmp_path / bad)
    pipe = finetuned.pipe
    with pytest.raises(InputError, match="refusing to unpickle"):
        generate_images(pipe, "A human face.", n=1, num_inference_steps=2, lora=tmp_path / "renamed.safetensors")
    assert pipeline_is_clean(pipe)
    save_file({"unet.x.weird.weight": torch.zeros(2)}, tmp_path / "odd.safetensors")
    with pytest.raises(InputError, match="unrecognised LoRA key"):
        lora_summary(read_lora(tmp_path / "odd.safetensors")[0])


@pytest.mark.parametrize("other_base, why", [
    ({"unet_channels": (32, 64, 96)}, "LoRA factors are"),  # same module names, other widths
    ({"attention_levels": 3}, "has no module"),  # attention where this base has none
])
def test_lora_for_another_base_is_refused(tmp_path, finetuned, other_base, why):
    other = finetune_lora(tiny_pipe(**other_base), person_images(), FinetuneConfig(steps=1, prior_preservation=False),
                          tmp_path, show_progress=False)
    state_dict, _ = read_lora(other.snapshots[-1][1])
    pipe = finetuned.pipe
    with pytest.raises(InputError, match=f"another one: .*{why}"):
        check_lora_fits(state_dict, pipe)
    with pytest.raises(InputError, match="another one"):
        generate_images(pipe, "A human face.", n=1, num_inference_steps=2, lora=other.snapshots[-1][1])
    assert pipeline_is_clean(pipe)


# --- generation ----------------------------------------------------------------------------------


def test_generation_through_the_lora_differs_from_the_base_and_unloads(finetuned):
    pipe, res = finetuned.pipe, finetuned.result
    args = dict(n=2, seed=0, num_inference_steps=3)
    base = generate_images(pipe, res.instance_prompt, **args)
    tuned = generate_images(pipe, res.instance_prompt, lora=res.snapshots[-1][1].parent, **args)
    again = generate_images(pipe, res.instance_prompt, **args)
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in tuned)
    assert np.abs(pixels(tuned) - pixels(base)).mean() > 0.1
    assert np.array_equal(pixels(again), pixels(base)) and pipeline_is_clean(pipe)
    # Scale 0 switches the LoRA off: the base's images again.
    off = generate_images(pipe, res.instance_prompt, lora=res.snapshots[-1][1], lora_scale=0.0, **args)
    assert np.abs(pixels(off) - pixels(base)).max() <= 1


def test_generation_is_reproducible_and_accepts_prompt_embeddings(finetuned):
    pipe = finetuned.pipe
    args = dict(n=2, num_inference_steps=3)
    first = generate_images(pipe, "A human face.", seed=5, **args)
    assert np.array_equal(pixels(first), pixels(generate_images(pipe, "A human face.", seed=5, **args)))
    assert not np.array_equal(pixels(first), pixels(generate_images(pipe, "A human face.", seed=6, **args)))
    embeds, _ = pipe.encode_prompt("A human face.", "cpu", 1, False)
    from_embeds = generate_images(pipe, prompt_embeds=embeds, seed=5, **args)
    assert np.array_equal(pixels(from_embeds), pixels(first))
    with pytest.raises(LoraleakError, match="exactly one"):
        generate_images(pipe, "A human face.", prompt_embeds=embeds)
