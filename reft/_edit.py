"""How a hooked module's hidden states are edited inside one call of an `IntervenableModel`.

A *unit* is one intervention of one adapter at one site, with the part of the site's position spec
it edits. Every hooked module has a list of units (from every adapter that edits it); a call says
which adapters apply: all rows through the active ones in order, or each row through its own
(`route`). Units of the same class and configuration at a module run as one batched computation
over the routed rows: their weights stacked, each row's picked by its adapter (`torch.func`), so a
mixed batch costs no Python loop over examples.

Everything here is tensor code: positions are index tensors, routing is an index tensor, and rows a
unit does not apply to get the index -1 (a zero edit) or keep their hidden states by `torch.where`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import nn

from .interventions.base import Intervention
from .positions import PositionSpec, resolve
from .sites import Site

MODES = ("prompt", "every_token")


@dataclass(eq=False)
class Unit:
    """One intervention of adapter `adapter` at `site`, editing `part` of the site's spec.

    `part` is "all" (every token), "both" (a tied spec's first and last tokens), "prefix" or
    "suffix" (an untied site's two interventions).
    """

    adapter: str
    site: Site
    spec: PositionSpec
    part: str
    intervention: Intervention
    max_norm: float | None = None

    def covers_generated(self, mode: str) -> bool:
        """Whether, in generation mode `mode`, this unit also edits each generated token."""
        return mode == "every_token" and (self.part == "all" or (self.part in ("both", "suffix") and self.spec.last > 0))

    def __post_init__(self):
        # Units with equal keys compute the same function of different weights: they batch together.
        config = json.dumps(self.intervention.config, sort_keys=True, default=str)
        self.group_key = (type(self.intervention), config, self.part, self.max_norm)


def units_of(adapter: str, site: Site, spec: PositionSpec, interventions: list[Intervention], max_norm: float | None) -> list[Unit]:
    if spec.all:
        parts = ["all"]
    elif len(interventions) == 1:
        parts = ["both"]
    else:
        parts = ["prefix", "suffix"]
    return [Unit(adapter, site, spec, part, iv, max_norm) for part, iv in zip(parts, interventions)]


@dataclass
class Generation:
    """A `generate` call in progress: which columns are the prompt, and what this forward pass sees.

    The prompt is columns `[0, prompt_length)` of the full sequence, the generated tokens follow it.
    Each forward pass (prefill, a decode step, or with `use_cache=False` the whole sequence again)
    covers columns `[start, start + shape[1])`; the model's top-level pre-hook sets `start` (the KV
    cache length, a Python int) and `shape` before the layers run.
    """

    mode: str  # "prompt": edit prompt positions only; "every_token": also edit each generated token
    prompt_length: int  # P, columns of the left-padded prompt; 0 for an encoder-decoder's decoder
    start: int = 0  # columns already in the KV cache when this forward pass began
    shape: tuple[int, int] | None = None  # [batch * beams, seq] of this forward pass


@dataclass
class Call:
    """What the hooks need to know about the wrapper call in progress."""

    adapters: tuple[str, ...]  # route is None: applied to every row, in this order; else the names route indexes
    masks: dict[str, torch.Tensor | None]  # per stack: the mask position specs count tokens in
    positions: torch.Tensor | None = None  # explicit [B, P] positions, -1 = none
    shape: tuple[int, int] | None = None  # [batch, seq] of the inputs, when known
    route: torch.Tensor | None = None  # [B] index into `adapters` per row, -1 = no adapter
    generation: Generation | None = None  # set while `generate` runs
    cache: dict = field(default_factory=dict)  # index tensors, routing tensors, per-module unit lists

    def batch_shape(self) -> tuple[int, int] | None:
        """`[batch, seq]` of the call: its main mask's shape, else its inputs'."""
        mask = self.masks.get("")
        return tuple(mask.shape) if mask is not None else self.shape


# ===================================================================== editing one module's output
def edit(units: list[Unit], h: torch.Tensor, call: Call) -> torch.Tensor:
    """Apply the call's units among `units` to hidden states `h` `[B, T, d]` (or `[B * T, d]`)."""
    key = ("units", id(units))
    mine = call.cache.get(key)
    if mine is None:
        order = {name: i for i, name in enumerate(call.adapters)}
        mine = call.cache[key] = sorted((u for u in units if u.adapter in order), key=lambda u: order[u.adapter])
    if not mine:
        return h
    site = mine[0].site
    if h.shape[-1] != mine[0].intervention.hidden_size:
        raise ValueError(
            f"site {site.name!r}: hidden states have size {h.shape[-1]}, "
            f"but the intervention expects hidden_size {mine[0].intervention.hidden_size}"
        )
    generation = call.generation
    if generation is not None and site.stack != "encoder":
        return _edit_generating(mine, h, call, generation)
    flat = h.dim() == 2
    if flat:
        h = _unflatten(site, h, call.batch_shape())
    if call.positions is not None:
        untied = [u.site.name for u in mine if u.part in ("prefix", "suffix")]
        if untied:
            raise ValueError(f"site {untied[0]!r} is untied: explicit positions= need tied=True")
    h = _run(mine, h, call, lambda u: _index(u, h, call))
    return h.flatten(0, 1) if flat else h


def _edit_generating(units: list[Unit], h: torch.Tensor, call: Call, generation: Generation) -> torch.Tensor:
    """Edit `h` during `generate`: prompt positions by the spec, generated tokens by the mode.

    A decode step with the KV cache holds only generated tokens: in mode "prompt" it returns `h`
    untouched (no tensor op, no host sync); in mode "every_token" the units that reach generated
    tokens (`"all"`, or a last-token spec) edit all of it.
    """
    new_units = [u for u in units if u.covers_generated(generation.mode)]
    if generation.start >= generation.prompt_length:  # a decode step: generated tokens only
        return _run(new_units, h, call, lambda u: None) if new_units else h
    flat = h.dim() == 2
    if flat:
        h = _unflatten(units[0].site, h, generation.shape)
    split = min(generation.prompt_length - generation.start, h.shape[1])  # prompt columns in this pass
    prompt, new = h[:, :split], h[:, split:]
    prompt = _run(units, prompt, call, lambda u: None if u.part == "all" else _prompt_index(u, prompt, call, generation))
    if new_units and new.shape[1] > 0:
        new = _run(new_units, new, call, lambda u: None)
    h = torch.cat([prompt, new], dim=1) if new.shape[1] > 0 else prompt
    return h.flatten(0, 1) if flat else h


def _run(units: list[Unit], h: torch.Tensor, call: Call, index_of) -> torch.Tensor:
    """Apply `units` to `h` `[B, T, d]`: in order to every row, or each row through its adapter's."""
    if call.route is None:
        for u in units:
            h = _apply(u.intervention, h, index_of(u), u.max_norm)
        return h
    route = _route(call, h.shape[0], h.device)
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.group_key, []).append(u)
    for group in groups.values():
        slot = _slots(call, group, route)  # [B]: the unit of `group` each row uses, -1 = none
        indices = [index_of(u) for u in group]
        if len(group) == 1:
            h = _apply(group[0].intervention, h, indices[0], group[0].max_norm, rows=slot >= 0)
        else:
            h = _apply(_stacked(group, slot), h, _pick(indices, slot), group[0].max_norm, rows=slot >= 0)
    return h


