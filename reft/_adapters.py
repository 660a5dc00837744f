"""`IntervenableModel`'s adapters: adding, loading, choosing, deleting and saving them.

`AdaptersMixin` is one part of `reft.model.IntervenableModel` (whose `__init__` sets the state it
uses: `model`, `adapters`, `reft_config`, `_active_adapters`); `reft._calls.CallsMixin` holds the
hooks that `_add` attaches each adapter's units to.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ._device import execution_device
from ._edit import units_of
from ._errors import short
from .config import ReftConfig
from .interventions.base import Intervention
from .positions import PositionSpec
from .sites import resolve_site

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


class AdaptersMixin:
    """Named adapters on one wrapper: `add_adapter`, `load_adapter`, `set_adapter`, `delete_adapter`,
    `save_pretrained`, `push_to_hub`."""

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
        copy_head(self.model, head)

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

    def adapter_index(self, adapter_names: Sequence[str | None]) -> torch.Tensor:
        """`adapter_names` as a `[B]` tensor of indices into `rm.adapter_names` (-1 for None).

        Pass it as `adapter_names=` to a compiled model: routing by tensor does not recompile per batch.
        """
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise ValueError(f"adapter_names must be a list with one adapter name (or None) per example, got {short(adapter_names)}")
        names = self.adapter_names
        for name in adapter_names:
            if name is not None:
                self._check_known(name)
        return torch.tensor([names.index(n) if n is not None else -1 for n in adapter_names], dtype=torch.long)

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
            modules[site_key(site_name)] = nn.ModuleList(ivs).to(device)
        for head in heads:
            head.requires_grad_(True)
        self.adapters[name] = modules
        self.reft_config[name] = config.resolved(self.model)
        for site_name, site in sites.items():
            spec = PositionSpec.parse(config.positions[site_name])
            units = units_of(name, site, spec, list(modules[site_key(site_name)]), config.max_norm)
            self._hook_for(site).units.extend(units)
        if not self._active_adapters:
            self._active_adapters = [name]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the adapters: `"default"` at `path` (`adapter_config.json` + `adapter_model.safetensors`),
        every other one in `path/<name>/`."""
        from .adapter import save_adapter

        save_adapter(self, path)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapters and a model card to Hub repo `repo_id` (see `reft.hub.push_to_hub`)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)


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


def copy_head(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in tensors.items():
            path, name = key.rsplit(".", 1)
            live = getattr(model.get_submodule(path), name)
            live.copy_(value)


def site_key(site: str) -> str:
    return site.replace(".", "-")  # ModuleDict keys cannot hold dots; module paths never hold dashes
