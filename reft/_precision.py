"""Training precision: fp32, or bf16 / fp16 autocast (parameters stay in their own dtype)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The forward's context for `precision` (one of `PRECISIONS`) on `device`."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
