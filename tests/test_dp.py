"""Training-time defenses: DP-SGD on the LoRA (Opacus per-sample gradients, clipping, noise) and the
paper's DPGM loss, run through the real fine-tune on a small random tiny base, and a zoo built with one."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
from loraleak.config import from_dict
from loraleak.defenses import DefenseConfig, defenses_applied, dp_record
from loraleak.defenses.dp_accounting import DPPlan, epsilon_spent
from loraleak.defenses.dp_sgd import LoraPrivacyEngine
from loraleak.defenses.dpgm import DPGMLoss, rbf_kernel
from loraleak.errors import ConfigError
from loraleak.finetune.batched import check_batchable
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import RECORD_NAME, finetune_lora
from loraleak.lora.io import lora_factors, read_lora
from loraleak.zoo.build import run_plan
from loraleak.zoo.config import ZooConfig
from loraleak.zoo.manifest import read_manifest
from loraleak.zoo.plan import plan_zoo

TINY = TinyBaseConfig(resolution=16, unet_channels=(32, 32), attention_levels=1, text_width=32,
                      text_layers=1, text_heads=1, vae_channels=(32,))
# Prior preservation on (class images given, so none are sampled); 3 photos, batches of 2; θ_0 kept.
FAST = dict(rank=2, alpha=2, steps=4, lr=1e-3, batch_size=2, num_class_images=2, snapshot_steps=[0])


def person_images(n: int = 3, size: int = 16) -> list[Image.Image]:
    images = []
    for i in range(n):
        im = Image.new("RGB", (size, size), (30 + 40 * i, 60, 90))
        ImageDraw.Draw(im).ellipse((3 + i, 2, 12 + i, 14), fill=(220, 170, 140))
        images.append(im)
    return images


CLASS_IMAGES = [Image.new("RGB", (16, 16), (120, 110 + 30 * i, 100)) for i in range(2)]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(TINY, seed=0)


def run(pipe, out: Path, **settings):
    cfg = from_dict(FinetuneConfig, {**FAST, **settings})
    return finetune_lora(pipe, person_images(), cfg, out, class_images=CLASS_IMAGES, show_progress=False)


def update(result) -> torch.Tensor:
    """Δθ = θ_final - θ_0 of every UNet LoRA factor, as one vector."""
    first, last = read_lora(result.snapshots[0][1])[0], read_lora(result.snapshots[-1][1])[0]
    return torch.cat([(last[k] - first[k]).flatten() for k in sorted(first)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


def pipeline_is_clean(pipe) -> bool:
    """No LoRA left, and none of Opacus' hooks or attributes."""
    modules = list(pipe.unet.modules())
    return (not any("lora" in name for name, _ in pipe.unet.named_modules())
            and not any(m._forward_hooks or m._backward_hooks for m in modules)
            and not any(hasattr(m, "autograd_grad_sample_hooks") or hasattr(m, "activations") for m in modules)
            and not any(hasattr(p, "grad_sample") for p in pipe.unet.parameters()))


# --- the DP fine-tune --------------------------------------------------------------------------


def test_dp_sgd_finetune_records_sigma_and_epsilon_spent(pipe, tmp_path):
    result = run(pipe, tmp_path / "dp", snapshot_steps=[0, 2], defense={"kind": "dp_sgd", "epsilon": 10.0})
    privacy = result.settings["privacy"]
    # 3 photos, 2 per batch: q = 2/3; σ derived so that 4 steps cost at most the target ε.
    assert (privacy["unit"], privacy["records"], privacy["sample_rate"]) == ("image", 3, pytest.approx(2 / 3))
    assert privacy["noise_multiplier"] > 0 and 9.9 <= privacy["epsilon"] <= 10.0
    assert (privacy["delta"], privacy["max_grad_norm"], privacy["sampling"]) == (1e-5, 1.0, "poisson")
    assert privacy["accounting_exact"] and "one private photo" in privacy["unit_meaning"]
    assert privacy["epsilon"] == pytest.approx(epsilon_spent(privacy["noise_multiplier"], 1e-5, 2 / 3, 4))
    assert json.loads((tmp_path / "dp" / RECORD_NAME).read_text())["privacy"] == privacy
    assert all(math.isfinite(x) for x in result.losses) and update(result).abs().max() > 0
    # Every snapshot file says it was DP-trained, and what that had cost at its step.
    spent = []
    for step, path in result.snapshots:
        state, metadata = read_lora(path)
        assert defenses_applied(metadata) == [DefenseConfig(kind="dp_sgd", epsilon=10.0)]
        record = dp_record(metadata)
        assert (record["steps_taken"], record["noise_multiplier"]) == (step, privacy["noise_multiplier"])
        spent.append(record["epsilon"])
        assert lora_factors(state)
    assert spent[0] == 0 and 0 < spent[1] < spent[2] == privacy["epsilon"]
    assert pipeline_is_clean(pipe)
    pipe.load_lora_weights(str(result.snapshots[-1][1].parent))  # still an ordinary diffusers LoRA file
    pipe.unload_lora_weights()
    assert run(pipe, tmp_path / "plain").settings["privacy"] is None


