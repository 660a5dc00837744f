"""Adapters and training checkpoints on disk: safetensors for tensors, JSON for everything else.

An adapter folder holds `adapter_config.json` (format version, reft version, every site with its
intervention's registered name and constructor arguments, positions and tying, head module paths,
a fingerprint of the base model) and `adapter_model.safetensors` (the intervention tensors, and the
head's under `head.`). Loading rebuilds interventions through the registry only: no code is ever
deserialized, no class is ever imported from a string. A training checkpoint is an adapter folder
plus `training_state.json` and `training_state.safetensors` (optimizer, scheduler, RNG states and
the caller's state).

Every write is atomic: files go into a temporary folder beside the target, are flushed to disk, and
the folder is then renamed onto the target (on Linux, atomically swapped with an existing one), so
a crash at any point leaves either the previous folder or the new one, never a mix. A write never
removes what it did not write: it refuses a target folder that holds anything but this library's own
files, and what it does not rewrite of those (checkpoints, the log, the recipe, other adapters) it
keeps. Reading is bounded by what the files record: sizes and checksums are checked before a tensor
file is read, JSON files are capped in size and depth, and sizes are checked against the base model
before anything is built.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import numbers
import os
import random
import re
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from ._errors import short
from .config import ReftConfig
from .interventions.base import Intervention
from .sites import find_stacks, hidden_size_of, resolve_site

DEFAULT_ADAPTER = "default"  # the adapter saved at a folder's root; others go in sub-folders named after them
PEFT_FOLDER = "peft"  # where a peft base model's own adapter is saved beside ours
FORMAT_VERSION = 1  # bump when a reader of the previous version could misread a new adapter
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TRAINING_STATE_NAME = "training_state.json"
TRAINING_TENSORS_NAME = "training_state.safetensors"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_NUMBER_LIST = re.compile(r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]")
# What a save may find in its target folder (and keeps, when it does not rewrite it): the adapter and
# training-state files, the recipe `reft train` saves beside an adapter (reft.cli.RECIPE_NAME), the
# trainer's log (reft.train.LOG_NAME), checkpoint-{step} folders, other adapter folders, and the
# temporaries of an interrupted write (`.{name}.tmp-*`, `.{name}.old-*`).
_OWN_FILES = (CONFIG_NAME, WEIGHTS_NAME, TRAINING_STATE_NAME, TRAINING_TENSORS_NAME, "recipe.yaml", "log.jsonl")
_TEMPORARY = re.compile(r"\..+\.(tmp|old)-.*")
_OWN_DEPTH = 3  # folders nested deeper than this in a target are not this library's
_MAX_JSON_BYTES = 64 * 2**20  # adapter_config.json is a few KB; training_state.json grows with the log
_MAX_JSON_DEPTH = 32  # the deepest file this library writes nests 6 levels

PathLike = str | os.PathLike


# ===================================================================== adapters
def save_adapter(rm, path: PathLike) -> None:
    """Write `rm`'s adapters to folder `path`: `"default"` at its root, every other one in `path/<name>/`.

    The folder is replaced atomically: an existing adapter at `path` stays intact until the new one
    is complete on disk. Called by `IntervenableModel.save_pretrained`.
    """
    with _atomic_folder(path) as tmp:
        _write_adapters(rm, tmp)


def read_adapter(model: nn.Module, path: PathLike) -> tuple[ReftConfig, dict[str, list[Intervention]], dict[str, torch.Tensor]]:
    """The adapter saved in folder `path`, for `model`: `(config, {site: [interventions]}, head tensors)`.

    Everything is checked before anything is attached: the format version, the base model's
    fingerprint (model type, hidden size, number of layers, shapes of the edited modules), the
    intervention names (registered ones only) and sizes (before any weight is allocated), the
    tensors' integrity, names, shapes and dtypes. On any error a ValueError (or FileNotFoundError)
    is raised and `model` is left untouched; the head tensors are for the caller to copy in.
    """
    folder = Path(path)
    where = folder / CONFIG_NAME
    raw = read_json(folder, CONFIG_NAME, "an adapter")
    check_format(raw, "reft-adapter", where)
    _check_base_model(raw, model, folder)
    config = ReftConfig.from_dict(raw, str(where))
    _check_sites(model, config, raw, folder)
    try:
        interventions = config.build(model)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    tensors = _read_tensors(folder, WEIGHTS_NAME, raw)
    expected = _tensor_table(interventions, config.head, model)
    _check_tensors(tensors, expected, folder / WEIGHTS_NAME)
    with torch.no_grad():
        for key, live in expected.items():
            if not key.startswith("head."):
                live.copy_(tensors[key])
    head = {key.removeprefix("head."): t for key, t in tensors.items() if key.startswith("head.")}
    return config, interventions, head


def _write_adapters(rm, folder: Path) -> None:
    for name in rm.adapter_names:
        target = folder if name == DEFAULT_ADAPTER else folder / name
        target.mkdir(exist_ok=True)
        _write_adapter(rm, target, name)
    if hasattr(rm.model, "peft_config") and hasattr(rm.model, "save_pretrained"):
        rm.model.save_pretrained(str(folder / PEFT_FOLDER))  # LoRA (or another peft tuner) trained beside


def _write_adapter(rm, folder: Path, name: str = "default") -> None:
    config = _adapter_config(rm, name)
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in _live_tensors(rm, name).items()}
    data = _st_save(tensors, metadata={"format": "pt"})
    _write_bytes(folder / WEIGHTS_NAME, data)
    config["files"] = {WEIGHTS_NAME: _file_record(data)}
    _write_bytes(folder / CONFIG_NAME, _json_bytes(config))


def _adapter_config(rm, name: str = "default") -> dict:
    from . import __version__

    for site, ivs in rm.interventions_of(name).items():
        for iv in ivs:
            if not iv.name:
                raise ValueError(
                    f"site {site!r}: {type(iv).__name__} is not a registered intervention; "
                    "decorate it with @reft.register_intervention(name) so that adapters can name it"
                )
    config = rm.reft_config[name]
    return {
        "format": "reft-adapter",
        "format_version": FORMAT_VERSION,
        "reft_version": __version__,
        "base_model": _fingerprint(rm.model, [rm.site_of(site) for site in config.sites]),
        **config.to_dict(),
    }


def _fingerprint(model: nn.Module, sites) -> dict:
    """What an adapter needs of its base model: type, sizes, and the shapes of the edited modules.

    A peft model is fingerprinted as the base model under it (paths and shapes without peft's
    wrappers and adapter weights), so an adapter trained with LoRA loads on the plain base and back.
    """
    base = _base_of(model)
    config = base.config
    paths = {id(m): p for p, m in base.named_modules()}
    return {
        "model_type": getattr(config, "model_type", None),
        "architecture": type(base).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,  # informative only: never checked
        "hidden_size": hidden_size_of(base),
        "num_layers": _num_layers(base),
        "modules": {
            site.name: {"path": paths.get(id(site.module)), "shapes": _shapes(site.module, model)} for site in sites
        },
    }


def _base_of(model: nn.Module) -> nn.Module:
    """The transformers model under a peft model; any other model itself."""
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def _shapes(module: nn.Module, model: nn.Module) -> dict[str, list[int]]:
    """`{parameter: shape}` of a module, without a peft model's adapter weights and wrapper names."""
    tuners = set(getattr(model, "peft_config", {}) or {})  # peft's adapter names, e.g. "default"
    shapes = {}
    for name, p in module.named_parameters():
        parts = name.split(".")
        if tuners & set(parts):  # lora_A.default.weight and the like
            continue
        shapes[".".join(x for x in parts if x != "base_layer")] = list(p.shape)
    return shapes


