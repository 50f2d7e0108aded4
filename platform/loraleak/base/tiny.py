"""The built-in `tiny` base: Stable Diffusion's architecture, shrunk to train on a CPU.

Same components and classes as SD 1.4 — `AutoencoderKL`, `UNet2DConditionModel` with
cross-attention, a frozen `CLIPTextModel`, a `CLIPTokenizer`, a DPM-Solver scheduler — so every
later stage (DreamBooth-LoRA, the attack, evaluation) runs the same code on `tiny` and on SD.
The text encoder stays at its random initialisation and is never trained: its features for a
prompt are a fixed random code the UNet learns to read, which is all DreamBooth's trigger word
needs (the measurement in docs/real-faces-on-cpu.md used exactly this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import MODEL_MAX_LENGTH, build_tokenizer

NORM_GROUPS = 32  # GroupNorm groups in the UNet, as in SD: every channel count is a multiple


@dataclass(frozen=True)
class TinyBaseConfig:
    resolution: int = 32  # image side in pixels
    unet_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_levels: int = 2  # cross-attention in this many lowest-resolution levels (cheap there)
    head_dim: int = 32  # UNet attention head width; heads per level = channels // head_dim
    text_width: int = 128  # = UNet cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (32, 64)  # len - 1 downsamplings: (32, 64) -> factor 2
    vae_layers_per_block: int = 1
    vae_attention: bool = False  # SD's VAE attends at 64x64 latents; at 16x16 convs see enough
    # GroupNorm groups in the VAE. 32 groups over 32 channels normalise each channel per image
    # (instance norm), which erases its mean colour; 4 channels per group keep colour and train faster.
    vae_norm_groups: int = 8
    latent_channels: int = 4
    # v-prediction: with ε-prediction under this schedule (ᾱ_T ≈ 0) the first sampling step turns
    # the ε error into x0 error amplified by 1/sqrt(ᾱ_T), and a small base samples noise.
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    beta_schedule: Literal["squaredcos_cap_v2", "scaled_linear", "linear"] = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        for name, groups in (("unet_channels", NORM_GROUPS), ("vae_channels", self.vae_norm_groups)):
            channels = getattr(self, name)
            if not channels or groups < 1 or any(c <= 0 or c % groups for c in channels):
                raise ValueError(f"{name} must be multiples of {groups}, got {channels}")
        if not 0 <= self.attention_levels <= len(self.unet_channels):
            raise ValueError(f"attention_levels must be in 0..{len(self.unet_channels)}")
        for c in self.unet_channels[len(self.unet_channels) - self.attention_levels:]:
            if c % self.head_dim:
                raise ValueError(f"head_dim {self.head_dim} does not divide UNet channels {c}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_heads {self.text_heads} does not divide text_width {self.text_width}")
        if self.resolution % (self.vae_scale_factor * 2 ** (len(self.unet_channels) - 1)):
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the VAE factor {self.vae_scale_factor}"
                f" times the UNet's {len(self.unet_channels) - 1} downsamplings"
            )

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor


def build_unet(cfg: TinyBaseConfig) -> UNet2DConditionModel:
    levels = len(cfg.unet_channels)
    attends = [i >= levels - cfg.attention_levels for i in range(levels)]
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        # The mid block sits at the lowest resolution; it attends like SD's unless no level does.
        mid_block_type="UNetMidBlock2DCrossAttn" if cfg.attention_levels else "UNetMidBlock2D",
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=NORM_GROUPS,
        cross_attention_dim=cfg.text_width,
        # diffusers' historical name: `attention_head_dim` is the number of heads per level.
        attention_head_dim=tuple(max(1, c // cfg.head_dim) for c in cfg.unet_channels),
    )


def build_vae(cfg: TinyBaseConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.resolution,
        scaling_factor=1.0,  # set to 1/std of the latents once the VAE is trained
        mid_block_add_attention=cfg.vae_attention,
    )
    _zero_init_residual_branches(vae)
    return vae


@torch.no_grad()
def _zero_init_residual_branches(model: torch.nn.Module) -> None:
    """Start every residual block as the identity (Fixup/ReZero style).

    Measured on 32 px faces: the from-scratch AutoencoderKL learns markedly faster this way
    (the shallow path through the shortcuts learns first, the blocks then add detail).
    """
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            torch.nn.init.zeros_(module.conv2.weight)
            torch.nn.init.zeros_(module.conv2.bias)
        elif isinstance(module, Attention):
            torch.nn.init.zeros_(module.to_out[0].weight)
            torch.nn.init.zeros_(module.to_out[0].bias)


def build_text_encoder(cfg: TinyBaseConfig, vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        projection_dim=cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_scheduler(cfg: TinyBaseConfig) -> DPMSolverMultistepScheduler:
    """The paper's sampler (DPM-Solver++ multistep) over the training noise schedule."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        # The cosine schedule's last steps have huge log-SNR; diffusers clips them for stability.
        lambda_min_clipped=-5.1 if cfg.beta_schedule == "squaredcos_cap_v2" else -float("inf"),
        steps_offset=1,  # what SD pipelines expect (they warn and patch otherwise)
    )


def build_tiny_pipeline(cfg: TinyBaseConfig = TinyBaseConfig(), seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised tiny SD pipeline (deterministic in `seed`), ready to pretrain."""
    tokenizer = build_tokenizer()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = build_text_encoder(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        vae = build_vae(cfg)
        unet = build_unet(cfg)
    finally:
        torch.random.set_rng_state(generator_state)  # do not disturb the caller's random stream
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=build_scheduler(cfg), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
