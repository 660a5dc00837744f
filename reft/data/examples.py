"""Tokenized examples: `TokenizedData`, the generation and classification builders, and what every
builder shares (the prompt format, the row and label checks, the length limit and its skips).

The example format and the checks every builder makes are described in `reft.data`'s docstring.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import short

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of the tokens that carry no loss (the prompt, the padding)
_NO_ADAPTER = object()  # a row without an "adapter" key (None is a row routed to no adapter)
TOO_LONG = ("error", "skip")


@dataclass
class TokenizedData(torch.utils.data.Dataset):
    """Tokenized examples (see the module docstring) with what the collator and the trainer need.

    Attributes:
        examples: the examples, dicts of tensors.
        task: `"generation"` (labels per token), `"classification"` (one label per example) or
            `"preference"` (a chosen and a rejected response per example).
        pad_token_id, padding_side: from the tokenizer, so that `Collator.for_data(data)` pads alike.
        max_length: the length limit the examples were checked against (None: no limit).
        skipped: examples dropped as longer than `max_length` (with `on_too_long="skip"`).
        num_labels: classification only: the number of classes the labels were checked against.
    """

    examples: list[dict[str, torch.Tensor]]
    task: str
    pad_token_id: int
    padding_side: str = "right"
    max_length: int | None = None
    skipped: int = 0
    num_labels: int | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]

    def lengths(self) -> list[int]:
        """The token count of every example (of its longer response for preference data)."""
        if self.task == "preference":
            return [max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in self.examples]
        return [len(e["input_ids"]) for e in self.examples]

    def __repr__(self) -> str:
        lengths = self.lengths()
        span = f"{min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.1f})" if lengths else "no tokens"
        extra = f", {self.num_labels} labels" if self.num_labels is not None else ""
        skipped = f", {self.skipped} skipped as longer than {self.max_length}" if self.skipped else ""
        return f"TokenizedData({self.task}: {len(self)} examples, {span}{extra}{skipped})"


# --------------------------------------------------------------------------- generation
def build_generation_data(
    tokenizer: Any,
    pairs_or_dataset: Iterable[Any],
    max_length: int | None = None,
    *,
    prompt_key: str = "prompt",
    response_key: str = "response",
    positions_key: str = "positions",
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    add_eos: bool = True,
    on_too_long: str = "error",
) -> TokenizedData:
    """Tokenize (prompt, response) pairs for supervised generation: loss on the response only.

    Args:
        tokenizer: a Hugging Face tokenizer.
        pairs_or_dataset: `(prompt, response)` tuples, `(prompt, response, positions)` triples, dicts
            with `prompt_key`/`response_key` (and optionally `positions_key`), or a `datasets.Dataset`
            with those columns. `positions` are token indices into the example (-1 = none).
        max_length: the longest example allowed, in tokens; None: the tokenizer's `model_max_length`
            when it is a real limit (the trainer also checks the model's context).
        chat_template: wrap the prompt as a user turn with the tokenizer's chat template (and the
            generation prompt); None: when the tokenizer has one.
        system_prompt: an optional system turn (chat template only).
        add_eos: append the tokenizer's EOS token to every response, so the model learns to stop.
        on_too_long: `"error"` (default) or `"skip"` (dropped, counted in `.skipped` and logged).

    Returns:
        `TokenizedData` whose examples have `input_ids` `[n]`, `labels` `[n]` (-100 over the
        prompt), `prompt_length` and, when given, `positions`.
    """
    encode_prompt, suffix, limit = response_setup(tokenizer, max_length, chat_template, system_prompt, add_eos, on_too_long)
    examples, skipped = [], 0
    for i, row in enumerate(_rows(pairs_or_dataset, prompt_key, response_key, positions_key)):
        prompt, response, positions, adapter = row
        prompt_ids = prompt_tokens(i, encode_prompt, prompt)
        input_ids, labels = labelled_response(i, tokenizer, prompt_ids, response, suffix, "response")
        if too_long(i, len(input_ids), limit, on_too_long):
            skipped += 1
            continue
        example = {"input_ids": input_ids, "labels": labels, "prompt_length": torch.tensor(len(prompt_ids))}
        if positions is not None:
            example["positions"] = _check_example_positions(i, positions, len(input_ids))
        if adapter is not _NO_ADAPTER:
            example["adapter"] = _check_adapter(i, adapter)
        examples.append(example)
    return finish_data(examples, "generation", tokenizer, limit, skipped)


def response_setup(
    tokenizer: Any, max_length: int | None, chat_template: bool | None, system_prompt: str | None, add_eos: bool, on_too_long: str
) -> tuple[Callable[[str], list[int]], list[int], int | None]:
    """`(prompt encoder, token ids after each response, length limit)` for the builders of examples with
    responses (generation, preference), their arguments checked."""
    check_choice("on_too_long", on_too_long, TOO_LONG)
    encode_prompt = prompt_encoder(tokenizer, chat_template, system_prompt)
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("the tokenizer has no eos_token to append; set tokenizer.eos_token or pass add_eos=False")
    return encode_prompt, [eos] if add_eos else [], length_limit(tokenizer, max_length)


def prompt_tokens(i: int, encode_prompt: Callable[[str], list[int]], prompt: str) -> list[int]:
    """Example `i`'s prompt as token ids; an error when it has none."""
    prompt_ids = encode_prompt(prompt)
    if not prompt_ids:
        raise ValueError(f"example {i}: prompt {short(prompt)} tokenizes to no tokens; every prompt needs at least one")
    return prompt_ids


