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
import sys

from ._cli_commands import RECIPE_NAME, run_convert_pyreft, run_eval, run_generate, run_info, run_train

__all__ = ["RECIPE_NAME", "main"]


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
    train.set_defaults(run=run_train)

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
    evaluate.set_defaults(run=run_eval)

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
    generate.set_defaults(run=run_generate)

    info = sub.add_parser(
        "info",
        help="describe an adapter without loading any model",
        description="Print an adapter's sites, interventions, positions, parameters and base model, from its files alone.",
    )
    info.add_argument("adapter", metavar="ADAPTER", help="an adapter folder")
    info.add_argument("--json", action="store_true", help="print adapter_config.json as is")
    info.set_defaults(run=run_info)

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
    convert.set_defaults(run=run_convert_pyreft)
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


if __name__ == "__main__":
    sys.exit(main())
