"""A tiny word-level tokenizer over the ids of `tests.tiny` models: words `w0`..`w91` are ids 4..95.

`<pad>` = 0, `<s>` = 1 (prepended, like LLaMA's BOS), `</s>` = 2 (EOS), `<unk>` = 3; built in
memory with `tokenizers`, nothing downloaded.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from . import tiny

WORDS = [f"w{i}" for i in range(tiny.VOCAB - 4)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'w90' if m['role'] == 'system' else 'w91' }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w89 {% endif %}"
)


def tokenizer(padding_side: str = "right", chat: bool = False, model_max_length: int = 128) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=model_max_length,
    )
    t.padding_side = padding_side
    if chat:
        t.chat_template = CHAT_TEMPLATE
    return t


def words(*ids: int) -> str:
    """`words(3, 4)` -> "w3 w4"."""
    return " ".join(f"w{i}" for i in ids)
