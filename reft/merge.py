"""RED folded into the weights (`rm.merge()`): a copy of the base model in which each RED site's
`s ⊙ y + b` has been folded into the linear layer that produces `y`: `W' = diag(s) W`, `c' = s ⊙ c + b`.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any

import torch
from torch import nn

from .interventions.red import RED


def merge(rm: nn.Module) -> nn.Module:
    """A copy of `rm.model` with every RED site folded into the linear layer before it.

    Each site must hold a `RED` on positions `"all"` and edit the output of a module whose output is
    exactly that of one `nn.Linear` (or GPT-2's `Conv1D`): an FFN output projection (`down_proj`,
    `c_proj`, `fc2`, `output.dense`, `wo`) or an attention output projection. This is checked with a
    probe forward pass, not by names. Then `W' = diag(s) W` and `c' = s ⊙ c + b`, computed in
    float32 and stored in the layer's dtype.

    The wrapped model and `rm` are left as they were: the merged model is a deep copy (twice the
    memory while both exist), without `rm`'s hooks; hooks that the user registered are copied with
    it. A linear layer without a bias gets one where `b != 0`; if the model's config has a flag for
    those biases (`mlp_bias`, `attention_bias`), it is set and the other layers it governs get zero
    biases, so that `save_pretrained` / `from_pretrained` round-trips; otherwise a warning says that
    reloading would drop them.

    Raises:
        ValueError: naming every site that cannot be merged, and why.
    """
    if len(rm.active_adapters) != 1:
        raise ValueError(f"cannot merge: merge folds one adapter, but {rm.active_adapters} are active; set_adapter(name) first")
    name = rm.active_adapter
    positions = rm.reft_config[name].positions
    interventions = rm.interventions_of(name)
    sites = {site: rm.site_of(site) for site in interventions}
    problems = []
    for site, ivs in interventions.items():
        iv = ivs[0]
        if not isinstance(iv, RED):
            problems.append(f"site {site!r} holds {type(iv).__name__}, only RED (s ⊙ h + b) is affine per coordinate")
        elif positions[site] != "all":
            problems.append(f"site {site!r} edits positions {positions[site]!r}; a weight edit applies to every token (needs 'all')")
        elif sites[site].edits_input:
            problems.append(f"site {site!r} edits a module's input, not the output of a linear layer")
    if problems:
        raise ValueError("cannot merge: " + "; ".join(problems))

    merged = rm.unwrapped_copy()
    paths = {id(m): p for p, m in rm.model.named_modules()}
    site_modules = {site: merged.get_submodule(paths[id(s.module)]) for site, s in sites.items()}
    linears = _probe_linears(merged, site_modules)
    seen: dict[str, str] = {}
    for site in interventions:
        path = linears[site]
        if path in seen:
            raise ValueError(f"cannot merge: sites {seen[path]!r} and {site!r} both edit the output of {path!r}")
        seen[path] = site
    added = [linears[site] for site, ivs in interventions.items() if _fold(merged.get_submodule(linears[site]), ivs[0])]
    if added:
        _make_loadable(merged, added)
    return merged


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # transformers' Conv1D: GPT-2


def _hidden(output: Any) -> torch.Tensor | None:
    """The tensor a site hook edits: the output, its first element, or a ModelOutput's first field."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "keys"):
        first = next(iter(output.values()), None)
        return first if isinstance(first, torch.Tensor) else None
    return None


@torch.no_grad()
def _probe_linears(model: nn.Module, sites: dict[str, nn.Module]) -> dict[str, str]:
    """`{site: path of the linear layer whose output is the site's output}`, from one forward pass.

    Every linear layer inside each site module (or the site module itself) records its outputs; a
    site maps to the linear that ran once and whose output equals the site's output exactly.
    """
    paths = {id(m): p for p, m in model.named_modules()}
    outputs: dict[int, list[torch.Tensor]] = {}
    handles = []

    def record(module, args, output):
        outputs.setdefault(id(module), []).append(_hidden(output))

    candidates = {name: [m for m in module.modules() if _is_linear(m)] for name, module in sites.items()}
    for module in {id(m): m for m in itertools.chain(sites.values(), *candidates.values())}.values():
        handles.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        dummy = {k: v.to(device) for k, v in model.dummy_inputs.items()}
        model(**dummy)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    found, problems = {}, []
    for name, module in sites.items():
        site_out = outputs.get(id(module), [None])[-1]
        match = [
            m for m in candidates[name]
            if len(outputs.get(id(m), [])) == 1 and site_out is not None
            and outputs[id(m)][0].shape == site_out.shape and torch.equal(outputs[id(m)][0], site_out)
        ]
        if not match:
            kinds = ", ".join(sorted({type(m).__name__ for m in module.modules()})[:8])
            problems.append(
                f"site {name!r}: the output of {type(module).__name__} is not the output of a linear layer "
                f"(checked with a forward pass; it contains {kinds}); RED merges after an FFN or attention "
                "output projection, e.g. 'layers.{i}.mlp_output'"
            )
        else:
            found[name] = paths[id(match[-1])]
    if problems:
        raise ValueError("cannot merge: " + "; ".join(problems))
    return found


@torch.no_grad()
def _fold(layer: nn.Module, red: RED) -> bool:
    """Fold `s ⊙ y + b` into `layer` (`y = x Wᵀ + c`); True if a bias had to be added."""
    s, b = red.scale.detach().float(), red.bias.detach().float()
    weight = layer.weight
    w = weight.float()
    scaled = w * s[None, :] if not isinstance(layer, nn.Linear) else w * s[:, None]  # Conv1D: [in, out]
    weight.copy_(scaled.to(weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_((s * layer.bias.float() + b).to(layer.bias.dtype))
        return False
    if torch.all(b == 0):
        return False
    layer.bias = nn.Parameter(b.to(weight.dtype), requires_grad=weight.requires_grad)
    return True


def _make_loadable(model: nn.Module, added: list[str]) -> None:
    """Set a config bias flag so that `from_pretrained` expects the biases `_fold` added, or warn."""
    keys = set(model.state_dict())
    flags = [f for f in ("mlp_bias", "attention_bias") if getattr(model.config, f, None) is False]
    for n in range(len(flags) + 1):
        for chosen in itertools.combinations(flags, n):
            config = copy.deepcopy(model.config)
            for flag in chosen:
                setattr(config, flag, True)
            try:
                with torch.device("meta"):
                    expected = set(type(model)(config).state_dict())
            except Exception:  # a class that cannot be rebuilt from its config: nothing to adjust
                continue
            missing = expected - keys
            if not keys <= expected or not _zero_biasable(model, missing):
                continue
            for key in missing:
                layer = model.get_submodule(key.removesuffix(".bias"))
                layer.bias = nn.Parameter(
                    torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device),
                    requires_grad=layer.weight.requires_grad,
                )
            model.config = config
            return
    warnings.warn(
        f"merge added biases to {', '.join(added)}, which {type(model).__name__}'s config has no flag for: "
        "the merged model computes the right outputs, but from_pretrained would drop those biases",
        stacklevel=3,
    )


def _zero_biasable(model: nn.Module, keys: set[str]) -> bool:
    """Whether every key is `<path>.bias` of an `nn.Linear` without a bias."""
    for key in keys:
        if not key.endswith(".bias"):
            return False
        try:
            layer = model.get_submodule(key.removesuffix(".bias"))
        except AttributeError:
            return False
        if not isinstance(layer, nn.Linear) or layer.bias is not None:
            return False
    return True