def _apply(fn, h: torch.Tensor, index: torch.Tensor | None, max_norm: float | None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`fn` on every token (`index` None) or at `index` `[B, P]`, on the rows where `rows` `[B]` is True."""
    if index is None:
        out = _capped(h, fn(h).to(h.dtype), max_norm)
        return out if rows is None else torch.where(rows[:, None, None], out, h)
    if rows is not None:
        index = torch.where(rows[:, None], index, -1)
    return apply_at(fn, h, index, max_norm)


def apply_at(fn, h: torch.Tensor, index: torch.Tensor, max_norm: float | None = None) -> torch.Tensor:
    """Edit `h` `[B, T, d]` at `index` `[B, P]` (-1 = no position): gather, intervene, add back.

    Rows are picked with `index_select` on `h` viewed as `[B * T, d]`, whose backward keeps only the
    row index (`gather` would keep all of `h` alive until the backward pass, at every site). Slots
    with -1 add a zero delta at position 0, so they never disturb a real edit there.
    """
    B, T, d = h.shape
    valid = (index >= 0).unsqueeze(-1)  # [B, P, 1]
    rows = (index.clamp(min=0) + T * torch.arange(B, device=h.device).unsqueeze(1)).flatten()  # [B * P]
    flat = h.reshape(B * T, d)
    selected = flat.index_select(0, rows).view(*index.shape, d)  # [B, P, d]
    delta = _capped_delta(fn(selected).to(h.dtype) - selected, max_norm)
    delta = torch.where(valid, delta, 0)
    return flat.index_add(0, rows, delta.reshape(-1, d)).view(B, T, d)


def _capped_delta(delta: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Scale each token's edit down to norm `max_norm` where it is longer (BREP's cap)."""
    if max_norm is None:
        return delta
    norm = delta.float().norm(dim=-1, keepdim=True)
    return delta * (max_norm / norm.clamp(min=max_norm)).to(delta.dtype)


def _capped(h: torch.Tensor, out: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    return out if max_norm is None else h + _capped_delta(out - h, max_norm)


def _stacked(group: list[Unit], slot: torch.Tensor):
    """One function for the rows of every unit of `group`: each row through its own unit's weights.

    The units' parameters and buffers are stacked `[m, ...]` and indexed per row `[B, ...]`;
    `torch.func.vmap` runs the first unit's forward over rows with those weights. Gradients flow
    through the stack to each unit's own parameters, and only from the rows routed to it.
    """
    base = group[0].intervention
    states = [dict(u.intervention.named_parameters()) | dict(u.intervention.named_buffers()) for u in group]
    pick = slot.clamp(min=0)
    per_row = {name: torch.stack([s[name] for s in states]).index_select(0, pick) for name in states[0]}

    def one(weights, x):
        return torch.func.functional_call(base, weights, (x,))

    return lambda x: torch.vmap(one, randomness="different")(per_row, x)


def _pick(indices: list[torch.Tensor | None], slot: torch.Tensor) -> torch.Tensor | None:
    """Each row's index tensor from its unit's: `[B, P_max]`, -1-padded (None: every token)."""
    if indices[0] is None:
        return None
    P = max(i.shape[1] for i in indices)
    stacked = torch.stack([nn.functional.pad(i, (0, P - i.shape[1]), value=-1) for i in indices])  # [m, B, P]
    B = stacked.shape[1]
    return stacked[slot.clamp(min=0), torch.arange(B, device=stacked.device)]


def _route(call: Call, B: int, device: torch.device) -> torch.Tensor:
    """The call's route for a batch of `B` rows (beams and returned sequences repeat each prompt's),
    on `device` (the hidden states'; a model split over devices has sites on several)."""
    if call.route.shape[0] == B and call.route.device == device:
        return call.route
    key = ("route", B, device)
    if key not in call.cache:
        route = call.route
        if route.shape[0] != B:
            if B % route.shape[0]:
                raise ValueError(f"batch {B} is not a multiple of the {route.shape[0]} rows adapter_names routes")
            route = route.repeat_interleave(B // route.shape[0])
        call.cache[key] = route.to(device)
    return call.cache[key]


def _slots(call: Call, group: list[Unit], route: torch.Tensor) -> torch.Tensor:
    """`[B]`: for each row, the position in `group` of its adapter's unit, or -1."""
    key = ("slots", tuple(u.adapter for u in group), route.shape[0], route.device)
    if key not in call.cache:
        lookup = [-1] * (len(call.adapters) + 1)  # lookup[k + 1]: slot of adapter k; lookup[0]: no adapter
        for s, u in enumerate(group):
            lookup[call.adapters.index(u.adapter) + 1] = s
        table = torch.tensor(lookup, device=route.device)
        call.cache[key] = table[route + 1]
    return call.cache[key]


# ===================================================================== positions
def _indices(spec: PositionSpec, part: str, mask: torch.Tensor) -> torch.Tensor:
    prefix, suffix = resolve(spec, mask)
    return {"both": lambda: torch.cat([prefix, suffix], dim=1), "prefix": lambda: prefix, "suffix": lambda: suffix}[part]()


def _index(u: Unit, h: torch.Tensor, call: Call) -> torch.Tensor | None:
    """`[B, P]` positions `u` edits in `h` `[B, T, d]`: explicit, or from its spec and the mask; None: every token."""
    if call.positions is not None:
        return call.positions.to(h.device)
    if u.part == "all":
        return None
    B, T = h.shape[:2]
    key = (u.spec, u.part, u.site.stack, h.device)  # no sizes in a key: under torch.compile hashing one fixes it
    if key in call.cache and call.cache[key][1] == (B, T):
        return call.cache[key][0]
    mask = call.masks.get(u.site.stack)
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=h.device)
    elif mask.shape != (B, T):
        raise ValueError(
            f"site {u.site.name!r}: the mask has shape {tuple(mask.shape)} but the hidden states "
            f"are [batch, seq] = ({B}, {T})"
        )
    index = _indices(u.spec, u.part, mask.to(h.device))
    call.cache[key] = (index, (B, T))
    return index


def _prompt_index(u: Unit, prompt: torch.Tensor, call: Call, generation: Generation) -> torch.Tensor:
    """`[B * beams, P]` positions of `u` within `prompt` (the prompt's columns from `start`)."""
    B, T = prompt.shape[:2]
    start = generation.start
    key = ("prompt", u.spec, u.part, u.site.stack, B, start, T, prompt.device)
    if key in call.cache:
        return call.cache[key]
    mask = call.masks[u.site.stack].to(prompt.device)  # [B0, P] prompt mask
    index = _indices(u.spec, u.part, mask)
    if B != mask.shape[0]:  # beams or returned sequences, expanded with repeat_interleave by `generate`
        if B % mask.shape[0]:
            raise ValueError(f"site {u.site.name!r}: batch {B} is not a multiple of the prompt batch {mask.shape[0]}")
        index = index.repeat_interleave(B // mask.shape[0], dim=0)
    if (start, T) != (0, generation.prompt_length):  # a prefill in chunks: the positions in [start, start + T)
        index = torch.where((index >= start) & (index < start + T), index - start, -1)
    call.cache[key] = index
    return index


def _unflatten(site: Site, h: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    """View `[B * T, d]` hidden states as `[B, T, d]`: some models (OPT) flatten them around their FFN."""
    if shape is None or shape[0] * shape[1] != h.shape[0]:
        raise ValueError(
            f"site {site.name!r} sees flattened hidden states {tuple(h.shape)}: call the model "
            "through the IntervenableModel with an attention_mask so that [batch, seq] is known"
        )
    return h.view(*shape, h.shape[-1])
