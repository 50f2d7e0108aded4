"""The one fine-tune loop (finetune/loop.py): the training-time defense hooks it calls, and the one
snapshot writer both fine-tune paths share, on the tiny base."""

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
from loraleak.defenses import training
from loraleak.defenses.training import NoDefense
from loraleak.finetune.batched import finetune_lora_batched
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.lora.io import lora_factors, read_lora
from test_batched_finetune import person

SMALL = dict(steps=3, rank=2, targets=("to_k", "to_v"), snapshot_steps=(0, 2), num_class_images=2,
             class_inference_steps=2, class_guidance_scale=1.0, lr=1e-2)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(TinyBaseConfig(), seed=0)


def recording_defense(calls: list, skip_update: bool = False) -> type:
    """The plain recipe, noting each hook the loop calls (and, with skip_update, never stepping)."""

    class Recording(NoDefense):
        def prepare(self, model, update):
            calls.append("prepare")
            return super().prepare(model, update)

        def before_step(self, rows, num_images, generator):
            calls.append("before_step")
            return super().before_step(rows, num_images, generator)

        def loss(self, pred, target, private_rows, prior_weight, class_rows):
            calls.append(f"loss {private_rows}+{class_rows}")
            return super().loss(pred, target, private_rows, prior_weight, class_rows)

        def after_step(self, loss, update):
            calls.append("after_step")
            if skip_update:
                update.optimizer.zero_grad(set_to_none=True)
            else:
                super().after_step(loss, update)

        def account(self, steps):
            calls.append(f"account {steps}")
            return super().account(steps)

    return Recording


def test_the_loop_calls_the_defense_hooks_in_order(pipe, tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(training.TRAINING_DEFENSES, "none", recording_defense(calls))
    cfg = FinetuneConfig(**SMALL, batch_size=2, class_images_dir=tmp_path / "class")
    finetune_lora(pipe, person(3, 0), cfg, tmp_path / "single", show_progress=False)
    step = ["before_step", "loss 2+2", "after_step"]
    assert calls == ["prepare", "account 0", *step, *step, "account 2", *step, "account 3", "account 3"]

    calls.clear()  # the K-per-pass path: each fine-tune's draws and record; its own loss and AdamW
    finetune_lora_batched(pipe, [person(3, 0), person(2, 1)], [cfg, cfg], [tmp_path / "b0", tmp_path / "b1"],
                          show_progress=False)
    assert calls == ["account 0"] * 2 + ["before_step"] * 4 + ["account 2"] * 2 + ["before_step"] * 2 + \
        ["account 3"] * 2 + ["account 3"] * 2


def test_a_defense_that_never_steps_leaves_the_initial_lora(pipe, tmp_path, monkeypatch):
    """The hooks decide the update: a defense whose after_step takes no optimiser step trains nothing."""
    monkeypatch.setitem(training.TRAINING_DEFENSES, "none", recording_defense([], skip_update=True))
    cfg = FinetuneConfig(**SMALL, prior_preservation=False)
    result = finetune_lora(pipe, person(2, 0), cfg, tmp_path, show_progress=False)
    (_, first), *_, (_, last) = result.snapshots
    assert read_lora(first)[0].keys() == read_lora(last)[0].keys()
    assert all(torch.equal(a, b) for a, b in zip(read_lora(first)[0].values(), read_lora(last)[0].values()))
    monkeypatch.undo()
    trained = finetune_lora(pipe, person(2, 0), cfg, tmp_path / "trained", show_progress=False)
    assert not torch.equal(next(iter(read_lora(trained.snapshots[-1][1])[0].values())),
                           next(iter(read_lora(trained.snapshots[0][1])[0].values())))


@pytest.mark.parametrize("path, targets", [("single", ("to_k", "proj_in", "ff.net.2")),
                                           ("batched", ("to_k", "ff.net.2", "time_emb_proj"))])
def test_a_lora_beyond_the_attention_projections_is_written_in_one_key_form_and_loads_whole(
        pipe, tmp_path, path, targets):
    """diffusers' loader decides a file's key form from its first key: a file mixing `lora.down`
    (attention projections) and `lora_A` (any other module) lost one kind silently when loaded."""
    cfg = FinetuneConfig(**{**SMALL, "targets": targets}, prior_preservation=False)
    if path == "single":
        result = finetune_lora(pipe, person(2, 0), cfg, tmp_path, show_progress=False)
    else:
        (result,) = finetune_lora_batched(pipe, [person(2, 0)], [cfg], [tmp_path], show_progress=False)
    state, _ = read_lora(result.snapshots[-1][1])
    assert all(".lora.down." in k or ".lora.up." in k for k in state), sorted(state)[:4]
    factors = lora_factors(state)
    assert {m.split(".")[-1] for m in factors} >= {t.split(".")[-1] for t in targets}
    pipe.load_lora_weights(str(result.snapshots[-1][1]), adapter_name="check")
    try:
        loaded = get_peft_model_state_dict(pipe.unet, adapter_name="check")
        assert len(loaded) == 2 * len(factors)
        for module, (down, up) in factors.items():
            module = module.removeprefix("unet.")
            assert torch.equal(loaded[f"{module}.lora_A.weight"].float(), down.float()), module
            assert torch.equal(loaded[f"{module}.lora_B.weight"].float(), up.float()), module
    finally:
        pipe.unload_lora_weights()
