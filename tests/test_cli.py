"""The `loraleak` command: bad input is one line of error, good input does the stage's work."""

import pytest

from loraleak.cli import build_parser, main


def test_every_stage_has_a_subcommand_with_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    for name in ["identities", "base", "scorer", "finetune", "generate", "zoo", "attack", "evaluate", "compare", "run"]:
        assert name in commands and commands[name].format_help()


def test_identities_preview_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["identities", "preview", "--num-identities", "3", "--per-identity", "2",
                 "--size", "32", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as grid:
        assert grid.width > 2 * 32 and grid.height > 3 * 32


def test_identities_split_prints_every_identity(capsys):
    assert main(["identities", "split", "--num-identities", "10", "--heldout-fraction", "0.3"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 10 and sum(split == "heldout" for _, split in rows) == 3


@pytest.mark.parametrize("config_text, message", [
    ("out_dir: x\nfinetune: {rnak: 4}\n", "unknown key 'rnak'"),
    ("out_dir: x\nfinetune: {steps: many}\n", "config.yaml.finetune.steps: expected an integer"),
    ("out_dir: x\nidentities: {kind: folder}\n", "folder"),
    ("out_dir: [unclosed\n", "not valid YAML"),
])
def test_bad_victim_config_is_one_line_error(tmp_path, capsys, config_text, message):
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    assert main(["finetune", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraleak: error:") and message in err and "\n" not in err


def test_missing_folder_root_is_one_line_error(tmp_path, capsys):
    assert main(["identities", "split", "--kind", "folder", "--root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "\n" not in err


def test_unknown_base_is_one_line_error(tmp_path, capsys):
    assert main(["base", "info", "--base", "no-such-org/no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load base model 'no-such-org/no-such-model'" in err and "\n" not in err


def test_finetune_command_fine_tunes_and_scores_one_victim(tmp_path, capsys):
    """`loraleak finetune` (one victim, the path `loraleak run` replaced) still runs end to end."""
    import json

    import yaml

    from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline

    tiny = TinyBaseConfig(resolution=16, unet_channels=(32, 32), attention_levels=1, text_width=32,
                          text_layers=1, text_heads=1, vae_channels=(32,))
    build_tiny_pipeline(tiny).save_pretrained(tmp_path / "base", safe_serialization=True)
    config = tmp_path / "victim.yaml"
    config.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "victim"), "base": str(tmp_path / "base"),
        "identities": {"num_identities": 3, "images_per_identity": 2}, "num_distractors": 2,
        "finetune": {"rank": 2, "alpha": 2, "steps": 2, "prior_preservation": False},
        "n_images": 2, "sample_steps": 2, "reference_size": 32}))
    assert main(["finetune", str(config)]) == 0
    summary = json.loads((tmp_path / "victim" / "summary.json").read_text())
    assert summary["candidates"] == 3 and set(summary["scores"]) == {"org", "victim_class_prompt", "base"}
    assert all(s["n_images"] == 2 for s in summary["scores"].values())
    assert list((tmp_path / "victim" / "lora").rglob("pytorch_lora_weights.safetensors"))
    assert "chance top-1 0.333" in capsys.readouterr().out
