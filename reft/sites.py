"""Sites: where in a Hugging Face model an intervention edits hidden states.

A site is `"layers.{i}.{component}"` (prefixed `encoder.` or `decoder.` in encoder-decoder
models), `"layers.{i}.{path}"` for a module path inside block i, or any dotted module path of the
model. The layer stack and its attention and MLP children are found from the module tree, not a
per-architecture table: the stack is the `nn.ModuleList` of identical blocks holding the most
parameters; the attention and MLP children are found by their usual names, then class names, and
for models whose MLP is not one module (OPT, BERT) by its first and last linear layers.

The components of `layers.{i}.{component}` are registered by name in `_COMPONENTS` (at the end of
this module): each says how to find its module in a block and whether that module's input or
output is edited. A new component is one line there, plus its finder if it needs a new one.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

_LAYER_SITE = re.compile(r"(?:(encoder|decoder)\.)?layers\.(-?\d+)\.(.+)")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "selfattention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "feedforward", "densereludense")
_MLP_CLASSES = ("mlp", "feedforward", "denseactdense", "densegatedactdense")


@dataclass
class Site:
    """A resolved site: the module whose input (`edits_input`) or output an intervention edits."""

    name: str
    module: nn.Module
    edits_input: bool
    stack: str  # "" for decoder-only and encoder-only models, else "encoder" or "decoder"
    hidden_size: int | None  # None where only a forward pass can tell


def hidden_size_of(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} from its config")


def find_stacks(model: nn.Module) -> dict[str, tuple[str, nn.ModuleList]]:
    """The layer stacks: `{"": (path, blocks)}`, or `{"encoder": ..., "decoder": ...}`."""
    candidates = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(b) for b in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > 0:
                candidates.append((size, path, module))
    candidates.sort(key=lambda c: -c[0])
    if not candidates:
        raise ValueError(f"found no layer stack (an nn.ModuleList of identical blocks) in {type(model).__name__}")
    if not getattr(model.config, "is_encoder_decoder", False):
        _, path, blocks = candidates[0]
        return {"": (path, blocks)}
    stacks = {}
    for side in ("encoder", "decoder"):
        found = [(p, m) for _, p, m in candidates if side in p.split(".")]
        if not found:
            raise ValueError(f"found no {side} layer stack in {type(model).__name__}")
        stacks[side] = found[0]
    return stacks


def resolve_site(model: nn.Module, name: str) -> Site:
    """Find the module for site `name`, or raise a ValueError that names the valid choices."""
    match = _LAYER_SITE.fullmatch(name)
    if match is None:
        return _module_path_site(model, name)
    side, index, component = match[1] or "", int(match[2]), match[3]
    stacks = find_stacks(model)
    if side not in stacks:
        valid = ", ".join(f"'{s + '.' if s else ''}layers.{{i}}.<component>'" for s in stacks)
        raise ValueError(f"site {name!r}: {type(model).__name__} has no {side or 'single'} layer stack; use {valid}")
    path, blocks = stacks[side]
    if not 0 <= index < len(blocks):
        raise ValueError(f"site {name!r}: model has {len(blocks)} layers (0–{len(blocks) - 1})")
    block = blocks[index]
    if component in _COMPONENTS:
        d = hidden_size_of(model)
        found = _COMPONENTS[component]
        module = found.find(block, name, d)
        return Site(name, module, found.edits_input, side, found.size(module) if found.size else d)
    try:
        module = block.get_submodule(component)
    except AttributeError:
        raise ValueError(
            f"site {name!r}: unknown component {component!r}; valid: {', '.join(COMPONENTS)}, "
            f"or a module path inside the block such as {_example_path(block)!r}"
        ) from None
    return Site(name, module, False, side, _output_size(module))


def _module_path_site(model: nn.Module, name: str) -> Site:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        paths = [p for p, _ in model.named_modules() if p]
        close = difflib.get_close_matches(name, paths, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"site {name!r}: no module {name!r} in {type(model).__name__}, and not a "
            f"'layers.{{i}}.<component>' site with component one of {', '.join(COMPONENTS)}{hint}"
        ) from None
    stacks = find_stacks(model)
    side = next((s for s, (path, _) in stacks.items() if s and name.startswith(path + ".")), "")
    return Site(name, module, False, side, _output_size(module))


def _block(block: nn.Module, site: str, hidden_size: int) -> nn.Module:
    return block


def _attention(block: nn.Module, site: str, hidden_size: int | None = None) -> nn.Module:
    modules = list(block.named_modules())[1:]
    for path, module in modules:
        if path.split(".")[-1].lower() in _ATTENTION_NAMES:
            return module
    for _, module in modules:
        if "attention" in type(module).__name__.lower():
            return module
    raise ValueError(f"site {site!r}: found no attention module in {type(block).__name__}")


def _attention_projection(block: nn.Module, site: str, hidden_size: int) -> nn.Module:
    """The attention's output projection (`o_proj`, `out_proj`, `c_proj`, `output.dense`, ...): the last
    linear layer in the attention module that maps to the hidden size. Its input is the heads' outputs."""
    attention = _attention(block, site)
    found = [m for m in attention.modules() if _is_linear(m) and _linear_sizes(m)[1] == hidden_size]
    if not found:
        raise ValueError(f"site {site!r}: found no output projection in {type(attention).__name__}")
    return found[-1]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # transformers' Conv1D: GPT-2