def _num_layers(model: nn.Module) -> int | dict[str, int]:
    stacks = find_stacks(model)
    if set(stacks) == {""}:
        return len(stacks[""][1])
    return {side: len(blocks) for side, (_, blocks) in stacks.items()}


def _live_tensors(rm, name: str = "default") -> dict[str, torch.Tensor]:
    """`{key in the file: live parameter or buffer}` for an adapter's interventions and head."""
    return _tensor_table(rm.interventions_of(name), rm.reft_config[name].head, rm.model)


def _tensor_table(interventions: dict[str, list[Intervention]], head: list[str], model: nn.Module) -> dict:
    table = {}
    for site, ivs in interventions.items():
        for i, iv in enumerate(ivs):
            for name, t in iv.state_dict(keep_vars=True).items():
                table[f"interventions.{site}.{i}.{name}"] = t
    for path in head:
        for name, p in model.get_submodule(path).named_parameters():
            table[f"head.{path}.{name}"] = p
    return table


# ============================================================= training checkpoints
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
    with _atomic_folder(path) as tmp:
        _write_adapters(rm, tmp)
        data = _st_save(tensors, metadata={"format": "pt"})
        _write_bytes(tmp / TRAINING_TENSORS_NAME, data)
        record["files"] = {TRAINING_TENSORS_NAME: _file_record(data)}
        _write_bytes(tmp / TRAINING_STATE_NAME, _json_bytes(record))  # written last


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
        _check_base_model(config, rm.model, sub)
        ours = _adapter_config(rm, name)
        for key in ("sites", "head"):
            if config.get(key) != ours[key]:
                saved, mine = _first_difference(config.get(key), ours[key])
                raise ValueError(f"{sub / CONFIG_NAME}: the checkpoint's {key} differ from the model's: {saved} vs {mine}")
        adapters[name] = _read_tensors(sub, WEIGHTS_NAME, config)
        _check_tensors(adapters[name], _live_tensors(rm, name), sub / WEIGHTS_NAME)
    tensors = _read_tensors(folder, TRAINING_TENSORS_NAME, record)
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
        _copy_into(rm, name, tensors)
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
        match = _CHECKPOINT.fullmatch(entry.name)
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


