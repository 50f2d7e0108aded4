"""Attack training with Ray Train over a real (tiny) zoo, checkpoint resume, and reconstruction.

One local Ray, one tiny base and one zoo (5 synthetic identities, rank-2 LoRAs on to_q/to_v, 5 steps
with snapshots at r = 0, 2, 5) built by the zoo module serve the whole file. An untrained UNet
barely reads its conditioning, so the base's cross-attention outputs are amplified: z then matters
to the ε-loss, as it does in a trained base. Each TorchTrainer fit costs ~20-40 s of Ray start-up
here: the default tests run two (a training run and its resumption).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraleak.attack.cli import attack_main
from loraleak.attack.config import AttackTrainConfig
from loraleak.attack.data import select_samples
from loraleak.attack.model import NetworkAutoencoder
from loraleak.attack.reconstruct import reconstruct
from loraleak.attack.train import TRAINING_RECORD, train_attack
from loraleak.base.loading import base_fingerprint, load_base_pipeline
from loraleak.base.tiny import build_tiny_pipeline
from loraleak.config import from_dict, to_dict
from loraleak.errors import ConfigError, InputError
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.identities import SyntheticFaces
from loraleak.lora.io import read_lora, save_lora_file
from loraleak.zoo.manifest import read_manifest
from studies import TINY, TINY_ZOO_FINETUNE, TINY_ZOO_IDENTITIES, build_tiny_zoo

IDENTITIES, FINETUNE = TINY_ZOO_IDENTITIES, TINY_ZOO_FINETUNE
TRAIN_STEPS, RESUMED_STEPS = 16, 20


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_tiny_zoo(tmp_path_factory.mktemp("attack-zoo"))


def attack_config(zoo, out, **overrides) -> AttackTrainConfig:
    data = {"zoo": zoo.root, "base": zoo.base, "identities": IDENTITIES, "batch_size": 4,
            "max_steps": TRAIN_STEPS, "checkpoint_every": 8, "val_every": 8, "log_every": 4, "val_fraction": 0.25,
            "out_dir": str(out), "workdir": str(out / "mlflow"), "resources_per_worker": {"CPU": 1}}
    return from_dict(AttackTrainConfig, {**data, **overrides})


@pytest.fixture(scope="module")
def trained(ray_local, zoo, tmp_path_factory):
    cfg = attack_config(zoo, tmp_path_factory.mktemp("attack-run"))
    return cfg, train_attack(cfg, show_progress=False)


def final_lora(zoo, split):
    table = read_manifest(zoo.root).to_pylist()
    row = next(r for r in table if r["split"] == split and r["snapshot_step"] == r["steps"])
    return Path(zoo.root) / row["lora_path"], row


# --- config and data selection (no Ray) ----------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"snapshots": "some"}, "snapshots"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"model": {"input_mode": "weights"}}, "input_mode"),
    ({"learning_rate": 1e-3}, "unknown key 'learning_rate'"),
])
def test_config_rejects_bad_settings(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(AttackTrainConfig, {"zoo": "zoo", **change})


def test_selection_reads_attack_train_only_and_splits_validation_by_identity(zoo, tmp_path):
    manifest = read_manifest(zoo.root).to_pylist()
    heldout = {r["identity_id"] for r in manifest if r["split"] == "heldout"}
    assert heldout
    every = select_samples(attack_config(zoo, tmp_path), base_hash=base_fingerprint(zoo.base))
    final = select_samples(attack_config(zoo, tmp_path, snapshots="final"))
    train_ids = {r.identity_id for r in every.train}
    val_ids = {r.identity_id for r in every.val}
    assert not (train_ids | val_ids) & heldout and not train_ids & val_ids and val_ids
    assert sorted({r.step for r in every.train}) == [2, 5]  # r = 0 is θ_0, never a sample
    assert {r.step for r in final.train} == {5} and len(final.train) == len(train_ids)
    assert all(r.step == r.steps for r in every.val) and every.lora_steps == 5
    assert len(every.layout) == 4 * 2 * 2 * 2  # 4 transformer blocks x attn1/attn2 x to_q/to_v x A/B


def test_train_identities_takes_nested_subsets_of_the_training_identities(zoo, tmp_path):
    every = select_samples(attack_config(zoo, tmp_path))
    all_ids = {r.identity_id for r in every.train}
    subsets = []
    for n in range(1, len(all_ids) + 1):
        chosen = select_samples(attack_config(zoo, tmp_path, train_identities=n))
        ids = {r.identity_id for r in chosen.train}
        assert len(ids) == n == chosen.train_identities and ids <= all_ids
        assert chosen.val == every.val  # validation does not move with the training set
        assert all(sum(r.identity_id == i for r in chosen.train) == sum(r.identity_id == i for r in every.train)
                   for i in ids)  # every snapshot of a chosen identity
        subsets.append(ids)
    assert all(a < b for a, b in zip(subsets, subsets[1:]))  # a learning curve's sets are nested
    with pytest.raises(InputError, match=f"train_identities is {len(all_ids) + 1}, but zoo"):
        select_samples(attack_config(zoo, tmp_path, train_identities=len(all_ids) + 1))
    with pytest.raises(ConfigError, match="train_identities must be >= 1"):
        attack_config(zoo, tmp_path, train_identities=0)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> str:
    """The same architecture with other weights: every LoRA fits it, none was made for it."""
    path = tmp_path_factory.mktemp("other-base")
    build_tiny_pipeline(TINY, seed=1).save_pretrained(path, safe_serialization=True)
    return str(path)


def test_the_decoder_attends_unfused_in_bf16_on_a_cpu(zoo, tmp_path):
    """PyTorch's CPU flash attention is slow in bf16 backward (loraleak.base.attention): bf16 uses the math kernel."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from loraleak.attack.train import _Decoder

    for precision, kind in (("bf16", AttnProcessor), ("no", AttnProcessor2_0)):
        cfg = attack_config(zoo, tmp_path / precision, mixed_precision=precision)
        decoder = _Decoder.load(cfg, torch.device("cpu"))
        assert {type(p) for p in decoder.unet.attn_processors.values()} == {kind}, precision


