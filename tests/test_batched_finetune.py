"""K fine-tunes in one UNet pass (finetune.batched) against the single fine-tune path, on the tiny base."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from loraleak.lora.batched import BatchedLoRALinear
from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
from loraleak.errors import ConfigError, InputError, LoraleakError
from loraleak.finetune.batched import (BatchedOptions, PerRowAdamW, clip_grad_norm_per_row_, find_max_k,
                                       finetune_lora_batched, largest_fitting, peft_initial_lora, probe_step)
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.lora.io import loaded_adapters, lora_factors, read_lora

SHARED = dict(steps=4, rank=4, targets=("to_q", "to_k", "to_v", "to_out.0"), snapshot_steps=(0, 2),
              num_class_images=3, class_inference_steps=2, class_guidance_scale=1.0)
# Everything a batch lets differ between its fine-tunes differs here.
PER_FINETUNE = (
    dict(seed=1, lr=1e-3, alpha=4),
    dict(seed=2, lr=3e-3, alpha=8, grad_clip=0.05, hflip=True, weight_decay=0.1, trigger="sks"),
    dict(seed=3, lr=1e-2, alpha=6, prior_loss_weight=0.5, adam_betas=(0.8, 0.99), snapshot_steps=(1,)),
)


def person(n: int, hue: int) -> list[Image.Image]:
    images = []
    for i in range(n):
        im = Image.new("RGB", (40, 40), (30 + 20 * i, 60 + 30 * hue, 90))
        ImageDraw.Draw(im).ellipse((8 + i, 6, 30 + i, 34), fill=(220, 170 - 40 * hue, 140))
        images.append(im)
    return images


def unet_state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same three fine-tunes, one at a time (finetune_lora) and batched."""
    tmp = tmp_path_factory.mktemp("batched")
    pipe = build_tiny_pipeline(TinyBaseConfig(), seed=0)
    base = unet_state(pipe)
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    cfgs = [FinetuneConfig(**{**SHARED, **own}, class_images_dir=tmp / "class-images") for own in PER_FINETUNE]
    image_sets = [person(3, 0), person(2, 1), person(4, 2)]  # unequal sizes: each its own batch order
    singles = [finetune_lora(pipe, images, cfg, tmp / f"single-{k}", show_progress=False)
               for k, (images, cfg) in enumerate(zip(image_sets, cfgs))]
    torch.manual_seed(999)  # the global random stream must play no part
    batched = finetune_lora_batched(pipe, image_sets, cfgs, [tmp / f"batched-{k}" for k in range(3)],
                                    show_progress=False)
    return SimpleNamespace(pipe=pipe, base=base, processors=processors, cfgs=cfgs, image_sets=image_sets,
                           singles=singles, batched=batched, tmp=tmp)


def adapter_config(metadata):
    """The LoraConfig diffusers stored in the file (alpha, rank...); target_modules is a set, in any order."""
    config = json.loads(metadata["lora_adapter_metadata"])
    return {**config, "unet.target_modules": sorted(config["unet.target_modules"])}


def assert_updates_match(single_file, batched_file, initial, rel=1e-2):
    """ΔA, ΔB of every matrix agree within float tolerance (Adam amplifies rounding in near-zero gradients)."""
    single, single_md = read_lora(single_file)
    batched, batched_md = read_lora(batched_file)
    assert single.keys() == batched.keys() and adapter_config(single_md) == adapter_config(batched_md)
    single, batched = lora_factors(single), lora_factors(batched)
    assert single.keys() == initial.keys()
    for module, factors in single.items():
        for single_now, batched_now, start in zip(factors, batched[module], initial[module]):
            delta_single, delta_batched = single_now - start, batched_now - start
            assert delta_single.norm() > 0
            assert (delta_batched - delta_single).norm() <= rel * delta_single.norm(), module


def test_batched_losses_and_lora_updates_equal_the_single_path(runs):
    for single, batched, cfg in zip(runs.singles, runs.batched, runs.cfgs):
        assert isinstance(batched, type(single))
        assert batched.trigger == single.trigger == cfg.trigger_word
        assert batched.losses == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
        assert [r for r, _ in batched.snapshots] == [r for r, _ in single.snapshots] == list(cfg.save_steps)
        initial, _ = peft_initial_lora(runs.pipe.unet, cfg)  # θ_0 of this seed
        for (step, single_file), (_, batched_file) in zip(single.snapshots, batched.snapshots):
            if step == 0:  # peft's init, bit for bit, in both
                for file in (single_file, batched_file):
                    saved = lora_factors(read_lora(file)[0])
                    assert saved.keys() == initial.keys()
                    assert all(torch.equal(a, b) for m in saved for a, b in zip(saved[m], initial[m]))
            else:
                assert_updates_match(single_file, batched_file, initial)


