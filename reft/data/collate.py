"""The collator: a list of examples -> padded batch tensors, on the tokenizer's padding side.

`Collator` returns `input_ids`, `attention_mask`, `labels`, `prompt_mask` (and `positions`, shifted by
the left padding) as batch tensors, and `adapter_names` (a list) when the examples carry adapters:
exactly the keyword arguments `IntervenableModel.forward` takes, plus `labels`. A batch of B preference
examples has 2B rows: the B chosen responses, then the B rejected ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._errors import short
from .examples import IGNORE_INDEX, TokenizedData, check_choice


class Collator:
    """Pad examples into a batch of tensors, on the tokenizer's padding side.

    Returns `input_ids` `[B, T]`, `attention_mask` `[B, T]`, `labels` (`[B, T]` with -100 on the prompt
    and the padding, or `[B]` for classification), `prompt_mask` `[B, T]` (1 on prompt tokens), and, when
    the examples carry them, `positions` `[B, P]` shifted by the padding (-1 = none). B preference
    examples give 2B rows: the B chosen responses, then the B rejected ones.

    Args:
        tokenizer: gives `pad_token_id` (its EOS when it has no pad token) and `padding_side`.
        padding_side, pad_token_id: override the tokenizer's (or give them without a tokenizer).
        pad_to_multiple_of: round T up to a multiple of this (tensor-core friendly shapes).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        padding_side: str | None = None,
        pad_token_id: int | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("no pad token: the tokenizer has neither pad_token nor eos_token; pass pad_token_id=")
        side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
        check_choice("padding_side", side, ("left", "right"))
        if pad_to_multiple_of is not None and (
            not isinstance(pad_to_multiple_of, int) or isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1
        ):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {short(pad_to_multiple_of)}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_data(cls, data: TokenizedData, **kwargs: Any) -> "Collator":
        """The collator that pads `data` as its tokenizer would."""
        return cls(padding_side=data.padding_side, pad_token_id=data.pad_token_id, **kwargs)

    def __call__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        if "chosen_input_ids" in examples[0]:  # preference pairs: the chosen rows, then the rejected ones
            examples = [
                {"input_ids": e[f"{side}_input_ids"], "labels": e[f"{side}_labels"], "prompt_length": e["prompt_length"],
                 **({"adapter": e["adapter"]} if "adapter" in e else {})}
                for side in ("chosen", "rejected")
                for e in examples
            ]
        B = len(examples)
        lengths = torch.tensor([len(e["input_ids"]) for e in examples])  # [B]
        if bool((lengths == 0).any()):
            i = int((lengths == 0).nonzero()[0])
            raise ValueError(f"example {i} of the batch has 0 tokens (input_ids {short(examples[i]['input_ids'])}); every example needs at least one")
        T = int(lengths.max())
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        left = self.padding_side == "left"
        offset = T - lengths if left else torch.zeros_like(lengths)  # [B] where each example starts

        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        token_labels = examples[0]["labels"].dim() == 1
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if token_labels else None
        for i, e in enumerate(examples):  # the copy padding needs; nothing else loops over the batch
            n = len(e["input_ids"])
            span = slice(T - n, T) if left else slice(0, n)
            input_ids[i, span] = e["input_ids"]
            if token_labels:
                labels[i, span] = e["labels"]
        if not token_labels:
            labels = torch.stack([e["labels"] for e in examples])  # [B]

        arange = torch.arange(T).unsqueeze(0)  # [1, T]
        start = offset.unsqueeze(1)  # [B, 1]
        attention_mask = (arange >= start) & (arange < start + lengths.unsqueeze(1))
        prompt_length = torch.stack([_prompt_length(e) for e in examples]).unsqueeze(1)  # [B, 1]
        prompt_mask = (arange >= start) & (arange < start + prompt_length)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask.long(),
            "labels": labels,
            "prompt_mask": prompt_mask.long(),
        }
        routed = sum("adapter" in e for e in examples)
        if routed not in (0, B):
            raise ValueError(f"{routed} of {B} examples name an adapter; either all or none must (None: no adapter)")
        if routed:
            batch["adapter_names"] = [e["adapter"] for e in examples]
        carried = sum("positions" in e for e in examples)
        if carried not in (0, B):
            raise ValueError(f"{carried} of {B} examples carry explicit positions; either all or none must")
        if carried:
            P = max(len(e["positions"]) for e in examples)
            positions = torch.full((B, P), -1, dtype=torch.long)
            for i, e in enumerate(examples):
                positions[i, : len(e["positions"])] = e["positions"]
            batch["positions"] = torch.where(positions >= 0, positions + start, -1)
        return batch

    def __repr__(self) -> str:
        multiple = f", pad_to_multiple_of={self.pad_to_multiple_of}" if self.pad_to_multiple_of else ""
        return f"Collator(padding_side={self.padding_side!r}, pad_token_id={self.pad_token_id}{multiple})"


def _prompt_length(example: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The example's `prompt_length`, or, where a caller dropped it (transformers' Trainer keeps only
    the columns a forward takes), what the builders set it to: the tokens before the first labelled
    one (generation), or the whole text (classification)."""
    if "prompt_length" in example:
        return torch.as_tensor(example["prompt_length"])
    labels, n = example["labels"], len(example["input_ids"])
    if labels.dim() == 0:
        return torch.tensor(n)
    labelled = (labels != IGNORE_INDEX).nonzero()
    return labelled[0, 0] if len(labelled) else torch.tensor(n)
