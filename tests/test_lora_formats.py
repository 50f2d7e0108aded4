"""LoRA files of other tools (PEFT folders, kohya / A1111 files) read into the project's form, and
project LoRAs written out to them, checked by the images they give from the shipped tiny base."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraleak.base.loading import load_base_pipeline
from loraleak.errors import InputError
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.generate import generate_images
from loraleak.lora.formats import delta_weights, detect_format, export_kohya, export_peft, read_shared_lora
from test_finetune import person_images, pixels

PROMPT = "A human face."
SAMPLE = dict(n=2, seed=3, num_inference_steps=4, guidance_scale=1.0)


@pytest.fixture(scope="module")
def pipe():
    return load_base_pipeline("tiny")


@pytest.fixture(scope="module")
def project_lora(pipe, tmp_path_factory):
    """A real project fine-tune of the shipped base: alpha != rank and four targets, so that a lost
    alpha or a dropped module shows in the images."""
    out = tmp_path_factory.mktemp("project-lora")
    cfg = FinetuneConfig(rank=2, alpha=6, targets=("to_q", "to_k", "to_v", "to_out.0"), lr=3e-2, steps=4,
                         prior_preservation=False)
    return finetune_lora(pipe, person_images(), cfg, out, show_progress=False).snapshots[-1][1]


def images_of(pipe, lora_file):
    return pixels(generate_images(pipe, PROMPT, lora=lora_file, **SAMPLE))


def max_delta_difference(a, b) -> float:
    da, db = delta_weights(a), delta_weights(b)
    assert set(da) == set(db)
    return max(float((da[m] - db[m]).abs().max()) for m in da)


def test_project_lora_round_trips_through_peft_and_kohya_to_the_same_images(pipe, project_lora, tmp_path):
    original = read_shared_lora(project_lora)
    assert original.source_format == "diffusers" and original.config["unet.lora_alpha"] == 6
    reference = images_of(pipe, project_lora)
    base = pixels(generate_images(pipe, PROMPT, **SAMPLE))
    assert np.abs(reference - base).mean() > 1.0  # the LoRA matters, so a lost alpha or module would show

    peft_dir = export_peft(original, tmp_path / "peft")
    kohya_file = export_kohya(original, tmp_path / "kohya.safetensors")
    assert detect_format(peft_dir) == "peft" and detect_format(kohya_file) == "kohya"
    assert all(k.startswith("lora_unet_") for k in load_file(kohya_file))
    for exported, kind in ((peft_dir, "peft"), (kohya_file, "kohya")):
        back = read_shared_lora(exported)
        assert back.source_format == kind
        assert set(back.state_dict) == set(original.state_dict)
        assert max_delta_difference(original, back) == 0.0
        diff = np.abs(images_of(pipe, back.save(tmp_path / f"{kind}-back")) - reference).max()
        print(f"{kind} round trip: max pixel difference {diff}")
        assert diff == 0

    # Another tool reading the kohya export: diffusers' own kohya loader gives the same images (alpha kept).
    pipe.load_lora_weights(str(kohya_file.parent), weight_name=kohya_file.name, adapter_name="kohya")
    try:
        via_diffusers = pixels(generate_images(pipe, PROMPT, **SAMPLE))
    finally:
        pipe.unload_lora_weights()
    assert np.abs(via_diffusers - reference).max() <= 1


def test_a_peft_adapter_made_with_peft_is_read_with_its_rank_and_alpha_patterns(pipe, tmp_path):
    from peft import LoraConfig, get_peft_model

    unet = copy.deepcopy(pipe.unet)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in"], init_lora_weights=False,
                        rank_pattern={"attn2.to_v": 2}, alpha_pattern={"proj_in": 1})
    torch.manual_seed(0)
    model = get_peft_model(unet, config)
    with torch.no_grad():  # init_lora_weights=False draws B at random too; keep the update small
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    lora = read_shared_lora(tmp_path / "adapter")
    assert lora.source_format == "peft" and lora.notes  # mixed ranks/alphas: folded into one scale
    assert lora.config["unet.r"] == 4 and not lora.config["unet.rank_pattern"]
    mine = images_of(pipe, lora.save(tmp_path / "converted"))

    # The same adapter applied by peft itself (merged into a copy of the UNet).
    merged = model.merge_and_unload()
    original_unet = pipe.unet
    pipe.unet = merged
    try:
        theirs = pixels(generate_images(pipe, PROMPT, **SAMPLE))
    finally:
        pipe.unet = original_unet
    base = pixels(generate_images(pipe, PROMPT, **SAMPLE))
    assert np.abs(theirs - base).mean() > 1.0
    print(f"PEFT adapter: max pixel difference to peft's own merge {np.abs(mine - theirs).max()}")
    assert np.abs(mine - theirs).max() <= 1


def test_kohya_per_module_alphas_scale_each_module(project_lora, tmp_path):
    original = read_shared_lora(project_lora)
    kohya = load_file(export_kohya(original, tmp_path / "k.safetensors"))
    alpha_keys = sorted(k for k in kohya if k.endswith(".alpha"))
    kohya[alpha_keys[0]] = kohya[alpha_keys[0]] * 0.5  # one module at half strength
    save_file(kohya, str(tmp_path / "halved.safetensors"))
    back = read_shared_lora(tmp_path / "halved.safetensors")
    before, after = delta_weights(original), delta_weights(back)
    close = lambda a, b: float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())  # noqa: E731  (fp32 folding)
    halved = [m for m in before if not close(after[m], before[m])]
    assert len(halved) == 1 and close(after[halved[0]], 0.5 * before[halved[0]])
    assert back.notes  # one module's scale differs: folded into its B


def test_unsafe_or_unsupported_files_are_refused_in_one_line(project_lora, tmp_path):
    original = read_shared_lora(project_lora)
    peft_dir = export_peft(original, tmp_path / "peft")
    (peft_dir / "adapter_model.safetensors").rename(peft_dir / "adapter_model.bin")
    with pytest.raises(InputError, match="refusing to unpickle"):
        read_shared_lora(peft_dir)

    dora = export_peft(original, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(InputError, match="DoRA"):
        read_shared_lora(dora)

    loose = tmp_path / "loose.safetensors"
    save_file(load_file(export_peft(original, tmp_path / "p2") / "adapter_model.safetensors"), str(loose))
    with pytest.raises(InputError, match="adapter_config.json"):
        read_shared_lora(loose)

    sdxl = load_file(export_kohya(original, tmp_path / "k.safetensors"))
    sdxl["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(2, 4)
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(InputError, match="SDXL"):
        read_shared_lora(tmp_path / "sdxl.safetensors")
    for error in (InputError,):
        with pytest.raises(error) as info:
            read_shared_lora(tmp_path / "missing.safetensors")
        assert "\n" not in str(info.value)
