"""The Trainer's data: which examples each process trains on per epoch, in which micro-batches; batches
onto the device; and the checks, before any training, that the data can train the model."""

from __future__ import annotations

from collections.abc import Mapping as AbcMapping
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .data import IGNORE_INDEX, TokenizedData


def epoch_batches(size: int, epoch: int, *, world: int, rank: int, batch_size: int, seed: int,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """This process's micro-batches of example indices (of `size` examples) for `epoch`: a seeded shuffle,
    as `DistributedSampler(shuffle=True, seed)` orders them, so every process agrees without talking;
    grouped by length when every example's `lengths` are given."""
    sampler = torch.utils.data.DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    b = batch_size
    if lengths is None:
        return [order[i : i + b] for i in range(0, len(order), b)]
    # As transformers' LengthGroupedSampler: sort each window of 50 micro-batches (of the shuffled
    # order) longest first, cut it into micro-batches, then shuffle the micro-batches.
    batches = []
    for start in range(0, len(order), 50 * b):
        window = sorted(order[start : start + 50 * b], key=lambda i: -lengths[i])
        batches += [window[i : i + b] for i in range(0, len(window), b)]
    shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed + epoch))
    return [batches[i] for i in shuffle.tolist()]


def example_lengths(data: Sequence[Any]) -> list[int]:
    """Every example's length in tokens, for `epoch_batches(..., lengths=)`."""
    return data.lengths() if isinstance(data, TokenizedData) else [len(e["input_ids"]) for e in data]


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a CPU batch to `device`; pinned first on CUDA, so the copy does not stall the host."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_data(rm: nn.Module, data: Sequence[Any], name: str) -> None:
    """Errors, before any training, for an empty dataset, examples past the model's context, bad labels."""
    if len(data) == 0:
        raise ValueError(f"{name} is empty: give at least one example")
    if not _has_labelled_token(data):
        raise ValueError(
            f"{name}: none of its {len(data)} examples has a labelled token (every label is {IGNORE_INDEX}): "
            "the loss would be 0 and nothing would be learned; check that the responses are not empty or masked out"
        )
    if not isinstance(data, TokenizedData):
        return
    model_config = getattr(rm.model, "config", None)
    context = _context_length(model_config)
    longest = max(data.lengths())
    if context is not None and longest > context:
        i = data.lengths().index(longest)
        raise ValueError(
            f"{name}: example {i} has {longest} tokens, but the model's context is {context}; rebuild the data "
            f"with max_length={context} (and on_too_long='skip' to drop the long ones)"
        )
    if data.task == "classification":
        num_labels = getattr(model_config, "num_labels", None)
        labels = torch.stack([e["labels"] for e in data.examples])
        if labels.is_floating_point():
            if num_labels not in (None, 1):
                raise ValueError(f"{name}: float (regression) labels, but the model's head has {num_labels} outputs (needs 1)")
        elif num_labels is not None:
            bad = (labels < 0) | (labels >= num_labels)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(
                    f"{name}: example {i} has label {int(labels[i])}, out of range for the model's head with "
                    f"{num_labels} classes (valid: 0..{num_labels - 1}); build the model with num_labels={int(labels.max()) + 1}"
                )


def _context_length(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _has_labelled_token(data: Sequence[Any]) -> bool:
    """Whether some example carries a label that is not IGNORE_INDEX (for token labels `[n]`, past the
    first token, which nothing predicts). Usually decided by the first example."""
    for i in range(len(data)):
        example = data[i]
        labels = example.get("labels") if isinstance(example, AbcMapping) else None
        if labels is None:
            return True  # examples this loop cannot read: the collator's business
        labels = torch.as_tensor(labels)
        if labels.dim() == 1:
            labels = labels[1:]
        if bool((labels != IGNORE_INDEX).any()):
            return True
    return False
