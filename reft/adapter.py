"""Adapters on disk: safetensors for tensors, JSON for everything else; the format and its validation.

An adapter folder holds `adapter_config.json` (format version, reft version, every site with its
intervention's registered name and constructor arguments, positions and tying, head module paths,
a fingerprint of the base model) and `adapter_model.safetensors` (the intervention tensors, and the
head's under `head.`). Loading rebuilds interventions through the registry only: no code is ever
deserialized, no class is ever imported from a string. Everything is checked before anything is
built: the format version, the base model's fingerprint, the sizes, the tensors' integrity, names,
shapes and dtypes. Writes and bounded reads are `reft._files`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save as _st_save
from torch import nn

from ._errors import short
from ._files import CONFIG_NAME, WEIGHTS_NAME, PathLike, atomic_folder, file_record, json_bytes, read_json, read_tensors, write_bytes
from .config import ReftConfig
from .interventions.base import Intervention
from .sites import find_stacks, hidden_size_of, resolve_site

DEFAULT_ADAPTER = "default"  # the adapter saved at a folder's root; others go in sub-folders named after them
PEFT_FOLDER = "peft"  # where a peft base model's own adapter is saved beside ours
FORMAT_VERSION = 1  # bump when a reader of the previous version could misread a new adapter


def save_adapter(rm, path: PathLike) -> None:
    """Write `rm`'s adapters to folder `path`: `"default"` at its root, every other one in `path/<name>/`.

    The folder is replaced atomically: an existing adapter at `path` stays intact until the new one
    is complete on disk. Called by `IntervenableModel.save_pretrained`.
    """
    with atomic_folder(path) as tmp:
        write_adapters(rm, tmp)


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
    check_base_model(raw, model, folder)
    config = ReftConfig.from_dict(raw, str(where))
    _check_sites(model, config, raw, folder)
    try:
        interventions = config.build(model)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    tensors = read_tensors(folder, WEIGHTS_NAME, raw)
    expected = _tensor_table(interventions, config.head, model)
    check_tensors(tensors, expected, folder / WEIGHTS_NAME)
    with torch.no_grad():
        for key, live in expected.items():
            if not key.startswith("head."):
                live.copy_(tensors[key])
    head = {key.removeprefix("head."): t for key, t in tensors.items() if key.startswith("head.")}
    return config, interventions, head


def write_adapters(rm, folder: Path) -> None:
    for name in rm.adapter_names:
        target = folder if name == DEFAULT_ADAPTER else folder / name
        target.mkdir(exist_ok=True)
        _write_adapter(rm, target, name)
    if hasattr(rm.model, "peft_config") and hasattr(rm.model, "save_pretrained"):
        rm.model.save_pretrained(str(folder / PEFT_FOLDER))  # LoRA (or another peft tuner) trained beside


def _write_adapter(rm, folder: Path, name: str = "default") -> None:
    config = adapter_config(rm, name)
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in live_tensors(rm, name).items()}
    data = _st_save(tensors, metadata={"format": "pt"})
    write_bytes(folder / WEIGHTS_NAME, data)
    config["files"] = {WEIGHTS_NAME: file_record(data)}
    write_bytes(folder / CONFIG_NAME, json_bytes(config))


def adapter_config(rm, name: str = "default") -> dict:
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


def live_tensors(rm, name: str = "default") -> dict[str, torch.Tensor]:
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


def check_base_model(config: dict, model: nn.Module, folder: Path) -> None:
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


def check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path) -> None:
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


def copy_into(rm, name: str, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, live in live_tensors(rm, name).items():
            live.copy_(tensors[key])
