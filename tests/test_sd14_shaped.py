"""The SD-1.4-shaped base's configs, checked on meta tensors (no weights: instant, no memory).

Building and saving the real folder (4.3 GB) is in the slow paper-profile test.
"""

from __future__ import annotations

import pytest
import torch

from loraleak.base.sd14_shaped import SD14_PARAMETERS, SD14ShapedConfig, build_sd14_shaped, parameter_counts
from loraleak.cli import main


@pytest.mark.parametrize("resolution", [512, 64])
def test_sd14_parameter_counts_at_any_resolution(resolution):
    with torch.device("meta"):
        pipe = build_sd14_shaped(SD14ShapedConfig(resolution=resolution))
    assert parameter_counts(pipe) == SD14_PARAMETERS == \
        {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == resolution
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 768
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.prediction_type == "epsilon"
    # The project's tokenizer: its ids fit CLIP-L's embedding table, its end-of-text id is the highest
    # (what SD's text-encoder config, eos_token_id 2, pools at).
    assert len(pipe.tokenizer) <= 49_408
    assert pipe.tokenizer.eos_token_id == max(pipe.tokenizer.get_vocab().values())


def test_bad_resolution_and_existing_folder_are_one_line(tmp_path, capsys):
    assert main(["base", "sd14-shaped", "--out", str(tmp_path / "x"), "--resolution", "100"]) != 0
    assert "resolution must be a positive multiple of 64" in capsys.readouterr().err
    (tmp_path / "model_index.json").write_text("{}")
    assert main(["base", "sd14-shaped", "--out", str(tmp_path)]) != 0
    assert "already holds a pipeline" in capsys.readouterr().err
