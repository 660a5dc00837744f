"""Adapters saved by pyreft 0.1.0 (`reft_model.save(folder)`), read without executing pickled code.

pyreft (on pyvene 0.1.8) saves `config.json` (pyvene's `IntervenableConfig`: one representation
per intervention, `[layer, component, unit, max_number_of_units, low_rank_dimension, ...]`, and each
intervention's class as a string) and one `intkey_<key>.bin` per intervention, a `torch.save`d state
dict. The `.bin` files are read with `torch.load(weights_only=True)`, which rebuilds tensors and
plain containers only and refuses anything else; class names are looked up in a table, never imported.

pyreft does not save two things, which the caller gives: the positions (they live in pyreft's data
module, not the model) and the activation of interventions built with `act_fn` (pyreft's own
`load` drops it too). Tying follows pyreft's layout: each site listed once is one intervention
(`share_weights=True`, or a one-sided spec); with a two-sided spec, a list made of the same sites
twice (pyreft's `layers + layers`, `share_weights=False`) gives the first half the first positions
and the second half the last ones.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import short
from .interventions.base import Intervention, make_intervention
from .positions import PositionSpec
from .sites import COMPONENTS

CONFIG_NAME = "config.json"
# pyvene's RepresentationConfig fields, in the order config.json lists them.
_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension", "intervention_type", "intervention",
           "subspace_partition", "group_key", "intervention_link_key", "moe_key", "source_representation",
           "hidden_source_representation", "latent_dim")
_ORTHOGONAL = "rotate_layer.parametrizations.weight."  # torch's orthogonal parametrization of pyreft's R^T [d, r]
_BUFFERS = ("embed_dim", "interchange_dim")  # pyvene bookkeeping saved beside the weights


def load_pyreft(model: nn.Module, folder: str | os.PathLike, positions: str, *, act: str | None = None,
                adapter_name: str = "default"):
    """Wrap `model` with the adapter pyreft saved in `folder`: an `IntervenableModel`.

    Args:
        model: the base model the adapter was trained on (weights, or on the meta device to convert).
        folder: what `reft_model.save(folder)` wrote (config.json and intkey_*.bin).
        positions: the position spec the adapter was trained with (`"f7+l7"`, `"l1"`, ...).
        act: the activation the interventions were built with (pyreft's `act_fn`), None for linear.
        adapter_name: the name of the adapter in the wrapper.
    """
    from .model import IntervenableModel

    interventions, tied = read_pyreft(folder, positions, act=act)
    return IntervenableModel(model, interventions, positions=positions, tied=tied, adapter_name=adapter_name)


def convert_pyreft(folder: str | os.PathLike, output: str | os.PathLike, model: nn.Module, positions: str, *,
                   act: str | None = None) -> None:
    """Write the pyreft adapter in `folder` as a reft adapter in `output` (`save_pretrained`'s format)."""
    rm = load_pyreft(model, folder, positions, act=act)
    try:
        rm.save_pretrained(output)
    finally:
        rm.remove()


def read_pyreft(folder: str | os.PathLike, positions: str, *, act: str | None = None) -> tuple[dict[str, Any], bool]:
    """`({site: intervention or (prefix, suffix)}, tied)` from pyreft's folder, the weights copied in."""
    folder = Path(folder)
    spec = PositionSpec.parse(positions)
    config = _read_config(folder)
    reps = config["representations"]
    described = [(_site(rep, folder), _class_name(cls, folder)) for rep, cls in zip(reps, config["intervention_types"])]
    keys = _keys(reps)
    order = config.get("sorted_keys") or keys
    if sorted(order) != sorted(keys):
        raise ValueError(f"{folder / CONFIG_NAME}: sorted_keys {short(order)} do not match the representations' keys {short(keys)}")
    # (site, key, pyreft class) in the order of sorted_keys, which is the order of pyreft's unit_locations
    entries = [(described[keys.index(key)][0], key, described[keys.index(key)][1]) for key in order]
    sites = [site for site, _, _ in entries]
    half = len(sites) // 2
    if len(set(sites)) == len(sites):
        tied, pairs = True, [[e] for e in entries]
    elif spec.two_sided and len(sites) % 2 == 0 and sites[:half] == sites[half:] and len(set(sites[:half])) == half:
        tied, pairs = False, [[a, b] for a, b in zip(entries[:half], entries[half:])]
    else:
        raise ValueError(
            f"{folder / CONFIG_NAME}: sites {sites} repeat in a layout pyreft does not write: each site once "
            "(share_weights=True, or a one-sided spec), or the same list twice with a two-sided spec like 'f7+l7' "
            f"(share_weights=False: first half prefix, second half suffix); positions given: {positions!r}"
        )
    if not tied and not spec.two_sided:
        raise ValueError(f"untied pyreft adapters need a two-sided positions spec 'f<n>+l<m>', got {positions!r}")
    interventions = {}
    for group in pairs:
        site = group[0][0]
        ivs = tuple(_intervention(folder / f"intkey_{key}.bin", cls, act) for _, key, cls in group)
        interventions[site] = ivs[0] if len(ivs) == 1 else ivs
    return interventions, tied


# ------------------------------------------------------------------------------ config.json
def _read_config(folder: Path) -> dict:
    file = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {str(folder)!r}: expected a folder saved by pyreft's reft_model.save()")
    if not file.is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise FileNotFoundError(f"{file}: missing; not a pyreft adapter folder (it holds {present})")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("representations"), list) or not config["representations"]:
        raise ValueError(f"{file}: no 'representations' list; not a pyreft/pyvene adapter (reft adapters load with from_pretrained)")
    types = config.get("intervention_types")
    if not isinstance(types, list) or len(types) != len(config["representations"]):
        raise ValueError(f"{file}: 'intervention_types' must list one class per representation, got {short(types)}")
    if (folder / "pytorch_model.bin").exists():
        raise ValueError(
            f"{folder}: pytorch_model.bin holds trained base-model parameters (pyreft's include_model=True, e.g. a "
            "classifier head); converting them is not supported: only the interventions would carry over"
        )
    config["representations"] = [_representation(r, file) for r in config["representations"]]
    return config


def _representation(raw: Any, file: Path) -> dict:
    if isinstance(raw, list) and len(raw) <= len(_FIELDS):
        rep = dict(zip(_FIELDS, raw))
    elif isinstance(raw, dict):
        rep = dict(raw)
    else:
        raise ValueError(f"{file}: malformed representation {short(raw)}; expected pyvene's list [layer, component, unit, ...]")
    return {field: rep.get(field) for field in _FIELDS}


def _keys(representations: list[dict]) -> list[str]:
    """pyvene's intervention keys (`IntervenableModel._get_representation_key`): the .bin file names."""
    keys, seen = [], {}
    for rep in representations:
        unit = str(rep["unit"]).replace(".", "_")
        stem = f"layer_{rep['layer']}_comp_{rep['component']}_unit_{unit}_nunit_{rep['max_number_of_units']}"
        if "." in str(rep["component"]):
            stem = f"comp_{str(rep['component']).replace('.', '_')}_unit_{unit}_nunit_{rep['max_number_of_units']}"
        seen[stem] = seen.get(stem, -1) + 1
        keys.append(f"{stem}#{seen[stem]}")
    return keys


def _site(rep: dict, folder: Path) -> str:
    where = f"{folder / CONFIG_NAME}: representation {rep['layer']}/{rep['component']}"
    if rep["component"] not in COMPONENTS or not isinstance(rep["layer"], int):
        raise ValueError(f"{where}: component {rep['component']!r} has no reft site; supported: {', '.join(COMPONENTS)}")
    if rep["unit"] != "pos" or rep["max_number_of_units"] not in (1, None):
        raise ValueError(f"{where}: unit {rep['unit']!r} x {rep['max_number_of_units']}; only unit 'pos' (one token per unit) converts")
    for field in ("intervention_link_key", "subspace_partition", "moe_key", "source_representation", "hidden_source_representation"):
        if rep[field] not in (None, False):
            raise ValueError(f"{where}: {field} = {short(rep[field])} is not supported (reft interventions take no sources, links or subspaces)")
    return f"layers.{rep['layer']}.{rep['component']}"


# ------------------------------------------------------------------------------ interventions
def _class_name(text: Any, folder: Path) -> str:
    match = re.fullmatch(r"<class '([\w.]+)'>", str(text))
    name = match[1].rsplit(".", 1)[-1] if match else None
    if name not in _CONVERT:
        raise ValueError(f"{folder / CONFIG_NAME}: intervention {short(text)} does not convert; supported: {', '.join(_CONVERT)}")
    return name


def _read_state(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from a pyreft .bin, unpickling tensors and plain containers only (never code)."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; the pyreft folder is incomplete")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and containers; others for a corrupt file
        raise ValueError(
            f"{file}: refused: it holds something other than tensors and plain containers, or is corrupt; reft reads pyreft "
            f"files with torch.load(weights_only=True) and never runs pickled code ({str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{file}: expected a state dict {{name: tensor}}, got {short(state)}")
    return {k: v for k, v in state.items() if k not in _BUFFERS}


def _orthogonal(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """pyreft's `R^T` `[d, r]` from torch's orthogonal parametrization, recomputed by torch itself."""
    original, base = state.pop(_ORTHOGONAL + "original"), state.pop(_ORTHOGONAL + "0.base")
    holder = nn.Module()
    holder.weight = nn.Parameter(original.clone())  # the same shape and dtype as pyreft's LowRankRotateLayer
    nn.utils.parametrizations.orthogonal(holder)  # the same default map pyreft's layer got
    holder.load_state_dict({"parametrizations.weight.original": original, "parametrizations.weight.0.base": base})
    with torch.no_grad():
        return holder.weight.detach().clone()


def _loreft(s, act):
    return "loreft", {"R.weight": s.pop("rotate_layer").T, "W.weight": s.pop("weight"), "W.bias": s.pop("bias")}


def _noreft(s, act):
    W2, bias = s.pop("proj_layer.weight"), s.pop("learned_source.bias")
    if "proj_layer.bias" in s:  # act(W1 h + b) - (W2 h + c): with a linear act, the bias b - c
        if act not in (None, "linear"):
            raise ValueError(f"NoreftIntervention with add_bias=True and act_fn {act!r} has no reft equivalent")
        bias = bias - s.pop("proj_layer.bias")
    return "noreft", {"W1.weight": s.pop("learned_source.weight"), "W1.bias": bias, "W2": W2}


def _nodireft(s, act):
    s.pop("proj_layer.bias", None)  # NodiReFT uses only proj_layer.weight
    return "direft", {"W1.weight": s.pop("learned_source.weight"), "W1.bias": s.pop("learned_source.bias"), "W2": s.pop("proj_layer.weight")}


def _direft(s, act):
    return "orth_direft", {"R.weight": _orthogonal(s).T, "W.weight": s.pop("learned_source.weight"), "W.bias": s.pop("learned_source.bias")}


def _consreft(s, act):
    return "consreft", {"R.weight": _orthogonal(s).T, "b": s.pop("learned_source")}


def _lobireft(s, act):
    return "lobireft", {"R.weight": _orthogonal(s).T, "b": s.pop("learned_source")}


# pyreft class -> the reft intervention and its tensors (pyreft's R^T [d, r] becomes reft's R [r, d])
_CONVERT = {
    "LoreftIntervention": _loreft,
    "NoreftIntervention": _noreft,
    "NodireftIntervention": _nodireft,  # h + W2^T act(W1 h + b): reft's DiReFT
    "DireftIntervention": _direft,  # the same with an orthogonal R: reft's OrthDiReFT
    "ConsreftIntervention": _consreft,
    "LobireftIntervention": _lobireft,
}
_TAKES_ACT = ("loreft", "noreft", "direft", "orth_direft")


def _intervention(file: Path, cls: str, act: str | None) -> Intervention:
    state = _read_state(file)
    try:
        name, tensors = _CONVERT[cls](state, act)
    except KeyError as e:
        raise ValueError(f"{file}: {cls} state dict lacks {e}; it holds {sorted(state)}") from None
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    if state:
        raise ValueError(f"{file}: unexpected tensors {sorted(state)} for a {cls}")
    dtypes = {t.dtype for t in tensors.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # pyreft keeps R in float32 beside a bf16 W
    rank, hidden_size = tensors["R.weight" if "R.weight" in tensors else "W2"].shape
    kwargs = {"act": act} if name in _TAKES_ACT and act is not None else {}
    iv = make_intervention(name, hidden_size=hidden_size, rank=rank, dtype=dtype, **kwargs)
    try:
        iv.load_state_dict({k: t.to(dtype) for k, t in tensors.items()})
    except RuntimeError as e:
        raise ValueError(f"{file}: the {cls} tensors do not fit reft's {name} ({str(e).splitlines()[0]})") from None
    return iv