def test_batched_record_is_the_single_record_plus_batch_info(runs):
    for k, (single, batched) in enumerate(zip(runs.singles, runs.batched)):
        record = json.loads((runs.tmp / f"batched-{k}" / "finetune.json").read_text())
        single_record = json.loads((runs.tmp / f"single-{k}" / "finetune.json").read_text())
        assert record.keys() == single_record.keys() | {"batched"}
        assert record["batched"]["fine_tunes"] == 3 and record["batched"]["index"] == k
        for field in ("config", "trigger", "instance_prompt", "resolution", "noise_scheduler", "lora",
                      "instance_images", "class_images", "snapshots"):
            assert record[field] == single_record[field], field
        assert record["losses"] == batched.losses and math.isfinite(record["final_loss"])


def test_batched_finetune_leaves_the_pipeline_as_it_was(runs):
    pipe = runs.pipe
    assert not loaded_adapters(pipe)
    assert not any(isinstance(m, BatchedLoRALinear) or "lora" in name for name, m in pipe.unet.named_modules())
    after = pipe.unet.state_dict()
    assert after.keys() == runs.base.keys() and all(torch.equal(after[k], v) for k, v in runs.base.items())
    assert all(p.requires_grad for p in pipe.unet.parameters())
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == runs.processors
    assert not pipe.unet.is_gradient_checkpointing


def test_gradient_checkpointing_and_channels_last_learn_the_same(runs, tmp_path):
    cfgs, image_sets = runs.cfgs[:2], runs.image_sets[:2]
    options = BatchedOptions(gradient_checkpointing=True, channels_last=True, loss_sync_every=3)
    results = finetune_lora_batched(runs.pipe, image_sets, cfgs, [tmp_path / "a", tmp_path / "b"], options=options,
                                    show_progress=False)
    for result, reference in zip(results, runs.batched[:2]):
        assert result.losses == pytest.approx(reference.losses, rel=1e-5, abs=1e-6)
        assert_updates_match(reference.snapshots[-1][1], result.snapshots[-1][1],
                             lora_factors(read_lora(reference.snapshots[0][1])[0]))
    assert not runs.pipe.unet.is_gradient_checkpointing


def test_bf16_autocast_matches_the_single_path_in_bf16(runs, tmp_path):
    cfgs = [FinetuneConfig(**{**SHARED, **own, "mixed_precision": "bf16", "prior_preservation": False, "steps": 2,
                              "snapshot_steps": ()}) for own in PER_FINETUNE[:2]]
    results = finetune_lora_batched(runs.pipe, runs.image_sets[:2], cfgs, [tmp_path / "a", tmp_path / "b"],
                                    show_progress=False)
    for k, (result, cfg) in enumerate(zip(results, cfgs)):
        single = finetune_lora(runs.pipe, runs.image_sets[k], cfg, tmp_path / f"single-{k}", show_progress=False)
        assert result.losses == pytest.approx(single.losses, rel=1e-2)  # bf16 rounding, not another recipe
        state, _ = read_lora(result.snapshots[-1][1])
        assert all(t.dtype == torch.float32 for t in state.values())  # fp32 LoRA, bf16 compute


