"""The base model: offline CLIP tokenizer, tiny SD pipeline, one loading path, pretraining."""

from __future__ import annotations

import json
import random
import shutil
import string

import numpy as np
import pytest
import torch

from loraleak.base import loading
from loraleak.base.loading import base_fingerprint, base_info, load_base_pipeline
from loraleak.base.pretrain import PretrainConfig, load_image_set, parse_args, pretrain_base, public_name
from loraleak.base.sampling import sample_images
from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
from loraleak.base.tokenizer import PROMPT_WORDS, build_tokenizer
from loraleak.config import from_dict
from loraleak.errors import ConfigError, LoraleakError
from loraleak.imaging import make_grid

# Smaller than the shipped default so that every test here runs in seconds on one core.
SMALL = TinyBaseConfig(unet_channels=(32, 64), attention_levels=1, text_width=32, text_heads=2,
                       vae_channels=(32, 32))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_small(tmp_path_factory):
    pipe = build_tiny_pipeline(SMALL, seed=0)
    directory = tmp_path_factory.mktemp("small-base")
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe, directory


def _images(pipe, seed=3, n=2, steps=3):
    return np.stack([np.asarray(im) for im in sample_images(pipe, "A face of qwzxkt.", n, seed, steps=steps)])


# --- tokenizer ---------------------------------------------------------------------------------


def test_prompt_words_are_single_tokens(tokenizer):
    for word in PROMPT_WORDS:
        tokens = tokenizer.tokenize(word)
        assert tokens == [word + "</w>"], (word, tokens)
    assert tokenizer.tokenize("A human face.") == ["a</w>", "human</w>", "face</w>", ".</w>"]


def test_random_triggers_become_distinct_letter_sequences(tokenizer):
    rng = random.Random(0)
    triggers = {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 11))) for _ in range(200)}
    sequences = set()
    for trigger in triggers:
        ids = tokenizer(f"A face of {trigger}.").input_ids
        body = ids[4:-2]  # <start> a face of ... . <end>
        assert tokenizer.eos_token_id not in body  # the unknown token is <|endoftext|>
        assert tokenizer.decode(body) == trigger
        assert len(body) >= 1
        sequences.add(tuple(body))
    assert len(sequences) == len(triggers)


def test_tokenizer_pads_to_77_with_end_token(tokenizer):
    batch = tokenizer(["A human face.", ""], padding="max_length", max_length=tokenizer.model_max_length,
                      truncation=True, return_tensors="pt")
    assert tokenizer.model_max_length == 77
    assert batch.input_ids.shape == (2, 77)
    assert batch.input_ids[0, 0] == tokenizer.bos_token_id
    assert (batch.input_ids[1, 1:] == tokenizer.eos_token_id).all()


# --- tiny pipeline and loading -----------------------------------------------------------------


def test_tiny_config_is_validated():
    with pytest.raises(ValueError, match="resolution"):
        TinyBaseConfig(resolution=36)
    with pytest.raises(ConfigError, match="unet_channels"):
        from_dict(TinyBaseConfig, {"unet_channels": [32, 48]})
    assert TinyBaseConfig().latent_size == 16


def test_tiny_architecture_matches_the_brief():
    pipe = build_tiny_pipeline(TinyBaseConfig(), seed=0)
    down = [type(b).__name__ for b in pipe.unet.down_blocks]
    assert down == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 128
    assert pipe.vae_scale_factor == 2
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    # Same seed, same weights; another seed, other weights.
    again, other = build_tiny_pipeline(TinyBaseConfig(), seed=0), build_tiny_pipeline(TinyBaseConfig(), seed=1)
    w = pipe.unet.conv_in.weight
    assert torch.equal(w, again.unet.conv_in.weight) and not torch.equal(w, other.unet.conv_in.weight)


