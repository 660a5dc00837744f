"""What each subcommand of the `reft` command does (`reft.cli` parses the command line and reports
errors): `train` from a recipe, `eval` and `generate` with a trained adapter and its recipe, `info`
from an adapter's files alone, and `convert-pyreft`. Each takes the parsed arguments and returns the
exit status; the library's errors propagate to `reft.cli.main`, which prints them as one line.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

RECIPE_NAME = "recipe.yaml"  # written beside the adapter by `reft train`


# --------------------------------------------------------------------------------------- train
def run_train(args: argparse.Namespace) -> int:
    from .recipes import RecipeError, dry_run, load_recipe

    args.recipe_file = args.config
    recipe = load_recipe(args.config, args.overrides)  # the user's own recipe: its imports are imported
    if args.dry_run:
        summary = dry_run(recipe)
        missing = summary.pop("missing", [])
        _print_summary(summary)
        if missing:
            raise RecipeError(f"{'; '.join(missing)} (the recipe itself is valid)")
        print(f"recipe {args.config}: OK (dry run, no weights loaded)")
        return 0
    from ._files import save_target
    from .recipes import build_data, build_intervenable, load_model
    from .train import Trainer, check_allow_changes

    if args.allow_changes and not args.resume:
        raise ValueError(f"--allow-change {' '.join(args.allow_changes)}: goes with --resume")
    check_allow_changes(args.allow_changes)
    out = Path(recipe.train.output_dir) / "adapter"
    if _is_rank0():
        save_target(out)  # a folder the adapter cannot be saved into is refused now, not after training

    model, tokenizer = load_model(recipe)
    rm = build_intervenable(recipe, model)
    train_data, eval_data = build_data(recipe, tokenizer)
    _rank0_print(repr(rm))
    trainer = Trainer(
        rm,
        recipe.train,
        train_data,
        eval_data=eval_data,
        collator=_collator(tokenizer),
    )
    start = time.perf_counter()
    history = trainer.fit(resume_from=args.resume, allow_changes=args.allow_changes)
    if _is_rank0():  # under torchrun every process trained the same interventions; one saves them
        rm.save_pretrained(out)
        _write_text(out / RECIPE_NAME, recipe.to_yaml())
        evals = [record for record in history if "eval_loss" in record]  # fit() evaluates after the last step
        if evals:
            print("eval", json.dumps(_round(evals[-1])))
        print(f"trained in {time.perf_counter() - start:.0f} s; adapter saved to {out}")
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    for key, value in summary.items():
        if key == "sites" and isinstance(value, list) and len(value) > 6:
            value = f"{len(value)} sites: {', '.join(value[:3])}, ..., {value[-1]}"
        elif key in ("trainable_params", "total_params") and isinstance(value, int):
            value = f"{value:,}"
        print(f"{key:>16}: {value}")


# --------------------------------------------------------------------------------------- eval
def run_eval(args: argparse.Namespace) -> int:
    from .model import IntervenableModel
    from .recipes import NO_EVAL_DATA, build_data, load_model
    from .train import Trainer

    recipe = _adapter_recipe(args, args.overrides)
    if args.generate:
        return _eval_generate(args, recipe)
    for flag in ("max_new_tokens", "batch_size", "predictions", "mode"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} goes with --generate")
    model, tokenizer = load_model(recipe)
    rm = IntervenableModel.from_pretrained(model, args.adapter)
    _, eval_data = build_data(recipe, tokenizer)
    if eval_data is None:
        raise FileNotFoundError(NO_EVAL_DATA)
    trainer = Trainer(rm, recipe.train, eval_data, eval_data=eval_data, collator=_collator(tokenizer))
    print(json.dumps(_round(trainer.evaluate())))
    return 0


def _eval_generate(args: argparse.Namespace, recipe) -> int:
    """Answer accuracy on the recipe's eval data (`reft.evaluate.answer_accuracy`), printed as JSON."""
    from .evaluate import answer_accuracy
    from .model import IntervenableModel
    from .recipes import answer_data, load_model

    for flag in ("max_new_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: must be an int >= 1")
    prompts, answers = answer_data(recipe)  # before loading the model: a recipe without answers fails fast
    model, tokenizer = load_model(recipe)
    rm = IntervenableModel.from_pretrained(model, args.adapter)
    mode = args.mode or ("every_token" if any(spec == "all" for spec, _ in rm.site_positions().values()) else "prompt")
    given = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    result = answer_accuracy(
        rm, tokenizer, prompts, answers, pattern=recipe.data.answer_pattern, match=recipe.data.answer_match, mode=mode,
        **{k: v for k, v in given.items() if v is not None},
    )
    predictions = result.pop("predictions")
    if args.predictions:
        path = Path(args.predictions)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    print(json.dumps(_round({**result, "mode": mode})))
    return 0


