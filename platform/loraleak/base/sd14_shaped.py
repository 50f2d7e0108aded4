"""Stable Diffusion 1.4's architecture with random weights, built offline: the paper path's dry run.

`--profile paper` loads `CompVis/stable-diffusion-v1-4`, which cannot be downloaded here. This
builds a pipeline folder with SD 1.4's exact component configs (the values of its published
`unet/`, `text_encoder/`, `vae/` and `scheduler/` configs) and random weights, so every tensor
shape of the paper's study — the 859.5 M-parameter UNet's attention projections the LoRAs sit on,
the 768-wide CLIP ViT-L/14 text encoder and its LoRA, the VAE — is exercised without a download.
Its images are noise: it proves the code path, never a result.

Two things differ from SD 1.4, each for a reason:
- the tokenizer is the project's offline `CLIPTokenizer` (`base/tokenizer.py`: same class and file
  format, a small vocabulary) since CLIP's 49,408-entry BPE files are a download; the text
  encoder keeps CLIP-L's 49,408-row embedding table, of which the tokenizer uses the first ids;
- `resolution` (default 512, SD's) sets only the configs' `sample_size`, which the platform reads
  as the base's image size: a 64 px folder has the very same parameter shapes and trains on 8x8
  latents, cheap enough for a CPU.

About 4.3 GB of fp32 safetensors (UNet 3.4 GB).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import build_tokenizer

VAE_SCALE_FACTOR = 8  # SD's VAE: three downsamplings
RECORD_FILE = "sd14_shaped.json"

# CompVis/stable-diffusion-v1-4, unet/config.json (sample_size set from the resolution).
UNET_CONFIG = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
# vae/config.json
VAE_CONFIG = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
# text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
    # SD 1.4's ids: eos_token_id 2 is transformers' legacy flag for "pool at the highest token id",
    # which is the end-of-text token in CLIP's vocabulary and in the project's tokenizer alike.
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# scheduler/scheduler_config.json
SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,  # (its clip_sample: false is not a PNDM setting)
)
# Parameter counts of SD 1.4's components (diffusers / transformers, fp32).
SD14_PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}


@dataclass(frozen=True)
class SD14ShapedConfig:
    resolution: int = 512  # SD 1.4's; a smaller one changes only sample_size, never a weight's shape
    seed: int = 0

    def __post_init__(self) -> None:
        # The UNet downsamples the latent three times: 8 (VAE) x 8 (UNet) pixels at least per side.
        if self.resolution < 64 or self.resolution % 64:
            raise ValueError(f"resolution must be a positive multiple of 64, got {self.resolution}")


def build_sd14_shaped(cfg: SD14ShapedConfig = SD14ShapedConfig()) -> StableDiffusionPipeline:
    """SD 1.4's components with random weights (deterministic in `cfg.seed`), in fp32 on the CPU."""
    latent = cfg.resolution // VAE_SCALE_FACTOR
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval().requires_grad_(False)
        vae = AutoencoderKL(**VAE_CONFIG, sample_size=cfg.resolution).eval().requires_grad_(False)
        unet = UNet2DConditionModel(**UNET_CONFIG, sample_size=latent).eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(state)  # do not disturb the caller's random stream
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(), unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def parameter_counts(pipe: StableDiffusionPipeline) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in SD14_PARAMETERS}


def save_sd14_shaped(out: str | Path, cfg: SD14ShapedConfig = SD14ShapedConfig()) -> dict[str, int]:
    """Build and save the pipeline folder `out` (safetensors); returns the parameter counts.

    The folder appears under its name only when complete (written beside it, then renamed), and a
    record `sd14_shaped.json` says what it is.
    """
    out = Path(out)
    if (out / "model_index.json").is_file():
        raise FileExistsError(f"{out} already holds a pipeline")
    pipe = build_sd14_shaped(cfg)
    counts = parameter_counts(pipe)
    if counts != SD14_PARAMETERS:  # a diffusers / transformers change to the architectures
        raise RuntimeError(f"parameter counts {counts} are not SD 1.4's {SD14_PARAMETERS}")
    partial = out.with_name(out.name + ".partial")
    pipe.save_pretrained(partial, safe_serialization=True)
    record = {"what": "SD 1.4's architecture with random weights (loraleak.base.sd14_shaped); images are noise",
              "resolution": cfg.resolution, "seed": cfg.seed, "parameters": counts,
              "differs_from_sd14": "tokenizer: the project's offline CLIPTokenizer (small vocabulary)"}
    (partial / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    partial.rename(out)
    return counts
