"""`IntervenableModel`: a frozen Hugging Face model with named adapters of interventions hooked onto sites.

One wrapper per base model. Each adapter (a `ReftConfig` and its interventions) edits its sites; a
call applies the active adapters in order, or routes each example to its own (`adapter_names=`).
One hook per edited module is registered when an adapter first edits it and removed by its handle
(`delete_adapter`, `remove()`); no other hook on the model is touched. The hooks act only inside a
call of this wrapper (forward, `generate`, and the backward recompute of such a call under gradient
checkpointing): a direct call of the base model runs it unedited. `reft._edit` says how a module's
hidden states are edited.
"""

from __future__ import annotations

import copy
import os
import re
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._edit import MODES, Call, Generation, Unit, edit, units_of
from ._errors import short
from .config import ReftConfig
from .interventions.base import Intervention
from .positions import PositionSpec
from .sites import Site, resolve_site

DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_WRAPPERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()  # base -> its wrapper


@dataclass(eq=False)
class _Hook:
    """The hook on one module (input or output), with every adapter's units there."""

    site: Site
    handle: torch.utils.hooks.RemovableHandle
    units: list[Unit]


class IntervenableModel(nn.Module):
    """Wrap `model` (any Hugging Face model) with `interventions` at named sites: adapter `adapter_name`.

    Args:
        model: the base model; its parameters are frozen. One wrapper per base model: add more
            adapters with `add_adapter`.
        interventions: `{site: Intervention}`, or a `ReftConfig` (fresh interventions built from it). A
            site is `"layers.{i}.{component}"` with component in `block_input, block_output,
            attention_output, mlp_input, mlp_output` (prefix `encoder.` or `decoder.` in
            encoder-decoder models), or a dotted module path whose output is edited. With
            `tied=False` a value may be a `(prefix, suffix)` pair of interventions.
        positions: `"all"` (every token), `"f{n}"`, `"l{n}"`, `"f{n}+l{m}"`, or `{site: spec}`.
            Specs count real tokens (the attention mask), or prompt tokens when a call passes a
            `prompt_mask`. A call may instead pass explicit `positions=` `[B, P]` (-1 = none).
        tied: one intervention for both the first and last positions of a site (default), or a
            separate one for each (pyreft's `share_weights=False`).
        head: module path(s) of the base model kept trainable, e.g. `"classifier"` or `"score"`.
        adapter_name: the name of this first adapter.
        max_norm: cap on each token's edit `‖h' − h‖₂` (BREP); None: no cap.

    Example:
        >>> rm = IntervenableModel(model, {"layers.3.block_output": LoReFT(576, rank=4)}, positions="l1")
        >>> out = rm(**batch)  # the base model's own output object
    """

    def __init__(
        self,
        model: nn.Module,
        interventions: Mapping[str, Intervention | tuple[Intervention, Intervention]] | ReftConfig,
        positions: str | PositionSpec | Mapping[str, str | PositionSpec] = "all",
        tied: bool = True,
        head: str | list[str] | None = None,
        *,
        adapter_name: str = DEFAULT,
        max_norm: float | None = None,
    ):
        super().__init__()
        if isinstance(model, IntervenableModel):
            raise TypeError(
                "model is already an IntervenableModel: add another adapter to it with rm.add_adapter(name, config)"
            )
        if not isinstance(interventions, ReftConfig) and not interventions:
            raise ValueError("interventions is empty: give at least one {site: Intervention}")
        other = _WRAPPERS.get(model)
        if other is not None and other() is not None and other()._hooks_live:
            raise ValueError(
                f"{type(model).__name__} is already wrapped by an IntervenableModel (adapters "
                f"{other().adapter_names}); add this adapter to it with rm.add_adapter(name, config), or call "
                "rm.remove() on the other wrapper first"
            )
        self.model = model
        peft_trainable = _peft_trainable(model)  # a peft model's LoRA (or other tuner) weights train with ours
        for p in model.parameters():
            p.requires_grad_(id(p) in peft_trainable)
        self.adapters = nn.ModuleDict()  # name -> {site key: [intervention(s)]}
        self.reft_config: dict[str, ReftConfig] = {}  # name -> its config (hidden sizes filled in)
        self._hooks: dict[tuple[int, bool], _Hook] = {}
        self._active_adapters: list[str] = []
        self._call: Call | None = None
        self._active = True
        self._hooks_live = True
        self._checkpoint_layers: list[nn.Module] = []  # layers whose checkpointing function we wrapped
        # modules that can checkpoint: found once here (not in the first call: torch.compile would recompile)
        self._checkpointable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        self._step_handle = model.register_forward_pre_hook(lambda m, a, kw: self._step(a, kw), with_kwargs=True)
        _WRAPPERS[model] = weakref.ref(self)
        try:
            if isinstance(interventions, ReftConfig):
                self.add_adapter(adapter_name, interventions)
            else:
                config = ReftConfig.of(interventions, positions=positions, tied=tied, head=head, max_norm=max_norm)
                self._add(adapter_name, config, _instances(interventions, config))
        except BaseException:
            self.remove()
            raise

    # ================================================================= adapters
    def add_adapter(self, adapter_name: str, config: ReftConfig) -> None:
        """Add adapter `adapter_name` with fresh interventions built from `config` (not made active)."""
        if not isinstance(config, ReftConfig):
            raise TypeError(f"config must be a reft.ReftConfig, got {type(config).__name__}")
        self._check_new_name(adapter_name)
        self._add(adapter_name, config, config.build(self.model))

    def load_adapter(self, path: str | os.PathLike, adapter_name: str, revision: str | None = None) -> None:
        """Add the adapter saved at `path` (a folder or Hub repo id, `save_pretrained`'s format) as `adapter_name` (not made active)."""
        from .adapter import read_adapter
        from .hub import resolve

        self._check_new_name(adapter_name)
        config, interventions, head = read_adapter(self.model, resolve(path, revision))
        self._add(adapter_name, config, interventions)
        _copy_head(self.model, head)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """The adapter(s) a call uses when it names none; a list applies several, in order."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_known(name)
        if len(set(names)) != len(names):
            raise ValueError(f"set_adapter: {names} names an adapter twice")
        self._active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter `adapter_name`, its interventions and the hooks only it used."""
        self._check_known(adapter_name)
        for key, hook in list(self._hooks.items()):
            hook.units[:] = [u for u in hook.units if u.adapter != adapter_name]
            if not hook.units:
                hook.handle.remove()
                del self._hooks[key]
        heads = set(self.reft_config[adapter_name].head)
        del self.adapters[adapter_name]
        del self.reft_config[adapter_name]
        still = {h for c in self.reft_config.values() for h in c.head}
        for path in heads - still:
            self.model.get_submodule(path).requires_grad_(False)
        self._active_adapters = [n for n in self._active_adapters if n != adapter_name] or list(self.adapters)[:1]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | None:
        return self._active_adapters[0] if self._active_adapters else None

    def _check_new_name(self, name: Any) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith("checkpoint-"):
            raise ValueError(
                f"adapter name {short(name)} is not valid: 1-64 letters, digits, '_', '.' or '-', not starting "
                "with '.' or '-' or 'checkpoint-' (it names the adapter's folder)"
            )
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} exists already (adapters: {self.adapter_names}); delete_adapter it first")

    def _check_known(self, name: Any) -> None:
        if name not in self.adapters:
            raise ValueError(f"no adapter {short(name)}; adapters: {self.adapter_names}")

    def _add(self, name: str, config: ReftConfig, interventions: dict[str, list[Intervention]]) -> None:
        """Attach adapter `name`: checks, devices, hooks. Nothing changes when a check fails."""
        self._check_new_name(name)
        sites, seen_modules, seen_ivs = {}, {}, {}
        for site_name, ivs in interventions.items():
            site = resolve_site(self.model, site_name)
            where = (id(site.module), site.edits_input)
            if where in seen_modules:
                raise ValueError(f"sites {seen_modules[where]!r} and {site_name!r} name the same module; give it once")
            seen_modules[where] = site_name
            for iv in ivs:
                if site.hidden_size is not None and iv.hidden_size != site.hidden_size:
                    raise ValueError(
                        f"site {site_name!r}: intervention {type(iv).__name__} has hidden_size {iv.hidden_size}, "
                        f"but the site's hidden size is {site.hidden_size}"
                    )
                if id(iv) in seen_ivs:
                    raise ValueError(
                        f"sites {seen_ivs[id(iv)]!r} and {site_name!r} hold the same {type(iv).__name__} object; "
                        "give each site its own intervention (shared weights would not survive save and load)"
                    )
                seen_ivs[id(iv)] = site_name
            sites[site_name] = site
        heads = [_head_module(self.model, path) for path in config.head]
        modules = nn.ModuleDict()
        for site_name, ivs in interventions.items():
            device = execution_device(sites[site_name].module, self.model)
            modules[_key(site_name)] = nn.ModuleList(ivs).to(device)
        for head in heads:
            head.requires_grad_(True)
        self.adapters[name] = modules
        self.reft_config[name] = config.resolved(self.model)
        for site_name, site in sites.items():
            spec = PositionSpec.parse(config.positions[site_name])
            units = units_of(name, site, spec, list(modules[_key(site_name)]), config.max_norm)
            self._hook_for(site).units.extend(units)
        if not self._active_adapters:
            self._active_adapters = [name]

    def _hook_for(self, site: Site) -> _Hook:
        key = (id(site.module), site.edits_input)
        if key in self._hooks:
            return self._hooks[key]
        units: list[Unit] = []

        def run(h: torch.Tensor) -> torch.Tensor:
            call = self._call
            if call is None or not self._active:  # outside our own call: the module runs unedited
                return h
            return edit(units, h, call)

        if site.edits_input:

            def pre_hook(module, args, kwargs):
                if args:
                    return (run(args[0]), *args[1:]), kwargs
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                return args, {**kwargs, key: run(kwargs[key])}

            handle = site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:

            def hook(module, args, output):
                if isinstance(output, torch.Tensor):
                    return run(output)
                if isinstance(output, tuple):
                    return (run(output[0]), *output[1:])
                key = next(iter(output.keys()))  # a ModelOutput: its first field is the hidden states
                output[key] = run(output[key])
                return output

            handle = site.module.register_forward_hook(hook)
        self._hooks[key] = _Hook(site, handle, units)
        return self._hooks[key]

    # ================================================================= calls
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model with the interventions; returns the base model's own output.

        `input_ids`, `attention_mask`, `labels` and any other keyword go to the base model (which
        computes its own loss from `labels`). `prompt_mask` `[B, T]` (1 on prompt tokens) makes
        position specs count prompt tokens only; `positions` `[B, P]` (-1 = none) gives explicit
        positions for every site; `adapter_names` (one name or None per example) routes each example
        through its own adapter.
        """
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        kwargs = {**{k: v for k, v in named.items() if v is not None}, **kwargs}
        with self._calling(args, kwargs, positions=positions, prompt_mask=prompt_mask, adapter_names=adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, mode: str = "prompt", adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """Hugging Face `generate` on the base model with the interventions.

        Args:
            *args, **kwargs: `model.generate`'s own arguments: the tokenized prompt (`input_ids` `[B, P]`,
                left-padded, and its `attention_mask`; without one every token counts as real), then
                `max_new_tokens`, `do_sample`, `num_beams`, `use_cache`, ...
            mode: `"prompt"` (default): position specs are resolved on the prompt's attention mask and
                the prompt is edited in the prefill pass only; the KV cache carries the edit into
                decoding, and decode steps run no intervention code. `"every_token"`: in addition,
                sites whose spec reaches generated tokens (`"all"`, or a spec with a last part `"l{n}"`)
                edit each generated token (with the suffix intervention of an untied site).
            adapter_names: one adapter name (or None) per prompt: each row is generated with its own.

        Returns:
            What `model.generate` returns (a `[B * num_return_sequences, P + new]` tensor, or its output
            object with `return_dict_in_generate=True`).

        With `use_cache=False` the whole sequence is recomputed at every step, and each pass edits the
        same positions, so the tokens match those generated with the cache. Encoder-decoder models:
        encoder sites edit the encoder input by their spec; decoder sites edit every decoder token in
        mode "every_token" (if their spec reaches generated tokens) and nothing in mode "prompt".

        Example:
            >>> batch = tokenizer(["Hi", "What is ReFT?"], return_tensors="pt", padding=True)  # padding_side="left"
            >>> out = rm.generate(**batch, max_new_tokens=32, do_sample=False)
        """
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(map(repr, MODES))}")
        for key in ("positions", "prompt_mask"):
            if key in kwargs:
                raise ValueError(f"generate takes no {key}=: the prompt positions come from the attention_mask")
        given = (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None)
        inputs = next((x for x in given if x is not None), None)
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
            got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"generate needs input_ids [batch, prompt_length] (or inputs_embeds), got {got}")
        B, P = inputs.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = kwargs["attention_mask"] = torch.ones(B, P, dtype=torch.long, device=inputs.device)
        if mask.shape != (B, P):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but the prompt is [batch, seq] = ({B}, {P})")
        decoder_prompt = 0 if getattr(self.model.config, "is_encoder_decoder", False) else P
        state = Generation(mode=mode, prompt_length=decoder_prompt)
        with self._calling((), {"attention_mask": mask, "input_ids": inputs}, generation=state, adapter_names=adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def _calling(
        self,
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        positions: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        generation: Generation | None = None,
        adapter_names: Sequence[str | None] | None = None,
    ) -> Iterator[Call]:
        """Context in which base-model calls with these inputs see their masks, positions and routing."""
        kwargs = kwargs or {}
        device = _first_device(self.model)
        shape = _input_shape(args, kwargs)
        main = prompt_mask if prompt_mask is not None else kwargs.get("attention_mask")
        for name, m in (("attention_mask", kwargs.get("attention_mask")), ("prompt_mask", prompt_mask)):
            if isinstance(m, torch.Tensor) and shape is not None and (m.dim() != 2 or tuple(m.shape) != shape):
                raise ValueError(f"{name} has shape {tuple(m.shape)}, but the inputs are [batch, seq] = {shape}")

        def as_mask(m: torch.Tensor | None) -> torch.Tensor | None:
            return m.to(device).bool() if m is not None else None

        masks = {"": as_mask(main), "encoder": as_mask(main), "decoder": as_mask(kwargs.get("decoder_attention_mask"))}
        if positions is not None:
            positions = _check_positions(positions, shape).to(device)
        adapters, route = self._routing(adapter_names, shape, device)
        previous = self._call
        self._call = Call(adapters, masks, positions=positions, shape=shape, route=route, generation=generation)
        if self._hooks_live:
            self._wrap_checkpointing()
        try:
            yield self._call
        finally:
            self._call = previous

    def _routing(self, adapter_names, shape, device) -> tuple[tuple[str, ...], torch.Tensor | None]:
        """`(adapters, route)`: the active adapters and no route, or the named ones and each row's index."""
        if adapter_names is None:
            return tuple(self._active_adapters), None
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise ValueError(f"adapter_names must be a list with one adapter name (or None) per example, got {short(adapter_names)}")
        if shape is not None and len(adapter_names) != shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} names, but the batch has {shape[0]} examples")
        names: list[str] = []
        for name in adapter_names:
            if name is not None and name not in names:
                self._check_known(name)
                names.append(name)
        route = [names.index(n) if n is not None else -1 for n in adapter_names]
        return tuple(names), torch.tensor(route, dtype=torch.long, device=device)

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

    def _wrap_checkpointing(self) -> None:
        """Make gradient checkpointing's recompute (in the backward, outside this call) see this call.

        Transformers' checkpointed layers call `layer._gradient_checkpointing_func(fn, *args)`; ours
        wraps `fn` so that, when the backward pass runs it again, the hooks see the same call
        (masks, positions, routing) as in the forward pass. Reentrant or not, the recompute then
        edits exactly as the forward did.
        """
        for module in self._checkpointable:
            func = module.__dict__.get("_gradient_checkpointing_func")
            if func is None or getattr(func, "_reft_wrapped", False):
                continue
            module._gradient_checkpointing_func = self._checkpointing(func)
            self._checkpoint_layers.append(module)

    def _checkpointing(self, original):
        wrapper = self

        def checkpoint(function, *args, **kwargs):
            call = wrapper._call

            def run(*a, **k):
                previous, wrapper._call = wrapper._call, call
                try:
                    return function(*a, **k)
                finally:
                    wrapper._call = previous

            return original(run, *args, **kwargs)

        checkpoint._reft_wrapped = True
        checkpoint._reft_original = original
        return checkpoint

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model without interventions inside this block: `with rm.disabled(): rm(**b)`."""
        previous, self._active = self._active, False
        try:
            yield
        finally:
            self._active = previous

    def merge(self) -> nn.Module:
        """Fold RED into the preceding linear layers; see `reft.merge.merge`."""
        from .merge import merge

        return merge(self)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the adapters: `"default"` at `path` (`adapter_config.json` + `adapter_model.safetensors`),
        every other one in `path/<name>/`."""
        from .adapter import save_adapter

        save_adapter(self, path)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapters and a model card to Hub repo `repo_id` (see `reft.hub.push_to_hub`)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike, device: str | torch.device | None = None,
                        adapter_name: str = DEFAULT, revision: str | None = None) -> "IntervenableModel":
        """Rebuild the adapter saved at `path` (a folder or Hub repo id, by `save_pretrained`) on `model`, named `adapter_name`."""
        from .adapter import read_adapter
        from .hub import resolve

        config, interventions, head = read_adapter(model, resolve(path, revision))
        values = {site: ivs[0] if len(ivs) == 1 else tuple(ivs) for site, ivs in interventions.items()}
        rm = cls(model, values, positions=dict(config.positions), tied=config.tied, head=config.head or None,
                 adapter_name=adapter_name, max_norm=config.max_norm)
        _copy_head(model, head)
        rm.train(model.training)  # the interventions follow the base model's mode (eval: dropout off)
        if device is not None and torch.device(device) != _first_device(model):
            rm.to(device)
        return rm

    def remove(self) -> None:
        """Remove this wrapper's hooks (and only them); the base model runs unedited afterwards."""
        for hook in self._hooks.values():
            hook.handle.remove()
        self._hooks = {}
        self._step_handle.remove()
        for module in self._checkpoint_layers:
            func = module.__dict__.get("_gradient_checkpointing_func")
            if getattr(func, "_reft_wrapped", False):
                module._gradient_checkpointing_func = func._reft_original
        self._checkpoint_layers = []
        self._hooks_live = False
        if _WRAPPERS.get(self.model) is not None and _WRAPPERS[self.model]() is self:
            del _WRAPPERS[self.model]

    @property
    def hooked(self) -> bool:
        """False once `remove()` has run."""
        return self._hooks_live

    def unwrapped_copy(self) -> nn.Module:
        """A deep copy of the base model as if this wrapper's hooks had never been registered.

        Our entries are filtered out of each module's hook dicts for the copy, and the original dicts
        (which our handles point to) are put back afterwards, in their order. Hooks the user
        registered are copied with the model.
        """
        ours = {hook.handle.id for hook in self._hooks.values()} | {self._step_handle.id}
        attrs = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
        saved = []
        try:
            for module in self.model.modules():
                for attr in attrs:
                    hooks = getattr(module, attr, None)
                    if hooks and not ours.isdisjoint(hooks):
                        saved.append((module, attr, hooks))
                        object.__setattr__(module, attr, OrderedDict((k, v) for k, v in hooks.items() if k not in ours))
            for module in self._checkpoint_layers:
                func = module.__dict__.get("_gradient_checkpointing_func")
                if getattr(func, "_reft_wrapped", False):
                    saved.append((module, "_gradient_checkpointing_func", func))
                    object.__setattr__(module, "_gradient_checkpointing_func", func._reft_original)
            return copy.deepcopy(self.model)
        finally:
            for module, attr, value in saved:
                object.__setattr__(module, attr, value)

    # ================================================================= what model users expect
    @property
    def config(self):
        """The base model's config (transformers' Trainer and pipeline read it)."""
        return self.model.config

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the base model's execution device (accelerate's, when it dispatched the
        model and keeps offloaded weights on `meta`), else its first real weight's."""
        return execution_device(self.model, self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    @property
    def main_input_name(self) -> str:
        return getattr(self.model, "main_input_name", "input_ids")

    def can_generate(self) -> bool:
        return bool(getattr(self.model, "can_generate", lambda: False)())

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The tensors the adapters own: every intervention's and the heads' (and a peft model's trainable
        ones), not the frozen base, so that checkpoints written from it (transformers' Trainer) hold
        only what training changed. `load_state_dict` restores them."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        owned = {f"{prefix}{name}" for name, p in self.named_parameters() if p.requires_grad}
        owned |= {f"{prefix}{name}" for name, _ in self.adapters.named_buffers(prefix="adapters")}
        return type(full)((k, v) for k, v in full.items() if k in owned)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load adapter tensors (as `state_dict` returns them; a full state dict with the base loads too)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        own = set(self.state_dict())
        missing = [k for k in result.missing_keys if k in own]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Error(s) in loading state_dict for IntervenableModel: missing {missing}, unexpected {result.unexpected_keys}"
            )
        return torch.nn.modules.module._IncompatibleKeys(missing, result.unexpected_keys)

    # ================================================================= info
    def __getitem__(self, site: str) -> Intervention | tuple[Intervention, Intervention]:
        """The active adapter's intervention(s) at `site`."""
        modules = self._adapter_modules()
        if _key(site) not in modules:
            raise KeyError(f"no site {site!r}; sites: {', '.join(self.sites)}")
        ivs = modules[_key(site)]
        return ivs[0] if len(ivs) == 1 else tuple(ivs)

    def _adapter_modules(self, name: str | None = None) -> nn.ModuleDict:
        name = name or self.active_adapter
        if name is None:
            raise ValueError("this wrapper has no adapters")
        return self.adapters[name]

    def interventions_of(self, adapter_name: str | None = None) -> dict[str, list[Intervention]]:
        """`{site: [intervention(s)]}` of an adapter (default: the active one)."""
        name = adapter_name or self.active_adapter
        self._check_known(name)
        return {site: list(self.adapters[name][_key(site)]) for site in self.reft_config[name].sites}

    def site_of(self, site: str) -> Site:
        """The resolved `Site` (module, stack, input or output) of a site name of any adapter."""
        for hook in self._hooks.values():
            for u in hook.units:
                if u.site.name == site:
                    return u.site
        raise KeyError(f"no site {site!r}")

    @property
    def sites(self) -> list[str]:
        """The active adapter's sites."""
        name = self.active_adapter
        return list(self.reft_config[name].sites) if name else []

    @property
    def head(self) -> list[str]:
        """The base-model modules the active adapter trains (its `head`)."""
        name = self.active_adapter
        return list(self.reft_config[name].head) if name else []

    def site_positions(self, adapter_name: str | None = None) -> dict[str, tuple[str, bool]]:
        """`{site: (position spec, tied)}` of an adapter (default: the active one)."""
        config = self.reft_config[adapter_name or self.active_adapter]
        return {site: (config.positions[site], config.tied) for site in config.sites}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every adapter's intervention parameters, and the heads'."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        """`(trainable, total)` numbers of parameters."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def __repr__(self) -> str:
        trainable, total = self.parameter_counts()
        lines = [
            f"IntervenableModel({type(self.model).__name__}: {sum(len(c.sites) for c in self.reft_config.values())} sites, "
            f"{trainable:,} trainable of {total:,} params ({100 * trainable / total:.4f}%)"
        ]
        many = len(self.adapters) > 1
        for name, config in self.reft_config.items():
            indent = "  "
            if many:
                active = " (active)" if name in self._active_adapters else ""
                lines.append(f"  adapter {name!r}{active}:")
                indent = "    "
            for site in config.sites:
                tying = "" if config.tied or not PositionSpec.parse(config.positions[site]).two_sided else ", untied"
                ivs = " | ".join(map(repr, self.adapters[name][_key(site)]))
                lines.append(f"{indent}{site} [{config.positions[site]}{tying}]: {ivs}")
            if config.head:
                lines.append(f"{indent}head: {', '.join(config.head)}")
            if config.max_norm is not None:
                lines.append(f"{indent}max_norm: {config.max_norm:g}")
        return "\n".join(lines) + "\n)"


def get_reft_model(model: nn.Module, config: ReftConfig, adapter_name: str = DEFAULT) -> IntervenableModel:
    """Wrap `model` with a fresh adapter built from `config` (peft's `get_peft_model`)."""
    return IntervenableModel(model, config, adapter_name=adapter_name)


# ===================================================================== helpers
def _instances(interventions: Mapping[str, Any], config: ReftConfig) -> dict[str, list[Intervention]]:
    """`{site: [prefix, suffix] or [one]}` from the constructor's instances (a fresh suffix when untied)."""
    from .interventions.base import make_intervention

    built = {}
    for site, value in interventions.items():
        ivs = list(value) if isinstance(value, (tuple, list)) else [value]
        if len(config.sites[site]) == 2 and len(ivs) == 1:  # untied: a second, freshly initialised copy
            iv = ivs[0]
            ivs.append(make_intervention(iv.name, **iv.config) if iv.name else type(iv)(**iv.config))
        built[site] = ivs
    return built


def _peft_trainable(model: nn.Module) -> set[int]:
    """Ids of a peft model's trainable (adapter) parameters; empty for any other model."""
    if not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        return set()
    return {id(p) for p in model.parameters() if p.requires_grad}


def _head_module(model: nn.Module, path: str) -> nn.Module:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in model.named_children())
        raise ValueError(f"head {path!r}: no such module in {type(model).__name__} (top level: {children})") from None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        shared = {id(p) for p in embeddings.parameters()} & {id(p) for p in module.parameters()}
        if shared:
            raise ValueError(
                f"head {path!r} holds the model's input embeddings (or weights tied to them): training it would "
                "change the base model everywhere; name a task head such as 'classifier' or 'score'"
            )
    return module


