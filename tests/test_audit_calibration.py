"""The audit's calibration helpers (`loraleak.audit.calibration`): the AUC and its bootstrap, the
TPR >= 0.9 operating point, the negative LoRAs built from a positive's layout, and which zoo files
are the positives. A LoRA of the shipped tiny base is built by hand: no fine-tune, no zoo."""

import json

import pytest
import torch

from loraleak.audit.calibration import (bootstrap_auc, delta_norms, describe, negative_metadata, random_update_lora,
                                        roc_auc, scale_of, threshold_for_tpr, zero_update_lora, zoo_victims)
from loraleak.lora.io import (ADAPTER_METADATA_KEY, LoraProvenance, check_lora_fits, lora_provenance, lora_summary,
                              read_lora, save_lora_file)
from loraleak.zoo.manifest import write_part
from loraleak.zoo.storage import ZooStore
from test_lora_formats import pipe  # noqa: F401  (module fixture: the shipped tiny base)

RANK, ALPHA = 2, 4.0


def test_roc_auc_counts_ties_half_and_an_unscored_file_as_lowest():
    assert roc_auc([3, 2], [1, 2]) == pytest.approx(3.5 / 4)  # 3>1, 3>2, 2>1, 2=2
    assert roc_auc([1, 2], [3, 4]) == 0.0 and roc_auc([5], [1, 2]) == 1.0
    assert roc_auc([None], [0.0]) == 0.0  # a positive the scorer could not score is not flagged
    assert roc_auc([None], [None]) == 0.5 and roc_auc([0.0], [None]) == 1.0
    with pytest.raises(ValueError):
        roc_auc([], [1.0])


def test_bootstrap_interval_is_seeded_holds_the_estimate_and_collapses_when_separated():
    assert bootstrap_auc([0.5, 0.6, 0.7], [0.0, 0.1], n_boot=200) == (1.0, 1.0)
    pos, neg = [0.1, 0.4, 0.35, 0.8, 0.2, 0.6], [0.0, 0.3, 0.05, 0.5, 0.15, 0.25]
    low, high = bootstrap_auc(pos, neg, n_boot=500, seed=3)
    assert (low, high) == bootstrap_auc(pos, neg, n_boot=500, seed=3)
    assert low < roc_auc(pos, neg) < high and 0.0 <= low and high <= 1.0
    assert (low, high) != bootstrap_auc(pos, neg, n_boot=500, seed=4)


def test_the_operating_point_is_the_highest_fail_above_keeping_the_tpr():
    pos = [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.05]  # the 9th highest is 0.3
    neg = [0.0, 0.1, 0.32, 0.2]
    point = threshold_for_tpr(pos, neg, 0.9)
    assert point.fail_above == pytest.approx((0.3 + 0.2) / 2)  # halfway to the next lower score of any file
    assert point.tpr == pytest.approx(0.9) and point.fpr == pytest.approx(0.25)  # 0.32 is flagged
    assert threshold_for_tpr([0.5], [0.5], 0.9).fail_above < 0.5  # ties: flags the positive, and so the negative
    with pytest.raises(ValueError, match="no threshold"):
        threshold_for_tpr([None, None, 0.4], [0.0], 0.9)
    assert describe([0.1, None, 0.3, 0.2]) == {"n": 4, "unscored": 1, "min": 0.1, "median": 0.2, "max": 0.3}


