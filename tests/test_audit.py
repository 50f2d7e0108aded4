"""`loraleak audit` on the shipped tiny base: a real fine-tune (in its own format and exported to
kohya), a zero-update LoRA and a PEFT adapter of another rank, with and without a learned attack."""

import json
from dataclasses import replace

import pytest
import torch

from loraleak.attack.lora_inputs import fit_to_layout, lora_layout
from loraleak.attack.model import NetworkAutoencoder
from loraleak.attack.train import TRAINING_RECORD
from loraleak.base.loading import base_fingerprint
from loraleak.cli import main
from loraleak.errors import InputError
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.identities import IdentitiesConfig, make_source
from loraleak.lora.formats import export_kohya, read_shared_lora
from loraleak.lora.io import read_lora, save_lora_file
from test_lora_formats import pipe  # noqa: F401  (module fixture: the shipped tiny base)

FAST = ["--candidates", "6", "--steps", "4", "--base", "tiny"]


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory):  # noqa: F811
    """A fine-tune on one synthetic person (the faces the base and the scorer know); its kohya export;
    the same LoRA with B = 0."""
    work = tmp_path_factory.mktemp("audit-loras")
    person = next(iter(make_source(IdentitiesConfig(num_identities=1, images_per_identity=5)).identities()))
    cfg = FinetuneConfig(rank=2, alpha=2, targets=("to_q", "to_k", "to_v", "to_out.0"), lr=1e-2, steps=12,
                         prior_preservation=False)
    result = finetune_lora(pipe, person.load(32), cfg, work / "tuned", base_ref="tiny", show_progress=False)
    tuned = result.snapshots[-1][1]
    shared = read_shared_lora(tuned)
    zero = replace(shared, state_dict={k: torch.zeros_like(v) if ".lora_B." in k else v
                                       for k, v in shared.state_dict.items()}).save(work / "zero.safetensors")
    kohya = export_kohya(shared, work / "tuned-kohya.safetensors")
    return {"tuned": tuned, "zero": zero, "kohya": kohya, "work": work, "trigger": result.trigger}


def run(capsys, *argv):
    status = main(["audit", *map(str, argv)])
    return status, capsys.readouterr()


def test_audit_scores_a_fine_tune_above_a_zero_update_and_gates_on_the_threshold(loras, tmp_path, capsys):
    out = tmp_path / "audit"
    status, printed = run(capsys, loras["tuned"], loras["zero"], loras["kohya"], *FAST, "--out", out)
    assert status == 0, printed.err  # no threshold: nothing fails
    report = json.loads((out / "audit.json").read_text())
    tuned, zero, kohya = report["files"]
    assert zero["leakage"] == pytest.approx(0.0, abs=1e-9)  # B = 0: exactly the base's samples
    # Measured 0.095 with these settings (6 samples, 4 steps): a small fine-tune, a small but real pull.
    assert tuned["leakage"] > 0.03
    assert kohya["format"] == "kohya" and kohya["leakage"] == pytest.approx(tuned["leakage"], abs=1e-6)
    assert len(printed.out.strip().splitlines()) == 4  # one verdict per file + where the report is
    html = (out / "index.html").read_text()
    assert all(name in html for name in ("base/finextract-000.png", "finextract-005.png", "leakage"))
    assert all((out / p).is_file() for f in report["files"] for p in f["images"]["finextract"])

    threshold = tuned["leakage"] / 2
    status, printed = run(capsys, loras["tuned"], loras["zero"], *FAST, "--out", tmp_path / "gate",
                          "--fail-above", threshold)
    lines = printed.out.splitlines()
    assert status == 1 and lines[0].startswith("FAIL") and lines[1].startswith("ok")
    status, _ = run(capsys, loras["zero"], *FAST, "--out", tmp_path / "pass", "--fail-above", threshold)
    assert status == 0