def test_the_attention_kernel_is_chosen_by_precision_and_device_and_does_not_change_what_is_learned(runs, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    auto = BatchedOptions()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert isinstance(auto.attention_processor(cpu, torch.bfloat16), AttnProcessor)  # CPU flash bf16 backward: slow
    assert isinstance(auto.attention_processor(cpu, None), AttnProcessor2_0)
    assert isinstance(auto.attention_processor(cuda, torch.bfloat16), AttnProcessor2_0)
    assert isinstance(BatchedOptions(attention="sdpa").attention_processor(cpu, torch.bfloat16), AttnProcessor2_0)
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa, math, got 'flash'"):
        BatchedOptions(attention="flash")
    # inductor zeroed every LoRA gradient of the math processor under bf16: auto keeps sdpa there, math is refused.
    compiled = BatchedOptions(compile=True)
    assert isinstance(compiled.attention_processor(cpu, torch.bfloat16), AttnProcessor2_0)
    with pytest.raises(ValueError, match="trains nothing"):
        BatchedOptions(compile=True, attention="math").attention_processor(cpu, torch.bfloat16)
    traced = BatchedOptions(compile=True, compile_backend="aot_eager", attention="math")  # right under aot_eager
    assert isinstance(traced.attention_processor(cpu, torch.bfloat16), AttnProcessor)
    # Math and fused attention compute the same function: the same fp32 fine-tunes up to rounding.
    results = finetune_lora_batched(runs.pipe, runs.image_sets[:2], runs.cfgs[:2], [tmp_path / "a", tmp_path / "b"],
                                    options=BatchedOptions(attention="math"), show_progress=False)
    for result, reference in zip(results, runs.batched[:2]):
        assert result.losses == pytest.approx(reference.losses, rel=1e-4, abs=1e-6)
    assert {name: type(p) for name, p in runs.pipe.unet.attn_processors.items()} == runs.processors


@pytest.mark.parametrize("change, field", [
    ({"rank": 8}, "rank"), ({"steps": 5}, "steps"), ({"targets": ("to_q",)}, "targets"),
    ({"batch_size": 2}, "batch_size"), ({"prior_preservation": False}, "prior_preservation"),
])
def test_fine_tunes_that_shape_the_batch_differently_are_refused(change, field, tmp_path):
    cfgs = [FinetuneConfig(**SHARED), FinetuneConfig(**{**SHARED, **change})]
    with pytest.raises(ConfigError, match=f"must agree on {field}: fine-tune 0 has .*, fine-tune 1 has"):
        finetune_lora_batched(None, [person(1, 0)] * 2, cfgs, [tmp_path / "a", tmp_path / "b"])


def test_bad_batches_are_refused_with_one_line(tmp_path):
    cfg = FinetuneConfig(**SHARED)
    with pytest.raises(InputError, match="one of each per fine-tune"):
        finetune_lora_batched(None, [person(1, 0)], [cfg, cfg], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(InputError, match="its own output directory"):
        finetune_lora_batched(None, [person(1, 0)] * 2, [cfg, cfg], [tmp_path / "a", tmp_path / "a"])
    with pytest.raises(InputError, match="fine-tune 1 has no instance images"):
        finetune_lora_batched(None, [person(1, 0), []], [cfg, cfg], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ConfigError, match="train_text_encoder"):
        finetune_lora_batched(None, [person(1, 0)], [FinetuneConfig(**SHARED, train_text_encoder=True)],
                              [tmp_path / "a"])


def test_a_diverging_fine_tune_fails_alone_with_return_exceptions(runs, tmp_path):
    fine = FinetuneConfig(**{**SHARED, "prior_preservation": False, "seed": 1})
    diverging = FinetuneConfig(**{**SHARED, "prior_preservation": False, "seed": 2, "lr": 1e30})
    out = [tmp_path / "fine", tmp_path / "diverging"]
    results = finetune_lora_batched(runs.pipe, runs.image_sets[:2], [fine, diverging], out,
                                    options=BatchedOptions(loss_sync_every=100), return_exceptions=True,
                                    show_progress=False)
    assert isinstance(results[1], LoraleakError)
    assert "fine-tune 1 of the batch" in str(results[1]) and "diverged" in str(results[1])
    assert not (out[1] / "finetune.json").exists() and (out[0] / "finetune.json").is_file()
    assert all(math.isfinite(x) for x in results[0].losses) and len(results[0].losses) == 4
    # The survivor learnt exactly what it learns alone: NaNs stay in their own fine-tune's samples.
    alone = finetune_lora_batched(runs.pipe, runs.image_sets[:1], [fine], [tmp_path / "alone"], show_progress=False)
    assert results[0].losses == pytest.approx(alone[0].losses, rel=1e-5)
    with pytest.raises(LoraleakError, match=r"fine-tune 1 of the batch .* diverged: .* at step \d+ of 4"):
        finetune_lora_batched(runs.pipe, runs.image_sets[:2], [fine, diverging], [tmp_path / "c", tmp_path / "d"],
                              show_progress=False)
    assert not loaded_adapters(runs.pipe)
    assert not any(isinstance(m, BatchedLoRALinear) for m in runs.pipe.unet.modules())


# --- the parts: per-fine-tune optimiser, clipping, K search ---------------------------------------


def test_per_row_adamw_and_clipping_equal_k_torch_optimisers():
    torch.manual_seed(0)
    hyper = [dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, clip=1.0),
             dict(lr=5e-2, betas=(0.8, 0.99), weight_decay=0.0, clip=0.1),
             dict(lr=2e-4, betas=(0.95, 0.9), weight_decay=0.5, clip=100.0)]
    shapes = [(4, 16), (32, 4)]
    stacked = [torch.nn.Parameter(torch.randn(3, *s)) for s in shapes]
    separate = [[torch.nn.Parameter(p.detach()[k].clone()) for p in stacked] for k in range(3)]
    optimizer = PerRowAdamW(stacked, [h["lr"] for h in hyper], [h["betas"] for h in hyper],
                            [h["weight_decay"] for h in hyper])
    torch_optimizers = [torch.optim.AdamW(params, lr=h["lr"], betas=h["betas"], weight_decay=h["weight_decay"])
                        for params, h in zip(separate, hyper)]
    for _ in range(4):
        grads = [torch.randn(3, *s) * 3 for s in shapes]
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        norms = clip_grad_norm_per_row_(stacked, torch.tensor([h["clip"] for h in hyper]))
        optimizer.step()
        for k, (params, opt, h) in enumerate(zip(separate, torch_optimizers, hyper)):
            for p, g in zip(params, grads):
                p.grad = g[k].clone()
            assert torch.nn.utils.clip_grad_norm_(params, h["clip"]).item() == pytest.approx(norms[k].item(), rel=1e-6)
            opt.step()
        for k in range(3):
            for p, q in zip(stacked, separate[k]):
                torch.testing.assert_close(p.detach()[k], q.detach(), rtol=1e-5, atol=1e-7)


def test_grouped_rows_go_through_the_same_loras_as_interleaved_rows():
    """The fine-tune's layout (LoRA k's rows contiguous) computes what the decoding layout (row j: LoRA j mod N)
    computes for the same rows: base plus scale_k · x A_kᵀ B_kᵀ, forward and gradients."""
    torch.manual_seed(0)
    n, rows, tokens = 3, 2, 5
    wrapper = BatchedLoRALinear(torch.nn.Linear(8, 6))
    down, up = torch.randn(n, 4, 8, requires_grad=True), torch.randn(n, 6, 4, requires_grad=True)
    wrapper.down, wrapper.up, wrapper.scale = down, up, torch.tensor([0.5, 1.0, 2.0])
    x = torch.randn(n * rows, tokens, 8)  # interleaved: row c·n + k
    interleaved = wrapper(x)
    expected = torch.stack([wrapper.base(x[j]) + wrapper.scale[j % n] * x[j] @ down[j % n].T @ up[j % n].T
                            for j in range(n * rows)])
    torch.testing.assert_close(interleaved, expected)
    grads = torch.autograd.grad(interleaved.square().sum(), [down, up])
    wrapper.grouped = True
    order = [c * n + k for k in range(n) for c in range(rows)]  # grouped row k·rows + c = interleaved row c·n + k
    grouped = wrapper(x[order])
    torch.testing.assert_close(grouped, interleaved[order])
    for got, want in zip(torch.autograd.grad(grouped.square().sum(), [down, up]), grads):
        torch.testing.assert_close(got, want)


def test_largest_fitting_doubles_then_bisects():
    for capacity in (1, 2, 3, 37, 64, 1000):
        asked = []

        def fits(k):
            asked.append(k)
            return k <= capacity

        assert largest_fitting(fits, limit=256) == min(capacity, 256)
        assert len(asked) <= 2 * 9  # logarithmic, not a scan
    assert largest_fitting(lambda k: True, limit=5) == 5


def test_find_max_k_on_cpu_returns_the_configured_k_and_the_probe_runs(runs):
    cfg = FinetuneConfig(**SHARED)
    assert find_max_k(runs.pipe, cfg, "cpu", cpu_k=6) == 6
    probe_step(runs.pipe, cfg, 2, BatchedOptions(gradient_checkpointing=True), steps=1)  # what a GPU search runs
    assert not loaded_adapters(runs.pipe) and all(p.requires_grad for p in runs.pipe.unet.parameters())


@pytest.mark.slow  # ~25 s: dynamo traces the UNet twice (forward and backward)
def test_compiled_unet_learns_the_same(runs, tmp_path):
    """torch.compile's graph capture and autograd (aot_eager: inductor's kernels take minutes on a CPU)."""
    cfgs = [FinetuneConfig(**{**SHARED, **own, "prior_preservation": False}) for own in PER_FINETUNE[:2]]
    eager = finetune_lora_batched(runs.pipe, runs.image_sets[:2], cfgs, [tmp_path / "a", tmp_path / "b"],
                                  show_progress=False)
    compiled = finetune_lora_batched(runs.pipe, runs.image_sets[:2], cfgs, [tmp_path / "c", tmp_path / "d"],
                                     options=BatchedOptions(compile=True, compile_backend="aot_eager"),
                                     show_progress=False)
    for reference, result in zip(eager, compiled):
        assert result.losses == pytest.approx(reference.losses, rel=1e-5, abs=1e-6)
        assert_updates_match(reference.snapshots[-1][1], result.snapshots[-1][1],
                             lora_factors(read_lora(reference.snapshots[0][1])[0]))
