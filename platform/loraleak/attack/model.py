"""The paper's variational network autoencoder: LoRA matrices (+ fine-tuning step r) -> prompt embedding z.

    per-matrix inputs (rank x long side) --matrix encoders--> one token each
    [task token, step token, matrix tokens, pad tokens] -> LayerNorm (+ positions)
        -> the base's FROZEN CLIP text transformer -> its final LayerNorm -> first P tokens
        -> Linear μ, Linear log σ² -> z = μ + σ ε  (P x D: the shape of the base's prompt embedding)

P is the tokenizer's prompt length (77 for SD) and D the UNet's cross-attention width (768 for
SD 1.4); the token width is the text encoder's. Nothing is sized for the tiny base.

Choices where the paper's code is silent or this code departs from it (all in AttackModelConfig):
  - attention "bidirectional" (default, the paper's code: it calls the CLIP encoder without a mask)
    or "causal" (CLIP's own causal mask, as its forward builds it). Causal attention lets output
    token i see only tokens 0..i, so tokens beyond P could never reach z: that combination is refused.
  - positions "none" (default, the paper's code), "clip" (CLIP's frozen position embeddings, only
    when the sequence fits CLIP's position table) or "learned" (a trainable table, any length).
  - fewer than P tokens: learned pad tokens are appended after the matrix tokens (like the padding
    after a prompt's end token) so that z always has P tokens; the paper's code would return fewer.
  - matrix encoders with the same shape are evaluated together as one grouped Conv1d (groups =
    matrices): the same maths as one encoder per matrix, in a few kernels instead of hundreds.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from transformers.masking_utils import create_causal_mask

from ..config import from_dict, to_dict
from ..errors import ConfigError, InputError
from .artifact import CONFIG_NAME, read_record, read_tensors, save_artifact
from .lora_inputs import InputMode, LoraLayout, MatrixSpec

WEIGHTS_NAME = "model.safetensors"
FORMAT = "loraleak-network-autoencoder"
FORMAT_VERSION = 1
TEXT_ENCODER_PREFIX = "text_encoder."  # submodule name of the frozen CLIP: never saved


@dataclass(frozen=True)
class AttackModelConfig:
    input_mode: InputMode = "delta"
    step_embedding: bool = True  # embed the fine-tuning step r as a token (the paper's paradigm)
    kl_weight: float = 0.0  # weight of the KL term in the loss (0 in the paper's training code)
    embedding_mse_weight: float = 0.0  # weight of MSE(z, true prompt embedding) (1 in one code version)
    matrix_channels: int | None = None  # hidden channels of the matrix encoders; None = the rank (paper)
    matrix_blocks: int = 4
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    positions: Literal["none", "clip", "learned"] = "none"

    def __post_init__(self) -> None:
        if self.input_mode not in ("delta", "raw", "gl_invariant"):
            raise ValueError(f"input_mode must be 'delta', 'raw' or 'gl_invariant', got {self.input_mode!r}")
        if self.kl_weight < 0 or self.embedding_mse_weight < 0:
            raise ValueError("kl_weight and embedding_mse_weight must be >= 0")
        if self.matrix_channels is not None and self.matrix_channels < 1:
            raise ValueError(f"matrix_channels must be >= 1, got {self.matrix_channels}")
        if self.matrix_blocks < 1:
            raise ValueError(f"matrix_blocks must be >= 1, got {self.matrix_blocks}")
        if self.attention not in ("bidirectional", "causal"):
            raise ValueError(f"attention must be 'bidirectional' or 'causal', got {self.attention!r}")
        if self.positions not in ("none", "clip", "learned"):
            raise ValueError(f"positions must be 'none', 'clip' or 'learned', got {self.positions!r}")


class EncoderOutput(NamedTuple):
    z: torch.Tensor  # (batch, prompt_length, embedding_dim): replaces the prompt embedding
    mu: torch.Tensor
    logvar: torch.Tensor
    kl: torch.Tensor  # scalar: KL(q(z|θ) || N(0, I)), summed over z's entries, averaged over the batch


class MatrixEncoderGroup(nn.Module):
    """`count` independent matrix encoders for matrices of one shape (rank x length), run as one.

    Per matrix: `blocks` x [InstanceNorm1d -> Conv1d(k=3, padding 1) -> LeakyReLU], the last block
    with 1 output channel and Tanh instead, then Linear(length -> width). A grouped Conv1d with
    groups=count is exactly `count` separate Conv1d's; InstanceNorm normalises each channel alone.
    """

    def __init__(self, count: int, rank: int, length: int, hidden: int, width: int, blocks: int) -> None:
        super().__init__()
        self.count, self.rank, self.length = count, rank, length
        layers: list[nn.Module] = []
        channels = rank
        for block in range(blocks):
            last = block == blocks - 1
            out = 1 if last else hidden
            layers += [nn.InstanceNorm1d(count * channels),
                       nn.Conv1d(count * channels, count * out, kernel_size=3, padding=1, groups=count),
                       nn.Tanh() if last else nn.LeakyReLU()]
            channels = out
        self.blocks = nn.Sequential(*layers)
        # One Linear(length -> width) per matrix, initialised as nn.Linear initialises itself.
        bound = 1.0 / math.sqrt(length)
        self.weight = nn.Parameter(torch.empty(count, length, width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(count, width).uniform_(-bound, bound))

    def forward(self, matrices: torch.Tensor) -> torch.Tensor:
        """(batch, count, rank, length) -> (batch, count, width) tokens."""
        batch = matrices.shape[0]
        hidden = self.blocks(matrices.reshape(batch, self.count * self.rank, self.length))
        return torch.einsum("bnl,nlw->bnw", hidden, self.weight) + self.bias


def _text_transformer(text_encoder: nn.Module) -> nn.Module:
    """The module holding embeddings / encoder / final_layer_norm (transformers 5 flattened CLIPTextModel)."""
    return getattr(text_encoder, "text_model", text_encoder)


def text_encoder_sha256(text_encoder: nn.Module) -> str:
    """sha256 of the text encoder's weights (names without transformers 4's "text_model." prefix)."""
    digest = hashlib.sha256()
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class NetworkAutoencoder(nn.Module):
    """Encoder of LoRA weights into a prompt embedding z; the victim's UNet is the decoder.

    The base's text encoder is held by reference (it is usually the pipeline's own), frozen and
    kept in eval mode; it is not part of `save_pretrained`'s weights — `from_pretrained` takes it
    again from the base and refuses a different one.
    """

    def __init__(self, config: AttackModelConfig, layout: LoraLayout, text_encoder: nn.Module, *,
                 prompt_length: int, embedding_dim: int, base_fingerprint: str | None = None) -> None:
        super().__init__()
        if not layout:
            raise InputError("the LoRA layout is empty: no matrices to encode")
        self.config = config
        self.layout: LoraLayout = tuple(layout)
        self.prompt_length, self.embedding_dim = prompt_length, embedding_dim
        self.base_fingerprint = base_fingerprint
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        transformer = _text_transformer(text_encoder)
        width = transformer.config.hidden_size
        self.width = width

        # Matrix encoders, grouped by shape; `token_order` puts their tokens back in layout order.
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, spec in enumerate(self.layout):
            groups[(spec.rank, spec.length)].append(index)
        self.group_indices = [indices for indices in groups.values()]
        self.matrix_encoders = nn.ModuleList(
            MatrixEncoderGroup(len(indices), rank, length, config.matrix_channels or rank, width,
                               config.matrix_blocks)
            for (rank, length), indices in groups.items())
        grouped = [i for indices in self.group_indices for i in indices]
        self.register_buffer("token_order", torch.argsort(torch.tensor(grouped)), persistent=False)

        self.task_token = nn.Parameter(torch.randn(1, 1, width))
        if config.step_embedding:
            self.step_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.step_embedding = TimestepEmbedding(width, width)
        num_tokens = 1 + int(config.step_embedding) + len(self.layout)
        self.num_pad = max(0, prompt_length - num_tokens)
        self.sequence_length = num_tokens + self.num_pad
        if self.num_pad:
            self.pad_tokens = nn.Parameter(torch.randn(1, self.num_pad, width))
        self.input_norm = nn.LayerNorm(width)
        max_positions = transformer.config.max_position_embeddings
        if config.positions == "clip" and self.sequence_length > max_positions:
            raise ConfigError(f"positions 'clip' needs at most {max_positions} tokens, this LoRA gives "
                             f"{self.sequence_length}; use positions 'learned' or 'none'")
        if config.attention == "causal" and self.sequence_length > prompt_length:
            raise ConfigError(f"causal attention over {self.sequence_length} tokens: the last "
                             f"{self.sequence_length - prompt_length} could never reach the first {prompt_length} "
                             "outputs that form z; use attention 'bidirectional'")
        if config.positions == "learned":
            self.position_embedding = nn.Parameter(torch.zeros(1, self.sequence_length, width))
        self.to_mu = nn.Linear(width, embedding_dim)
        self.to_logvar = nn.Linear(width, embedding_dim)

    @classmethod
    def from_pipeline(cls, pipe: Any, layout: LoraLayout, config: AttackModelConfig = AttackModelConfig(),
                      base_fingerprint: str | None = None) -> "NetworkAutoencoder":
        """Sized from the base: prompt length from its tokenizer, z width from its UNet."""
        return cls(config, layout, pipe.text_encoder, prompt_length=int(pipe.tokenizer.model_max_length),
                   embedding_dim=int(pipe.unet.config.cross_attention_dim), base_fingerprint=base_fingerprint)

    def train(self, mode: bool = True) -> "NetworkAutoencoder":
        super().train(mode)
        self.text_encoder.eval()  # frozen: no dropout, ever
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- forward -------------------------------------------------------------------------------

    def _tokens(self, matrices: Sequence[torch.Tensor], steps: torch.Tensor | None) -> torch.Tensor:
        if len(matrices) != len(self.layout):
            raise InputError(f"got {len(matrices)} LoRA matrices, the attack expects {len(self.layout)}")
        batch = matrices[0].shape[0]
        for spec, matrix in zip(self.layout, matrices):
            if tuple(matrix.shape[1:]) != (spec.rank, spec.length) or matrix.shape[0] != batch:
                raise InputError(f"matrix {spec.factor} of {spec.module!r} has shape {tuple(matrix.shape)}, "
                                 f"expected ({batch}, {spec.rank}, {spec.length})")
        parts = [self.task_token.expand(batch, -1, -1)]
        if self.config.step_embedding:
            if steps is None:
                raise InputError("this attack model embeds the fine-tuning step: pass the LoRA's steps")
            steps = torch.as_tensor(steps, device=self.task_token.device).reshape(-1)
            if steps.shape[0] != batch:
                raise InputError(f"got {steps.shape[0]} steps for a batch of {batch} LoRAs")
            embedded = self.step_proj(steps).to(self.task_token.dtype)
            parts.append(self.step_embedding(embedded)[:, None])
        group_tokens = [encoder(torch.stack([matrices[i] for i in indices], dim=1).to(self.task_token))
                        for encoder, indices in zip(self.matrix_encoders, self.group_indices)]
        parts.append(torch.cat(group_tokens, dim=1).index_select(1, self.token_order))
        if self.num_pad:
            parts.append(self.pad_tokens.expand(batch, -1, -1))
        return torch.cat(parts, dim=1)

    def _transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """LayerNorm (+ positions) -> frozen CLIP encoder -> CLIP's final LayerNorm, as CLIP runs it."""
        transformer = _text_transformer(self.text_encoder)
        hidden = self.input_norm(tokens)
        if self.config.positions == "clip":
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            hidden = hidden + transformer.embeddings.position_embedding(positions)[None]
        elif self.config.positions == "learned":
            hidden = hidden + self.position_embedding
        if self.config.attention == "causal":
            mask = create_causal_mask(config=transformer.config, inputs_embeds=hidden, attention_mask=None,
                                      cache=None)
            out = transformer.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
        else:
            out = transformer.encoder(inputs_embeds=hidden, attention_mask=None, is_causal=False)
        return transformer.final_layer_norm(out.last_hidden_state)

    def _moments(self, matrices: Sequence[torch.Tensor],
                 steps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._transform(self._tokens(matrices, steps))[:, : self.prompt_length]
        return self.to_mu(hidden), self.to_logvar(hidden)

    def forward(self, matrices: Sequence[torch.Tensor], steps: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> EncoderOutput:
        """Encode a batch of LoRAs: `matrices` are per-matrix (batch, rank, length) tensors in layout
        order (`collate_lora_matrices`), `steps` their fine-tuning steps r (batch,)."""
        mu, logvar = self._moments(matrices, steps)
        noise = torch.randn(mu.shape, generator=generator,
                            device=generator.device if generator is not None else mu.device)
        z = mu + torch.exp(0.5 * logvar) * noise.to(mu.device, mu.dtype)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=(1, 2))).mean()
        return EncoderOutput(z, mu, logvar, kl)

    def encode_mean(self, matrices: Sequence[torch.Tensor], steps: torch.Tensor | None = None) -> torch.Tensor:
        """The attack's z = μ (no sampling): what conditions the victim's UNet at attack time."""
        return self._moments(matrices, steps)[0]

    # --- persistence ---------------------------------------------------------------------------

    def _own_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if not k.startswith(TEXT_ENCODER_PREFIX)}

    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors (the frozen CLIP is not saved: it comes from the base)."""
        record = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "config": to_dict(self.config),
            "layout": [spec.to_dict() for spec in self.layout],
            "prompt_length": self.prompt_length, "embedding_dim": self.embedding_dim, "width": self.width,
            "base_fingerprint": self.base_fingerprint,
            "text_encoder_sha256": text_encoder_sha256(self.text_encoder),
        }
        return save_artifact(directory, record, self._own_state_dict(), WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, text_encoder: nn.Module) -> "NetworkAutoencoder":
        """Load a saved attack model onto `text_encoder`, which must be the base's it was trained with."""
        directory = Path(directory)
        record = read_record(directory, ("format", FORMAT), FORMAT_VERSION, "attack model")
        if text_encoder_sha256(text_encoder) != record["text_encoder_sha256"]:
            raise InputError(f"the attack model in {directory} was trained with another base's text encoder "
                             f"(base fingerprint {record.get('base_fingerprint')})")
        model = cls(from_dict(AttackModelConfig, record["config"], where=str(directory / CONFIG_NAME)),
                    tuple(MatrixSpec.from_dict(spec) for spec in record["layout"]), text_encoder,
                    prompt_length=record["prompt_length"], embedding_dim=record["embedding_dim"],
                    base_fingerprint=record.get("base_fingerprint"))
        weights = read_tensors(directory / WEIGHTS_NAME)
        expected = model._own_state_dict()
        if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
            raise InputError(f"{directory / WEIGHTS_NAME} does not match its {CONFIG_NAME}")
        model.load_state_dict(weights, strict=False)
        return model