def test_a_poisson_step_that_draws_no_photo_is_noise_only(pipe, tmp_path):
    # No class rows, 1 photo in 3 per step on average: a step draws none with probability 8/27.
    result = run(pipe, tmp_path / "dp", batch_size=1, steps=30, prior_preservation=False,
                 defense={"kind": "dp_sgd", "noise_multiplier": 1.0})
    empty = [math.isnan(x) for x in result.losses]  # such a step has no loss, but it is a step
    assert len(empty) == 30 and 0 < sum(empty) < 30
    assert update(result).abs().max() > 0 and result.settings["privacy"]["steps_taken"] == 30
    assert pipeline_is_clean(pipe)


def test_no_noise_and_a_huge_clip_give_the_plain_update(pipe, tmp_path):
    plain = update(run(pipe, tmp_path / "plain"))
    same_batches = {"kind": "dp_sgd", "noise_multiplier": 0.0, "max_grad_norm": 1e6, "sampling": "shuffle"}
    dp = run(pipe, tmp_path / "dp", defense=same_batches)
    assert dp.settings["privacy"]["epsilon"] == "inf"  # σ = 0 promises nothing
    assert cosine(update(dp), plain) > 0.9999
    assert torch.allclose(update(dp), plain, rtol=1e-3, atol=1e-6)
    # The comparison is sensitive: a binding clip, or noise, turns the update elsewhere.
    clipped = update(run(pipe, tmp_path / "clipped", defense={**same_batches, "max_grad_norm": 1e-3}))
    noisy = update(run(pipe, tmp_path / "noisy", defense={**same_batches, "noise_multiplier": 1.0,
                                                          "max_grad_norm": 1.0}))
    assert cosine(clipped, plain) < 0.99 and cosine(noisy, plain) < 0.9


# --- the engine on a small module --------------------------------------------------------------


class SmallLoraModel(nn.Module):
    """A frozen layer plus a trainable low-rank branch, like a LoRA-adapted Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(6, 5).requires_grad_(False)
        self.down = nn.Linear(6, 2, bias=False)
        self.up = nn.Linear(2, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def row_losses(model, x, y):
    return (model(x) - y).pow(2).mean(1)


def per_row_gradients(model, x, y) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [torch.cat([g.flatten() for g in torch.autograd.grad(row_losses(model, x[i:i + 1], y[i:i + 1]).sum(),
                                                               params)]) for i in range(len(x))]


def one_sgd_step(model, engine, x, y, private_rows, public_weight=0.0) -> torch.Tensor:
    """The gradient the engine hands the optimiser (SGD at lr 1: the step is minus the gradient)."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params])
    with engine.attach(model, torch.optim.SGD(params, lr=1.0)):
        engine.backward(row_losses(model, x, y), private_rows, public_weight)
        engine.step()
    return before - torch.cat([p.detach().flatten() for p in params])


def engine_for(unit: str, clip: float, records: int = 4, batch: int = 4) -> LoraPrivacyEngine:
    plan = DPPlan.plan(noise_multiplier=0.0, delta=1e-5, max_grad_norm=clip, unit=unit, records=records,
                       batch_size=batch, steps=1)
    return LoraPrivacyEngine(plan, sampling="shuffle", noise_seed=0)


def test_per_sample_clipping_bounds_every_records_gradient():
    x = torch.randn(5, 6) * torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0])[:, None]  # norms far apart
    y = torch.zeros(5, 5)
    clip = 0.5
    model = SmallLoraModel()
    grads = per_row_gradients(model, x, y)
    norms = torch.stack([g.norm() for g in grads])
    assert (norms[:4] < clip).any() and (norms[:4] > clip).any()  # some clipped, some not
    clipped = [g * min(1.0, clip / (g.norm().item() + 1e-6)) for g in grads]

    # Four private photos: the mean of the clipped gradients; each one's share is at most C / 4.
    step = one_sgd_step(model, engine_for("image", clip), x[:4], y[:4], private_rows=4)
    assert torch.allclose(step, torch.stack(clipped[:4]).sum(0) / 4, atol=1e-6)
    assert all(c.norm() <= clip * (1 + 1e-5) for c in clipped)
    # One photo with a huge gradient moves the LoRA by at most C / (expected batch size), in its direction.
    step = one_sgd_step(SmallLoraModel(), engine_for("image", clip), x[4:], y[4:], private_rows=1)
    assert step.norm() <= clip / 4 * (1 + 1e-5) and cosine(step, grads[4]) > 0.9999
    # A public row (a class image) is neither clipped nor noised: its weighted gradient is added as is.
    step = one_sgd_step(SmallLoraModel(), engine_for("image", clip), x[3:], y[3:], private_rows=1, public_weight=2.0)
    assert torch.allclose(step, clipped[3] / 4 + 2.0 * grads[4], atol=1e-5)
    # Per person: the whole set is one record, clipped once (its mean gradient), 1 record per batch.
    step = one_sgd_step(SmallLoraModel(), engine_for("user", clip, records=1, batch=1), x[:4], y[:4], private_rows=4)
    whole = torch.stack(grads[:4]).mean(0)
    assert torch.allclose(step, whole * min(1.0, clip / whole.norm().item()), atol=1e-6)


