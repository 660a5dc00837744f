"""Metrics: answer accuracy by generation, preference accuracy, and AUROC for concept detection.

`answer_accuracy` is the metric of the ReFT papers' commonsense and math experiments.

Each prompt is formatted as training formats it (`reft.data.build_generation_data`: the chat template
when the tokenizer has one), answered greedily with the interventions (`rm.generate`),
and the answer is extracted from the generated continuation with a regular expression, first or
last match, then compared with the gold answer:

    >>> result = answer_accuracy(rm, tokenizer, ["Is ice cold? Answer true or false."], ["true"], pattern="true|false")
    >>> result["answer_accuracy"], result["predictions"][0]["extracted"]

The papers' rules: for arithmetic, pyreft (after LLM-Adapters) takes the last number and counts it
right within 0.001 of the gold one; for commonsense, LLM-Adapters takes the first of the dataset's
candidate words (`true|false`, `solution1|solution2`, ...), while pyreft compares the whole text after
"the correct answer is " with the gold word (stricter).

`preference_accuracy` scores (prompt, chosen, rejected) pairs by whether the chosen response is the
likelier one; `auroc` scores a detector (`reft.detect.detection_scores`) as AxBench does.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ._progress import progress_bar
from .data import Collator, TokenizedData, prompt_encoder
from ._edit import MODES
from .objectives import logits_of, sequence_logprobs

if TYPE_CHECKING:
    from .model import IntervenableModel

MATCHES = ("first", "last")  # which occurrence of the pattern is the answer
NUMERIC_TOLERANCE = 1e-3  # pyreft's compute_metrics: abs(float(answer) - generation) <= 0.001
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")  # what counts as a number, commas removed


def answer_accuracy(
    rm: "IntervenableModel",
    tokenizer: Any,
    prompts: list[str],
    answers: list[str],
    pattern: str | None = None,
    match: str = "first",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    mode: str = "prompt",
) -> dict[str, Any]:
    """The share of prompts whose greedy answer matches the gold one.

    Args:
        rm: the wrapped model. Under `rm.disabled()` this measures the base model.
        tokenizer: the tokenizer the data was built with.
        prompts, answers: the prompts (before formatting) and their gold answers (str, or numbers), one each.
        pattern: a regular expression that finds the answer in the generated text (its first group
            if it has one, else the whole match); None: the whole stripped continuation.
        match: `"first"` or `"last"` occurrence of `pattern`.
        max_new_tokens: the longest continuation generated.
        batch_size: prompts generated together (left-padded).
        chat_template, system_prompt: as in `build_generation_data`; the defaults format the prompts
            as a recipe's training did.
        mode: `rm.generate`'s: `"prompt"` (edit the prompt; the KV cache carries the edit) for the
            papers' `f7+l7` LoReFT, `"every_token"` for interventions trained on `"all"` positions
            (RED), which edited the response tokens too (see docs/generation.md).

    Returns:
        `{"answer_accuracy": float, "n": int, "predictions": [...]}`, one prediction a prompt:
        `{"prompt", "generation", "extracted" (None: no match), "answer", "correct"}`.
    """
    prompts, answers = list(prompts), list(answers)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers; give one answer per prompt")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt and its answer")
    for name, values, kinds in (("prompt", prompts, (str,)), ("answer", answers, (str, int, float))):
        bad = next((i for i, v in enumerate(values) if not isinstance(v, kinds) or isinstance(v, bool)), None)
        if bad is not None:
            raise ValueError(f"{name} {bad} must be a str{'' if name == 'prompt' else ' or a number'}, got {values[bad]!r:.80}")
    answers = [str(a) for a in answers]
    regex = compile_pattern(pattern)
    _check_match(match)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    pad = pad_id(tokenizer)
    encode = prompt_encoder(tokenizer, chat_template, system_prompt)
    device = next(rm.model.parameters()).device

    encoded = [encode(p) for p in prompts]
    empty = next((i for i, ids in enumerate(encoded) if not ids), None)
    if empty is not None:
        raise ValueError(f"prompt {empty} ({prompts[empty]!r}) tokenizes to no tokens; every prompt needs at least one")

    generations: list[str] = []
    with eval_mode(rm), torch.no_grad():
        for start in progress_bar(iterable=range(0, len(prompts), batch_size), desc="generate", disable=None):
            input_ids, attention_mask = left_pad(encoded[start : start + batch_size], pad)
            out = rm.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), mode=mode,
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            )
            continuation = out[:, input_ids.shape[1] :].cpu()  # [B, new]: one transfer a batch
            generations += tokenizer.batch_decode(continuation, skip_special_tokens=True)

    predictions = []
    for prompt, generation, answer in zip(prompts, generations, answers):
        extracted = extract_answer(generation, regex, match)
        correct = extracted is not None and same_answer(extracted, answer)
        predictions.append({"prompt": prompt, "generation": generation, "extracted": extracted, "answer": answer, "correct": correct})
    accuracy = sum(p["correct"] for p in predictions) / len(predictions)
    return {"answer_accuracy": accuracy, "n": len(predictions), "predictions": predictions}


def preference_accuracy(rm: "IntervenableModel", data: TokenizedData, batch_size: int = 8) -> dict[str, Any]:
    """The share of preference pairs whose chosen response is likelier than the rejected one.

    A response's log-probability is the sum over its tokens (EOS included) of `log p(token | prompt,
    the tokens before it)` under `rm` (under `rm.disabled()`: the base model), the quantity DPO compares.

    Args:
        rm: the wrapped model.
        data: `reft.data.build_preference_data(...)`.
        batch_size: pairs per forward pass (2 * batch_size rows).

    Returns:
        `{"preference_accuracy": float, "n": int, "margins": [log p(chosen) − log p(rejected), ...]}`.
    """
    if getattr(data, "task", None) != "preference":
        raise ValueError(f"data must be reft.data.build_preference_data(...) pairs, got {getattr(data, 'task', type(data).__name__)!r} data")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    collate = Collator.for_data(data)
    device = next(rm.model.parameters()).device
    margins = []
    with eval_mode(rm), torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in collate([data[i] for i in range(start, min(start + batch_size, len(data)))]).items()}
            chosen, rejected = sequence_logprobs(logits_of(rm, batch), batch["labels"]).chunk(2)
            margins.append((chosen - rejected).cpu())
    margins = torch.cat(margins)
    return {"preference_accuracy": (margins > 0).double().mean().item(), "n": len(margins), "margins": margins.tolist()}


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (1 = positive).

    The probability that a random positive scores above a random negative, ties counting one half
    (the Mann–Whitney U statistic over `n₊ n₋`), computed from average ranks in `O(n log n)`. AxBench
    scores concept detection this way (its min-max normalisation of the scores does not change it).

    Args:
        scores: `[N]` numbers (a tensor, array or list), higher = more positive.
        labels: `[N]` 0/1 (or bools), with at least one of each.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten()
    if s.shape != y.shape:
        raise ValueError(f"{s.numel()} scores but {y.numel()} labels; give one label per score")
    if torch.isnan(s).any():
        raise ValueError(f"score {int(torch.isnan(s).nonzero()[0])} is NaN; every score must be a number")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError(f"labels must be 0 or 1 (or bools), got {y[(y != 0) & (y != 1)][0].item()!r}")
    positive = y.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs positive and negative examples; got {n_pos} positive and {n_neg} negative")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.double()
    below = torch.cumsum(counts, 0) - counts  # items with a smaller score, per distinct score
    rank = (below + (counts + 1) / 2)[inverse]  # average 1-based rank of each item, ties shared
    u = rank[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def extract_answer(text: str, pattern: str | re.Pattern | None = None, match: str = "first") -> str | None:
    """The answer in a generated `text`: the `match` ("first" or "last") occurrence of `pattern`
    (its first group if it has one), None if there is none; with no pattern, the stripped text."""
    _check_match(match)
    regex = compile_pattern(pattern)
    if regex is None:
        return text.strip()
    found = list(regex.finditer(text))
    if not found:
        return None
    m = found[0] if match == "first" else found[-1]
    return m.group(1) if regex.groups else m.group(0)


def same_answer(predicted: str, gold: str) -> bool:
    """Numbers (thousands commas removed) are equal within `NUMERIC_TOLERANCE`; other answers are
    equal as case-insensitive, whitespace-stripped strings."""
    a, b = _number(predicted), _number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= NUMERIC_TOLERANCE
    return predicted.strip().casefold() == gold.strip().casefold()


def compile_pattern(pattern: str | re.Pattern | None) -> re.Pattern | None:
    """`pattern` compiled, or a ValueError that names it and why it does not compile."""
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a regular expression (a str) or None, got {type(pattern).__name__} {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None


def _check_match(match: str) -> None:
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(map(repr, MATCHES))}; got {match!r}")


def _number(text: str) -> float | None:
    text = text.strip().replace(",", "")
    return float(text) if _NUMBER.fullmatch(text) else None


def pad_id(tokenizer: Any) -> int:
    """The token that left-pads prompts: pad_token, else eos_token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither pad_token nor eos_token to pad prompts with; set tokenizer.pad_token")
    return pad


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids, attention_mask` `[B, T]` of token lists, padded on the left (generation appends on the right)."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, T - len(r) :] = 1
    return input_ids, attention_mask


@contextmanager
def eval_mode(rm: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside the block; every module's own mode back afterwards."""
    modes = {m: m.training for m in rm.modules()}
    rm.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