def test_training_refuses_another_base_or_other_identities_before_starting(zoo, other_base, tmp_path):
    with pytest.raises(InputError, match="not the base the zoo was fine-tuned from"):
        train_attack(attack_config(zoo, tmp_path, base=other_base))
    with pytest.raises(InputError, match="differ from those its LoRA was fine-tuned on"):
        train_attack(attack_config(zoo, tmp_path, identities={**IDENTITIES, "images_per_identity": 2}))
    with pytest.raises(InputError, match="not in the configured identity source"):
        train_attack(attack_config(zoo, tmp_path, identities={**IDENTITIES, "seed": 7}))


# --- training through TorchTrainer --------------------------------------------------------------

def test_training_lowers_the_loss_logs_every_step_and_exports_the_model(trained):
    cfg, result = trained
    assert result.start_step == 0 and result.step == TRAIN_STEPS and len(result.losses) == TRAIN_STEPS
    assert sorted(result.evaluations) == [0, 8, 16]
    start, end = result.evaluations[0], result.evaluations[TRAIN_STEPS]
    # The same LoRAs, noise and timesteps at both ends: only the encoder changed, so a drop far above float
    # noise (~1e-6) is learning. Its size depends on the tiny zoo's last bits (1.3e-3 to 2.5e-3 seen).
    assert end["train_eval_loss"] < start["train_eval_loss"] - 5e-4
    assert set(end) == {"train_eval_loss", "val_loss"}
    # The reference losses: the same batches and noise with z = the true instance prompt / the empty
    # prompt. The victims' own triggers condition their UNets better than no prompt at all.
    refs = result.references
    assert set(refs) == {f"{name}.{z}" for name in end for z in ("true_prompt", "empty_prompt")}
    assert refs["train_eval_loss.true_prompt"] < refs["train_eval_loss.empty_prompt"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(cfg.workdir / 'mlflow.db').resolve()}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["snapshots"] == "all"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, TRAIN_STEPS + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 8, 16]

    record = json.loads((result.attack_dir / TRAINING_RECORD).read_text())
    assert record["step"] == TRAIN_STEPS and record["lora_steps"] == 5 and record["base"] == cfg.base
    assert record["references"] == refs
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss.true_prompt")] == [0]
    pipe = load_base_pipeline(cfg.base)
    model = NetworkAutoencoder.from_pretrained(result.attack_dir, pipe.text_encoder)
    assert model.base_fingerprint == base_fingerprint(cfg.base)