def labelled_response(
    i: int, tokenizer: Any, prompt_ids: list[int], response: str, suffix: list[int], what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, labels)` `[n]` of prompt + `response` + `suffix`, the prompt's labels -100; `what`
    names the response in the error for one that tokenizes to nothing."""
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not response_ids:
        raise ValueError(f"example {i}: {what} {short(response)} tokenizes to no tokens; every response needs at least one")
    input_ids = torch.tensor(prompt_ids + response_ids + suffix, dtype=torch.long)
    labels = input_ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return input_ids, labels


def prompt_encoder(tokenizer: Any, chat_template: bool | None, system_prompt: str | None) -> Callable[[str], list[int]]:
    """`prompt -> token ids` as training sees prompts (and `reft.evaluate` generates from them).

    With a chat template (`chat_template=None`: when the tokenizer has one) the prompt is a user turn,
    after `system_prompt` if given, followed by the generation prompt; otherwise it is the raw text
    after the tokenizer's leading special tokens (e.g. BOS).
    """
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True, but the tokenizer has no chat template; pass chat_template=False")
    if system_prompt is not None and not use_chat:
        raise ValueError("system_prompt needs a chat template; the tokenizer has none (or chat_template=False)")
    if not use_chat:
        bos = leading_special_tokens(tokenizer)
        return lambda prompt: bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []

    def encode(prompt: str) -> list[int]:
        messages = [*system, {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode


def too_long(i: int, length: int, limit: int | None, on_too_long: str) -> bool:
    """Whether example `i` must be skipped for exceeding `limit`; raises when `on_too_long` is "error"."""
    if limit is None or length <= limit:
        return False
    if on_too_long == "error":
        raise ValueError(
            f"example {i} has {length} tokens, longer than max_length {limit}; shorten it, raise "
            "max_length (up to the model's context), or pass on_too_long='skip'"
        )
    return True



# --------------------------------------------------------------------------- classification
def build_classification_data(
    tokenizer: Any,
    texts: Sequence[str] | Any,
    labels: Sequence[int] | None = None,
    max_length: int | None = None,
    *,
    num_labels: int | None = None,
    text_key: str = "text",
    label_key: str = "label",
    on_too_long: str = "error",
) -> TokenizedData:
    """Tokenize (text, label) pairs for sequence classification (the tokenizer adds its special tokens).

    Args:
        texts: the texts, or a `datasets.Dataset` (or list of dicts) with `text_key` and `label_key`
            columns when `labels` is None.
        labels: class indices in `0..num_labels-1`; floats when `num_labels == 1` (regression).
        num_labels: the number of classes of the head (checked here); None: checked by the trainer
            against the model's `config.num_labels`.
        max_length, on_too_long: as in `build_generation_data`.

    Returns:
        `TokenizedData` whose examples have `input_ids` `[n]`, a scalar `labels` and `prompt_length = n`
        (position specs count the whole text).
    """
    check_choice("on_too_long", on_too_long, TOO_LONG)
    adapters = None  # per example, when dict rows carry an "adapter" key
    if labels is None:
        rows = list(texts)
        if rows and not isinstance(rows[0], Mapping):
            raise ValueError("labels is None: texts must then be a datasets.Dataset or dicts with text and label")
        missing = [k for k in (text_key, label_key) if rows and k not in rows[0]]
        if missing:
            raise ValueError(f"rows have no column(s) {missing}; they have {sorted(rows[0])}")
        texts, labels = [r[text_key] for r in rows], [r[label_key] for r in rows]
        if rows and "adapter" in rows[0]:
            adapters = [_check_adapter(i, r.get("adapter")) for i, r in enumerate(rows)]
    texts, labels = list(texts), list(labels)
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
    if not texts:
        raise ValueError("the dataset is empty: give at least one (text, label) pair")
    if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1):
        raise ValueError(f"num_labels must be a positive int, got {short(num_labels)}")
    regression = num_labels == 1
    limit = length_limit(tokenizer, max_length)

    examples, skipped = [], 0
    for i, (text, label) in enumerate(zip(texts, labels)):
        label = _check_label(i, label, num_labels)
        ids = tokenizer(text)["input_ids"]
        if not ids:
            raise ValueError(f"example {i}: text {short(text)} tokenizes to no tokens")
        if too_long(i, len(ids), limit, on_too_long):
            skipped += 1
            continue
        examples.append({
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(label, dtype=torch.float if regression else torch.long),
            "prompt_length": torch.tensor(len(ids)),
            **({"adapter": adapters[i]} if adapters is not None else {}),
        })
    data = finish_data(examples, "classification", tokenizer, limit, skipped)
    if not regression:
        data.num_labels = num_labels if num_labels is not None else 1 + max(int(e["labels"]) for e in examples)
    else:
        data.num_labels = 1
    return data


# --------------------------------------------------------------------------- helpers
def _rows(data: Iterable[Any], prompt_key: str, response_key: str, positions_key: str):
    """Yield `(prompt, response, positions or None)` from tuples, dicts or a `datasets.Dataset`."""
    count = 0
    for i, row in enumerate(data):
        count += 1
        if isinstance(row, Mapping):
            missing = [k for k in (prompt_key, response_key) if k not in row]
            if missing:
                raise ValueError(f"example {i}: no key(s) {missing}; it has {sorted(row)}")
            prompt, response, positions = row[prompt_key], row[response_key], row.get(positions_key)
            adapter = row.get("adapter", _NO_ADAPTER)
        elif isinstance(row, (tuple, list)) and len(row) in (2, 3):
            prompt, response, positions = row[0], row[1], (row[2] if len(row) == 3 else None)
            adapter = _NO_ADAPTER
        else:
            raise ValueError(
                f"example {i}: expected a (prompt, response) pair, a (prompt, response, positions) triple or a "
                f"dict with {prompt_key!r} and {response_key!r}, got {type(row).__name__} {short(row)}"
            )
        for name, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise ValueError(f"example {i}: the {name} must be a str, got {type(value).__name__} {short(value)}")
        yield prompt, response, positions, adapter
    if count == 0:
        raise ValueError("the dataset is empty: give at least one (prompt, response) pair")


def _check_adapter(i: int, adapter: Any) -> str | None:
    if adapter is not None and not isinstance(adapter, str):
        raise ValueError(f"example {i}: 'adapter' must be an adapter name (str) or None, got {type(adapter).__name__} {adapter!r:.80}")
    return adapter


def _check_example_positions(i: int, positions: Any, n: int) -> torch.Tensor:
    try:
        pos = torch.as_tensor(positions)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        pos = None
    if pos is None or pos.dim() != 1 or pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise ValueError(f"example {i}: positions must be a list of ints, got {short(positions)}")
    bad = (pos < -1) | (pos >= n)
    if bad.any():
        raise ValueError(f"example {i}: position {int(pos[bad][0])} is out of range for its {n} tokens (valid: 0..{n - 1}, or -1)")
    return pos.long()


def _check_label(i: int, label: Any, num_labels: int | None) -> int | float:
    if num_labels == 1:
        try:
            value = float(label)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(label, (bool, str)) or not math.isfinite(value):
            raise ValueError(f"example {i}: a regression label (num_labels=1) must be a finite number, got {short(label)}")
        return value
    try:
        if isinstance(label, bool):
            raise TypeError
        label = operator.index(label)  # ints, numpy ints, integer 0-d tensors
    except TypeError:
        raise ValueError(f"example {i}: label must be an int class index, got {short(label)}") from None
    top = f"0..{num_labels - 1}" if num_labels is not None else "0 or more"
    if label < 0 or (num_labels is not None and label >= num_labels):
        raise ValueError(f"example {i}: label {label} is out of range for {num_labels or 'the'} classes (valid: {top})")
    return label


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts before a text (e.g. BOS), found by tokenizing a probe both ways."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k : k + len(plain)] == plain:
            return list(with_special[:k])
    return []


def length_limit(tokenizer: Any, max_length: int | None) -> int | None:
    """The longest example allowed: `max_length` (checked), else the tokenizer's real limit, else None."""
    if max_length is not None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 or None, got {short(max_length)}")
        return max_length
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and limit < 1_000_000 else None  # HF uses ~1e30 for "none"


def finish_data(examples: list, task: str, tokenizer: Any, limit: int | None, skipped: int) -> TokenizedData:
    """A builder's examples as `TokenizedData` padded like `tokenizer`; the skips logged, none left an error."""
    if skipped:
        logger.warning("skipped %d of %d examples longer than max_length %s", skipped, skipped + len(examples), limit)
    if not examples:
        raise ValueError(f"no examples left: all {skipped} are longer than max_length {limit}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither pad_token nor eos_token to pad with; set tokenizer.pad_token")
    side = getattr(tokenizer, "padding_side", "right") or "right"
    return TokenizedData(examples, task, int(pad), side, limit, skipped)


def check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    """A ValueError naming `value` and the `valid` choices when `value` is not one of them."""
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {short(value)}")
