"""Training checkpoints on disk: an adapter folder (`reft.adapter`) plus the state to resume from.

A checkpoint folder, conventionally `{output_dir}/checkpoint-{step}`, holds the adapter (loadable on
its own with `from_pretrained`), `training_state.json` and `training_state.safetensors` (optimizer,
scheduler, RNG states and the caller's state). Writes are atomic and reads bounded (`reft._files`);
everything is checked before anything is restored.
"""

from __future__ import annotations

import json
import numbers
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as _st_save

from ._errors import short
from ._files import (
    CHECKPOINT_FOLDER,
    CONFIG_NAME,
    TRAINING_STATE_NAME,
    TRAINING_TENSORS_NAME,
    WEIGHTS_NAME,
    PathLike,
    atomic_folder,
    file_record,
    json_bytes,
    read_json,
    read_tensors,
    write_bytes,
)
from .adapter import (
    DEFAULT_ADAPTER,
    FORMAT_VERSION,
    adapter_config,
    check_base_model,
    check_format,
    check_tensors,
    copy_into,
    live_tensors,
    write_adapters,
)


def save_training_checkpoint(path: PathLike, rm, optimizer=None, scheduler=None, state: dict | None = None) -> None:
    """Write a training checkpoint to folder `path` (conventionally `{output_dir}/checkpoint-{step}`).

    It holds the adapter (interventions + head, loadable on its own with `from_pretrained`), the
    optimizer's and LR scheduler's `state_dict()`s (tensors to safetensors, the rest to JSON), the
    RNG states (torch CPU, CUDA when available, Python `random`, numpy) and `state`, the caller's
    JSON-able dict (step, epoch, data order, ...). Atomic like `save_adapter`. Consumes no randomness.
    """
    from . import __version__

    state = dict(state or {})
    try:
        json.dumps(state, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"state must be a JSON-able dict (numbers, strings, lists, dicts): {e}") from None
    tensors: dict[str, torch.Tensor] = {}
    record = {
        "format": "reft-training-checkpoint",
        "format_version": FORMAT_VERSION,
        "reft_version": __version__,
        "state": state,
        "optimizer": _encode(optimizer.state_dict(), tensors, "optimizer") if optimizer is not None else None,
        "scheduler": _encode(scheduler.state_dict(), tensors, "scheduler") if scheduler is not None else None,
        "rng": _rng_state(tensors),
    }
    with atomic_folder(path) as tmp:
        write_adapters(rm, tmp)
        data = _st_save(tensors, metadata={"format": "pt"})
        write_bytes(tmp / TRAINING_TENSORS_NAME, data)
        record["files"] = {TRAINING_TENSORS_NAME: file_record(data)}
        write_bytes(tmp / TRAINING_STATE_NAME, json_bytes(record))  # written last