def test_save_and_load_round_trip_gives_identical_images(saved_small):
    pipe, directory = saved_small
    loaded = load_base_pipeline(directory)
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
    before, after = _images(pipe), _images(loaded)
    assert before.shape == (2, 32, 32, 3)
    assert np.array_equal(before, after)
    assert not np.array_equal(before[0], before[1])  # different noise, different images
    info = base_info(loaded)
    assert info["resolution"] == 32 and info["text_width"] == 32 and info["latent_size"] == 16
    assert any(name.endswith("attn2") for name in info["attention_modules"])
    grid = make_grid(sample_images(loaded, "A human face.", n=4, seed=0, steps=2))
    assert grid.size == (2 * 34 + 2, 2 * 34 + 2)


def test_builtin_names_load_from_package_assets(saved_small, tmp_path, monkeypatch):
    _, directory = saved_small
    monkeypatch.setattr(loading, "builtin_dir", lambda name: tmp_path / "not-installed")
    with pytest.raises(LoraleakError, match="built-in weights are not installed"):
        load_base_pipeline("tiny")
    monkeypatch.setattr(loading, "builtin_dir", lambda name: directory)
    assert base_info(load_base_pipeline("tiny"))["resolution"] == 32


def test_hub_id_that_cannot_be_downloaded_is_one_clear_error():
    with pytest.raises(LoraleakError, match=r"cannot load base model 'loraleak-tests/no-such-model': "
                                            r"not a local directory and not downloadable here \("):
        load_base_pipeline("loraleak-tests/no-such-model")


def test_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    with pytest.raises(LoraleakError, match="no model_index.json"):
        load_base_pipeline(tmp_path)


def test_fingerprint_is_stable_and_tells_bases_apart(saved_small, tmp_path):
    _, directory = saved_small
    fingerprint = base_fingerprint(directory)
    assert fingerprint == base_fingerprint(str(directory)) and len(fingerprint) == 16
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    assert base_fingerprint(copy) == fingerprint  # content, not location
    resaved = tmp_path / "resaved"
    load_base_pipeline(directory).save_pretrained(resaved, safe_serialization=True)
    assert base_fingerprint(resaved) == fingerprint  # stable across a load/save cycle
    build_tiny_pipeline(SMALL, seed=1).save_pretrained(tmp_path / "other", safe_serialization=True)
    assert base_fingerprint(tmp_path / "other") != fingerprint
    with pytest.raises(LoraleakError, match="cannot fingerprint"):
        base_fingerprint("loraleak-tests/no-such-model")


# --- pretraining -------------------------------------------------------------------------------


def _pretrain_config(out_dir, **overrides):
    settings = dict(out_dir=out_dir, num_images=24, tiny=SMALL, vae_steps=4, vae_batch_size=4, unet_steps=12,
                    batch_size=4, lr=2e-3, warmup_steps=2, sample_every=0, sample_steps=2, threads=1)
    return PretrainConfig(**{**settings, **overrides})


def test_pretrain_learns_saves_a_loadable_pipeline_and_resumes_exactly(tmp_path):
    straight = pretrain_base(_pretrain_config(tmp_path / "straight", sample_every=6))
    record = json.loads((tmp_path / "straight" / "training.json").read_text())
    losses = record["unet_losses"]
    assert len(losses) == 12 and record["unet_steps"] == 12
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert record["fingerprint"] == base_fingerprint(straight)
    assert record["vae_psnr_db"] > 0 and record["scaling_factor"] > 0
    assert sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir()) == [
        "step_000006.png", "step_000012.png"]

    pipe = load_base_pipeline(tmp_path / "straight")  # a run folder loads through its pipeline/
    assert pipe.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    image = pipe("A face of qwzxkt.", num_inference_steps=3, output_type="pil").images[0]
    assert image.size == (32, 32)

    # Stop after 7 steps, then resume to 12: the same steps as the uninterrupted run.
    pretrain_base(_pretrain_config(tmp_path / "resumed", unet_steps=7))
    pretrain_base(_pretrain_config(tmp_path / "resumed"))
    resumed = json.loads((tmp_path / "resumed" / "training.json").read_text())
    assert resumed["unet_losses"] == losses
    assert base_fingerprint(tmp_path / "resumed") == record["fingerprint"]

    with pytest.raises(ConfigError, match="different seed"):
        pretrain_base(_pretrain_config(tmp_path / "resumed", seed=1))