# --------------------------------------------------------------------------------------- generate
def run_generate(args: argparse.Namespace) -> int:
    import torch

    from .data import prompt_encoder
    from .evaluate import left_pad, pad_id
    from .model import IntervenableModel
    from .recipes import ModelSection, Recipe, import_recipe_modules, load_model

    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be an int >= 1")
    if args.model:
        import_recipe_modules(args.imports, "--import", exclude=args.adapter)
        recipe = Recipe(model=ModelSection(path=args.model), intervention=None, data=None, train=None)
    else:
        recipe = _adapter_recipe(args, [])
    model, tokenizer = load_model(recipe)
    rm = IntervenableModel.from_pretrained(model, args.adapter)
    rm.eval()
    encode = prompt_encoder(tokenizer, chat_template=False if args.no_chat_template else None, system_prompt=None)
    pad = pad_id(tokenizer)
    input_ids, attention_mask = left_pad([encode(p) for p in args.prompt], pad)  # prompts as training saw them
    device = next(model.parameters()).device
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=pad, **sampling)
    with torch.no_grad():
        out = rm.generate(**inputs, mode=args.mode, **kwargs)
        if args.compare:
            with rm.disabled():
                base = model.generate(**inputs, **kwargs)
    n = inputs["input_ids"].shape[1]
    for i, prompt in enumerate(args.prompt):
        print(f"prompt: {prompt}")
        if args.compare:
            print(f"  base:        {_decode(tokenizer, base[i, n:])}")
        print(f"  {'intervened: ' if args.compare else ''}{_decode(tokenizer, out[i, n:])}")
    return 0


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")


# --------------------------------------------------------------------------------------- info
def run_info(args: argparse.Namespace) -> int:
    from ._files import read_json
    from .adapter import CONFIG_NAME, WEIGHTS_NAME, check_format
    from .config import ReftConfig

    folder = Path(args.adapter)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}; not an adapter folder (written by save_pretrained or reft train)")
    config = read_json(folder, CONFIG_NAME, "an adapter")  # bounded in size and depth; a ValueError naming the file
    if args.json:
        print(json.dumps(config, indent=2))
        return 0
    check_format(config, "reft-adapter", config_file)
    adapter = ReftConfig.from_dict(config, str(config_file))  # the sites, positions and interventions, checked
    base = config.get("base_model", {})
    if not isinstance(base, dict):
        raise ValueError(f"{config_file}: 'base_model' is {_text(base)}, expected a JSON object")
    counts = _parameter_counts(folder / WEIGHTS_NAME)
    print(f"adapter:        {folder}")
    print(f"format:         {config.get('format')} v{config.get('format_version')} (reft {_text(config.get('reft_version'))})")
    print(
        f"base model:     {_text(base.get('architecture'))} ({_text(base.get('model_type'))}, hidden {_text(base.get('hidden_size'))}, "
        f"{_text(base.get('num_layers'))} layers) {_text(base.get('name_or_path') or '')}".rstrip()
    )
    print(f"sites:          {len(adapter.sites)}")
    for site, entries in adapter.sites.items():
        ivs = " | ".join(_describe(iv) for iv in entries)
        tying = "" if len(entries) == 1 else ", untied"
        print(f"  {_text(site)} [{_text(adapter.positions[site])}{tying}]: {ivs}")
    if adapter.head:
        print(f"head:           {', '.join(_text(h) for h in adapter.head)}")
    total = sum(counts.values())
    detail = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    print(f"parameters:     {total:,} ({detail})" if counts else "parameters:     (no weights file)")
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    print(f"size on disk:   {size / 1024:.1f} KB")
    recipe = folder / RECIPE_NAME
    if recipe.is_file():
        print(f"recipe:         {recipe}")
    return 0