def test_audit_runs_a_learned_attack_and_adapts_a_lora_of_another_rank_and_targets_by_svd(loras, pipe, tmp_path,  # noqa: F811
                                                                                           capsys):
    from peft import LoraConfig, get_peft_model
    import copy

    attack_dir = tmp_path / "nae"
    layout = lora_layout(read_shared_lora(loras["tuned"]).state_dict)
    NetworkAutoencoder.from_pipeline(pipe, layout, base_fingerprint=base_fingerprint("tiny")).save_pretrained(attack_dir)
    # What train_attack records of its zoo: the usual step count, and the alpha an adapted LoRA is scaled for.
    (attack_dir / TRAINING_RECORD).write_text(json.dumps({"base": "tiny", "lora_steps": 12, "lora_alpha": 2}))
    other = get_peft_model(copy.deepcopy(pipe.unet), LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"],
                                                                init_lora_weights=False))
    other.save_pretrained(str(tmp_path / "rank4"))

    status, printed = run(capsys, loras["tuned"], tmp_path / "rank4", *FAST, "--out", tmp_path / "audit",
                          "--attack", attack_dir)
    assert status == 0, printed.err
    tuned, rank4 = json.loads((tmp_path / "audit" / "audit.json").read_text())["files"]
    assert tuned["attacks"]["learned"]["kind"] == "network_autoencoder" and len(tuned["images"]["learned"]) == 6
    assert tuned["attacks"]["learned"]["adapted"] == []  # the zoo's own layout: read as it is
    assert tuned["trigger"] == loras["trigger"] and f"trigger {loras['trigger']!r}" in printed.out.splitlines()[0]
    assert rank4["format"] == "peft" and rank4["leakage"] is not None  # the training-free attack scores it
    learned = rank4["attacks"]["learned"]
    assert "error" not in learned and len(rank4["images"]["learned"]) == 6
    notes = learned["adapted"]
    assert f"adapted to the attack's zoo by SVD: rank 2, {len(layout) // 2} modules, alpha 2" in notes[0]
    assert any(n.startswith("zero blocks for") and "to_k" in n and "to_out.0" in n for n in notes)
    assert any(n.startswith("truncated") for n in notes)  # rank 4 -> the zoo's rank 2
    assert "adapted to its zoo by SVD" in printed.out.splitlines()[1]


def test_a_lora_whose_metadata_names_another_base_is_refused_in_one_line(loras, tmp_path, capsys):
    state, metadata = read_lora(loras["tuned"])
    assert metadata["loraleak_base_fingerprint"] == base_fingerprint("tiny")
    moved = save_lora_file(state, {**metadata, "loraleak_base_fingerprint": "0123456789abcdef"},
                           tmp_path / "moved.safetensors")
    status, printed = run(capsys, moved, *FAST, "--out", tmp_path / "audit")
    assert status == 2
    (line,) = [x for x in printed.out.splitlines() if x.startswith("ERR")]
    assert "another base (fingerprint 0123456789abcdef, from its metadata)" in line


def test_fit_to_layout_refuses_shapes_that_cannot_match_in_one_line(loras):
    shared = read_shared_lora(loras["tuned"])
    layout = lora_layout(shared.state_dict)
    wider = tuple(replace(spec, length=spec.length + 1) if spec.factor == "A" else spec for spec in layout)
    with pytest.raises(InputError, match="another base") as e:
        fit_to_layout(shared.state_dict, shared.metadata, wider, what="LoRA x")
    assert "\n" not in str(e.value)
    same, _, notes = fit_to_layout(shared.state_dict, shared.metadata, layout)
    assert notes == [] and same.keys() == shared.state_dict.keys()


def test_unreadable_files_and_another_base_are_one_line_each(loras, tmp_path, capsys):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not safetensors")
    status, printed = run(capsys, pickle, loras["zero"], *FAST, "--out", tmp_path / "audit")
    assert status == 2
    err_line = printed.out.splitlines()[0]
    assert err_line.startswith("ERR") and "refusing to unpickle" in err_line
    # tiny-lfw has the same architecture: a file that does not say its base fits and is scored; a project
    # LoRA's metadata names its base (tiny), so it is refused in one line.
    status, printed = run(capsys, loras["kohya"], "--candidates", "6", "--steps", "4", "--base", "tiny-lfw",
                          "--out", tmp_path / "other")
    assert status == 0, printed.out
    status, printed = run(capsys, loras["zero"], "--candidates", "6", "--steps", "4", "--base", "tiny-lfw",
                          "--out", tmp_path / "other-project")
    assert status == 2 and printed.out.startswith("ERR") and "another base" in printed.out.splitlines()[0]
