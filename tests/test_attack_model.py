"""The attack's model core on the tiny base: LoRA inputs, the network autoencoder, batched LoRA decoding."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from loraleak.attack import (AttackModelConfig, MatrixSpec, NetworkAutoencoder, canonical_factors,
                             collate_lora_matrices, lora_layout, lora_matrices)
from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
from loraleak.config import from_dict
from loraleak.errors import ConfigError, InputError
from loraleak.lora.batched import BatchedLoRALinear, batched_lora, epsilon_loss, lora_scale, stack_lora_factors
from loraleak.lora.io import loaded_adapters, read_lora

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# (rank, alpha) of three victims: different scales, and one of another rank (padded in a batch).
VICTIMS = ((4, 6), (4, 4), (2, 3))


def save_lora(pipe, out_dir, rank, alpha, seed, targets=TARGETS, b_std=0.1):
    """A diffusers-format LoRA file as the victim's fine-tune writes it; B drawn large so it matters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                         target_modules=list(targets)))
        init = {k.removeprefix("unet."): v.clone()  # the peft state dict shares the parameters' storage
                for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)).items()}
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0.0, b_std)
            elif "lora_A" in name:
                p.data.add_(0.1 * torch.randn_like(p))
    type(pipe).save_lora_weights(out_dir, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(pipe.unet)), unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    pipe.unload_lora_weights()
    return out_dir, init


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attack-loras")
    pipe = build_tiny_pipeline(TinyBaseConfig(), seed=0)
    pipe.unet.requires_grad_(False)
    loras = []
    for i, (rank, alpha) in enumerate(VICTIMS):
        path, init = save_lora(pipe, tmp / f"lora-{i}", rank, alpha, seed=10 + i)
        state_dict, metadata = read_lora(path)
        loras.append(SimpleNamespace(path=path, state_dict=state_dict, metadata=metadata, init=init))
    qv_path, qv_init = save_lora(pipe, tmp / "lora-qv", 4, 6, seed=20, targets=("to_q", "to_v"))
    qv_state_dict, qv_metadata = read_lora(qv_path)
    qv = SimpleNamespace(path=qv_path, state_dict=qv_state_dict, metadata=qv_metadata, init=qv_init)
    assert not loaded_adapters(pipe)
    return SimpleNamespace(pipe=pipe, loras=loras, qv=qv, tmp=tmp)


def encoder_for(zoo, lora=None, **config):
    torch.manual_seed(0)
    layout = lora_layout((lora or zoo.loras[0]).state_dict)
    return NetworkAutoencoder.from_pipeline(zoo.pipe, layout, AttackModelConfig(**config))


def inputs_for(loras, mode="delta"):
    return collate_lora_matrices([lora_matrices(l.state_dict, mode, l.init) for l in loras])


# --- LoRA inputs ---------------------------------------------------------------------------------


def test_layout_is_ordered_by_module_with_a_before_b_and_rank_as_channels(zoo):
    lora = zoo.loras[0]
    layout = lora_layout(lora.state_dict)
    assert len(layout) == 2 * len({s.module for s in layout})
    assert [s.factor for s in layout[:4]] == ["A", "B", "A", "B"]
    modules = [s.module for s in layout[::2]]
    assert modules[0].startswith("down_blocks") and modules[-1].startswith("up_blocks")
    assert all(m.endswith(TARGETS) for m in modules) and len(modules) == len(set(modules))
    to_k = zoo.pipe.unet.get_submodule(next(m for m in modules if "attn2.to_k" in m))
    first_to_k = next(i for i, s in enumerate(layout) if "attn2.to_k" in s.module)
    assert layout[first_to_k].length == to_k.in_features == zoo.pipe.text_encoder.config.hidden_size
    matrices = lora_matrices(lora.state_dict, "raw")
    for spec, matrix in zip(layout, matrices):
        assert matrix.shape == (spec.rank, spec.length)  # A as is, B transposed


