"""The baseline attacks on a real (tiny) zoo: nearest neighbour, PCA map, matching model updates.

One tiny base and one zoo (5 synthetic identities: 4 attack_train, 1 heldout; rank-2 LoRAs on
to_q/to_v, 5 steps) built by the zoo module serve the file, as in test_attack_train. An untrained
UNet barely reads its conditioning, so the base's cross-attention outputs are amplified. Every
baseline is fitted on a copy of the zoo whose heldout LoRA files are garbage: fitting must never
read them.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loraleak.attack.api import LoraInput
from loraleak.attack.loading import load_attack
from loraleak.attack.baselines import (BaselineConfig, MatchingUpdatesAttack, MatchingUpdatesConfig,
                                       NearestNeighbourAttack, PcaMapAttack, build_baseline, fit_baseline)
from loraleak.attack.baselines.features import delta_w_features, sketch_matrices
from loraleak.attack.lora_inputs import lora_layout
from loraleak.base.loading import load_base_pipeline
from loraleak.base.tiny import build_tiny_pipeline
from loraleak.config import from_dict
from loraleak.errors import ConfigError, InputError
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.lora.io import lora_factors
from loraleak.identities import SyntheticFaces, make_source
from loraleak.zoo.manifest import read_manifest
from studies import TINY, TINY_ZOO_FINETUNE, TINY_ZOO_IDENTITIES, build_tiny_zoo

IDENTITIES, FINETUNE = TINY_ZOO_IDENTITIES, TINY_ZOO_FINETUNE
MATCHING = {"steps": 3, "num_images": 1, "timesteps": [500]}  # enough to run; the inversion test runs longer


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_tiny_zoo(tmp_path_factory.mktemp("baseline-zoo"))


@pytest.fixture(scope="module")
def pipe(zoo):
    return load_base_pipeline(zoo.base)


def final_rows(zoo, split: str) -> list[dict]:
    rows = read_manifest(zoo.root).to_pylist()
    return [r for r in rows if r["split"] == split and r["snapshot_step"] == r["steps"]]


def lora_of(zoo, row) -> LoraInput:
    return LoraInput.from_file(Path(zoo.root) / row["lora_path"])


@pytest.fixture(scope="module")
def fitting_zoo(zoo, tmp_path_factory) -> str:
    """A copy of the zoo whose heldout LoRA files are not LoRAs at all."""
    root = tmp_path_factory.mktemp("fitting") / "zoo"
    shutil.copytree(zoo.root, root)
    heldout = [r for r in read_manifest(str(root)).to_pylist() if r["split"] == "heldout"]
    assert heldout
    for row in heldout:
        (root / row["lora_path"]).write_bytes(b"heldout: never read while fitting")
    return str(root)


def baseline_config(zoo, root: str, kind: str, out: Path, **overrides) -> BaselineConfig:
    return from_dict(BaselineConfig, {"kind": kind, "zoo": root, "base": zoo.base, "out_dir": str(out),
                                      **overrides})


@pytest.fixture(scope="module")
def fitted(zoo, fitting_zoo, pipe, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("baselines")
    settings = {"nearest_neighbour": {}, "pca_map": {"components": 3, "ridge": 1e-4}, "matching_updates": MATCHING}
    return {kind: fit_baseline(baseline_config(zoo, fitting_zoo, kind, out / kind, settings=s), pipe,
                               show_progress=False)
            for kind, s in settings.items()}


@pytest.fixture(scope="module")
def misfits(zoo, pipe, tmp_path_factory) -> dict[str, LoraInput]:
    """One-step LoRAs of the same base that another layout: rank 4, or targets to_k/to_v."""
    images = SyntheticFaces(1, 2, seed=3, namespace="other").identities()[0].load(TINY.resolution)
    loras = {}
    for name, change in {"rank 4": {"rank": 4, "alpha": 4}, "to_k/to_v": {"targets": ["to_k", "to_v"]}}.items():
        out = tmp_path_factory.mktemp("misfit")
        ft = from_dict(FinetuneConfig, {**FINETUNE, "steps": 1, **change})
        result = finetune_lora(pipe, images, ft, out, base_ref=zoo.base, show_progress=False)
        loras[name] = LoraInput.from_file(result.snapshots[-1][1])
    return loras


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"kind": "knn"}, "kind"),
    ({"settings": {"k": 3}}, "settings: unknown key 'k' for PcaMapConfig"),
    ({"settings": {"components": 0}}, "components must be >= 1"),
    ({"max_samples": 0}, "max_samples must be >= 1"),
])
def test_config_rejects_bad_settings_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as error:
        from_dict(BaselineConfig, {"kind": "pca_map", "zoo": "zoo", **change})
    assert "\n" not in str(error.value)


# --- nearest neighbour ---------------------------------------------------------------------------

def test_nearest_neighbour_answers_with_the_photos_of_the_nearest_identity(zoo, fitted, pipe):
    attack = load_attack(fitted["nearest_neighbour"], pipe)
    assert isinstance(attack, NearestNeighbourAttack)
    identities = {i.identity_id: i for i in make_source(zoo.identities).identities()}
    train, heldout = final_rows(zoo, "attack_train"), final_rows(zoo, "heldout")
    assert sorted(attack.lora_ids) == sorted(r["lora_id"] for r in train)
    assert heldout[0]["identity_id"] not in attack.identity_ids
    for row in train:
        photos = [np.asarray(im) for im in identities[row["identity_id"]].load(TINY.resolution)]
        out = attack.reconstruct(lora_of(zoo, row), n=5, seed=1)
        assert out.prompt_embeds is None and len(out.images) == 5
        # Its own LoRA is indexed: the nearest is itself, and its photos come back cycled from photo `seed`.
        assert attack.nearest(lora_of(zoo, row)).lora_id == row["lora_id"]
        for i, image in enumerate(out.images):
            np.testing.assert_array_equal(np.asarray(image), photos[(1 + i) % len(photos)])
    # A held-out person is answered with some attack-train identity's photos (a look-alike at best).
    answer = attack.nearest(lora_of(zoo, heldout[0]))
    assert answer.identity_id in attack.identity_ids and -1.0 <= answer.similarity < 1.0


def gl_transformed(lora: LoraInput, seed: int) -> LoraInput:
    """(B, A) -> (B G⁻¹, G A) with a random invertible G per module: the same ΔW, other factors."""
    generator = torch.Generator().manual_seed(seed)
    state = dict(lora.state_dict)
    suffixes = {".lora.down.weight": ".lora.up.weight", ".lora_A.weight": ".lora_B.weight"}
    for key, tensor in lora.state_dict.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is not None:
            up_key = key[: -len(suffix)] + suffixes[suffix]
            rank = tensor.shape[0]
            g = torch.eye(rank, dtype=torch.float64) * 2 + torch.randn(rank, rank, generator=generator,
                                                                        dtype=torch.float64)
            state[key] = (g @ tensor.double()).float()
            state[up_key] = (lora.state_dict[up_key].double() @ torch.linalg.inv(g)).float()
    return LoraInput(state, lora.metadata)


@pytest.mark.parametrize("sketch_size", [None, 8])  # exact ΔW, and ΔW sketched from 32 to 8 per side
def test_nearest_neighbour_is_invariant_to_the_lora_symmetry(zoo, fitting_zoo, pipe, sketch_size, tmp_path):
    cfg = baseline_config(zoo, fitting_zoo, "nearest_neighbour", tmp_path, settings={"sketch_size": sketch_size})
    attack = build_baseline(cfg, pipe, show_progress=False)
    assert bool(attack.sketches) == (sketch_size is not None)
    for k, row in enumerate(final_rows(zoo, "attack_train")):
        lora = lora_of(zoo, row)
        moved = gl_transformed(lora, seed=k)
        before = torch.cat([f.reshape(-1) for pair in lora_factors(lora.state_dict).values() for f in pair])
        after = torch.cat([f.reshape(-1) for pair in lora_factors(moved.state_dict).values() for f in pair])
        assert F.cosine_similarity(before, after, dim=0) < 0.9  # the factors really changed
        torch.testing.assert_close(attack._features(moved), attack._features(lora), rtol=1e-4, atol=1e-6)
        match = attack.nearest(moved)
        assert match.lora_id == row["lora_id"] and match.similarity == pytest.approx(1.0, abs=1e-4)


def test_sketched_features_keep_inner_products_of_the_full_update(zoo):
    rows = final_rows(zoo, "attack_train")
    loras = [lora_of(zoo, r) for r in rows[:2]]
    layout = lora_layout(loras[0].state_dict)
    exact = [delta_w_features(lo.state_dict, lo.metadata, layout, {}, normalise=True) for lo in loras]
    sketched = [delta_w_features(lo.state_dict, lo.metadata, layout, sketch_matrices(layout, 24, seed=0),
                                 normalise=True) for lo in loras]
    assert sketched[0].numel() < exact[0].numel()
    # Johnson-Lindenstrauss: the cosine of two LoRAs survives the sketch approximately.
    assert float(sketched[0] @ sketched[1]) == pytest.approx(float(exact[0] @ exact[1]), abs=0.15)


# --- PCA map -------------------------------------------------------------------------------------

def test_pca_map_maps_each_training_lora_near_its_own_prompt_and_round_trips(zoo, fitted, pipe, tmp_path):
    cfg = baseline_config(zoo, zoo.root, "pca_map", tmp_path / "unused",
                          settings={"components": 3, "ridge": 1e-4})
    attack = build_baseline(cfg, pipe, show_progress=False)
    assert attack.record["fit"]["components"] == 3 and 0 < attack.record["fit"]["explained_variance"] <= 1
    train = final_rows(zoo, "attack_train")
    with torch.no_grad():
        targets = pipe.encode_prompt([r["instance_prompt"] for r in train], "cpu", 1, False)[0].float()
    for k, row in enumerate(train):
        embeds = attack.reconstruct(lora_of(zoo, row)).prompt_embeds
        assert embeds.shape == (77, TINY.text_width)
        # k = N - 1 components and almost no ridge: the map interpolates its training pairs.
        distances = (targets - embeds).flatten(1).norm(dim=1)
        assert int(distances.argmin()) == k

    attack.save_pretrained(tmp_path / "pca")
    loaded = load_attack(tmp_path / "pca", pipe)
    assert isinstance(loaded, PcaMapAttack)
    heldout = lora_of(zoo, final_rows(zoo, "heldout")[0])
    assert torch.equal(loaded.reconstruct(heldout).prompt_embeds, attack.reconstruct(heldout).prompt_embeds)
    # The same fit from the zoo copy whose heldout files are garbage: identical maps.
    from_copy = load_attack(fitted["pca_map"], pipe)
    torch.testing.assert_close(from_copy.reconstruct(heldout).prompt_embeds,
                               attack.reconstruct(heldout).prompt_embeds)


def test_pca_map_refuses_a_base_with_another_text_encoder(fitted):
    other = build_tiny_pipeline(TINY, seed=1)
    with pytest.raises(InputError, match="another base's prompt space"):
        load_attack(fitted["pca_map"], other)


# --- matching model updates ----------------------------------------------------------------------

def test_matching_updates_inverts_a_known_single_step_towards_its_prompt(zoo, pipe, tmp_path):
    """A real one-step fine-tune from the known prompt "A face of sks.": its B is −lr · (Adam-normalised)
    gradient taken at its A, exactly what the baseline simulates. The full 77 x W embedding is not
    identifiable from a rank-8 update (the B matrices hold fewer numbers than z), and Adam wanders
    in the directions the update says nothing about, so z's distance is no measure. What a B update
    of a cross-attention value does pin down is the attention-weighted sum of z's tokens, which for
    an untrained UNet's near-uniform attention is the mean token: its direction must move towards
    the true one. (Rank 8: four cross-attention value LoRAs then see 4 x 8 projections of the
    32-wide mean token; at rank 2 they see 8 and the direction is not pinned down.)"""
    images = SyntheticFaces(1, 2, seed=3, namespace="other").identities()[0].load(TINY.resolution)
    ft = from_dict(FinetuneConfig, {**FINETUNE, "rank": 8, "alpha": 8, "steps": 1, "batch_size": 2,
                                    "trigger": "sks"})
    result = finetune_lora(pipe, images, ft, tmp_path / "victim", base_ref=zoo.base, show_progress=False)
    lora = LoraInput.from_file(result.snapshots[-1][1])
    with torch.no_grad():
        truth = pipe.encode_prompt([result.instance_prompt], "cpu", 1, False)[0][0].float()

    attack = MatchingUpdatesAttack(MatchingUpdatesConfig(steps=30, num_images=1, timesteps=(250, 750)), pipe)
    inversion = attack.invert(lora, seed=0)
    assert inversion.objectives[0] > 0.8 and min(inversion.objectives) < inversion.objectives[0] - 0.4

    def mean_token_cosine(z: torch.Tensor) -> float:
        return float(F.cosine_similarity(z.mean(0), truth.mean(0), dim=0))

    assert mean_token_cosine(inversion.prompt_embeds) > mean_token_cosine(inversion.initial) + 0.25


def test_matching_updates_simulates_the_victims_update_exactly(zoo):
    """One SGD step of a peft LoRA (the victim's machinery), from a known prompt embedding, latents,
    noise and timesteps: at that very data the simulated update points exactly along B (objective
    0); at a random embedding it does not. Guards the sign, the target (v or ε) and the module order."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from loraleak.finetune.dreambooth_lora import training_noise_scheduler

    pipe = load_base_pipeline(zoo.base)  # its own copy: the adapter is added to this UNet
    config = MatchingUpdatesConfig(num_images=1, timesteps=(250, 750))
    attack = MatchingUpdatesAttack(config, pipe)
    with torch.no_grad():
        truth = pipe.encode_prompt(["A face of sks."], "cpu", 1, False)[0][0]
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)

    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    scheduler, t = training_noise_scheduler(pipe), torch.tensor([250, 750])
    x = latents.repeat(2, 1, 1, 1)
    pred = pipe.unet(scheduler.add_noise(x, noise, t), t, truth.expand(2, *truth.shape)).sample
    F.mse_loss(pred, scheduler.get_velocity(x, noise, t)).backward()
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p -= 0.1 * p.grad
    lora = LoraInput({k: v.detach().clone() for k, v in get_peft_model_state_dict(pipe.unet).items()})
    pipe.unload_lora_weights()  # the base again, as the fine-tune leaves it

    assert attack.objective(lora, truth, latents, noise) == pytest.approx(0.0, abs=1e-4)
    elsewhere = attack.starting_point(seed=0)[0]
    assert attack.objective(lora, elsewhere, latents, noise) > 0.1


