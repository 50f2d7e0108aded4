"""FineXtract, the training-free attack: guided sampling between base and fine-tune, then clustering,
on the shipped tiny base with a real project fine-tune (a few sampling steps)."""

import numpy as np
import pytest

from loraleak.attack.api import LoraInput
from loraleak.attack.loading import load_attack
from loraleak.attack.baselines import BaselineConfig, FineXtractAttack, FineXtractConfig
from loraleak.attack.baselines.finextract import densest_cluster, guided_samples, image_features
from loraleak.config import from_dict
from loraleak.errors import ConfigError
from loraleak.generate import generate_images
from test_finetune import pipeline_is_clean, pixels
from test_lora_formats import pipe, project_lora  # noqa: F401  (module fixtures: the tiny base, a real LoRA)

FAST = FineXtractConfig(num_candidates=6, sample_steps=4, batch_size=3)


def test_guidance_one_is_the_fine_tuned_model_and_no_lora_is_the_base(pipe, project_lora):  # noqa: F811
    sample = dict(n=3, seed=7, num_inference_steps=FAST.sample_steps, guidance_scale=1.0)
    tuned = pixels(generate_images(pipe, FAST.prompt, lora=project_lora, **sample))
    base = pixels(generate_images(pipe, FAST.prompt, **sample))
    at_one = pixels(guided_samples(pipe, project_lora, FAST, 3, 7, guidance=1.0))
    assert np.abs(at_one - tuned).max() <= 1  # the sampler is the pipeline's own
    assert np.abs(pixels(guided_samples(pipe, None, FAST, 3, 7)) - base).max() <= 1
    # w > 1 extrapolates: further from the base than the fine-tuned model itself.
    beyond = pixels(guided_samples(pipe, project_lora, FAST, 3, 7, guidance=4.0))
    assert np.abs(beyond - base).mean() > 1.5 * np.abs(tuned - base).mean()
    assert pipeline_is_clean(pipe)


def test_densest_cluster_finds_the_tight_group():
    rng = np.random.default_rng(0)
    centre = rng.normal(size=32)
    tight = [centre + 0.05 * rng.normal(size=32) for _ in range(4)]
    loose = [rng.normal(size=32) for _ in range(8)]
    items = loose[:3] + tight[:2] + loose[3:] + tight[2:] + [None]
    unit = [None if v is None else v / np.linalg.norm(v) for v in items]
    assert sorted(densest_cluster(unit, 4)) == [3, 4, 10, 11]


def test_finextract_is_a_baseline_kind_that_answers_with_images_of_its_densest_cluster(pipe, project_lora,  # noqa: F811
                                                                                       tmp_path):
    assert from_dict(BaselineConfig, {"kind": "finextract", "zoo": "-", "settings": {"guidance": 2.0}})
    with pytest.raises(ConfigError, match="cfg_scale"):
        from_dict(BaselineConfig, {"kind": "finextract", "zoo": "-", "settings": {"cfg_scale": 0.5}})
    directory = FineXtractAttack(FAST, pipe, {"base": "tiny"}).save_pretrained(tmp_path / "finextract")
    attack = load_attack(directory, pipe)
    assert attack.kind == "finextract" and attack.config == FAST
    lora = LoraInput.from_file(project_lora)
    answer = attack.reconstruct(lora, n=3, seed=11)
    assert answer.prompt_embeds is None and len(answer.images) == 3
    candidates = attack.candidates(lora, seed=11)
    features = image_features(candidates, "pixels")
    chosen = [next(i for i, c in enumerate(candidates) if np.array_equal(pixels([c]), pixels([im])))
              for im in answer.images]
    assert sorted(chosen) == sorted(densest_cluster(features, 3))
    assert pipeline_is_clean(pipe)
