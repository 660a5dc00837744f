"""The Trainer under torchrun: joining the process group, DDP over the trainable parameters, the
gradient average used instead when the base model is sharded with FSDP2's `fully_shard`, and a
gather of every process's predictions."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ._device import execution_device


def device_of(rm: nn.Module) -> torch.device:
    """Where batches go: the base model's execution device (accelerate's, when it dispatched the model;
    its offloaded weights are on `meta`), else its first real parameter's."""
    return execution_device(rm.model, rm.model)


def init_distributed(rm: nn.Module) -> tuple[int, int]:
    """`(rank, world size)`; under torchrun, joins the process group (nccl on CUDA, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return 0, 1
    if not dist.is_initialized():
        cuda = device_of(rm).type == "cuda"
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            rm.to(f"cuda:{local}")
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def wrap_ddp(rm: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters only: the frozen base is loaded alike on every process and is
    neither broadcast nor synchronised."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in rm.named_parameters() if not p.requires_grad] + [n for n, _ in rm.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(rm, frozen)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(rm, device_ids=ids)


def sharded(rm: nn.Module) -> bool:
    """Whether `rm`'s base model holds parameters sharded by FSDP2's `fully_shard` (DTensors).

    The trainable ones must not be: the Trainer keeps them replicated and averages their gradients.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return False
    sharded = [(name, p.requires_grad) for name, p in rm.named_parameters() if isinstance(p, DTensor)]
    trained = [name for name, requires_grad in sharded if requires_grad]
    if trained:
        raise ValueError(
            f"trainable parameter {trained[0]!r} is sharded by fully_shard: shard the base model (its layers, then "
            "the model itself) before wrapping it, never the IntervenableModel; keep a trained head out with "
            "fully_shard(model, ignored_params=set(head.parameters())) (docs/distributed.md)"
        )
    return bool(sharded)


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average the replicated parameters' gradients over the processes, as DDP would: one all-reduce
    per dtype. A parameter that no process gave a gradient keeps None (AdamW skips it, as in one
    process); one that only some did gets zeros from the others."""
    groups: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    for group in groups.values():
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
        has = torch.tensor([p.grad is not None for p in group], dtype=group[0].dtype, device=grads[0].device)
        flat = torch.cat([*grads, has])  # [sum of sizes + len(group)]: one message
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p, given in zip(group, (flat[-len(group):] > 0).tolist()):  # the step's one host sync here
            p.grad = flat[offset : offset + p.numel()].view_as(p) if given else None
            offset += p.numel()


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D tensors of different lengths from every process (for compute_metrics)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