def test_matching_updates_from_the_zoo_round_trips_and_answers_with_an_embedding(zoo, fitted, pipe):
    attack = load_attack(fitted["matching_updates"], pipe)
    assert isinstance(attack, MatchingUpdatesAttack)
    assert attack.config == from_dict(MatchingUpdatesConfig, MATCHING)
    heldout = lora_of(zoo, final_rows(zoo, "heldout")[0])
    assert attack.layout == lora_layout(heldout.state_dict)
    first = attack.reconstruct(heldout, seed=4)
    with torch.no_grad():  # as an evaluation may call it: the inversion turns gradients on for itself
        again = attack.reconstruct(heldout, seed=4)
    assert first.prompt_embeds.shape == (77, TINY.text_width) and torch.isfinite(first.prompt_embeds).all()
    assert torch.equal(first.prompt_embeds, again.prompt_embeds)  # the seed decides everything


# --- every baseline ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nearest_neighbour", "pca_map", "matching_updates"])
def test_saved_baselines_name_their_kind_and_record_the_zoo_they_were_fitted_on(fitted, fitting_zoo, kind):
    import json

    record = json.loads((fitted[kind] / "config.json").read_text())
    assert record["kind"] == kind and record["zoo"] == fitting_zoo
    assert record["fit"]["num_identities"] == 4  # the attack_train identities, no heldout one
    assert (fitted[kind] / "baseline.safetensors").is_file()