def test_delta_subtracts_the_initial_lora_and_without_it_only_b_is_a_delta(zoo):
    lora = zoo.loras[0]
    raw = lora_matrices(lora.state_dict, "raw")
    delta = lora_matrices(lora.state_dict, "delta", lora.init)
    init = lora_matrices(lora.init, "raw")
    for r, d, i in zip(raw, delta, init):
        torch.testing.assert_close(d, r - i)
    assert all(i.abs().sum() == 0 for i in init[1::2])  # peft initialises B to zero
    assert all(i.abs().sum() > 0 for i in init[0::2])
    no_init = lora_matrices(lora.state_dict, "delta")
    for r, n in zip(raw, no_init):
        torch.testing.assert_close(n, r)  # B - 0 = B; A_0 unknown, A stays raw


def random_invertible(rank, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64))
    scales = torch.linspace(0.5, 2.0, rank, dtype=torch.float64)
    return (q * scales) @ torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64))[0]


def reparametrised(state_dict, seed):
    """The same LoRA written as (B G⁻¹, G A): every product B A is unchanged."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("lora.down.weight"):
            up_key = key.replace("lora.down.weight", "lora.up.weight")
            g = random_invertible(value.shape[0], seed)
            out[key] = (g @ value.double()).float()
            out[up_key] = (state_dict[up_key].double() @ torch.linalg.inv(g)).float()
    return out


def test_gl_invariant_input_ignores_the_lora_symmetry_and_raw_does_not(zoo):
    lora = zoo.loras[0]
    moved = reparametrised(lora.state_dict, seed=3)
    for key, value in lora.state_dict.items():  # the merged updates really are the same
        if key.endswith("lora.down.weight"):
            up = key.replace("lora.down.weight", "lora.up.weight")
            torch.testing.assert_close(moved[up] @ moved[key], lora.state_dict[up] @ value, atol=1e-5, rtol=1e-4)
    model = encoder_for(zoo, input_mode="gl_invariant").eval()
    steps = torch.tensor([100])
    with torch.no_grad():
        for mode, same in (("gl_invariant", True), ("raw", False)):
            a = collate_lora_matrices([lora_matrices(lora.state_dict, mode)])
            b = collate_lora_matrices([lora_matrices(moved, mode)])
            tokens_a, tokens_b = model._tokens(a, steps), model._tokens(b, steps)
            if same:
                torch.testing.assert_close(tokens_a, tokens_b, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(model.encode_mean(a, steps), model.encode_mean(b, steps),
                                           atol=1e-4, rtol=1e-4)
            else:
                assert (tokens_a - tokens_b).abs().max() > 1e-2


def test_canonical_factors_keep_the_product_and_fix_signs():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 48, generator=g), torch.randn(40, 4, generator=g)
    new_down, new_up = canonical_factors(down, up)
    torch.testing.assert_close(new_up @ new_down, up @ down, atol=1e-4, rtol=1e-4)
    u = new_up / new_up.norm(dim=0)
    assert torch.allclose(u.T @ u, torch.eye(4), atol=1e-5)  # orthogonal columns: an SVD basis
    assert (u[u.abs().argmax(dim=0), torch.arange(4)] > 0).all()
    zero_down, zero_up = canonical_factors(down, torch.zeros(40, 4))  # the untrained LoRA: B = 0
    assert zero_down.abs().max() == 0 and zero_up.abs().max() == 0
    wide_down, wide_up = canonical_factors(torch.randn(8, 3, generator=g), torch.randn(5, 8, generator=g))
    assert wide_down.shape == (8, 3) and wide_up.shape == (5, 8)  # rank above a side: zero-padded


def test_a_lora_of_another_layout_is_refused(zoo):
    layout = lora_layout(zoo.loras[0].state_dict)
    other = zoo.qv.state_dict
    with pytest.raises(InputError, match="LoRA matrices, the attack expects"):
        lora_matrices(other, "delta", layout=layout)
    with pytest.raises(InputError, match="rank 2"):
        lora_matrices(zoo.loras[2].state_dict, "delta", layout=layout)
    with pytest.raises(InputError, match="different layouts"):
        collate_lora_matrices([lora_matrices(zoo.loras[0].state_dict, "raw"), lora_matrices(other, "raw")])


# --- the network autoencoder ---------------------------------------------------------------------


def test_z_has_the_shape_of_the_bases_prompt_embedding(zoo):
    model = encoder_for(zoo)
    pipe = zoo.pipe
    x = inputs_for(zoo.loras[:2])
    out = model(x, torch.tensor([10, 500]))
    shape = (2, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
    assert out.z.shape == out.mu.shape == out.logvar.shape == shape
    prompt = pipe.encode_prompt("A face of sks.", "cpu", 1, False)[0]
    assert out.z.shape[1:] == prompt.shape[1:]
    assert out.kl.ndim == 0 and torch.isfinite(out.kl) and out.kl > 0
    assert not torch.equal(out.z, out.mu)  # sampled
    torch.testing.assert_close(model.encode_mean(x, torch.tensor([10, 500])), out.mu)


def test_step_embedding_changes_z_and_switching_it_off_drops_the_token(zoo):
    x = inputs_for([zoo.qv])
    model = encoder_for(zoo, zoo.qv).eval()
    assert model.num_pad == 77 - 2 - len(model.layout) > 0
    with torch.no_grad():
        early, late = model.encode_mean(x, torch.tensor([10])), model.encode_mean(x, torch.tensor([900]))
    assert (early - late).abs().max() > 1e-3
    with pytest.raises(InputError, match="fine-tuning step"):
        model(x)
    plain = encoder_for(zoo, zoo.qv, step_embedding=False).eval()
    assert plain.num_pad == model.num_pad + 1  # one token fewer before padding to the prompt length
    assert model._tokens(x, torch.tensor([10])).shape[1] == plain._tokens(x, None).shape[1] == 77
    assert not any("step" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_mean(x, torch.tensor([10])), plain.encode_mean(x, torch.tensor([900])))


def test_causal_attention_hides_later_tokens_and_bidirectional_does_not(zoo):
    base = lora_matrices(zoo.qv.state_dict, "raw")
    changed = list(base)
    changed[-1] = changed[-1] + torch.randn_like(changed[-1])  # the last matrix token
    last_matrix = 2 + len(base) - 1  # after the task and step tokens
    for attention, positions in (("causal", "clip"), ("bidirectional", "learned")):
        model = encoder_for(zoo, zoo.qv, attention=attention, positions=positions).eval()
        with torch.no_grad():
            a = model.encode_mean(collate_lora_matrices([base]), torch.tensor([5]))
            b = model.encode_mean(collate_lora_matrices([changed]), torch.tensor([5]))
        earlier = (a[:, :last_matrix] - b[:, :last_matrix]).abs().max()
        assert (earlier == 0) if attention == "causal" else (earlier > 1e-4)
        assert (a[:, last_matrix:] - b[:, last_matrix:]).abs().max() > 1e-4


def test_positions_are_added_to_the_tokens(zoo):
    x, steps = inputs_for([zoo.qv]), torch.tensor([5])
    with torch.no_grad():
        plain = encoder_for(zoo, zoo.qv).eval().encode_mean(x, steps)
        clip = encoder_for(zoo, zoo.qv, positions="clip").eval().encode_mean(x, steps)
        learned_model = encoder_for(zoo, zoo.qv, positions="learned").eval()
        torch.testing.assert_close(learned_model.encode_mean(x, steps), plain)  # the table starts at zero
        learned_model.position_embedding.normal_()
        learned = learned_model.encode_mean(x, steps)
    assert (clip - plain).abs().max() > 1e-3 and (learned - plain).abs().max() > 1e-3


def test_too_many_tokens_for_causal_attention_or_clip_positions_are_refused(zoo):
    layout = tuple(MatrixSpec(f"m{i}", "A", 2, 8) for i in range(80))
    for config in (dict(attention="causal"), dict(positions="clip")):
        with pytest.raises(ConfigError, match="77"):
            NetworkAutoencoder.from_pipeline(zoo.pipe, layout, AttackModelConfig(**config))
    model = NetworkAutoencoder.from_pipeline(zoo.pipe, layout, AttackModelConfig(positions="learned"))
    x = [torch.randn(1, 2, 8) for _ in layout]
    assert model.encode_mean(x, torch.tensor([1])).shape == (1, 77, 128)  # the first 77 of 82 tokens


def test_config_is_validated_at_the_edge():
    with pytest.raises(ConfigError, match="input_mode"):
        from_dict(AttackModelConfig, {"input_mode": "weights"})
    with pytest.raises(ConfigError, match="kl_weight"):
        from_dict(AttackModelConfig, {"kl_weight": -1})
    assert from_dict(AttackModelConfig, {"kl_weight": "1e-4"}).kl_weight == 1e-4


def test_save_and_load_round_trip_and_refuse_another_text_encoder(zoo, tmp_path):
    model = encoder_for(zoo, input_mode="gl_invariant", kl_weight=0.1).eval()
    x, steps = inputs_for(zoo.loras[:2], "gl_invariant"), torch.tensor([3, 7])
    model.save_pretrained(tmp_path / "attack")
    assert sorted(p.name for p in (tmp_path / "attack").iterdir()) == ["config.json", "model.safetensors"]
    loaded = NetworkAutoencoder.from_pretrained(tmp_path / "attack", zoo.pipe.text_encoder).eval()
    assert loaded.config == model.config and loaded.layout == model.layout
    with torch.no_grad():
        assert torch.equal(loaded.encode_mean(x, steps), model.encode_mean(x, steps))
    with safe_open(tmp_path / "attack" / "model.safetensors", framework="pt") as f:
        assert f.keys() and not any(k.startswith("text_encoder.") for k in f.keys())  # CLIP comes from the base
    other = build_tiny_pipeline(TinyBaseConfig(), seed=1).text_encoder
    with pytest.raises(InputError, match="another base's text encoder"):
        NetworkAutoencoder.from_pretrained(tmp_path / "attack", other)


def test_loading_refuses_what_is_not_a_saved_attack_model_in_one_line(zoo, tmp_path):
    import json

    saved = encoder_for(zoo).save_pretrained(tmp_path / "attack")
    config = json.loads((saved / "config.json").read_text())

    def refused(message: str) -> None:
        with pytest.raises(InputError, match=message) as error:
            NetworkAutoencoder.from_pretrained(saved, zoo.pipe.text_encoder)
        assert "\n" not in str(error.value)

    (saved / "config.json").write_text(json.dumps({"kind": "pca_map", "format_version": 1}))  # a baseline's
    refused("is not a saved attack model")
    (saved / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    refused("format version 99, this code reads version 1")
    (saved / "config.json").write_text(json.dumps(config))
    torch.save({"weights": torch.zeros(2)}, saved / "model.safetensors")  # a pickle under the right name
    refused("cannot read .*model.safetensors")
    (saved / "config.json").unlink()
    refused("cannot read config.json")


# --- batched LoRA decoding -----------------------------------------------------------------------


def test_lora_scale_comes_from_the_files_metadata(zoo):
    for lora, (rank, alpha) in zip(zoo.loras, VICTIMS):
        assert lora_scale(lora.metadata) == alpha / rank
    with pytest.raises(InputError, match="alpha"):
        lora_scale({})
    assert lora_scale({}, alpha=27, rank=16) == 27 / 16


def diffusers_outputs(pipe, loras, latents, timesteps, cond):
    """Reference: each sample through its own LoRA loaded by diffusers' `load_lora_weights`."""
    outs = []
    for i, (lora, lat, t, c) in enumerate(zip(loras, latents, timesteps, cond)):
        pipe.load_lora_weights(lora.path, adapter_name=f"victim{i}")
        with torch.no_grad():
            outs.append(pipe.unet(lat[None], t, c[None]).sample)
        pipe.unload_lora_weights()
    return torch.cat(outs)


