"""The Trainer's optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .interventions.base import OrthonormalRows


def make_optimizer(rm: nn.Module, config) -> torch.optim.AdamW:
    """AdamW with `config`'s (a TrainConfig's) lr; weight decay only on matrices that are not R
    (orthonormal rows): decaying R stalls LoReFT."""
    orthonormal = {id(p) for m in rm.modules() if isinstance(m, OrthonormalRows) for p in m.parameters()}
    decay, no_decay = [], []
    for p in rm.trainable_parameters():
        (decay if p.dim() >= 2 and id(p) not in orthonormal else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # one fused kernel for every tensor: about 2 ms less a step with 30 LoReFT sites (bench/RESULTS.md)
        return torch.optim.AdamW(groups, lr=config.lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype that fused AdamW does not support
        return torch.optim.AdamW(groups, lr=config.lr)


def make_scheduler(optimizer, config, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`config`'s (a TrainConfig's) warm-up, then its schedule, over `total` steps."""
    warmup = int(config.warmup_ratio * total)
    schedule = config.schedule

    def factor(step: int) -> float:  # the lr of step `step` (0-based) as a fraction of config.lr
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