def resumed_config(cfg: AttackTrainConfig, tmp_path: Path, **overrides) -> AttackTrainConfig:
    """The trained run's config with a later max_steps, on a copy of its Ray Train storage (same run
    name: Ray Train finds the checkpoints there) and with another out_dir."""
    storage = tmp_path / "ray"
    shutil.copytree(cfg.storage, storage)
    return from_dict(AttackTrainConfig, {**to_dict(cfg), "max_steps": RESUMED_STEPS, "storage_path": str(storage),
                                         "out_dir": str(tmp_path / "resumed"), "tracking": False, **overrides})


@pytest.mark.slow
def test_a_rerun_resumes_from_the_latest_checkpoint(trained, tmp_path):
    cfg, first = trained
    resumed = train_attack(resumed_config(cfg, tmp_path), show_progress=False)
    assert resumed.start_step == TRAIN_STEPS and resumed.step == RESUMED_STEPS
    assert len(resumed.losses) == RESUMED_STEPS - TRAIN_STEPS
    # Its first evaluation is of the restored encoder: the checkpoint's weights give the very
    # losses the first run measured at that step.
    assert resumed.evaluations[TRAIN_STEPS] == pytest.approx(first.evaluations[TRAIN_STEPS], abs=1e-6)
    assert json.loads((resumed.attack_dir / TRAINING_RECORD).read_text())["step"] == RESUMED_STEPS


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(trained, tmp_path):
    """Data order, noise and optimizer state all survive a resume: same losses, same weights."""
    cfg, _ = trained
    resumed = train_attack(resumed_config(cfg, tmp_path), show_progress=False)
    straight = train_attack(from_dict(AttackTrainConfig, {**to_dict(cfg), "max_steps": RESUMED_STEPS, "tracking": False,
                                                          "out_dir": str(tmp_path / "straight")}), show_progress=False)
    assert resumed.start_step == TRAIN_STEPS and straight.start_step == 0
    assert straight.losses[TRAIN_STEPS:] == pytest.approx(resumed.losses, abs=1e-6)
    a = load_file(str(resumed.attack_dir / "model.safetensors"))
    b = load_file(str(straight.attack_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --- reconstruction -----------------------------------------------------------------------------

def test_reconstruct_writes_images_of_a_heldout_lora(trained, zoo, tmp_path):
    cfg, result = trained
    lora, row = final_lora(zoo, "heldout")
    rec = reconstruct(result.attack_dir, lora, out_dir=tmp_path / "rec", n=2, num_inference_steps=2)
    assert rec.step == 5 and "step-000005" in rec.step_source  # r from the snapshot's folder
    assert [p.name for p in rec.images] == ["rec_000.png", "rec_001.png"] and rec.grid.is_file()
    from PIL import Image

    assert Image.open(rec.images[0]).size == (TINY.resolution, TINY.resolution)
    z = load_file(str(rec.z))["z"]
    assert z.shape == (77, TINY.text_width) and torch.isfinite(z).all()
    record = json.loads((tmp_path / "rec" / "reconstruct.json").read_text())
    assert record["base"] == cfg.base and record["step"] == 5
    # A project LoRA shared as a bare file says its step and trigger in its metadata; one stripped of
    # them says nothing of its steps: r is the attack zoo's fine-tune length.
    shared = tmp_path / "shared" / "victim.safetensors"
    shared.parent.mkdir()
    shutil.copy(lora, shared)
    bare = reconstruct(result.attack_dir, shared, out_dir=tmp_path / "bare", n=1, num_inference_steps=2)
    assert bare.step == 5 and "metadata" in bare.step_source and bare.trigger == row["trigger"]
    torch.testing.assert_close(load_file(str(bare.z))["z"], z)
    state, metadata = read_lora(lora)
    stripped = save_lora_file(state, {k: v for k, v in metadata.items() if not k.startswith("loraleak_")},
                              tmp_path / "stripped" / "victim.safetensors")
    bare = reconstruct(result.attack_dir, stripped, out_dir=tmp_path / "stripped-rec", n=1, num_inference_steps=2)
    assert bare.step == 5 and "zoo" in bare.step_source and bare.trigger is None


@pytest.mark.parametrize("change, says", [({"rank": 4, "alpha": 4}, "truncated"),
                                          ({"targets": ["to_k", "to_v"]}, "dropped")])
def test_reconstruct_adapts_a_lora_of_another_rank_or_targets_and_refuses_other_shapes(trained, zoo, tmp_path,
                                                                                       change, says, capsys):
    _, result = trained
    pipe = load_base_pipeline(zoo.base)
    images = SyntheticFaces(1, 2, seed=3, namespace="other").identities()[0].load(TINY.resolution)
    ft = from_dict(FinetuneConfig, {**FINETUNE, "steps": 1, **change})
    finetune_lora(pipe, images, ft, tmp_path / "victim", base_ref=zoo.base, show_progress=False)
    lora = tmp_path / "victim" / "step-000001"
    rec = reconstruct(result.attack_dir, lora, out_dir=tmp_path / "rec", n=1, num_inference_steps=2)
    assert "adapted to the attack's zoo by SVD" in rec.notes[0] and any(n.startswith(says) for n in rec.notes)
    assert json.loads((tmp_path / "rec" / "reconstruct.json").read_text())["notes"] == list(rec.notes)
    capsys.readouterr()
    code = attack_main(["reconstruct", "--attack", str(result.attack_dir), "--lora", str(lora),
                        "--out", str(tmp_path / "rec-cli"), "--n", "1", "--steps", "2"])
    printed = capsys.readouterr().out
    assert code == 0 and "note: " in printed and f"trigger {ft.trigger_word!r}" in printed

    # Module shapes that cannot match the zoo's (another base): one line, nothing written.
    state, metadata = read_lora(lora / "pytorch_lora_weights.safetensors")
    key = next(k for k in sorted(state) if k.endswith("to_v.lora.down.weight"))  # a module of the zoo
    state[key] = torch.cat([state[key], state[key][:, :1]], dim=1)
    wider = save_lora_file(state, metadata, tmp_path / "wider.safetensors")
    with pytest.raises(InputError, match="another base"):
        reconstruct(result.attack_dir, wider, out_dir=tmp_path / "rec-wider")
    assert not (tmp_path / "rec-wider").exists()
    code = attack_main(["reconstruct", "--attack", str(result.attack_dir), "--lora", str(wider),
                        "--out", str(tmp_path / "rec-wider")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("loraleak: error: LoRA") and "\n" not in err


def test_reconstruct_refuses_a_lora_whose_metadata_names_another_base(trained, zoo, tmp_path):
    _, result = trained
    lora, _ = final_lora(zoo, "heldout")
    state, metadata = read_lora(lora)
    moved = save_lora_file(state, {**metadata, "loraleak_base_fingerprint": "0123456789abcdef"},
                           tmp_path / "moved.safetensors")
    with pytest.raises(InputError, match="fine-tuned from another base .fingerprint 0123456789abcdef, from its metadata"):
        reconstruct(result.attack_dir, moved, out_dir=tmp_path / "rec")


def test_reconstruct_refuses_another_base(trained, zoo, other_base, tmp_path):
    _, result = trained
    lora, _ = final_lora(zoo, "heldout")
    with pytest.raises(InputError, match="trained on another base"):
        reconstruct(result.attack_dir, lora, base=other_base, out_dir=tmp_path / "rec")