def test_batched_lora_equals_each_lora_loaded_by_diffusers(zoo):
    pipe, loras = zoo.pipe, zoo.loras
    g = torch.Generator().manual_seed(0)
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    latents = torch.randn(3, channels, size, size, generator=g)
    timesteps = torch.tensor([10, 500, 990])
    cond = torch.randn(3, 77, pipe.unet.config.cross_attention_dim, generator=g)
    expected = diffusers_outputs(pipe, loras, latents, timesteps, cond)
    factors = stack_lora_factors([l.state_dict for l in loras])
    scales = [lora_scale(l.metadata) for l in loras]
    with torch.no_grad():
        with batched_lora(pipe.unet, factors, scales):
            got = pipe.unet(latents, timesteps, cond).sample
            # classifier-free-guidance layout: the batch twice over, sample j uses LoRA j mod 3
            doubled = pipe.unet(torch.cat([latents] * 2), timesteps.repeat(2), cond.repeat(2, 1, 1)).sample
        base = pipe.unet(latents, timesteps, cond).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(doubled, torch.cat([expected] * 2), atol=1e-5, rtol=1e-4)
    assert (got - base).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # every LoRA changes its sample
    assert not any(isinstance(m, BatchedLoRALinear) for m in pipe.unet.modules())  # base restored


