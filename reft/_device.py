"""Where a module runs: accelerate's execution device when it dispatched the model, else the device
of the module's first real (not meta) tensor."""

from __future__ import annotations

import torch
from torch import nn


def execution_device(module: nn.Module, model: nn.Module) -> torch.device:
    """Where `module` runs: accelerate's execution device, else its first real (not meta) tensor's."""
    for m in (module, *module.modules()):
        hook = getattr(m, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return first_device(model)


def first_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")