@pytest.fixture(scope="module")
def positive(pipe, tmp_path_factory):  # noqa: F811
    """A rank-2 'fine-tune' of the tiny base's attention (diffusers keys, alpha 4, random B != 0),
    saved with the metadata a zoo file carries."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_k",
                                                                  "to_out.0")):
            state[f"unet.{name}.lora.down.weight"] = torch.randn(RANK, module.in_features, generator=g)
            state[f"unet.{name}.lora.up.weight"] = 0.05 * torch.randn(module.out_features, RANK, generator=g)
    provenance = LoraProvenance(trigger="sks", instance_prompt="A face of sks.", base_fingerprint=None, rank=RANK,
                                alpha=ALPHA, targets=("to_k", "to_out.0", "to_q", "to_v"), step=12)
    metadata = {**provenance.metadata(), "format": "pt",
                ADAPTER_METADATA_KEY: json.dumps({"unet.lora_alpha": ALPHA, "unet.r": RANK})}
    path = save_lora_file(state, metadata, tmp_path_factory.mktemp("calib") / "positive.safetensors")
    return read_lora(path)


def test_negatives_keep_the_layout_and_pass_the_loading_gate(positive, pipe, tmp_path):  # noqa: F811
    state, metadata = positive
    scale = scale_of(metadata)
    assert scale == pytest.approx(ALPHA / RANK)
    for label, tensors in (("zero", zero_update_lora(state, 7)), ("random", random_update_lora(state, scale, 7))):
        meta = negative_metadata(metadata, f"{label}000", 0)
        back, back_meta = read_lora(save_lora_file(tensors, meta, tmp_path / f"{label}.safetensors"))
        assert back.keys() == state.keys()
        assert all(back[k].shape == state[k].shape and back[k].dtype == state[k].dtype for k in state)
        check_lora_fits(back, pipe)
        summary, original = lora_summary(back, back_meta), lora_summary(state, metadata)
        assert (summary["rank"], summary["alpha"], summary["targets"]) == \
            (original["rank"], original["alpha"], original["targets"])
        provenance = lora_provenance(back_meta)
        assert provenance.trigger == f"{label}000" and provenance.instance_prompt == f"A face of {label}000."
        assert (provenance.rank, provenance.alpha, provenance.step) == (RANK, ALPHA, 0)


def test_zero_update_is_a_step_zero_lora(positive):
    state, _ = positive
    zero = zero_update_lora(state, 1)
    assert all(v.abs().max() == 0 for k, v in zero.items() if ".up." in k)
    downs = torch.cat([v.flatten() for k, v in zero.items() if ".down." in k])
    assert downs.std().item() == pytest.approx(1 / RANK, rel=0.05)  # PEFT's gaussian init
    assert all(n == 0 for n in delta_norms(zero, 2.0).values())
    assert not torch.equal(downs, torch.cat([v.flatten() for k, v in zero_update_lora(state, 2).items()
                                             if ".down." in k]))


def test_random_update_matches_every_modules_update_norm_in_another_direction(positive):
    state, metadata = positive
    scale = scale_of(metadata)
    target = delta_norms(state, scale)
    rand = random_update_lora(state, scale, 5)
    got = delta_norms(rand, scale)
    assert got.keys() == target.keys() and len(got) > 4
    assert all(got[k] == pytest.approx(target[k], rel=1e-5) for k in target)
    assert all(torch.equal(rand[k], random_update_lora(state, scale, 5)[k]) for k in rand)  # seeded
    other = random_update_lora(state, scale, 6)
    assert not torch.equal(rand[next(iter(rand))], other[next(iter(other))])
    key = next(k for k in state if ".down." in k)
    up = key.replace(".down.", ".up.")
    delta, fitted = state[up] @ state[key], rand[up] @ rand[key]
    cosine = float((delta * fitted).sum() / (delta.norm() * fitted.norm()))
    assert abs(cosine) < 0.5  # not the fine-tune's direction
    one_zero = {**state, up: torch.zeros_like(state[up])}  # a module the fine-tune left alone stays alone
    assert delta_norms(random_update_lora(one_zero, scale, 5), scale)[key] == 0


def test_positives_are_the_final_snapshots_of_finished_heldout_fine_tunes(tmp_path):
    store = ZooStore(str(tmp_path))

    def rows(lora_id, split, steps, snapshots, status="done"):
        return [{"lora_id": lora_id, "identity_id": f"id-{lora_id}", "split": split, "steps": steps,
                 "snapshot_step": r, "status": status, "lora_path": f"loras/{lora_id}/step-{r:06d}/x.safetensors"}
                for r in snapshots]

    write_part(store, "b", rows("b", "heldout", 40, [0, 20, 40]))
    write_part(store, "a", rows("a", "heldout", 40, [0, 20, 40]))
    write_part(store, "c", rows("c", "attack_train", 40, [0, 40]))
    write_part(store, "d", rows("d", "heldout", 40, [0, 20]))  # still training: no final snapshot
    write_part(store, "e", rows("e", "heldout", 40, [40], status="failed"))
    victims = zoo_victims(tmp_path)
    assert [(v.lora_id, v.step, v.split) for v in victims] == [("a", 40, "heldout"), ("b", 40, "heldout")]
    assert victims[0].path == tmp_path / "loras/a/step-000040/x.safetensors"
    assert [v.lora_id for v in zoo_victims(tmp_path, ("heldout", "attack_train"))] == ["a", "b", "c"]