def test_gradients_reach_the_encoder_but_not_the_frozen_clip_or_unet(zoo):
    pipe = zoo.pipe
    pipe.unet.requires_grad_(True)  # even a UNet left trainable is frozen while decoding
    try:
        model = encoder_for(zoo, kl_weight=1e-6).train()
        assert not pipe.text_encoder.training  # the frozen CLIP stays in eval mode
        loras = zoo.loras[:2]
        out = model(inputs_for(loras), torch.tensor([100, 1000]))
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        latents = torch.randn(2, 4, 16, 16)
        terms = epsilon_loss(pipe.unet, scheduler, latents, out.z, stack_lora_factors([l.state_dict for l in loras]),
                             [lora_scale(l.metadata) for l in loras], torch.Generator().manual_seed(0),
                             kl=out.kl, kl_weight=model.config.kl_weight,
                             target_embeds=torch.zeros_like(out.z), embedding_mse_weight=0.5)
        terms.total.backward()
        expected = terms.epsilon + 1e-6 * out.kl + 0.5 * terms.embedding_mse
        torch.testing.assert_close(terms.total, expected)
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        for prefix in ("matrix_encoders", "task_token", "step_embedding", "input_norm", "to_mu", "to_logvar"):
            assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
        assert all(p.grad is None and not p.requires_grad for p in pipe.text_encoder.parameters())
        assert all(p.grad is None for p in pipe.unet.parameters())
        assert all(p.requires_grad for p in pipe.unet.parameters())  # the caller's flags are back
    finally:
        pipe.unet.requires_grad_(False)