def _copy_head(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in tensors.items():
            path, name = key.rsplit(".", 1)
            live = getattr(model.get_submodule(path), name)
            live.copy_(value)


def execution_device(module: nn.Module, model: nn.Module) -> torch.device:
    """Where `module` runs: accelerate's execution device, else its first real (not meta) tensor's."""
    for m in (module, *module.modules()):
        hook = getattr(m, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return _first_device(model)


def _first_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _key(site: str) -> str:
    return site.replace(".", "-")  # ModuleDict keys cannot hold dots; module paths never hold dashes


_INPUT_KEYS = ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")  # decoder first


def _input_shape(args: tuple, kwargs: Mapping[str, Any]) -> tuple[int, int] | None:
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return x.shape[0], x.shape[1]
    return None


def _check_positions(positions: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    if (
        not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.is_floating_point()
        or positions.is_complex() or positions.dtype in (torch.bool, torch.uint8)
    ):
        got = f"{tuple(positions.shape)} {positions.dtype}" if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(
            f"positions must be an integer tensor [batch, P] of token indices (-1 = none), got {got}; "
            "a bool or uint8 tensor is a mask, not positions: use a position spec, or the indices of its True entries"
        )
    if shape is not None:
        B, T = shape
        if positions.shape[0] != B:
            raise ValueError(f"positions has batch size {positions.shape[0]}, but the inputs have {B}")
        if torch.compiler.is_compiling():  # no host sync in a compiled graph: the check runs on the device
            valid = ((positions >= -1) & (positions < T)).all()
            torch._assert_async(valid, "positions out of range: each must be -1 (none) or a token index below the sequence length")
        else:
            bad = (positions < -1) | (positions >= T)
            if bad.any():  # one check per call, on explicit positions only
                value = positions[bad][0].item()
                raise ValueError(f"position {value} is out of range for sequence length {T} (valid: 0..{T - 1}, or -1 for none)")
    return positions.long()
