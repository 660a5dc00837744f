"""A recipe's data: examples read from files (JSON, JSON Lines, CSV, TSV, Parquet), the built-in data
or a hub dataset, split for evaluation, and built into training data with `reft.data`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .._errors import short
from .schema import DATA_SUFFIXES, Recipe, RecipeError

NO_EVAL_DATA = "the recipe has no eval data: set data.eval, data.eval_split or data.eval_fraction (e.g. --set data.eval=FILE)"


def read_rows(recipe: Recipe, which: str) -> list[dict[str, Any]] | None:
    """The raw examples (`which` = "train" or "eval") as dicts; None when there is no eval data."""
    d = recipe.data
    source = d.train if which == "train" else d.eval
    split = d.train_split if which == "train" else d.eval_split
    if which == "eval" and source is None:
        if d.eval_split and not _is_file_or_builtin(d.train):
            source = d.train
        elif d.eval_fraction > 0:
            return _split(recipe)[1]
        else:
            return None
    if which == "train" and d.eval is None and d.eval_fraction > 0 and not d.eval_split:
        return _split(recipe)[0]
    rows = _read_source(source, d.config, split, f"data.{which}")
    limit = d.max_train_examples if which == "train" else d.max_eval_examples
    return rows[:limit] if limit else rows


def _split(recipe: Recipe) -> tuple[list[dict], list[dict]]:
    d = recipe.data
    rows = _read_source(d.train, d.config, d.train_split, "data.train")
    random.Random(d.seed).shuffle(rows)
    n_eval = max(1, round(len(rows) * d.eval_fraction))
    train, evaluation = rows[n_eval:], rows[:n_eval]
    return train[: d.max_train_examples or None], evaluation[: d.max_eval_examples or None]


def _is_file_or_builtin(source: str) -> bool:
    return source.startswith("builtin:") or Path(source).suffix.lower() in DATA_SUFFIXES


def _read_source(source: str, config: str | None, split: str | None, key: str) -> list[dict[str, Any]]:
    if source == "builtin:rotten_tomatoes":
        from ..assets import rotten_tomatoes

        return [{"text": text, "label": label} for text, label in rotten_tomatoes()]
    import datasets

    suffix = Path(source).suffix.lower()
    if suffix in DATA_SUFFIXES:
        if not Path(source).is_file():
            raise RecipeError(f"{key}: no such file {short(source)}")
        if DATA_SUFFIXES[suffix] == "json":
            return _read_json_rows(Path(source), key)
        extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            dataset = datasets.load_dataset(DATA_SUFFIXES[suffix], data_files=source, split="train", **extra)
        except Exception as e:  # pandas' and pyarrow's parse errors name the line where they have one
            raise RecipeError(f"{key}: {source}: cannot read it as {suffix[1:]} ({_cause(e)})") from None
    else:
        try:
            dataset = datasets.load_dataset(source, config, split=split or "train")
        except Exception as e:  # offline, unknown name, unknown split: say which key to fix
            raise RecipeError(f"{key}: cannot load dataset {short(source)} (config {short(config)}, split {short(split)}): {e}") from None
    return [dict(row) for row in dataset]


def _read_json_rows(path: Path, key: str) -> list[dict[str, Any]]:
    """The examples of a JSON Lines file (one object a line), or of a JSON file holding a list of objects;
    errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{key}: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):  # one JSON list
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{key}: {path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise RecipeError(f"{key}: {path}: JSON nested too deeply") from None
        lines = [None] * len(rows)
    else:  # JSON Lines
        rows, lines = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecipeError(f"{key}: {path}:{number}: not valid JSON ({e.msg}, column {e.colno}): {short(line)}") from None
            except RecursionError:
                raise RecipeError(f"{key}: {path}:{number}: JSON nested too deeply") from None
            lines.append(number)
    for i, (row, number) in enumerate(zip(rows, lines)):
        if not isinstance(row, dict):
            where = f"{path}:{number}" if number is not None else f"{path}: example {i}"
            raise RecipeError(f"{key}: {where}: expected an object of fields, e.g. {{\"instruction\": ...}}, got {short(row)}")
    return rows


def _cause(error: Exception) -> str:
    """An exception and the one it was raised from (datasets wraps pandas' errors), on one short line."""
    parts = [f"{type(error).__name__}: {error}"]
    if error.__cause__ is not None:
        parts.append(f"{type(error.__cause__).__name__}: {error.__cause__}")
    text = " <- ".join(parts).replace("\n", " ")
    return text if len(text) <= 400 else text[:397] + "..."


def _fill(template: str, row: dict[str, Any], key: str, index: int) -> str:
    try:
        return template.format(**{k: "" if v is None else v for k, v in row.items()})
    except KeyError as e:
        raise RecipeError(f"{key}: example {index} has no field {short(e.args[0])} (its fields: {', '.join(row)})") from None


def answer_data(recipe: Recipe) -> tuple[list[str], list[str]]:
    """`(prompts, answers)` of the eval examples, from `data.prompt` and `data.answer`, for
    `reft.evaluate.answer_accuracy` (`reft eval --generate`)."""
    d = recipe.data
    if recipe.model.task != "causal_lm":
        raise RecipeError(f"model.task: answers are generated by causal LMs, this recipe's task is {short(recipe.model.task)}")
    if d.answer is None:
        raise RecipeError("data.answer: the recipe has no gold answers: set data.answer, e.g. --set data.answer={answer}")
    rows = read_rows(recipe, "eval")
    if rows is None:
        raise RecipeError(NO_EVAL_DATA)
    if not rows:
        raise RecipeError("data.eval: no examples")
    prompts = [_fill(d.prompt, row, "data.prompt", i) for i, row in enumerate(rows)]
    return prompts, [_fill(d.answer, row, "data.answer", i) for i, row in enumerate(rows)]


def build_data(recipe: Recipe, tokenizer):
    """`(train_data, eval_data)` for the recipe, built with `reft.data` (eval_data may be None)."""
    from .. import data as reft_data

    d = recipe.data
    out = []
    for which in ("train", "eval"):
        rows = read_rows(recipe, which)
        if rows is None:
            out.append(None)
            continue
        if not rows:
            raise RecipeError(f"data.{which}: no examples")
        if recipe.model.task == "causal_lm":
            pairs = [
                (_fill(d.prompt, row, "data.prompt", i), _fill(d.response, row, "data.response", i))
                for i, row in enumerate(rows)
            ]
            out.append(reft_data.build_generation_data(tokenizer, pairs, max_length=d.max_length))
        else:
            texts = [_fill(d.text, row, "data.text", i) for i, row in enumerate(rows)]
            if d.label not in rows[0]:
                raise RecipeError(f"data.label: the examples have no field {short(d.label)} (their fields: {', '.join(rows[0])})")
            labels = [int(row[d.label]) for row in rows]
            out.append(reft_data.build_classification_data(tokenizer, texts, labels, max_length=d.max_length))
    return out[0], out[1]
