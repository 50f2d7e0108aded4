import json
import math

import pytest
import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
from loraleak.config import from_dict
from loraleak.defenses import DEFENSES_METADATA_KEY, DefenseConfig, defenses_applied
from loraleak.defenses.post_hoc import apply_post_hoc
from loraleak.defenses.dp_accounting import DPPlan, epsilon_spent, noise_multiplier_for
from loraleak.defenses.output_perturbation import perturb_lora
from loraleak.defenses.rank_truncation import truncate_lora, truncate_pair
from loraleak.errors import ConfigError, InputError
from loraleak.lora.io import adapter_metadata, lora_factors, lora_summary, read_lora

RANK, ALPHA = 8, 27  # alpha / r = 3.375: a scale that must survive truncation


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(TinyBaseConfig())


@pytest.fixture(scope="module")
def lora_dir(pipe, tmp_path_factory):
    """A diffusers-format UNet LoRA with its LoraConfig in the metadata, as the victim saves one,
    with random (not zero) up factors so that every B A has full rank."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    torch.manual_seed(0)
    pipe.unet.add_adapter(config)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    out = tmp_path_factory.mktemp("lora")
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in pipe.unet.peft_config["default"].to_dict().items()}
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(out, unet_lora_layers=layers, unet_lora_adapter_metadata=meta)
    pipe.unet.delete_adapters("default")
    return out


def products(state_dict):
    return {m: up.double() @ down.double() for m, (down, up) in lora_factors(state_dict).items()}


def best_rank_k(matrix, k):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


# --- DefenseConfig -------------------------------------------------------------------------------

def test_defense_config_fills_each_kinds_defaults_and_round_trips_through_the_manifest():
    assert DefenseConfig().to_manifest() == "none"
    assert DefenseConfig.from_manifest("none") == DefenseConfig()
    dp = from_dict(DefenseConfig, {"kind": "dp_sgd", "epsilon": "inf"})
    assert (dp.delta, dp.max_grad_norm, dp.accounting) == (1e-5, 1.0, "image")  # the paper's settings
    value = dp.to_manifest()
    assert json.loads(value)["epsilon"] == "inf"  # strict JSON has no infinity
    assert DefenseConfig.from_manifest(value) == dp
    for defense in (DefenseConfig(kind="dpgm", noise_multiplier=0.975, accounting="user"),
                    DefenseConfig(kind="output_noise", relative_noise=0.1),
                    DefenseConfig(kind="rank_truncation", rank=4)):
        assert DefenseConfig.from_manifest(defense.to_manifest()) == defense
    assert DefenseConfig(kind="output_noise", relative_noise=0.1).seed == 0
    assert DefenseConfig(kind="rank_truncation", rank=4).post_hoc and not dp.post_hoc
    with pytest.raises(ConfigError, match="neither 'none' nor JSON"):
        DefenseConfig.from_manifest("{kind: dp_sgd")


@pytest.mark.parametrize("settings, problem", [
    ({"kind": "dp_sgd"}, "exactly one of epsilon or noise_multiplier"),
    ({"kind": "dp_sgd", "epsilon": 1.0, "noise_multiplier": 2.0}, "exactly one"),
    ({"kind": "dp_sgd", "epsilon": 0.0}, "epsilon must be > 0"),
    ({"kind": "dp_sgd", "epsilon": 1.0, "delta": 1.0}, "delta"),
    ({"kind": "dp_sgd", "epsilon": 1.0, "accounting": "person"}, "accounting"),
    ({"kind": "output_noise"}, "relative_noise"),
    ({"kind": "output_noise", "relative_noise": -0.1}, "relative_noise"),
    ({"kind": "rank_truncation", "rank": 0}, "rank"),
    ({"kind": "rank_truncation", "rank": 4, "epsilon": 1.0}, "epsilon does not apply"),
    ({"kind": "none", "rank": 4}, "rank does not apply"),
    ({"kind": "laplace"}, "kind"),
    ({"kind": "rank_truncation", "rnak": 4}, "unknown key 'rnak'"),
])
def test_defense_config_rejects_bad_settings_in_one_line(settings, problem):
    with pytest.raises(ConfigError, match=problem):
        from_dict(DefenseConfig, settings, where="defense")


# --- output perturbation -------------------------------------------------------------------------

def test_output_noise_has_the_requested_size_relative_to_each_matrix():
    generator = torch.Generator().manual_seed(1)
    state_dict = {"unet.m.lora.down.weight": torch.randn(16, 512, generator=generator) * 3,
                  "unet.m.lora.up.weight": torch.randn(512, 16, generator=generator) * 0.01}
    before = {k: v.clone() for k, v in state_dict.items()}
    noisy = perturb_lora(state_dict, relative_noise=0.2, seed=7)
    for key, matrix in state_dict.items():
        ratio = (noisy[key] - matrix).norm() / matrix.norm()
        assert ratio == pytest.approx(0.2, rel=0.05)  # 8,192 draws: within a few percent
    assert all(torch.equal(state_dict[k], before[k]) for k in before)  # the input is left alone


def test_output_noise_is_deterministic_in_its_seed_and_zero_noise_is_a_copy():
    state_dict = {"unet.m.lora.down.weight": torch.randn(4, 32), "unet.m.lora.up.weight": torch.randn(32, 4),
                  "unet.n.lora.down.weight": torch.randn(4, 32).bfloat16(),
                  "unet.n.lora.up.weight": torch.randn(32, 4).bfloat16()}
    first, again, other = (perturb_lora(state_dict, 0.5, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(first[k], again[k]) for k in state_dict)
    assert not any(torch.equal(first[k], other[k]) for k in state_dict)
    assert all(first[k].dtype == state_dict[k].dtype for k in state_dict)
    assert all(torch.equal(perturb_lora(state_dict, 0.0)[k], v) for k, v in state_dict.items())
    with pytest.raises(InputError, match="unrecognised LoRA key"):
        perturb_lora({"model.weight": torch.ones(2, 2)}, 0.1)


# --- rank truncation -----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5])
def test_truncation_is_the_best_rank_k_approximation(k):
    generator = torch.Generator().manual_seed(k)
    down, up = torch.randn(6, 40, generator=generator), torch.randn(24, 6, generator=generator)
    new_down, new_up = truncate_pair(down, up, k)
    assert new_down.shape == (k, 40) and new_up.shape == (24, k)
    expected = best_rank_k(up.double() @ down.double(), k)
    assert torch.allclose(new_up.double() @ new_down.double(), expected, atol=1e-5)
    # Balanced factors: B'ᵀB' = A'A'ᵀ = S_k.
    assert torch.allclose(new_up.T @ new_up, new_down @ new_down.T, atol=1e-4)


def test_truncation_at_or_above_the_rank_keeps_every_product():
    generator = torch.Generator().manual_seed(0)
    state_dict = {"unet.m.lora.down.weight": torch.randn(6, 40, generator=generator),
                  "unet.m.lora.up.weight": torch.randn(24, 6, generator=generator),
                  "text_encoder.t.lora_linear_layer.down.weight": torch.randn(6, 16, generator=generator),
                  "text_encoder.t.lora_linear_layer.up.weight": torch.randn(16, 6, generator=generator)}
    for k in (6, 10):
        truncated = truncate_lora(state_dict, k)
        assert set(truncated) == set(state_dict)
        assert all(truncated[key].shape == state_dict[key].shape for key in state_dict)  # rank stays 6
        assert not torch.equal(truncated["unet.m.lora.up.weight"], state_dict["unet.m.lora.up.weight"])  # re-gauged
        assert torch.allclose(products(truncated)["m"], products(state_dict)["m"], atol=1e-4)
        text = lora_factors(truncated, "text_encoder")["t"]
        down, up = lora_factors(state_dict, "text_encoder")["t"]
        assert torch.allclose(text[1] @ text[0], up @ down, atol=1e-4)


def test_a_rank_above_the_layer_width_pads_with_zero_directions():
    down, up = torch.randn(10, 6), torch.randn(20, 10)  # rank 10 on a 6-wide input: BA has rank 6
    new_down, new_up = truncate_pair(down, up, 8)
    assert new_down.shape == (8, 6) and new_up.shape == (20, 8)
    assert torch.allclose(new_up @ new_down, up @ down, atol=1e-4)
    assert torch.count_nonzero(new_down[6:]) == 0


def test_truncated_file_keeps_keys_and_scale_and_loads_into_the_pipeline(pipe, lora_dir, tmp_path):
    original, original_meta = read_lora(lora_dir)
    out = apply_post_hoc(DefenseConfig(kind="rank_truncation", rank=2), lora_dir, tmp_path / "truncated")
    truncated, meta = read_lora(out)
    assert set(truncated) == set(original)
    summary = lora_summary(truncated, meta)
    assert summary["rank"] == 2 and summary["alpha"] == pytest.approx(ALPHA * 2 / RANK)
    assert defenses_applied(meta) == [DefenseConfig(kind="rank_truncation", rank=2)]
    assert adapter_metadata(meta)["unet.target_modules"] == adapter_metadata(original_meta)["unet.target_modules"]

    pipe.load_lora_weights(out.parent, adapter_name="truncated")
    try:
        module_path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        layer = pipe.unet.get_submodule(module_path)
        assert layer.r["truncated"] == 2
        assert layer.scaling["truncated"] == pytest.approx(ALPHA / RANK)  # the effective scale is kept
        applied = layer.lora_B["truncated"].weight.double() @ layer.lora_A["truncated"].weight.double()
        expected = best_rank_k(products(original)[module_path], 2)
        assert torch.allclose(applied, expected, atol=1e-5)
    finally:
        pipe.delete_adapters("truncated")


def test_noisy_file_records_both_defenses_in_turn_and_loads(pipe, lora_dir, tmp_path):
    first = apply_post_hoc(DefenseConfig(kind="rank_truncation", rank=4), lora_dir, tmp_path / "a.safetensors")
    noisy = apply_post_hoc(DefenseConfig(kind="output_noise", relative_noise=0.3, seed=1), first, first)
    assert noisy == first  # rewritten in place, atomically
    state_dict, meta = read_lora(noisy)
    assert [d.kind for d in defenses_applied(meta)] == ["rank_truncation", "output_noise"]
    assert json.loads(meta[DEFENSES_METADATA_KEY])[1] == {"kind": "output_noise", "relative_noise": 0.3, "seed": 1}
    pipe.load_lora_weights(noisy, adapter_name="noisy")
    pipe.delete_adapters("noisy")
    with pytest.raises(ConfigError, match="not applied to a finished LoRA"):
        apply_post_hoc(DefenseConfig(kind="dp_sgd", epsilon=1.0), lora_dir, tmp_path / "b")


def test_truncation_refuses_metadata_that_contradicts_the_matrices(tmp_path):
    state_dict = {"unet.m.lora.down.weight": torch.randn(4, 8), "unet.m.lora.up.weight": torch.randn(8, 4)}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 16, "unet.lora_alpha": 16})}
    save_file(state_dict, tmp_path / "x.safetensors", metadata=metadata)
    # The LoRA gate every reader goes through refuses it before truncation sees it.
    with pytest.raises(InputError, match="x.safetensors: the metadata states unet rank 16, but m has rank 4"):
        apply_post_hoc(DefenseConfig(kind="rank_truncation", rank=2), tmp_path / "x.safetensors", tmp_path / "y")


# --- DP accounting -------------------------------------------------------------------------------

def test_noise_multiplier_falls_as_epsilon_grows_and_is_zero_at_infinity():
    sigmas = [noise_multiplier_for(eps, 1e-5, sample_rate=0.2, steps=200) for eps in (0.5, 1.0, 2.0, 10.0)]
    assert all(a > b > 0 for a, b in zip(sigmas, sigmas[1:]))
    assert noise_multiplier_for(math.inf, 1e-5, 0.2, 200) == 0.0
    assert epsilon_spent(0.0, 1e-5, 0.2, 200) == math.inf
    for eps, sigma in zip((0.5, 1.0, 2.0, 10.0), sigmas):  # the σ found spends the budget, not more
        assert eps - 0.02 <= epsilon_spent(sigma, 1e-5, 0.2, 200) <= eps


def test_dp_plan_records_what_was_accounted_per_image_and_per_user():
    image = DPPlan.for_defense(DefenseConfig(kind="dp_sgd", epsilon=10.0), records=5, batch_size=1, steps=200)
    assert image.sample_rate == 0.2 and image.unit == "image" and image.epsilon <= 10.0
    user = DPPlan.for_defense(DefenseConfig(kind="dp_sgd", epsilon=10.0, accounting="user"),
                              records=1, batch_size=1, steps=200)
    assert user.sample_rate == 1.0  # one person, in every step: no amplification by sampling
    assert user.noise_multiplier > 2 * image.noise_multiplier
    fixed = DPPlan.for_defense(DefenseConfig(kind="dpgm", noise_multiplier=0.6), records=5, batch_size=1, steps=200)
    assert fixed.noise_multiplier == 0.6 and 10.0 < fixed.epsilon < math.inf  # the ε σ = 0.6 really costs
    assert DPPlan.for_defense(DefenseConfig(kind="dp_sgd", epsilon=math.inf), records=5, batch_size=1,
                              steps=200).summary()["epsilon"] == "inf"
    with pytest.raises(ConfigError, match="batch_size <= records"):
        DPPlan.plan(epsilon=1.0, delta=1e-5, max_grad_norm=1.0, unit="image", records=5, batch_size=8, steps=10)
    with pytest.raises(ConfigError, match="has no DP plan"):
        DPPlan.for_defense(DefenseConfig(kind="rank_truncation", rank=2), records=5, batch_size=1, steps=10)