# ================================================================== validation
def read_json(folder: Path, name: str, what: str) -> dict:
    file = folder / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {str(folder)!r}: expected {what} with {name}")
    if not os.path.lexists(file):
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise FileNotFoundError(f"{file}: missing; expected {what} here (the folder holds {short(present)})")
    data = _read_regular_file(file, None, _MAX_JSON_BYTES)  # not a FIFO, a device, nor a huge file
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}); the file is truncated or corrupt") from None
    except RecursionError:
        value = None  # nested past Python's own limit: reported as too deep below
    depth = _json_depth(value) if value is not None else _MAX_JSON_DEPTH + 1
    if depth > _MAX_JSON_DEPTH:
        raise ValueError(f"{file}: JSON nested deeper than {_MAX_JSON_DEPTH} levels; not a file this library wrote")
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a decoded JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= _MAX_JSON_DEPTH:  # deeper is already too deep: stop walking
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _read_regular_file(file: Path, size: int | None, limit: int | None = None) -> bytes:
    """The bytes of regular file `file` (through symlinks), read only when its size on disk is `size`
    (when given) and at most `limit`: never more bytes than were asked for, from a FIFO or a device."""
    try:
        info = file.stat()
    except OSError as e:
        raise FileNotFoundError(f"{file}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{file}: not a regular file; an adapter holds regular files only")
    if size is not None and info.st_size != size:
        raise ValueError(
            f"{file}: has {info.st_size} bytes, but the config records {size} bytes: the file is truncated, "
            "corrupt, replaced or was changed after saving"
        )
    if limit is not None and info.st_size > limit:
        raise ValueError(f"{file}: {info.st_size} bytes, more than the {limit} bytes such a file may have")
    want = info.st_size
    with open(file, "rb") as f:
        data = f.read(want + 1)  # one more: a file that grew since stat() is not read whole
    if len(data) != want:
        raise ValueError(f"{file}: changed size while being read ({want} bytes, then {len(data)}+)")
    return data


def check_format(config: dict, kind: str, where: Path) -> None:
    if config.get("format") != kind:
        raise ValueError(f"{where}: 'format' is {short(config.get('format'))}, expected {kind!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{where}: 'format_version' is {short(version)}, expected an int 1..{FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {version} was written by a newer reft ({short(config.get('reft_version'))}); "
            f"this reft reads format_version up to {FORMAT_VERSION}: upgrade reft"
        )


def _check_base_model(config: dict, model: nn.Module, folder: Path) -> None:
    saved = config.get("base_model")
    if not isinstance(saved, dict):
        raise ValueError(f"{folder / CONFIG_NAME}: missing the 'base_model' fingerprint")
    found = {
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": hidden_size_of(model),
        "num_layers": _num_layers(model),
    }
    for key, value in found.items():
        if saved.get(key) != value:
            raise ValueError(
                f"{folder}: the adapter was saved for a base model with {key} {short(saved.get(key))} "
                f"({short(saved.get('name_or_path') or saved.get('architecture'))}), but this model has {key} {value!r} "
                f"({type(model).__name__})"
            )


