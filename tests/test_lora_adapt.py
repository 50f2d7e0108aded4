"""`lora.adapt`: a LoRA of another rank or target set re-factorised to an attack zoo's layout by SVD."""

import json

import pytest
import torch

from loraleak.errors import InputError
from loraleak.lora.adapt import TargetShape, adapt_lora, refactor_lora
from loraleak.lora.io import ADAPTER_METADATA_KEY, lora_factors

IN, OUT = 12, 10


def factors(rank, modules, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, IN, generator=g), torch.randn(OUT, rank, generator=g)) for m in modules}


def delta(down, up, scale):
    return scale * up.double() @ down.double()


def target(rank, modules):
    return {m: TargetShape(rank, IN, OUT) for m in modules}


@pytest.mark.parametrize("rank, zoo_rank", [(2, 2), (2, 4), (3, 8)])
def test_without_rank_reduction_the_update_is_unchanged(rank, zoo_rank):
    lora = factors(rank, ["a.to_q", "a.to_v"])
    scale, zoo_scale = 6 / rank, 27 / zoo_rank  # alpha 6 against the zoo's alpha 27: another scale too
    adapted = refactor_lora(lora, scale, target(zoo_rank, ["a.to_q", "a.to_v"]), zoo_scale)
    assert not adapted.changed and adapted.discarded_energy == pytest.approx(0.0, abs=1e-9)
    for m, (down, up) in adapted.factors.items():
        assert down.shape == (zoo_rank, IN) and up.shape == (OUT, zoo_rank)
        assert torch.allclose(delta(down, up, zoo_scale), delta(*lora[m], scale), atol=1e-5)
        # √S split into both factors: B'ᵀB' = A'A'ᵀ (balanced)
        assert torch.allclose(up.T @ up, down @ down.T, atol=1e-4)


def test_truncation_error_is_the_discarded_singular_values_energy():
    lora = factors(6, ["m.to_q", "m.to_k"], seed=1)
    scale, zoo_scale = 0.5, 2.0
    adapted = refactor_lora(lora, scale, target(2, ["m.to_q", "m.to_k"]), zoo_scale)
    assert adapted.truncated == ("m.to_k", "m.to_q")
    error = total = discarded = 0.0
    for m, (down, up) in adapted.factors.items():
        full = delta(*lora[m], scale)
        s = torch.linalg.svdvals(full)
        discarded += float((s[2:] ** 2).sum())
        total += float((s ** 2).sum())
        error += float(((full - delta(down, up, zoo_scale)) ** 2).sum())
        # The best rank-2 approximation (Eckart–Young): the top two singular values survive exactly.
        assert torch.allclose(torch.linalg.svdvals(delta(down, up, zoo_scale))[:2], s[:2], rtol=1e-5)
    assert error == pytest.approx(discarded, rel=1e-6)
    assert adapted.discarded_energy == pytest.approx(discarded, rel=1e-6)
    assert adapted.total_energy == pytest.approx(total, rel=1e-6)
    assert "truncated 2 module(s) to the zoo's rank 2" in adapted.notes(2)[0]


def test_missing_targets_get_zero_blocks_and_extra_targets_are_dropped_with_a_warning_line():
    lora = factors(2, ["b.to_q", "b.proj_in"])
    adapted = refactor_lora(lora, 1.0, target(4, ["b.to_q", "b.to_v"]), 1.0)
    assert list(adapted.factors) == ["b.to_q", "b.to_v"]
    assert adapted.zeroed == ("b.to_v",) and adapted.dropped == ("b.proj_in",)
    down, up = adapted.factors["b.to_v"]
    assert down.shape == (4, IN) and up.shape == (OUT, 4) and not down.any() and not up.any()
    notes = adapted.notes()
    assert any(line.startswith("dropped 1 module(s)") and "b.proj_in" in line for line in notes)
    assert all("\n" not in line for line in notes)


def test_the_factorisation_is_deterministic_and_sign_fixed():
    lora = factors(3, ["c.to_q"], seed=4)
    one = refactor_lora(lora, 1.0, target(2, ["c.to_q"]), 1.0).factors["c.to_q"]
    flipped = {"c.to_q": (-lora["c.to_q"][0], -lora["c.to_q"][1])}  # the same ΔW
    two = refactor_lora(flipped, 1.0, target(2, ["c.to_q"]), 1.0).factors["c.to_q"]
    assert torch.allclose(one[0], two[0], atol=1e-6) and torch.allclose(one[1], two[1], atol=1e-6)
    up = one[1]
    assert all(float(up[up[:, j].abs().argmax(), j]) > 0 for j in range(up.shape[1]))


def test_another_base_or_no_shared_module_is_refused_in_one_line():
    lora = factors(2, ["d.to_q"])
    with pytest.raises(InputError, match="another base") as e:
        refactor_lora(lora, 1.0, {"d.to_q": TargetShape(2, IN + 1, OUT)}, 1.0, what="x.safetensors")
    assert "\n" not in str(e.value) and str(e.value).startswith("x.safetensors")
    with pytest.raises(InputError, match="shares no LoRA module"):
        refactor_lora(lora, 1.0, target(2, ["e.to_q"]), 1.0)


def test_adapt_lora_writes_the_zoos_rank_and_alpha_into_the_metadata():
    lora = factors(4, ["f.to_q", "f.to_k"])
    state_dict = {}
    for m, (down, up) in lora.items():
        state_dict[f"unet.{m}.lora.down.weight"], state_dict[f"unet.{m}.lora.up.weight"] = down, up
    metadata = {"format": "pt", "loraleak_trigger": "xyz",
                ADAPTER_METADATA_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": ["to_k", "to_q"],
                                                  "text_encoder.r": 4})}
    out, meta, adapted = adapt_lora(state_dict, metadata, target(8, ["f.to_q"]), target_alpha=4)
    stored = json.loads(meta[ADAPTER_METADATA_KEY])
    assert stored["unet.r"] == 8 and stored["unet.lora_alpha"] == 4 and stored["unet.target_modules"] == ["to_q"]
    assert "text_encoder.r" not in stored and meta["loraleak_trigger"] == "xyz"
    (down, up), = lora_factors(out).values()
    assert torch.allclose(delta(down, up, 4 / 8), delta(*lora["f.to_q"], 8 / 4), atol=1e-5)
    assert adapted.dropped == ("f.to_k",)
