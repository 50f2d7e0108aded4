"""Whether bf16 pays on a device: CPUs without bf16 units run it emulated, several times slower than fp32.

bf16 autocast is the fast mode on GPUs and on CPUs with bf16 matmul units (Intel AMX or AVX-512 BF16:
the lfw zoo 1.9x, `benchmarks/zoo_throughput.py`). On a CPU without them (an AVX2-only AMD EPYC, say)
oneDNN converts and computes in fp32 and pays for the conversions: evaluation sampling ran 16x slower
there (`benchmarks/evaluation_sampling.py`: 0.06x). The results stay right either way (only rounding differs),
so this warns instead of refusing: a setting chosen on one machine may run on another.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
_warned: set[str] = set()  # once per process and kind of work: a zoo worker runs many passes


def native_bf16(device: torch.device) -> bool:
    """True when `device` computes bf16 matmuls in hardware (a CPU with AMX or AVX-512 BF16, a GPU with bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # other accelerators: their own business


def warn_if_emulated_bf16(device: torch.device, amp_dtype: torch.dtype | None, what: str) -> bool:
    """Log one warning when `what` is asked to run under bf16 on a device that would emulate it; True if it did."""
    if amp_dtype != torch.bfloat16 or native_bf16(device):
        return False
    if what in _warned:
        return True
    _warned.add(what)
    capability = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device.type
    logger.warning("%s: bf16 was asked for, but this %s has no bf16 units (%s): it runs emulated and slower "
                   "than fp32 here; mixed_precision 'no' is faster on this machine", what, device.type, capability)
    return True