def test_a_short_optimisation_on_two_fixed_loras_lowers_the_loss(zoo):
    """30 AdamW steps (the paper's lr) on 2 LoRAs, each with its own image, against one fixed draw of
    noise and timesteps: a random UNet reads its conditioning weakly, so the loss averaged over
    fresh draws moves too little to test in 30 steps; a fixed draw makes the objective z's alone."""
    pipe, loras = zoo.pipe, zoo.loras[:2]
    model = encoder_for(zoo)
    x, steps = inputs_for(loras), torch.tensor([1000, 1000])
    factors = stack_lora_factors([l.state_dict for l in loras])
    scales = [lora_scale(l.metadata) for l in loras]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def loss_of(z):
        return epsilon_loss(pipe.unet, scheduler, latents, z, factors, scales, torch.Generator().manual_seed(7)).total

    with torch.no_grad():
        before = loss_of(model.encode_mean(x, steps)).item()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=5e-3, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        loss = loss_of(model(x, steps, generator=generator).z)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_of(model.encode_mean(x, steps)).item()
    assert after < 0.95 * before, (before, after)


def test_mismatched_factors_are_refused(zoo):
    factors = stack_lora_factors([l.state_dict for l in zoo.loras])
    with pytest.raises(InputError, match="3 LoRAs"):
        with batched_lora(zoo.pipe.unet, factors, [1.0, 2.0]):
            pass
    wrong = {"down_blocks.9.nothing": next(iter(factors.values()))}
    with pytest.raises(InputError, match="no module"):
        with batched_lora(zoo.pipe.unet, wrong, 1.0):
            pass
    with pytest.raises(InputError, match="other modules"):
        stack_lora_factors([zoo.loras[0].state_dict, zoo.qv.state_dict])
    assert not any(isinstance(m, BatchedLoRALinear) for m in zoo.pipe.unet.modules())


def test_config_dataclass_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AttackModelConfig().kl_weight = 1.0