@pytest.mark.parametrize("kind", ["nearest_neighbour", "pca_map", "matching_updates"])
@pytest.mark.parametrize("misfit", ["rank 4", "to_k/to_v"])
def test_every_baseline_refuses_a_lora_of_another_layout_in_one_line(fitted, misfits, pipe, kind, misfit):
    attack = load_attack(fitted[kind], pipe)
    with pytest.raises(InputError, match="does not fit the attack") as error:
        attack.reconstruct(misfits[misfit], n=1)
    assert "\n" not in str(error.value) and kind in str(error.value)


# --- a new kind: its own module plus one registration line -------------------------------------

def test_a_registered_kind_is_fitted_saved_and_loaded_through_the_registry(zoo, fitting_zoo, pipe, tmp_path):
    """What `register_baseline(KIND, Config, build, load)` at the end of a module gives: BaselineConfig
    accepts the kind and checks its settings, fit_baseline builds it from the attack_train rows only,
    load_attack reads it back. (The kind is unregistered again at the end.)"""
    from dataclasses import dataclass

    from loraleak.attack import api
    from loraleak.attack.baselines import registry
    from loraleak.attack.baselines.common import load_baseline, save_baseline

    @dataclass(frozen=True)
    class MeanConfig:
        scale: float = 1.0

        def __post_init__(self):
            if not self.scale > 0:
                raise ValueError(f"scale must be > 0, got {self.scale}")

    class MeanAttack:
        kind = "mean_embedding"

        def __init__(self, config, mean, record=None):
            self.config, self.mean, self.record = config, mean, dict(record or {})

        def save_pretrained(self, directory):
            return save_baseline(directory, self.kind, self.config, self.record, {"mean": self.mean})

    seen = {}

    def build(settings, inputs):
        seen["lora_ids"] = {row.lora_id for row in inputs.rows}
        seen["loras"] = len(inputs.loras())
        return MeanAttack(settings, settings.scale * inputs.prompt_embeddings().mean(0))

    def load(directory, pipe):
        config, record, tensors = load_baseline(directory, "mean_embedding", MeanConfig)
        return MeanAttack(config, tensors["mean"], record)

    with pytest.raises(ConfigError, match="kind must be one of"):
        baseline_config(zoo, fitting_zoo, "mean_embedding", tmp_path / "unknown")
    registry.register_baseline("mean_embedding", MeanConfig, build, load)
    try:
        with pytest.raises(ConfigError, match="scale must be > 0"):
            baseline_config(zoo, fitting_zoo, "mean_embedding", tmp_path / "bad", settings={"scale": 0})
        cfg = baseline_config(zoo, fitting_zoo, "mean_embedding", tmp_path / "mean", settings={"scale": 2.0})
        directory = fit_baseline(cfg, pipe, show_progress=False)
        attack_train = {r["lora_id"] for r in final_rows(zoo, "attack_train")}
        assert seen == {"lora_ids": attack_train, "loras": len(attack_train)}  # heldout never read
        loaded = load_attack(directory, pipe)
        assert isinstance(loaded, MeanAttack) and loaded.config == MeanConfig(scale=2.0)
        assert loaded.record["fit"]["num_loras"] == len(attack_train)
    finally:
        del registry.BASELINE_KINDS["mean_embedding"], registry._BUILDERS["mean_embedding"]
        del api.LOADERS["mean_embedding"]
