"""Which attention kernel a UNet trains with, chosen by device and precision.

PyTorch's fused scaled_dot_product_attention (diffusers' AttnProcessor2_0, the UNet's default) is
the right kernel on a GPU and for fp32 on a CPU. Its CPU flash kernel in bf16 is not: at the tiny
lfw base's shapes its backward took 8x its fp32 time, and made a bf16 fine-tune *slower* than an
fp32 one, while the unfused math (diffusers' AttnProcessor: baddbmm, softmax, bmm) runs at bf16
speed (benchmarks/zoo_step_profile.py). "auto" picks math for bf16 on a CPU and sdpa otherwise.
Both compute the same function; only rounding differs.

Except under torch.compile's inductor: the math processor in a bf16-autocast UNet compiled by
inductor (torch 2.13, CPU) trained nothing, every LoRA gradient exactly zero, while the same graph
under aot_eager and the sdpa processor under inductor were right. "auto" therefore keeps sdpa
when the UNet is compiled, and "math" with inductor and bf16 is refused. Compiling did not pay
on a CPU anyway (bf16 eager with math: 67 ms per fine-tune step; compiled with sdpa: 99-103 ms).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

ATTENTION_CHOICES = ("auto", "sdpa", "math")


def attention_processor(choice: str, device: torch.device, amp_dtype: torch.dtype | None,
                        compiled_by: str | None = None) -> Any:
    """The diffusers attention processor `choice` names for training on `device` under autocast to `amp_dtype`,
    the UNet compiled by torch.compile's backend `compiled_by` (None: not compiled)."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {choice!r}")
    inductor_bf16 = compiled_by == "inductor" and amp_dtype == torch.bfloat16
    if choice == "auto":
        choice = "math" if device.type == "cpu" and amp_dtype == torch.bfloat16 and compiled_by is None else "sdpa"
    elif choice == "math" and inductor_bf16:
        raise ValueError("attention 'math' with bf16 and torch.compile's inductor trains nothing (zero LoRA "
                         "gradients, torch 2.13); use attention 'sdpa' or 'auto', or do not compile")
    return AttnProcessor2_0() if choice == "sdpa" else AttnProcessor()