def test_opacus_per_sample_gradients_of_the_lora_unet_match_per_row_backward():
    from peft import LoraConfig

    unet = build_tiny_pipeline(TINY, seed=1).unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    params = [p for p in unet.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x, t, h = torch.randn(3, 4, 16, 16, generator=g), torch.tensor([10, 500, 900]), torch.randn(3, 77, 32, generator=g)
    losses = lambda rows: (unet(x[rows], t[rows], h[rows], return_dict=False)[0] - x[rows]).pow(2).flatten(1).mean(1)
    engine = engine_for("image", 1.0, records=3, batch=3)
    with engine.attach(unet, torch.optim.SGD(params, lr=0.0)):
        engine.backward(losses(slice(None)), private_rows=3, public_weight=0.0)
        samples = torch.cat([p.grad_sample.flatten(1) for p in params], 1)
        engine.step()
    for i in range(3):
        expected = torch.cat([gr.flatten() for gr in torch.autograd.grad(losses(slice(i, i + 1)).sum(), params)])
        assert torch.allclose(samples[i], expected, rtol=1e-4, atol=1e-7), i


# --- accounting ---------------------------------------------------------------------------------


def test_epsilon_falls_as_the_noise_grows_and_rises_with_steps():
    eps = [epsilon_spent(sigma, 1e-5, 0.2, 200) for sigma in (0.6, 0.975, 2.0, 4.0, 16.0)]
    assert all(a > b for a, b in zip(eps, eps[1:])) and eps[-1] < 1.0
    assert epsilon_spent(0.0, 1e-5, 0.2, 200) == math.inf
    engine = LoraPrivacyEngine.for_defense(DefenseConfig(kind="dp_sgd", noise_multiplier=1.0), num_images=5,
                                           batch_size=1, steps=100, noise_seed=0)
    assert engine.epsilon_spent(0) == 0 < engine.epsilon_spent(10) < engine.epsilon_spent(100)


def test_user_and_image_accounting_give_different_noise_for_one_epsilon():
    def plan(unit):
        return LoraPrivacyEngine.for_defense(DefenseConfig(kind="dp_sgd", epsilon=2.0, accounting=unit), num_images=5,
                                             batch_size=1, steps=200, noise_seed=0).plan

    image, user = plan("image"), plan("user")
    # Per image: 1 photo of 5 per step (q = 0.2, amplified by sampling); per user: the one person, every step.
    assert (image.sample_rate, image.records, user.sample_rate, user.records) == (0.2, 5, 1.0, 1)
    assert user.noise_multiplier > 2 * image.noise_multiplier
    assert image.epsilon <= 2.0 and user.epsilon <= 2.0


def test_a_batch_larger_than_the_photos_or_an_unreachable_budget_is_one_line(pipe, tmp_path):
    with pytest.raises(ConfigError, match="batch_size <= the number of photos"):
        run(pipe, tmp_path / "a", batch_size=4, defense={"kind": "dp_sgd", "epsilon": 1.0})
    with pytest.raises(ConfigError, match="out of reach"):
        run(pipe, tmp_path / "b", defense={"kind": "dp_sgd", "epsilon": 1e-9, "accounting": "user"})
    assert pipeline_is_clean(pipe)


# --- DPGM ---------------------------------------------------------------------------------------


def test_dpgm_finetune_runs_with_a_finite_loss(pipe, tmp_path):
    result = run(pipe, tmp_path / "dpgm", defense={"kind": "dpgm", "noise_multiplier": 0.975})
    assert all(math.isfinite(x) for x in result.losses) and update(result).abs().max() > 0
    privacy = result.settings["privacy"]
    assert (privacy["kind"], privacy["noise_multiplier"], privacy["kernel_bandwidths"]) == \
        ("dpgm", 0.975, [1.0, 2.0, 4.0, 8.0, 16.0])
    assert privacy["guarantee"].startswith("nominal") and 0 < privacy["epsilon"] < math.inf
    state, metadata = read_lora(result.snapshots[-1][1])
    assert defenses_applied(metadata)[0].kind == "dpgm" and dp_record(metadata)["steps_taken"] == FAST["steps"]
    assert pipeline_is_clean(pipe)


def test_dpgm_loss_is_the_papers_noisy_squared_mmd():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    loss = DPGMLoss(DPPlan.plan(noise_multiplier=0.0, delta=1e-5, max_grad_norm=1.0, unit="image", records=2,
                                batch_size=2, steps=1), noise_seed=0)
    k = rbf_kernel(torch.cat([x, y]))
    mmd = k[:2, :2].mean() - 2 * k[:2, 2:].mean() + k[2:, 2:].mean()
    assert torch.allclose(loss(x, y), mmd**2) and mmd > 0
    assert torch.allclose(k.diagonal(), torch.full((5,), 5.0))  # five unit kernels

    # With noise: reproducible from its seed; and the noise only rescales the noise-free gradient
    # (why the recorded ε is nominal): d loss / d x = 2 · noisy MMD · d MMD / d x.
    noisy_plan = DPPlan.plan(noise_multiplier=16.0, delta=1e-5, max_grad_norm=1.0, unit="image", records=2,
                             batch_size=2, steps=1)
    a, b = DPGMLoss(noisy_plan, noise_seed=3), DPGMLoss(noisy_plan, noise_seed=3)
    assert a(x, y) == b(x, y) and a(x, y) != loss(x, y)
    grads = []
    for fn in (loss, a):
        xg = x.clone().requires_grad_(True)
        fn(xg, y).backward()
        grads.append(xg.grad.flatten())
    assert abs(cosine(grads[0], grads[1])) > 0.9999


# --- configs, the batched path, the zoo ---------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    ({"defense": {"kind": "rank_truncation", "rank": 1}}, "is post-hoc"),
    ({"defense": {"kind": "dp_sgd", "epsilon": 1.0}, "train_text_encoder": True}, "UNet LoRA only"),
    ({"defense": {"kind": "dp_sgd", "epsilon": 1.0, "sampling": "random"}}, "sampling"),
])
def test_finetune_config_checks_its_defense(settings, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(FinetuneConfig, settings)


def test_the_batched_path_refuses_defended_fine_tunes():
    dp = FinetuneConfig(defense=DefenseConfig(kind="dp_sgd", epsilon=1.0))
    with pytest.raises(ConfigError, match="runs alone in finetune_lora"):
        check_batchable([FinetuneConfig(), dp])


def test_a_zoo_with_dp_sgd_builds_and_its_manifest_records_it(tmp_path):
    base = tmp_path / "base"
    build_tiny_pipeline(TINY).save_pretrained(base, safe_serialization=True)
    defense = {"kind": "dp_sgd", "epsilon": 8.0, "accounting": "user"}

    def zoo(root, **overrides):
        return from_dict(ZooConfig, {
            "root": str(root), "base": str(base), "workers": 0, "tracking": False, "num_snapshots": 1,
            "identities": {"kind": "synthetic", "num_identities": 2, "images_per_identity": 3},
            "finetune": {"rank": 2, "alpha": 2, "steps": 3, "prior_preservation": False},
            "fine_tunes_per_pass": 2,  # the batched path refuses DP: each fine-tune runs alone
            **overrides})

    with pytest.raises(ConfigError, match="set the zoo's `defense`"):
        zoo(tmp_path / "x", finetune={"defense": defense})
    cfg = zoo(tmp_path / "zoo", defense=defense)
    plan = plan_zoo(cfg, show_progress=False)
    assert all(ft.finetune.defense == cfg.defense for ft in plan.fine_tunes)
    plain_ids = {ft.lora_id for ft in plan_zoo(zoo(tmp_path / "plain"), show_progress=False).fine_tunes}
    assert plain_ids.isdisjoint(ft.lora_id for ft in plan.fine_tunes)  # the defense is part of the id

    summary = run_plan(cfg, plan, show_progress=False)
    assert (summary["done"], summary["failed"]) == (2, 0)
    rows = read_manifest(cfg.root).to_pylist()
    assert len(rows) == 2 * 2 and {r["defense"] for r in rows} == {cfg.defense.to_manifest()}
    assert json.loads(rows[0]["defense"])["kind"] == "dp_sgd"
    for row in rows:
        _, metadata = read_lora(Path(cfg.root) / row["lora_path"])
        assert defenses_applied(metadata) == [cfg.defense]
        record = dp_record(metadata)
        assert (record["unit"], record["steps_taken"]) == ("user", row["snapshot_step"])
        finetune = json.loads((Path(cfg.root) / row["lora_path"]).parents[1].joinpath(RECORD_NAME).read_text())
        assert finetune["privacy"]["epsilon"] <= 8.0 and finetune["privacy"]["noise_multiplier"] > 0
