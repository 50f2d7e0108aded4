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


def test_wrong_triggers_embedded_in_chunks_equal_each_row_embedded_alone():
    """The wrong-trigger rows of several steps go through the text encoder in one call: the same triggers,
    in the same order, as embedding every step (or every row) alone, and the same embeddings up to rounding."""
    import torch

    from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
    from loraleak.finetune.data import encode_tokens, token_ids
    from loraleak.finetune.prior_prompts import PromptEmbeddings

    pipe = build_tiny_pipeline(TinyBaseConfig(), seed=0)
    cfg = FinetuneConfig(batch_size=4, steps=40, prior_negative_triggers=1000, prior_negative_fraction=0.75, seed=3)
    calls = []

    def encode(text_encoder, ids):
        calls.append(ids)
        return encode_tokens(text_encoder, ids)

    chunked = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, cfg, token_ids, encode, rows_per_call=64)
    per_step = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, cfg, token_ids, encode_tokens, rows_per_call=1)
    calls.clear()  # the fixed prompts' call
    rows = {step: chunked.step_rows(step, 4) for step in range(1, cfg.steps + 1)}
    # 3 wrong triggers a step, 64 rows a call: steps 1-21 in the first call, 22-40 in the second.
    assert [len(ids) for ids in calls] == [63, 57]
    wrong = [i for step in range(1, cfg.steps + 1) for i in prior_prompt_indices(cfg, step, 4) if i]
    assert torch.equal(torch.cat(calls), torch.cat([token_ids(pipe.tokenizer, prior_prompt(cfg, i)) for i in wrong]))
    assert wrong == list(range(1, 121))  # each step its own new wrong triggers
    with torch.no_grad():
        alone = {i: encode_tokens(pipe.text_encoder, token_ids(pipe.tokenizer, prior_prompt(cfg, i)))[0] for i in wrong}
        class_prompt = encode_tokens(pipe.text_encoder, token_ids(pipe.tokenizer, cfg.class_prompt))[0]
        instance = encode_tokens(pipe.text_encoder, token_ids(pipe.tokenizer, cfg.instance_prompt_text))[0]
    for step, got in rows.items():
        indices = prior_prompt_indices(cfg, step, 4)
        expected = torch.stack([instance] * 4 + [alone[i] if i else class_prompt for i in indices])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, per_step.step_rows(step, 4), rtol=1e-5, atol=1e-5)
    # Out of order (a step already served, or another row count): embedded afresh, still the same rows.
    torch.testing.assert_close(chunked.step_rows(7, 4), rows[7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.class_rows(9, 2), torch.stack(
        [alone[i] if i else class_prompt for i in prior_prompt_indices(cfg, 9, 2)]), rtol=1e-5, atol=1e-5)