def load_training_checkpoint(path: PathLike, rm, optimizer=None, scheduler=None) -> dict:
    """Restore a checkpoint written by `save_training_checkpoint` in place; returns the caller's `state`.

    `rm` must have the same sites and interventions as the saved one, and `optimizer` / `scheduler`
    the same structure; all of it is checked before anything is restored. Restores the adapter
    tensors, the optimizer and scheduler states and the RNG states (CUDA only where devices exist).
    """
    folder = Path(path)
    record = read_json(folder, TRAINING_STATE_NAME, "a training checkpoint")
    check_format(record, "reft-training-checkpoint", folder / TRAINING_STATE_NAME)
    _checked_state(record, folder)
    adapters = {}  # adapter name -> its tensors in the checkpoint
    for name in rm.adapter_names:
        sub = folder if name == DEFAULT_ADAPTER else folder / name
        config = read_json(sub, CONFIG_NAME, f"adapter {name!r} of a training checkpoint")
        check_format(config, "reft-adapter", sub / CONFIG_NAME)
        check_base_model(config, rm.model, sub)
        ours = adapter_config(rm, name)
        for key in ("sites", "head"):
            if config.get(key) != ours[key]:
                saved, mine = _first_difference(config.get(key), ours[key])
                raise ValueError(f"{sub / CONFIG_NAME}: the checkpoint's {key} differ from the model's: {saved} vs {mine}")
        adapters[name] = read_tensors(sub, WEIGHTS_NAME, config)
        check_tensors(adapters[name], live_tensors(rm, name), sub / WEIGHTS_NAME)
    tensors = read_tensors(folder, TRAINING_TENSORS_NAME, record)
    try:
        opt_state = _decode(record["optimizer"], tensors)
        sched_state = _decode(record["scheduler"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / TRAINING_STATE_NAME}: malformed optimizer or scheduler state ({e!r})") from None
    if optimizer is not None:
        if opt_state is None:
            raise ValueError(f"{folder}: the checkpoint has no optimizer state, but an optimizer was given")
        _check_optimizer(opt_state, optimizer, folder)
    if scheduler is not None and sched_state is None:
        raise ValueError(f"{folder}: the checkpoint has no scheduler state, but a scheduler was given")
    rng = _read_rng_state(record.get("rng"), tensors, folder / TRAINING_STATE_NAME)

    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    for name, tensors in adapters.items():
        copy_into(rm, name, tensors)
    _set_rng_state(rng)
    return record["state"]


def read_training_state(path: PathLike) -> dict:
    """The caller's `state` in the checkpoint at `path`, read and checked without restoring anything."""
    folder = Path(path)
    record = read_json(folder, TRAINING_STATE_NAME, "a training checkpoint")
    check_format(record, "reft-training-checkpoint", folder / TRAINING_STATE_NAME)
    return _checked_state(record, folder)


def _checked_state(record: dict, folder: Path) -> dict:
    state = record.get("state")
    if not isinstance(state, dict):
        raise ValueError(f"{folder / TRAINING_STATE_NAME}: 'state' is {short(state)}, expected a JSON object")
    return state


def latest_checkpoint(output_dir: PathLike) -> str | None:
    """The complete `checkpoint-{step}` folder under `output_dir` with the highest step, or None.

    Temporary folders of an interrupted save (`.checkpoint-{step}.tmp-*`) are never returned.
    """
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def checkpoints(output_dir: PathLike) -> list[tuple[int, str]]:
    """`[(step, folder)]` of the complete `checkpoint-{step}` folders under `output_dir`, by step."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = CHECKPOINT_FOLDER.fullmatch(entry.name)
        if match and entry.is_dir() and (entry / TRAINING_STATE_NAME).is_file():
            found.append((int(match[1]), str(entry)))
    return sorted(found)


def _check_optimizer(saved: dict, optimizer, folder: Path) -> None:
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = saved.get("param_groups", [])
    mine = [len(g["params"]) for g in groups]
    theirs = [len(g["params"]) for g in saved_groups]
    if mine != theirs:
        raise ValueError(
            f"{folder}: the checkpoint's optimizer has param groups of sizes {theirs}, this optimizer {mine}"
        )


def _first_difference(saved: Any, mine: Any) -> tuple[str, str]:
    """The first differing entries of two lists (else the values), as JSON cut to a readable length."""
    if isinstance(saved, list) and isinstance(mine, list):
        for a, b in zip(saved, mine):
            if a != b:
                return _clip(a), _clip(b)
        return f"{len(saved)} entries", f"{len(mine)} entries"
    return _clip(saved), _clip(mine)


def _clip(value: Any, limit: int = 300) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return short(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rng_state(tensors: dict[str, torch.Tensor]) -> dict:
    tensors["rng.torch"] = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, s in enumerate(cuda):
        tensors[f"rng.cuda.{i}"] = s
    rng = {"python": _encode(random.getstate(), tensors, "rng.python"), "cuda_devices": len(cuda), "numpy": None}
    np = _numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(cached)}
    return rng


def _read_rng_state(rng: Any, tensors: dict[str, torch.Tensor], where: Path) -> dict:
    """The saved RNG states, decoded and complete, or a ValueError (before anything is restored)."""
    try:
        out = {"torch": tensors["rng.torch"], "python": _decode(rng["python"], tensors), "numpy": None}
        out["cuda"] = [tensors[f"rng.cuda.{i}"] for i in range(rng.get("cuda_devices") or 0)]
        if rng.get("numpy"):
            s = rng["numpy"]
            out["numpy"] = (s["name"], s["keys"], int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: malformed or incomplete RNG state ({short(e)})") from None
    try:  # each state set on a scratch generator first: a bad one fails here, before anything is restored
        torch.Generator().set_state(out["torch"])
        random.Random().setstate(out["python"])
        np = _numpy()
        if np is not None and out["numpy"] is not None:
            name, keys, pos, has_gauss, cached = out["numpy"]
            np.random.RandomState().set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        for i, state in enumerate(out["cuda"][: torch.cuda.device_count() if torch.cuda.is_available() else 0]):
            if state.dtype != torch.uint8 or state.shape != torch.cuda.get_rng_state(i).shape:
                raise ValueError(f"CUDA device {i}: a {state.dtype} tensor of shape {list(state.shape)}")
    except (TypeError, ValueError, RuntimeError, OverflowError, IndexError) as e:
        raise ValueError(f"{where}: the saved RNG state cannot be restored ({str(e)[:200]}); nothing was restored") from None
    return out


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():  # on fewer devices than saved, the first ones; on a CPU-only machine, none
        for i, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    random.setstate(rng["python"])
    np = _numpy()
    if np is not None and rng["numpy"] is not None:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


# JSON <-> Python values with tensors kept aside. Tuples and non-string dict keys (the optimizer's
# integer parameter ids) survive the round trip, because `load_state_dict` and `random.setstate`
# need them exactly as they were.
def _encode(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors would be stored under {key!r}")
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, f"{key}.key"), _encode(v, tensors, f"{key}.{k}")] for k, v in value.items()]}
    raise TypeError(f"{key}: cannot store a {type(value).__name__} in a checkpoint (only JSON values and tensors)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}