def _linear_sizes(module: nn.Module) -> tuple[int, int]:
    """`(in, out)` features of an `nn.Linear` or a GPT-2 `Conv1D` (weight `[in, out]`)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def _mlp_input(block: nn.Module, site: str, hidden_size: int) -> nn.Module:
    """The MLP module of a block, or where it is not one module, its first linear layer from `d`."""
    return _mlp(block, site, hidden_size, first=True)


def _mlp_output(block: nn.Module, site: str, hidden_size: int) -> nn.Module:
    """The MLP module of a block, or where it is not one module, its last linear layer to `d`."""
    return _mlp(block, site, hidden_size, first=False)


def _mlp(block: nn.Module, site: str, hidden_size: int, first: bool) -> nn.Module:
    modules = list(block.named_modules())[1:]
    for path, module in modules:
        if path.split(".")[-1].lower() in _MLP_NAMES:
            return module
    for _, module in modules:
        if any(key in type(module).__name__.lower() for key in _MLP_CLASSES):
            return module
    attention = _attention(block, site)
    inside_attention = {id(m) for m in attention.modules()}
    linears = [m for _, m in modules if isinstance(m, nn.Linear) and id(m) not in inside_attention]
    if first:
        found = [m for m in linears if m.in_features == hidden_size]
        pick = found[0] if found else None
    else:
        found = [m for m in linears if m.out_features == hidden_size]
        pick = found[-1] if found else None
    if pick is None:
        raise ValueError(f"site {site!r}: found no MLP module in {type(block).__name__}")
    return pick


def _output_size(module: nn.Module) -> int | None:
    for key in ("out_features", "nf", "embedding_dim"):
        if isinstance(getattr(module, key, None), int):
            return getattr(module, key)
    shape = getattr(module, "normalized_shape", None)
    return shape[-1] if shape else None


def _example_path(block: nn.Module) -> str:
    paths = [p for p, m in block.named_modules() if p and isinstance(m, nn.Linear)]
    return paths[-1] if paths else "mlp"


@dataclass(frozen=True)
class _Component:
    """A part of a layer block: `find(block, site, hidden_size)` returns the module whose input
    (`edits_input`) or output an intervention edits; `site` is for error messages."""

    find: Callable[[nn.Module, str, int], nn.Module]
    edits_input: bool
    size: Callable[[nn.Module], int] | None = None  # the edited tensor's last size; None: the hidden size


# `layers.{i}.<component>`, in the order error messages list them.
_COMPONENTS = {
    "block_input": _Component(_block, edits_input=True),  # the residual stream entering the block
    "block_output": _Component(_block, edits_input=False),
    "attention_input": _Component(_attention, edits_input=True),  # after the pre-attention norm, if any
    "attention_output": _Component(_attention, edits_input=False),  # before the residual add
    # the heads' outputs side by side, [..., heads * head_dim], entering the output projection (LoFiT)
    "attention_heads": _Component(_attention_projection, edits_input=True, size=lambda m: _linear_sizes(m)[0]),
    "mlp_input": _Component(_mlp_input, edits_input=True),
    "mlp_output": _Component(_mlp_output, edits_input=False),
}
COMPONENTS = tuple(_COMPONENTS)  # the valid component names
