"""The study's edges a user meets first: the Python API, `--help` with defaults, `--out` that refuses what it cannot
honour (an object-store URI) in one line, and Ray that will not start or join, said in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

import loraleak
from loraleak.cli import main
from loraleak.cluster import ray_failure
from loraleak.errors import ConfigError
from loraleak.pipeline.config import PipelineConfig


def test_the_study_is_a_library_call():
    from loraleak.pipeline.api import load_pipeline_config, run_study

    assert loraleak.load_pipeline_config is load_pipeline_config and loraleak.run_study is run_study
    cfg = loraleak.load_pipeline_config("quick", out="runs/x", overrides={"zoo.finetune.rank": 8},
                                        assignments=["attack.max_steps=10"], tracking_uri="sqlite:///t.db")
    assert isinstance(cfg, PipelineConfig) and cfg.out_dir == Path("runs/x") and cfg.zoo.finetune.rank == 8
    assert cfg.attack.max_steps == 10 and cfg.tracking_uri == "sqlite:///t.db"
    with pytest.raises(ConfigError, match="unknown profile 'quik'"):
        loraleak.load_pipeline_config("quik")
    with pytest.raises(TypeError, match="PipelineConfig"):
        loraleak.run_study({"out_dir": "x"})


@pytest.mark.parametrize("out", ["s3://bucket/studies/x", "gs://bucket/x", "hdfs://namenode/x"])
def test_an_object_store_out_is_refused_in_one_line(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    scheme = out.split(":")[0]
    assert err.startswith(f"loraleak: error: out {out}: ") and f"{scheme}:// is not supported" in err
    assert "\n" not in err and not any(tmp_path.iterdir())  # no folder named "s3:", no store
    with pytest.raises(ConfigError, match="is not supported"):  # from a config file too
        from loraleak.config import from_dict

        from_dict(PipelineConfig, {"out_dir": out})


def test_a_file_uri_out_is_its_path(tmp_path):
    cfg = loraleak.load_pipeline_config(out=(tmp_path / "study").as_uri())
    assert cfg.out_dir == tmp_path / "study"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: quick)" in text and "$MLFLOW_TRACKING_URI" in text
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "(default: runs)" in " ".join(capsys.readouterr().out.split())


def test_a_ray_that_will_not_start_is_one_line_naming_the_way_out():
    error = RuntimeError("Failed to start the GCS server.\n  ...27 lines of traceback...\n"
                         "ValueError: port 6379 is in use")
    text = ray_failure(error, None, ["192.0.2.2:6379"])
    assert "\n" not in text and "another Ray instance runs on this machine (192.0.2.2:6379" in text
    assert "port 6379 is in use" in text and "--address auto" in text and "ray stop" in text
    joined = ray_failure(ConnectionError("Timed out while waiting for GCS"), "10.0.0.1:6379", [])
    assert "RAY_ADDRESS=10.0.0.1:6379" in joined and "unset RAY_ADDRESS" in joined
    assert ray_failure(OSError(), None, []) == "cannot start a local Ray (OSError)"
