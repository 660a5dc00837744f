"""`IntervenableModel`: a frozen Hugging Face model with named adapters of interventions hooked onto sites.

One wrapper per base model. Each adapter (a `ReftConfig` and its interventions) edits its sites; a
call applies the active adapters in order, or routes each example to its own (`adapter_names=`).
One hook per edited module is registered when an adapter first edits it and removed by its handle
(`delete_adapter`, `remove()`); no other hook on the model is touched. The hooks act only inside a
call of this wrapper (forward, `generate`, and the backward recompute of such a call under gradient
checkpointing): a direct call of the base model runs it unedited. `reft._edit` says how a module's
hidden states are edited.

The class is put together from two parts: `reft._adapters.AdaptersMixin` (adding, loading, choosing,
deleting and saving adapters) and `reft._calls.CallsMixin` (the hooks, `forward`, `generate`, and the
context a call gives the hooks). This module holds its state (`__init__`), what it shows of itself
and of the base model, and removing it; `reft._device` says where a module runs.
"""

from __future__ import annotations

import copy
import os
import weakref
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from ._adapters import AdaptersMixin, copy_head, site_key
from ._calls import CallsMixin, Hook
from ._device import execution_device, first_device
from ._edit import Call
from .config import ReftConfig
from .interventions.base import Intervention
from .positions import PositionSpec
from .sites import Site

DEFAULT = "default"
_WRAPPERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()  # base -> its wrapper


class IntervenableModel(AdaptersMixin, CallsMixin, nn.Module):
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
        self._hooks: dict[tuple[int, bool], Hook] = {}
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

    def merge(self) -> nn.Module:
        """Fold RED into the preceding linear layers; see `reft.merge.merge`."""
        from .merge import merge

        return merge(self)

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
        copy_head(model, head)
        rm.train(model.training)  # the interventions follow the base model's mode (eval: dropout off)
        if device is not None and torch.device(device) != first_device(model):
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
        if site_key(site) not in modules:
            raise KeyError(f"no site {site!r}; sites: {', '.join(self.sites)}")
        ivs = modules[site_key(site)]
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
        return {site: list(self.adapters[name][site_key(site)]) for site in self.reft_config[name].sites}

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
                ivs = " | ".join(map(repr, self.adapters[name][site_key(site)]))
                lines.append(f"{indent}{site} [{config.positions[site]}{tying}]: {ivs}")
            if config.head:
                lines.append(f"{indent}head: {', '.join(config.head)}")
            if config.max_norm is not None:
                lines.append(f"{indent}max_norm: {config.max_norm:g}")
        return "\n".join(lines) + "\n)"


def get_reft_model(model: nn.Module, config: ReftConfig, adapter_name: str = DEFAULT) -> IntervenableModel:
    """Wrap `model` with a fresh adapter built from `config` (peft's `get_peft_model`)."""
    return IntervenableModel(model, config, adapter_name=adapter_name)
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
