"""`TrainConfig`: how to train, checked when it is made (each bad value named with its valid range)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import short
from ._precision import PRECISIONS
from .objectives import OBJECTIVES

_SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    """How to train. The defaults train a LoReFT/RED adapter on a small dataset reasonably well."""

    lr: float = 4e-3  # peak learning rate; ReFT papers use 1e-3..9e-3 for these tiny modules
    epochs: float = 3  # passes over train_data (a fraction stops part-way); ignored when max_steps is set
    max_steps: int | None = None  # optimizer steps in all; None: `epochs` decides
    batch_size: int = 8  # examples per micro-batch and process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * processes
    warmup_ratio: float = 0.0  # fraction of the steps over which lr rises linearly to `lr`
    schedule: str = "linear"  # after warm-up: "linear" or "cosine" decay to 0, or "constant"
    weight_decay: float = 0.0  # AdamW decay on matrices only: never on R (orthonormal rows) nor vectors/biases
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    seed: int = 42  # data order (per epoch) and dropout
    precision: str = "fp32"  # "fp32", or "bf16" / "fp16" autocast (parameters stay in their own dtype)
    eval_every: int | None = None  # steps between evaluations on eval_data; None: once, after the last step
    log_every: int = 10  # steps between log records: the only host syncs of the loss
    save_every: int | None = None  # steps between checkpoints in output_dir (and one at the end); None: none
    output_dir: str | None = None  # log.jsonl and checkpoint-{step}/ go here; None: write nothing
    base_dropout: bool = False  # run the frozen base model in train mode while training (its own dropout on)
    group_by_length: bool = False  # batch examples of similar length (less padding, faster); order stays seeded
    gradient_checkpointing: bool = False  # recompute each layer in the backward: less memory, ~1.3x the time
    objective: str = "ce"  # "ce" (cross-entropy), or "dpo" / "reps" on preference pairs (reft.objectives)
    beta: float = 0.1  # DPO's weight on the log-probability margin
    compile: bool | str = False  # torch.compile the forward and backward (True: inductor, or a backend name); see training.md

    def __post_init__(self):
        def bad(name: str, valid: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} = {short(getattr(self, name))}: must be {valid}")

        if not (_is_number(self.lr) and 0 < self.lr < 1):
            raise bad("lr", "a number in (0, 1), e.g. 4e-3")
        if self.max_steps is None and not (_is_number(self.epochs) and 0 < self.epochs < math.inf):
            raise bad("epochs", "a positive finite number (or set max_steps)")
        if self.max_steps is not None and not (_is_int(self.max_steps) and self.max_steps >= 1):
            raise bad("max_steps", "an int >= 1 or None")
        for name in ("batch_size", "grad_accum", "log_every"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an int >= 1")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) is not None and not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an int >= 1 or None")
        if not (_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise bad("warmup_ratio", "a number in [0, 1)")
        if not (isinstance(self.schedule, str) and self.schedule in _SCHEDULES):
            raise bad("schedule", f"one of {', '.join(_SCHEDULES)}")
        if not (_is_number(self.weight_decay) and 0 <= self.weight_decay < math.inf):
            raise bad("weight_decay", "a finite number >= 0")
        if self.max_grad_norm is not None and not (_is_number(self.max_grad_norm) and 0 < self.max_grad_norm < math.inf):
            raise bad("max_grad_norm", "a finite number > 0 or None")
        if not (isinstance(self.precision, str) and self.precision in PRECISIONS):
            raise bad("precision", f"one of {', '.join(PRECISIONS)}")
        if not _is_int(self.seed):
            raise bad("seed", "an int")
        for name in ("base_dropout", "group_by_length", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.output_dir is not None and not isinstance(self.output_dir, (str, os.PathLike)):
            raise bad("output_dir", "a folder path or None")
        if self.objective not in OBJECTIVES:
            raise bad("objective", f"one of {', '.join(OBJECTIVES)}")
        if not (isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and self.beta > 0):
            raise bad("beta", "a number > 0, e.g. 0.1")
        if not isinstance(self.compile, bool) and self.compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise bad("compile", "True, False or a torch.compile backend name such as 'inductor' or 'aot_eager' (torch._dynamo.list_backends())")
        if self.save_every is not None and self.output_dir is None:
            raise ValueError(f"TrainConfig.save_every = {self.save_every}: checkpoints need an output_dir")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    """An int or float that is not a bool nor NaN (comparisons with NaN are all False anyway)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
