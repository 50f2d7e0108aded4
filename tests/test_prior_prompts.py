"""Wrong triggers in the prior: which prompt each class row carries, in the single and the batched fine-tune."""

import pytest

from loraleak.finetune.batched import finetune_lora_batched
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.finetune.prior_prompts import negative_trigger, prior_prompt, prior_prompt_indices


def test_the_paper_prior_shows_only_the_class_prompt():
    cfg = FinetuneConfig(batch_size=3)
    assert prior_prompt_indices(cfg, step=1, rows=3) == [0, 0, 0]
    assert prior_prompt(cfg, 0) == "A human face."


def test_wrong_triggers_alternate_with_the_class_prompt_and_never_repeat_within_the_pool():
    cfg = FinetuneConfig(batch_size=2, steps=100, prior_negative_triggers=1000, seed=5)
    rows = [i for step in range(1, 101) for i in prior_prompt_indices(cfg, step, 2)]
    assert rows[0::2] == [0] * 100  # every other class row: the class prompt
    assert rows[1::2] == list(range(1, 101))  # the others: a new wrong trigger each
    words = {negative_trigger(cfg, i) for i in range(1000)}
    assert cfg.trigger_word not in words and len(words) > 990  # random 4-11 letter words
    assert prior_prompt(cfg, 7) == f"A face of {negative_trigger(cfg, 6)}."
    again = FinetuneConfig(batch_size=2, steps=100, prior_negative_triggers=1000, seed=5)
    assert [negative_trigger(again, i) for i in range(5)] == [negative_trigger(cfg, i) for i in range(5)]
    small = FinetuneConfig(batch_size=1, prior_negative_triggers=2)
    assert [prior_prompt_indices(small, s, 1)[0] for s in range(1, 9)] == [0, 1, 0, 2, 0, 1, 0, 2]


def test_wrong_triggers_need_prior_preservation_and_a_sane_count():
    with pytest.raises(ValueError, match="needs prior_preservation"):
        FinetuneConfig(prior_preservation=False, prior_negative_triggers=4)
    with pytest.raises(ValueError, match="prior_negative_triggers"):
        FinetuneConfig(prior_negative_triggers=-1)


def test_batched_and_single_fine_tunes_show_the_same_wrong_triggers(tmp_path):
    """Both paths condition the class rows on the same prompts: the same losses step for step."""
    from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
    from test_batched_finetune import person

    pipe = build_tiny_pipeline(TinyBaseConfig(), seed=0)
    cfgs = [FinetuneConfig(steps=4, rank=2, targets=("to_k", "to_v"), num_class_images=2, class_inference_steps=2,
                           class_guidance_scale=1.0, class_images_dir=tmp_path / "class", batch_size=2,
                           prior_negative_triggers=50, seed=seed, lr=1e-2) for seed in (1, 2)]
    images = [person(2, 0), person(3, 1)]
    singles = [finetune_lora(pipe, im, cfg, tmp_path / f"s{k}", show_progress=False)
               for k, (im, cfg) in enumerate(zip(images, cfgs))]
    batched = finetune_lora_batched(pipe, images, cfgs, [tmp_path / f"b{k}" for k in range(2)], show_progress=False)
    for single, other in zip(singles, batched):
        assert other.losses == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    plain = finetune_lora(pipe, images[0], FinetuneConfig(**{**cfgs[0].__dict__, "prior_negative_triggers": 0}),
                          tmp_path / "plain", show_progress=False)
    # Same data draws; only the second class row's prompt differs (a wrong trigger instead of the class prompt).
    assert plain.losses != pytest.approx(singles[0].losses, rel=1e-4)