def _check_sites(model: nn.Module, config: ReftConfig, raw: dict, folder: Path) -> None:
    """Every site resolves and its module has the recorded shapes; the head exists. Before any building."""
    modules = raw["base_model"].get("modules")
    modules = modules if isinstance(modules, dict) else {}
    for site in config.sites:
        try:
            resolved = resolve_site(model, site)
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None
        recorded = modules.get(site, {}).get("shapes") if isinstance(modules.get(site), dict) else None
        if isinstance(recorded, dict):
            mine = _shapes(resolved.module, model)
            if sorted(map(str, recorded.values())) != sorted(map(str, mine.values())):
                diff = {n: (recorded.get(n), mine.get(n)) for n in set(recorded) | set(mine) if recorded.get(n) != mine.get(n)}
                raise ValueError(
                    f"{folder}: site {site!r}: the edited module's parameter shapes differ from the saved "
                    f"base model's ({{name: (saved, this model)}}: {str(diff)[:200]})"
                )
    for path in config.head:
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{folder}: head module {short(path)} not found in {type(model).__name__}") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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


def _read_tensors(folder: Path, name: str, record: dict) -> dict[str, torch.Tensor]:
    """The tensors of `folder/name`, read only after its size matches the one recorded in `record`
    (`{"files": {name: {"bytes", "sha256"}}}`), then checked against the recorded SHA-256."""
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; {folder} is incomplete")
    files = record.get("files")
    expected = files.get(name) if isinstance(files, dict) else None
    if not isinstance(expected, dict):
        raise ValueError(
            f"{file}: its config records no size and checksum (\"files\": {{{name!r}: {{\"bytes\", \"sha256\"}}}}); "
            "this library writes them with every file and reads no tensor file without them"
        )
    size, digest = expected.get("bytes"), expected.get("sha256")
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0 and isinstance(digest, str)):
        raise ValueError(f"{file}: malformed size and checksum record {short(expected)}; expected {{\"bytes\": int, \"sha256\": str}}")
    data = _read_regular_file(file, size)
    found = _file_record(data)
    if found != {"bytes": size, "sha256": digest}:
        raise ValueError(
            f"{file}: has {found['bytes']} bytes with sha256 {found['sha256'][:16]}..., but the config records "
            f"{size} bytes with sha256 {digest[:16]}...: the file is truncated, corrupt or was changed after saving"
        )
    try:
        return _st_load(data)
    except Exception as e:  # safetensors raises its own error type for every malformed file
        raise ValueError(f"{file}: not a valid safetensors file ({e}); it is truncated or corrupt") from None