def _parameter_counts(weights: Path) -> dict[str, int]:
    """`{"interventions": n, "head": m}` from the safetensors header alone (no tensor is read)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    if not weights.is_file():
        return counts
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                group = "head" if key.startswith("head.") else "interventions"
                counts[group] = counts.get(group, 0) + math.prod(f.get_slice(key).get_shape())
    except Exception as e:  # safetensors raises its own error type for every malformed file
        raise ValueError(f"{weights}: not a valid safetensors file ({e}); it is truncated or corrupt") from None
    return counts


def _describe(iv: dict[str, Any]) -> str:
    config = {k: v for k, v in iv.get("config", {}).items() if v is not None}
    return f"{_text(iv.get('name'))}({', '.join(f'{k}={_text(v)}' for k, v in config.items())})"


def _text(value: Any) -> str:
    """A value of a config as printed: itself, or its short repr when it is long."""
    from ._errors import short

    text = str(value)
    return text if len(text) <= 100 else short(value)


# --------------------------------------------------------------------------------------- convert-pyreft
def run_convert_pyreft(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from .hub import resolve
    from .pyreft import convert_pyreft
    from .recipes import ModelSection, Recipe, model_config

    config = model_config(Recipe(model=ModelSection(path=args.model), intervention=None, data=None, train=None), local_only=False)
    if config is None:
        raise FileNotFoundError(f"--model {args.model}: no model config found there")
    with torch.device("meta"):  # the sites and the fingerprint need the architecture, not the weights
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            model = transformers.AutoModel.from_config(config)
    convert_pyreft(resolve(args.source), args.output, model, args.positions, act=args.act)
    print(f"wrote {args.output}")
    return 0


# --------------------------------------------------------------------------------------- helpers
def _adapter_recipe(args: argparse.Namespace, overrides: list[str]):
    """The recipe of `eval`/`generate`: `--config`, or the adapter's recipe.yaml. Modules are imported from
    `--import` and from a `--config` recipe, never because the adapter's recipe names them, and never
    from the adapter's folder."""
    from .recipes import import_recipe_modules, load_recipe

    import_recipe_modules(args.imports, "--import", exclude=args.adapter)
    config = getattr(args, "config", None)
    args.recipe_file = config or _recipe_file(args.adapter)
    if config:
        return load_recipe(config, overrides, import_exclude=args.adapter)
    return load_recipe(args.recipe_file, overrides, import_modules=False)


def _recipe_file(adapter: str) -> Path:
    path = Path(adapter) / RECIPE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{adapter}: no {RECIPE_NAME} beside the adapter (written by `reft train`); pass --config RECIPE or --model PATH"
        )
    return path


def _collator(tokenizer):
    from .data import Collator

    return Collator(tokenizer)


def _is_rank0() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _rank0_print(text: str) -> None:
    if _is_rank0():
        print(text)


def _round(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def _write_text(path: Path, text: str) -> None:
    """Atomic: a temporary file in the same folder, then `os.replace`."""
    from ._files import write_file

    write_file(path, text.encode("utf-8"))