def test_pretrain_reads_a_folder_of_public_photos(tmp_path):
    rng = np.random.default_rng(0)
    from PIL import Image
    for person in ("Ann_A", "Bob_B"):
        (tmp_path / "photos" / person).mkdir(parents=True)
        for k in range(2):
            pixels = rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / person / f"{k}.jpg")
    (tmp_path / "photos" / "Bob_B" / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = _pretrain_config(tmp_path / "run", images=tmp_path / "photos", crop_fraction=1.0)
    images, identities = load_image_set(cfg)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert identities.tolist() == [0, 0, 1, 1]  # one number per person folder
    assert (tmp_path / "run" / "images.safetensors").is_file()


def test_named_captions_train_the_text_encoder_and_continue_a_pretrained_base(tmp_path):
    """captions: names gives each public identity a name the base learns to read (text encoder included)."""
    first = pretrain_base(_pretrain_config(tmp_path / "first", unet_steps=2))
    cfg = _pretrain_config(tmp_path / "named", init_from=first, captions="names", train_text_encoder=True,
                           images_per_identity=4, unet_steps=6, sample_every=6)
    images, identities = load_image_set(cfg)
    assert identities.tolist() == [k // 4 for k in range(24)]
    named = pretrain_base(cfg)
    before, after = load_base_pipeline(first), load_base_pipeline(named)
    # The VAE comes with the pipeline it continues; the text encoder and the UNet learned.
    assert torch.equal(before.vae.encoder.conv_in.weight, after.vae.encoder.conv_in.weight)
    assert after.vae.config.scaling_factor == pytest.approx(before.vae.config.scaling_factor)
    assert not torch.equal(before.text_encoder.get_input_embeddings().weight,
                           after.text_encoder.get_input_embeddings().weight)
    assert base_fingerprint(named) != base_fingerprint(first)
    # Names are words like triggers, fixed by (seed, identity), distinct across identities.
    names = [public_name(0, i) for i in range(50)]
    assert names == [public_name(0, i) for i in range(50)] and len(set(names)) == 50
    assert all(n.isalpha() and n.islower() for n in names)
    assert (tmp_path / "named" / "samples" / "step_000006-names.png").is_file()
    # Resuming checks what the run is: another caption mode is another run.
    with pytest.raises(ConfigError, match="different captions"):
        pretrain_base(_pretrain_config(tmp_path / "named", init_from=first, images_per_identity=4))


def test_pretrain_command_line_parses_into_a_validated_config(tmp_path):
    cfg = parse_args(["--out-dir", str(tmp_path), "--unet-steps", "30", "--tiny", "{resolution: 64}",
                      "--time-limit-min", "25"])
    assert cfg.unet_steps == 30 and cfg.tiny.resolution == 64 and cfg.time_limit_min == 25.0
    with pytest.raises(ConfigError, match="unet_steps"):
        parse_args(["--out-dir", str(tmp_path), "--unet-steps", "many"])


def test_bf16_on_a_device_without_bf16_units_is_warned_about_once(caplog):
    """bf16 autocast is emulated (slower than fp32) on CPUs without AMX / AVX-512 BF16: one warning per kind of
    work, none for fp32 or where the units exist (this machine's own answer decides which branch runs)."""
    import logging

    import torch

    from loraleak.base import precision

    cpu = torch.device("cpu")
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert precision.native_bf16(cpu) is native
    what = f"test work {id(caplog)}"
    with caplog.at_level(logging.WARNING, logger="loraleak.base.precision"):
        assert precision.warn_if_emulated_bf16(cpu, None, what) is False
        assert precision.warn_if_emulated_bf16(cpu, torch.bfloat16, what) is (not native)
        assert precision.warn_if_emulated_bf16(cpu, torch.bfloat16, what) is (not native)
    warnings = [r.getMessage() for r in caplog.records if what in r.getMessage()]
    assert len(warnings) == (0 if native else 1)
    if not native:
        assert "no bf16 units" in warnings[0] and torch.backends.cpu.get_cpu_capability() in warnings[0]
