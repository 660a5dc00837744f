"""`IntervenableModel`: a frozen Hugging Face model with interventions hooked onto named sites.

Hooks are registered once, at construction, and removed by their handles (`remove()`); no other
hook on the model is touched. Each call resolves position specs into index tensors on the model's
device (once per spec and stack per call), and each hook gathers the edited positions, applies its
intervention and scatters the result back, out of place.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .interventions.base import Intervention, make_intervention, registered_interventions
from .positions import PositionSpec, resolve
from .sites import Site, resolve_site


@dataclass
class _Slot:
    """One site with its position spec and one (tied) or two (prefix, suffix) interventions."""

    site: Site
    spec: PositionSpec
    interventions: nn.ModuleList

    @property
    def tied(self) -> bool:
        return len(self.interventions) == 1


@dataclass
class _Generation:
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
class _Call:
    """What the hooks need to know about the forward call in progress."""

    masks: dict[str, torch.Tensor | None]  # per stack: the mask position specs count tokens in
    positions: torch.Tensor | None = None  # explicit [B, P] positions, -1 = none
    shape: tuple[int, int] | None = None  # [batch, seq] of the inputs, when known
    cache: dict = field(default_factory=dict)  # (spec, stack, T) -> index tensors
    generation: _Generation | None = None  # set while `generate` runs


class IntervenableModel(nn.Module):
    """Wrap `model` (any Hugging Face model) with `interventions` at named sites.

    Args:
        model: the base model; its parameters are frozen.
        interventions: `{site: Intervention}`. A site is `"layers.{i}.{component}"` with component in
            `block_input, block_output, attention_output, mlp_input, mlp_output` (prefix `encoder.`
            or `decoder.` in encoder-decoder models), or a dotted module path whose output is edited.
            With `tied=False` a value may be a `(prefix, suffix)` pair of interventions.
        positions: `"all"` (every token), `"f{n}"`, `"l{n}"`, `"f{n}+l{m}"`, or `{site: spec}`.
            Specs count real tokens (the attention mask), or prompt tokens when a call passes a
            `prompt_mask`. A call may instead pass explicit `positions=` `[B, P]` (-1 = none).
        tied: one intervention for both the first and last positions of a site (default), or a
            separate one for each (pyreft's `share_weights=False`).
        head: module path(s) of the base model kept trainable, e.g. `"classifier"` or `"score"`.

    Example:
        >>> rm = IntervenableModel(model, {"layers.3.block_output": LoReFT(576, rank=4)}, positions="l1")
        >>> out = rm(**batch)  # the base model's own output object
    """

    def __init__(
        self,
        model: nn.Module,
        interventions: Mapping[str, Intervention | tuple[Intervention, Intervention]],
        positions: str | PositionSpec | Mapping[str, str | PositionSpec] = "all",
        tied: bool = True,
        head: str | list[str] | None = None,
    ):
        super().__init__()
        if not interventions:
            raise ValueError("interventions is empty: give at least one {site: Intervention}")
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.head = [head] if isinstance(head, str) else list(head or [])
        for path in self.head:
            _submodule(model, path, "head").requires_grad_(True)
        specs = _site_specs(positions, interventions)
        device = next(model.parameters()).device
        self.interventions = nn.ModuleDict()
        self._slots: list[_Slot] = []
        for name, value in interventions.items():
            site = resolve_site(model, name)
            spec = specs[name]
            ivs = _pair(value, spec, tied, name)
            for iv in ivs:
                if site.hidden_size is not None and iv.hidden_size != site.hidden_size:
                    raise ValueError(
                        f"site {name!r}: intervention {type(iv).__name__} has hidden_size {iv.hidden_size}, "
                        f"but the site's hidden size is {site.hidden_size}"
                    )
            self.interventions[_key(name)] = nn.ModuleList(ivs).to(device)
            self._slots.append(_Slot(site, spec, self.interventions[_key(name)]))
        self._call: _Call | None = None
        self._active = True
        self._handles = [self._hook(slot) for slot in self._slots]
        self._handles.append(model.register_forward_pre_hook(lambda m, a, kw: self._step(a, kw), with_kwargs=True))

    # ----------------------------------------------------------------- hooks
    def _hook(self, slot: _Slot) -> torch.utils.hooks.RemovableHandle:
        if slot.site.edits_input:

            def pre_hook(module, args, kwargs):
                if args:
                    return (self._edit(slot, args[0]), *args[1:]), kwargs
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                return args, {**kwargs, key: self._edit(slot, kwargs[key])}

            return slot.site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                return self._edit(slot, output)
            if isinstance(output, tuple):
                return (self._edit(slot, output[0]), *output[1:])
            key = next(iter(output.keys()))  # a ModelOutput: its first field is the hidden states
            output[key] = self._edit(slot, output[key])
            return output

        return slot.site.module.register_forward_hook(hook)

    def _step(self, args: tuple, kwargs: dict) -> None:
        """Top-level pre-hook: during `generate`, record which columns this forward pass covers.

        `start` is the KV cache length: from the 2-D attention mask, which spans the cached and the
        new columns (`generate` drops it when it is all ones), else from the cache. Shapes only.
        """
        call = self._call
        if call is None or call.generation is None:
            return None
        generation = call.generation
        x = kwargs.get("input_ids")
        if x is None:
            x = next((kwargs.get(k) for k in _INPUT_KEYS if kwargs.get(k) is not None), args[0] if args else None)
        if not isinstance(x, torch.Tensor):
            generation.shape, generation.start = None, 0
            return None
        generation.shape = (x.shape[0], x.shape[1])
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or kwargs.get("use_cache") is False:
            generation.start = 0
            return None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and "decoder_input_ids" not in kwargs:
            generation.start = mask.shape[1] - x.shape[1]
        else:
            generation.start = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        return None

    def _edit(self, slot: _Slot, h: torch.Tensor) -> torch.Tensor:
        """Apply `slot`'s interventions to hidden states `h` `[B, T, d]` at the call's positions."""
        if not self._active:
            return h
        call = self._call
        if call is not None and call.generation is not None and slot.site.stack != "encoder":
            return self._edit_generating(slot, h, call.generation)
        _check_size(slot, h)
        explicit = call.positions if call is not None else None
        if slot.spec.all and explicit is None:
            return slot.interventions[0](h).to(h.dtype)
        flat = h.dim() == 2
        if flat:
            h = _unflatten(slot, h, self._batch_shape())
        if explicit is not None:
            if not slot.tied:
                raise ValueError(f"site {slot.site.name!r} is untied: explicit positions= need tied=True")
            indices = [explicit]
        else:
            indices = self._indices(slot, h)
        for intervention, index in zip(slot.interventions, indices):
            h = _apply_at(intervention, h, index)
        return h.flatten(0, 1) if flat else h

    def _edit_generating(self, slot: _Slot, h: torch.Tensor, generation: _Generation) -> torch.Tensor:
        """Edit `h` during `generate`: prompt positions by the spec, generated tokens by the mode.

        A decode step with the KV cache holds only generated tokens: in mode "prompt" it returns `h`
        untouched (no tensor op, no host sync); in mode "every_token" a site whose spec reaches
        generated tokens (`"all"`, or a last-token spec) applies its (suffix) intervention to all of it.
        """
        covers_new = generation.mode == "every_token" and (slot.spec.all or slot.spec.last > 0)
        if generation.start >= generation.prompt_length:  # a decode step: generated tokens only
            if not covers_new:
                return h
            _check_size(slot, h)
            return slot.interventions[-1](h).to(h.dtype)
        _check_size(slot, h)
        flat = h.dim() == 2
        if flat:
            h = _unflatten(slot, h, generation.shape)
        split = min(generation.prompt_length - generation.start, h.shape[1])  # prompt columns in this pass
        prompt, new = h[:, :split], h[:, split:]
        if slot.spec.all:
            prompt = slot.interventions[0](prompt).to(h.dtype)
        else:
            for intervention, index in zip(slot.interventions, self._prompt_indices(slot, prompt, generation)):
                prompt = _apply_at(intervention, prompt, index)
        if covers_new and new.shape[1] > 0:
            new = slot.interventions[-1](new).to(h.dtype)
        h = torch.cat([prompt, new], dim=1) if new.shape[1] > 0 else prompt
        return h.flatten(0, 1) if flat else h

    def _prompt_indices(self, slot: _Slot, prompt: torch.Tensor, generation: _Generation) -> list[torch.Tensor]:
        """Index tensors `[B * beams, P]` of the spec's prompt positions within `prompt` (its columns from `start`)."""
        B, T = prompt.shape[:2]
        start = generation.start
        key = ("prompt", slot.spec, slot.site.stack, slot.tied, B, start, T)
        cache = self._call.cache
        if key in cache:
            return cache[key]
        mask = self._call.masks[slot.site.stack].to(prompt.device)  # [B0, P] prompt mask
        index = _slot_indices(slot, mask)
        if B != mask.shape[0]:  # beams or returned sequences, expanded with repeat_interleave by `generate`
            if B % mask.shape[0]:
                raise ValueError(f"site {slot.site.name!r}: batch {B} is not a multiple of the prompt batch {mask.shape[0]}")
            index = [i.repeat_interleave(B // mask.shape[0], dim=0) for i in index]
        if (start, T) != (0, generation.prompt_length):  # a prefill in chunks: the positions in [start, start + T)
            index = [torch.where((i >= start) & (i < start + T), i - start, -1) for i in index]
        cache[key] = index
        return index

    def _batch_shape(self) -> tuple[int, int] | None:
        """`[batch, seq]` of the call in progress: its main mask's shape, else its inputs'."""
        call = self._call
        if call is None:
            return None
        mask = call.masks.get("")
        return tuple(mask.shape) if mask is not None else call.shape

    def _indices(self, slot: _Slot, h: torch.Tensor) -> list[torch.Tensor]:
        B, T = h.shape[:2]
        key = (slot.spec, slot.site.stack, T, slot.tied)
        call = self._call
        if call is not None and key in call.cache:
            return call.cache[key]
        mask = call.masks.get(slot.site.stack) if call is not None else None
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=h.device)
        elif mask.shape != (B, T):
            raise ValueError(
                f"site {slot.site.name!r}: the mask has shape {tuple(mask.shape)} but the hidden states "
                f"are [batch, seq] = ({B}, {T})"
            )
        index = _slot_indices(slot, mask.to(h.device))
        if call is not None:
            call.cache[key] = index
        return index

    # ----------------------------------------------------------------- calls
    def forward(
        self,
        *args: Any,
        positions: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model with the interventions; returns the base model's own output.

        `prompt_mask` `[B, T]` (1 on prompt tokens) makes position specs count prompt tokens only;
        `positions` `[B, P]` (-1 = none) gives explicit positions for every site.
        """
        with self.calling(args, kwargs, positions=positions, prompt_mask=prompt_mask):
            return self.model(*args, **kwargs)

    @contextmanager
    def calling(
        self,
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        positions: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        generation: _Generation | None = None,
    ) -> Iterator[_Call]:
        """Context in which base-model calls with these inputs see their masks and positions.

        With `generation`, the calls are the forward passes of one `generate` call on this prompt.
        """
        kwargs = kwargs or {}
        device = next(self.model.parameters()).device

        def as_mask(m: torch.Tensor | None) -> torch.Tensor | None:
            return m.to(device).bool() if m is not None else None

        main = as_mask(prompt_mask if prompt_mask is not None else kwargs.get("attention_mask"))
        masks = {"": main, "encoder": main, "decoder": as_mask(kwargs.get("decoder_attention_mask"))}
        shape = _input_shape(args, kwargs)
        if positions is not None:
            positions = _check_positions(positions, shape).to(device)
        previous, self._call = self._call, _Call(masks=masks, positions=positions, shape=shape, generation=generation)
        try:
            yield self._call
        finally:
            self._call = previous

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model without interventions inside this block: `with rm.disabled(): rm(**b)`."""
        previous, self._active = self._active, False
        try:
            yield
        finally:
            self._active = previous

    def generate(self, *args: Any, mode: str = "prompt", **kwargs: Any) -> Any:
        """Hugging Face `generate` with the interventions; see `reft.generation.generate`."""
        from .generation import generate

        return generate(self, *args, mode=mode, **kwargs)

    def merge(self) -> nn.Module:
        """Fold RED into the preceding linear layers; see `reft.generation.merge`."""
        from .generation import merge

        return merge(self)

    def save_pretrained(self, path: str) -> None:
        """Write the adapter (`adapter_config.json` + `adapter_model.safetensors`) to `path`."""
        from .checkpoint import save_adapter

        save_adapter(self, path)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str, device: str | torch.device | None = None):
        """Rebuild an adapter saved with `save_pretrained` on `model`."""
        from .checkpoint import load_adapter

        return load_adapter(cls, model, path, device=device)

    def remove(self) -> None:
        """Remove this wrapper's hooks (and only them); the base model runs unedited afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ----------------------------------------------------------------- info
    def __getitem__(self, site: str) -> Intervention | tuple[Intervention, Intervention]:
        for slot in self._slots:
            if slot.site.name == site:
                return slot.interventions[0] if slot.tied else tuple(slot.interventions)
        raise KeyError(f"no site {site!r}; sites: {', '.join(self.sites)}")

    @property
    def sites(self) -> list[str]:
        return [slot.site.name for slot in self._slots]

    def site_positions(self) -> dict[str, tuple[str, bool]]:
        """`{site: (position spec, tied)}`."""
        return {slot.site.name: (str(slot.spec), slot.tied) for slot in self._slots}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The intervention parameters, and the head's if there is one."""
        return [p for p in self.parameters() if p.requires_grad]

    def _counts(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self._counts()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def __repr__(self) -> str:
        trainable, total = self._counts()
        lines = [
            f"IntervenableModel({type(self.model).__name__}: {len(self._slots)} sites, "
            f"{trainable:,} trainable of {total:,} params ({100 * trainable / total:.4f}%)"
        ]
        for slot in self._slots:
            tying = "" if slot.tied or not slot.spec.two_sided else ", untied"
            ivs = " | ".join(map(repr, slot.interventions))
            lines.append(f"  {slot.site.name} [{slot.spec}{tying}]: {ivs}")
        if self.head:
            lines.append(f"  head: {', '.join(self.head)}")
        return "\n".join(lines) + "\n)"


def _check_size(slot: _Slot, h: torch.Tensor) -> None:
    if h.shape[-1] != slot.interventions[0].hidden_size:
        raise ValueError(
            f"site {slot.site.name!r}: hidden states have size {h.shape[-1]}, "
            f"but the intervention expects hidden_size {slot.interventions[0].hidden_size}"
        )


def _apply_at(intervention: nn.Module, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
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
    delta = torch.where(valid, intervention(selected).to(h.dtype) - selected, 0)
    return flat.index_add(0, rows, delta.reshape(-1, d)).view(B, T, d)


def _slot_indices(slot: _Slot, mask: torch.Tensor) -> list[torch.Tensor]:
    """One index tensor per intervention of `slot`: prefix and suffix together when tied."""
    prefix, suffix = resolve(slot.spec, mask)
    return [torch.cat([prefix, suffix], dim=1)] if slot.tied else [prefix, suffix]


def _unflatten(slot: _Slot, h: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    """View `[B * T, d]` hidden states as `[B, T, d]`: some models (OPT) flatten them around their FFN."""
    if shape is None or shape[0] * shape[1] != h.shape[0]:
        raise ValueError(
            f"site {slot.site.name!r} sees flattened hidden states {tuple(h.shape)}: call the model "
            "through the IntervenableModel with an attention_mask so that [batch, seq] is known"
        )
    return h.view(*shape, h.shape[-1])


def _key(site: str) -> str:
    return site.replace(".", "-")  # ModuleDict keys cannot hold dots; module paths never hold dashes


def _submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in model.named_children())
        raise ValueError(f"{what} {path!r}: no such module in {type(model).__name__} (top level: {children})") from None


def _site_specs(positions, interventions) -> dict[str, PositionSpec]:
    if not isinstance(positions, Mapping):
        spec = PositionSpec.parse(positions)
        return {site: spec for site in interventions}
    missing = [site for site in interventions if site not in positions]
    extra = [site for site in positions if site not in interventions]
    if missing or extra:
        raise ValueError(f"positions dict must name exactly the intervention sites; missing {missing}, unknown {extra}")
    return {site: PositionSpec.parse(spec) for site, spec in positions.items()}


def _pair(value, spec: PositionSpec, tied: bool, site: str) -> list[Intervention]:
    """One intervention (tied, or a one-sided spec) or a (prefix, suffix) pair."""
    ivs = list(value) if isinstance(value, (tuple, list)) else [value]
    for iv in ivs:
        if not isinstance(iv, Intervention):
            raise TypeError(
                f"site {site!r}: expected a reft.Intervention (registered: {', '.join(registered_interventions())}), "
                f"got {type(iv).__name__}"
            )
    if tied or not spec.two_sided:
        if len(ivs) != 1:
            raise ValueError(f"site {site!r}: a pair of interventions needs tied=False and a spec 'f<n>+l<m>'")
        return ivs
    if len(ivs) == 1:  # a second, freshly initialised copy for the suffix
        iv = ivs[0]
        ivs.append(make_intervention(iv.name, **iv.config) if iv.name else type(iv)(**iv.config))
    if len(ivs) != 2:
        raise ValueError(f"site {site!r}: untied sites take one intervention or a (prefix, suffix) pair, got {len(ivs)}")
    return ivs


_INPUT_KEYS = ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")  # decoder first


def _input_shape(args: tuple, kwargs: Mapping[str, Any]) -> tuple[int, int] | None:
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(x, torch.Tensor):
            return x.shape[0], x.shape[1]
    return None


def _check_positions(positions: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.is_floating_point():
        got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"positions must be an integer tensor [batch, P] (-1 = none), got {got}")
    if shape is not None:
        B, T = shape
        if positions.shape[0] != B:
            raise ValueError(f"positions has batch size {positions.shape[0]}, but the inputs have {B}")
        bad = (positions < -1) | (positions >= T)
        if bad.any():  # one check per call, on explicit positions only
            value = positions[bad][0].item()
            raise ValueError(f"position {value} is out of range for sequence length {T} (valid: 0..{T - 1}, or -1 for none)")
    return positions.long()
