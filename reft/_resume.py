"""What a resumed run checks and restores beyond the checkpoint itself (reft.checkpoint): that it
continues the same run (TrainConfig, data, processes), the changes allowed on purpose, and every
process's own RNG state."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping as AbcMapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ._errors import short
from .checkpoint import checkpoints, latest_checkpoint

# How a resumed run's TrainConfig may differ from its checkpoint's: these fields only decide what is
# logged, evaluated and saved, and where; these may change on purpose, with fit(allow_changes=[...]);
# every other field (the data order: batch_size, grad_accum, seed, group_by_length; precision,
# base_dropout) must stay the same.
BOOKKEEPING = ("log_every", "eval_every", "save_every", "output_dir")
CHANGEABLE = ("lr", "max_steps", "epochs", "warmup_ratio", "schedule", "weight_decay", "max_grad_norm")


def check_allow_changes(allow_changes: Sequence[str]) -> set[str]:
    if isinstance(allow_changes, str):
        allow_changes = [allow_changes]
    bad = [k for k in allow_changes if k not in CHANGEABLE]
    if bad:
        raise ValueError(
            f"allow_changes: {short(bad)} cannot change when a run resumes; the fields that can: {', '.join(CHANGEABLE)} "
            "(batch_size, grad_accum, seed and group_by_length decide the data order; precision and base_dropout "
            "the numerics)"
        )
    return set(allow_changes)


def checkpoint_to_resume(resume_from, output_dir) -> str | None:
    """The checkpoint folder `fit(resume_from=)` names (None: a fresh start), or an error."""
    if resume_from is None:
        found = checkpoints(output_dir) if output_dir is not None else []
        if found:
            names = [Path(path).name for _, path in found]
            raise ValueError(
                f"output_dir {str(output_dir)!r} holds checkpoints of an earlier run ({short(names)}): continue that "
                "run with fit(resume_from='latest') (reft train --resume latest), or train into another output_dir"
            )
        return None
    if str(resume_from) == "latest":
        if output_dir is None:
            raise ValueError("resume_from='latest' looks in output_dir, but TrainConfig.output_dir is None")
        return latest_checkpoint(output_dir)
    if not Path(resume_from).is_dir():
        raise FileNotFoundError(f"resume_from={str(resume_from)!r}: no such checkpoint folder")
    return str(resume_from)


def check_resume(path: str, state: dict, saved: dict, allow: set[str], config, *, world: int, total_steps: int,
                 fingerprint: Callable[[], dict]) -> None:
    """Errors, before anything is restored, for a checkpoint this run cannot continue: its TrainConfig
    `config` (the saved one: `saved`), its train_data (`fingerprint()`), processes and steps."""
    mine = asdict(config)
    differ = [k for k in mine if k in saved and k not in BOOKKEEPING and saved[k] != mine[k]]
    refused = [k for k in differ if k not in allow]
    if refused:
        listing = "; ".join(f"saved with {k}={short(saved[k])}, this run has {k}={short(mine[k])}" for k in refused)
        fixed = [k for k in refused if k not in CHANGEABLE]
        hint = (
            f"resuming needs the same {', '.join(fixed)} (the data order and the numerics)"
            if fixed
            else f"to change them on purpose, pass fit(..., allow_changes={refused!r}) "
            f"(reft train ... {' '.join('--allow-change ' + k for k in refused)})"
        )
        raise ValueError(f"{path}: {listing}: {hint}")
    data = state.get("data")
    if isinstance(data, dict):
        mine_data = fingerprint()
        if data != mine_data:
            raise ValueError(
                f"{path}: the checkpoint was trained on {short(data.get('examples'))} examples (sha256 "
                f"{str(data.get('sha256'))[:12]}...), this run's train_data has {mine_data['examples']} (sha256 "
                f"{mine_data['sha256'][:12]}...): a resumed run continues on the same data; train a new run, "
                "in another output_dir, on other data"
            )
    if state.get("world_size") != world:
        raise ValueError(f"{path}: saved with {short(state.get('world_size'))} processes, this run has {world}")
    for key in ("step", "epoch", "batches_done"):
        if not (_is_int(state.get(key)) and state[key] >= 0):
            raise ValueError(f"{path}: malformed training state: {key} = {short(state.get(key))}, expected an int >= 0")
    if not isinstance(state.get("history"), list):
        raise ValueError(f"{path}: malformed training state: history = {short(state.get('history'))}, expected a list")
    if state["step"] >= total_steps:
        limit = f"max_steps={config.max_steps}" if config.max_steps else f"epochs={config.epochs:g}"
        raise ValueError(
            f"{path} is at step {state['step']}, and this run trains {total_steps} steps ({limit}): nothing is "
            "left to train. To train further, raise max_steps and allow it: fit(..., allow_changes=['max_steps']) "
            "(reft train ... --set train.max_steps=N --allow-change max_steps)"
        )


def apply_changes(optimizer, scheduler, config, saved: dict, allow: set[str], fresh_decay: list[float]) -> None:
    """Put the allowed changes of this run's `config` over the restored optimizer and schedule."""
    mine = asdict(config)
    changed = {k for k in allow if k in saved and saved[k] != mine[k]}
    groups = optimizer.param_groups
    if changed & {"lr", "max_steps", "epochs", "warmup_ratio", "schedule"}:  # the schedule from here on
        sched = scheduler
        sched.base_lrs = [config.lr] * len(groups)
        lrs = [base * factor(sched.last_epoch) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(groups, lrs):
            group["initial_lr"], group["lr"] = config.lr, lr
        sched._last_lr = lrs
    if "weight_decay" in changed:
        for group, decay in zip(groups, fresh_decay):
            group["weight_decay"] = decay


def data_fingerprint(data: Sequence[Any]) -> dict:
    """`{"examples": n, "sha256": ...}` of a dataset: its examples' tensors, strings and numbers, in order
    (other values count by their type only)."""
    h = hashlib.sha256()
    for i in range(len(data)):
        _hash_into(h, data[i])
    return {"examples": len(data), "sha256": h.hexdigest()}


def _hash_into(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, AbcMapping):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(f"{key!s}:".encode())
            _hash_into(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _hash_into(h, item)
        h.update(b"]")
    elif isinstance(value, (str, int, float, bool)) or value is None:
        h.update(f"{type(value).__name__} {value!r};".encode())
    else:
        h.update(f"<{type(value).__qualname__}>;".encode())


def process_rng_state() -> dict[str, str]:
    """This process's torch RNG states (CPU, and its current CUDA device's) as base64 text, for JSON."""
    encode = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    rng = {"cpu": encode(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = encode(torch.cuda.get_rng_state())
    return rng


def checked_process_rng(value: Any, rank: int, world: int, path: str) -> dict[str, torch.Tensor] | None:
    """This process's saved RNG states (`state["process_rng"][rank]`), decoded and tried on scratch
    generators, or a ValueError: a bad state fails before anything is restored."""
    if value is None:
        return None
    try:
        if not (isinstance(value, list) and len(value) == world and isinstance(value[rank], dict)):
            raise ValueError(f"expected a list of {world} dicts, got {short(value)}")
        rng = {k: torch.frombuffer(bytearray(base64.b64decode(v, validate=True)), dtype=torch.uint8) for k, v in value[rank].items()}
        torch.Generator().set_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available() and rng["cuda"].shape != torch.cuda.get_rng_state().shape:
            raise ValueError(f"a CUDA state of {rng['cuda'].numel()} bytes")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # binascii.Error is a ValueError
        raise ValueError(f"{path}: process {rank}'s saved RNG state cannot be restored ({str(e)[:200]}); nothing was restored") from None
    return rng


def set_process_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
