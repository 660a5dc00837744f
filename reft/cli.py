"""The `reft` command: train from a YAML recipe, evaluate, generate with an adapter, inspect one.

    reft train configs/smollm2_pirate.yaml [--set train.lr=1e-3 ...] [--dry-run]
    reft eval runs/smollm2-pirate/adapter
    reft eval runs/commonsense-loreft/adapter --generate --predictions predictions.jsonl
    reft generate runs/smollm2-pirate/adapter --prompt "What is the capital of Spain?" --compare
    reft info runs/smollm2-pirate/adapter
    reft convert-pyreft pyreft_folder adapter --model yahma/llama-7b-hf --positions f7+l7

`reft train` saves the adapter and the recipe it was trained from (`recipe.yaml`) in
`<train.output_dir>/adapter`; `eval` and `generate` read that recipe to find the base model and data,
but import nothing it names: modules are imported only from the user's own recipe (`reft train`,
`--config`) or with `--import MODULE`, and never from the adapter's folder. Every error of the
library is reported as one line, `reft COMMAND: error: ...`, naming the file (and the line of a
data file), with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

RECIPE_NAME = "recipe.yaml"  # written beside the adapter by `reft train`


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, OSError, FloatingPointError, ImportError) as e:  # the library's errors name the bad value
        print(f"reft {args.command}: error: {_one_line(e, args)}", file=sys.stderr)
        return 2


def _one_line(error: Exception, args: argparse.Namespace) -> str:
    """The error's message on one line; a recipe's error is prefixed with the recipe's file."""
    from .recipes import RecipeError

    text = " | ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    recipe = getattr(args, "recipe_file", None)
    if isinstance(error, RecipeError) and recipe is not None and str(recipe) not in text:
        text = f"{recipe}: {text}"
    return text if len(text) <= 2000 else text[:1997] + "..."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reft",
        description="Representation finetuning: train, evaluate and use interventions on frozen Hugging Face models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train the interventions of a YAML recipe",
        description="Train the interventions of a YAML recipe and save the adapter to <train.output_dir>/adapter.",
        epilog="example: reft train configs/smollm2_pirate.yaml --set train.lr=1e-3 --set intervention.layers=[10,20]",
    )
    train.add_argument("config", metavar="CONFIG.yaml", help="the recipe (see configs/ and docs/recipes.md)")
    _add_set(train)
    train.add_argument("--dry-run", action="store_true", help="validate the recipe and its sites without loading weights, then exit")
    train.add_argument("--resume", metavar="CHECKPOINT", help="continue from a training checkpoint folder, or 'latest'")
    train.add_argument(
        "--allow-change",
        dest="allow_changes",
        action="append",
        default=[],
        metavar="KEY",
        help="with --resume: let train.KEY differ from the checkpoint's on purpose (lr, max_steps, epochs, warmup_ratio, "
        "schedule, weight_decay, max_grad_norm); repeatable",
    )
    train.set_defaults(run=_train)

    evaluate = sub.add_parser(
        "eval",
        help="evaluate an adapter on its recipe's eval data",
        description=(
            "Evaluate a trained adapter on the eval data of the recipe it was trained with (or of --config): "
            "loss and accuracy with teacher forcing, or with --generate the accuracy of greedily generated answers."
        ),
        epilog="example: reft eval runs/math-loreft/adapter --generate --max-new-tokens 512 --predictions math.jsonl",
    )
    evaluate.add_argument("adapter", metavar="ADAPTER", help="an adapter folder written by `reft train`")
    evaluate.add_argument("--config", metavar="CONFIG.yaml", help="take model and data from this recipe instead")
    _add_set(evaluate)
    _add_import(evaluate)
    evaluate.add_argument(
        "--generate",
        action="store_true",
        help="answer each eval prompt greedily and score the answer (the papers' commonsense and math metric); "
        "needs data.answer, and reads data.answer_pattern and data.answer_match",
    )
    evaluate.add_argument("--max-new-tokens", type=int, metavar="N", help="with --generate: the longest answer generated (default 32)")
    evaluate.add_argument("--batch-size", type=int, metavar="N", help="with --generate: prompts generated together (default 8)")
    evaluate.add_argument(
        "--predictions",
        metavar="FILE.jsonl",
        help="with --generate: write one JSON line per example (prompt, generation, extracted, answer, correct)",
    )
    evaluate.add_argument(
        "--mode",
        choices=["prompt", "every_token"],
        help="with --generate: which tokens the interventions edit; default every_token when a site edits 'all' "
        "positions (trained on the response too, e.g. RED), else prompt",
    )
    evaluate.set_defaults(run=_eval)

    generate = sub.add_parser(
        "generate",
        help="generate text with a trained adapter",
        description="Generate answers to prompts with a trained adapter (chat template applied when the tokenizer has one).",
        epilog='example: reft generate runs/smollm2-pirate/adapter --prompt "Who are you?" --compare',
    )
    generate.add_argument("adapter", metavar="ADAPTER", help="an adapter folder")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    generate.add_argument("--model", help="the base model (hub id, folder, builtin:smollm2); default: from the adapter's recipe")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--mode", choices=["prompt", "every_token"], default="prompt", help="which tokens the interventions edit")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--compare", action="store_true", help="also print the base model's answer")
    generate.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    _add_import(generate)
    generate.set_defaults(run=_generate)

    info = sub.add_parser(
        "info",
        help="describe an adapter without loading any model",
        description="Print an adapter's sites, interventions, positions, parameters and base model, from its files alone.",
    )
    info.add_argument("adapter", metavar="ADAPTER", help="an adapter folder")
    info.add_argument("--json", action="store_true", help="print adapter_config.json as is")
    info.set_defaults(run=_info)

    convert = sub.add_parser(
        "convert-pyreft",
        help="turn an adapter saved by pyreft 0.1.0 into a reft adapter",
        description=(
            "Read a folder written by pyreft's reft_model.save() (config.json and intkey_*.bin; the .bin files are "
            "read with torch.load(weights_only=True): no pickled code runs) and save it as a reft adapter."
        ),
        epilog="example: reft convert-pyreft runs/pyreft-adapter runs/adapter --model yahma/llama-7b-hf --positions f7+l7",
    )
    convert.add_argument("source", metavar="SRC", help="the pyreft folder (or a Hub repo id)")
    convert.add_argument("output", metavar="DST", help="the reft adapter folder to write")
    convert.add_argument("--model", required=True, help="the base model (hub id, folder, builtin:smollm2); only its config is read")
    convert.add_argument("--positions", required=True, help="the positions it was trained with (f7+l7, l1, ...): pyreft does not save them")
    convert.add_argument("--act", help="the interventions' activation (pyreft's act_fn) if not linear: pyreft does not save it")
    convert.set_defaults(run=_convert_pyreft)
    return parser


def _add_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (it may register your own interventions); nothing is imported because the "
        "adapter's recipe.yaml names it, and no module from the adapter's folder; repeatable",
    )


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. train.lr=1e-3 or intervention.layers=[3,9] (repeatable; values in YAML)",
    )


# --------------------------------------------------------------------------------------- train
def _train(args: argparse.Namespace) -> int:
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
def _eval(args: argparse.Namespace) -> int:
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
def _generate(args: argparse.Namespace) -> int:
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
def _info(args: argparse.Namespace) -> int:
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
def _convert_pyreft(args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