def _check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{file}: missing tensor(s) {missing}; the file holds {sorted(found)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ValueError(f"{file}: unexpected tensor(s) {unexpected}; expected exactly {sorted(expected)}")
    for key, want in expected.items():
        got = found[key]
        cast_ok = key.startswith("head.") and got.dtype.is_floating_point and want.dtype.is_floating_point
        if got.shape != want.shape or (got.dtype != want.dtype and not cast_ok):
            raise ValueError(
                f"{file}: tensor {key!r} has shape {list(got.shape)} and dtype {got.dtype}, "
                f"expected shape {list(want.shape)} and dtype {want.dtype}"
            )


def _copy_into(rm, name: str, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, live in _live_tensors(rm, name).items():
            live.copy_(tensors[key])


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ================================================================ atomic writes
@contextmanager
def _atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` in one rename.

    Before anything is written, `save_target` refuses a `path` whose folder holds entries this library
    did not write; of its own entries, those the new folder does not rewrite are kept.
    """
    target = save_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: a saved folder has the user's usual permissions
        yield tmp
        _fsync(tmp)
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(target.parent)


def save_target(path: PathLike) -> Path:
    """The folder a save to `path` replaces: `path`, or the folder a symlink at `path` points to.

    Raises a ValueError, before anything is written, when that is the working folder or one above it,
    a file, or a folder holding entries this library did not write (`_foreign_entries`).
    """
    given = Path(path)
    real = Path(os.path.realpath(given))
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd or real in cwd.parents:
        where = "the working folder" if real == cwd else "a folder above the working folder"
        raise ValueError(
            f"save path {str(path)!r} is {where} ({real}): a save replaces its folder as a whole; "
            f"give a sub-folder, e.g. {str(given / 'adapter')!r}"
        )
    target = given.resolve() if given.is_symlink() else given  # replace the folder a link points to, keep the link
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target}: exists and is not a folder; give a folder path to save into")
    if target.is_dir():
        _refuse_foreign(target)
    return target


def _refuse_foreign(target: Path) -> None:
    foreign = _foreign_entries(target)
    if foreign:
        raise ValueError(
            f"{target}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} this library did not write "
            f"({short(foreign)}); a save replaces the folder and would remove them: save into a new or empty "
            "folder, or move them away"
        )


def _foreign_entries(folder: Path, depth: int = 0) -> list[str]:
    """The entries of `folder` that are not this library's (paths relative to it, folders ending in /).

    This library's: the files named in `_OWN_FILES`, the temporaries of an interrupted write, and
    folders holding only such files that are checkpoints (`checkpoint-{step}`) or adapters (with an
    `adapter_config.json`). A symlink is never this library's: it writes none.
    """
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif _TEMPORARY.fullmatch(name):
            continue
        elif entry.is_file():
            if name not in _OWN_FILES:
                foreign.append(name)
        elif entry.is_dir() and depth + 1 < _OWN_DEPTH and (_CHECKPOINT.fullmatch(name) or (entry / CONFIG_NAME).is_file()):
            foreign += [f"{name}/{inner}" for inner in _foreign_entries(entry, depth + 1)]
        else:
            foreign.append(name + "/" if entry.is_dir() else name)
    return foreign


def _umask() -> int:
    """The process's umask: from /proc where it says, so that it is read without being changed."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_dead_temporaries(target: Path) -> None:
    """Delete `.{name}.tmp-{pid}-*` folders beside `target` whose process is gone (a save killed
    before its rename). Those of live processes, and `.old-*` folders (which may hold the only copy
    of a previous version), are left alone."""
    if os.name != "posix":
        return
    prefix = f".{target.name}.tmp-"
    for folder in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user's
        return True
    return True


def _replace_folder(tmp: Path, target: Path) -> None:
    """Put complete folder `tmp` at `target`: a rename, or an atomic swap with an existing target after
    this library's entries of the target that `tmp` lacks are hard-linked into `tmp` (kept, not removed).

    Another process may create or replace `target` between the checks and the rename (two saves of the
    same new folder): the rename then fails with ENOTEMPTY and the swap is made instead.
    """
    for _ in range(10):
        if not os.path.lexists(target):
            try:
                os.rename(tmp, target)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue  # created meanwhile by another process: swap with it
        _refuse_foreign(target)
        _carry_over(target, tmp)
        if _exchange(tmp, target):
            shutil.rmtree(tmp)  # now the previous version: what it held that is kept is linked into the new one
            return
        # no atomic swap here: the previous version sits at `.{name}.old-*` for two renames
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        try:
            os.rename(target, old)
        except FileNotFoundError:
            continue  # moved away meanwhile by another process
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old)
        return
    raise OSError(errno.EBUSY, "other processes kept replacing this folder while it was saved", str(target))


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (copy, where links are not supported) into `new` every entry of `old` that `new` lacks,
    except the temporary folders of writes in progress or interrupted."""
    for entry in old.iterdir():
        dest = new / entry.name
        if os.path.lexists(dest) or (_TEMPORARY.fullmatch(entry.name) and ".tmp-" in entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest)


def _link_or_copy(src: PathLike, dst: PathLike) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _write_bytes(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file(path: PathLike, data: bytes) -> None:
    """Write file `path` atomically: a temporary file beside it (`.{name}.tmp-*`), flushed, then renamed
    onto it; its permissions follow the umask, as those of a file the user creates."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some platforms and filesystems cannot fsync a folder
    finally:
        os.close(fd)


def _json_bytes(value: dict) -> bytes:
    text = json.dumps(value, indent=2)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m[1].split(",")) + "]", text)
    return (text + "\n").encode("utf-8")  # indented, with shapes and other number lists on one line


def _file_record(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
