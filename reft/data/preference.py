"""Preference data: (prompt, chosen, rejected) triples tokenized for the preference objectives (DPO,
RePS), with the prompt formatted and the lengths checked as `build_generation_data` does.

A preference example holds two generation examples with one prompt: `chosen_input_ids`,
`chosen_labels`, `rejected_input_ids`, `rejected_labels` and `prompt_length`; the collator turns a
batch of B of them into 2B rows, the chosen responses then the rejected ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .examples import TokenizedData, finish_data, labelled_response, prompt_tokens, response_setup, too_long


def build_preference_data(
    tokenizer: Any,
    triples_or_dataset: Iterable[Any],
    max_length: int | None = None,
    *,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    add_eos: bool = True,
    on_too_long: str = "error",
) -> TokenizedData:
    """Tokenize (prompt, chosen, rejected) triples for the preference objectives (DPO, RePS).

    The prompt is formatted as `build_generation_data` formats it (the chat template when the
    tokenizer has one) and shared by both responses; each response is tokenized on its own (with EOS
    when `add_eos`) and labelled, the prompt is not.

    Args:
        triples_or_dataset: `(prompt, chosen, rejected)` tuples, dicts with `prompt_key`,
            `chosen_key` and `rejected_key`, or a `datasets.Dataset` with those columns.
        max_length, chat_template, system_prompt, add_eos, on_too_long: as in `build_generation_data`
            (`max_length` bounds the prompt plus the longer response).

    Returns:
        `TokenizedData` (task `"preference"`) whose examples have `chosen_input_ids`, `chosen_labels`,
        `rejected_input_ids`, `rejected_labels` (`[n]` each, -100 over the prompt) and `prompt_length`.
    """
    encode_prompt, suffix, limit = response_setup(tokenizer, max_length, chat_template, system_prompt, add_eos, on_too_long)
    examples, skipped = [], 0
    for i, (prompt, chosen, rejected) in enumerate(_triples(triples_or_dataset, (prompt_key, chosen_key, rejected_key))):
        prompt_ids = prompt_tokens(i, encode_prompt, prompt)
        example = {"prompt_length": torch.tensor(len(prompt_ids))}
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            input_ids, labels = labelled_response(i, tokenizer, prompt_ids, response, suffix, f"{side} response")
            example[f"{side}_input_ids"], example[f"{side}_labels"] = input_ids, labels
        longest = max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))
        if too_long(i, longest, limit, on_too_long):
            skipped += 1
            continue
        examples.append(example)
    return finish_data(examples, "preference", tokenizer, limit, skipped)


def _triples(data: Iterable[Any], keys: tuple[str, str, str]):
    """Yield `(prompt, chosen, rejected)` from tuples, dicts or a `datasets.Dataset`."""
    count = 0
    for i, row in enumerate(data):
        count += 1
        if isinstance(row, Mapping):
            missing = [k for k in keys if k not in row]
            if missing:
                raise ValueError(f"example {i}: no key(s) {missing}; it has {sorted(row)}")
            values = tuple(row[k] for k in keys)
        elif isinstance(row, (tuple, list)) and len(row) == 3:
            values = tuple(row)
        else:
            raise ValueError(
                f"example {i}: expected a (prompt, chosen, rejected) triple or a dict with {', '.join(map(repr, keys))}, "
                f"got {type(row).__name__} {row!r:.80}"
            )
        for name, value in zip(("prompt", "chosen", "rejected"), values):
            if not isinstance(value, str):
                raise ValueError(f"example {i}: the {name} must be a str, got {type(value).__name__} {value!r:.80}")
        yield values
    if count == 0:
        raise ValueError("the dataset is empty: give at least one (prompt, chosen, rejected) triple")
