"""Example builders and the collator: (prompt, response), (text, label) and (prompt, chosen, rejected)
examples -> padded tensors.

An example is a dict of tensors:

- `input_ids` `[n]`: the tokens (prompt, then response and EOS for generation data);
- `labels`: `[n]` with -100 over the prompt (generation), or a scalar class index (classification);
- `prompt_length` (scalar): how many leading tokens are prompt; the whole text for classification,
  so that position specs such as `"l1"` count prompt tokens while training on prompt + response;
- `positions` `[p]` (optional): explicit token indices into the example, -1 = none;
- `adapter` (optional, a str or None): the adapter this example trains and is scored with, when rows
  given as dicts carry an `"adapter"` key (several adapters trained at once: multi-task).

A preference example holds two generation examples with one prompt: `chosen_input_ids`,
`chosen_labels`, `rejected_input_ids`, `rejected_labels` and `prompt_length`.

`Collator` pads a list of examples on the tokenizer's side and returns `input_ids`, `attention_mask`,
`labels`, `prompt_mask` (and `positions`, shifted by the left padding) as batch tensors, and
`adapter_names` (a list) when the examples carry adapters: exactly the keyword arguments
`IntervenableModel.forward` takes, plus `labels`. A batch of B preference examples
has 2B rows: the B chosen responses, then the B rejected ones.

Every builder checks its input before any training starts: an empty dataset, a prompt or response that
tokenizes to nothing, an example longer than `max_length` (an error, or a counted and logged skip with
`on_too_long="skip"`), a label out of range.

The package: `examples` (`TokenizedData`, the generation and classification builders, the checks they
share), `preference` (the preference builder) and `collate` (the `Collator`).
"""

from .collate import Collator
from .examples import (
    IGNORE_INDEX,
    TokenizedData,
    build_classification_data,
    build_generation_data,
    leading_special_tokens,
    prompt_encoder,
)
from .preference import build_preference_data

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "TokenizedData",
    "build_classification_data",
    "build_generation_data",
    "build_preference_data",
    "leading_special_tokens",
    "prompt_encoder",
]
