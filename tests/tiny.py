"""Tiny random models built from configs (hidden 32, 2 layers): fast stand-ins for real ones."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
HIDDEN = 32


def _decoder(cls_name: str, **extra):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(extra)
    return getattr(tf, cls_name)(**base)


CONFIGS = {
    "llama": lambda **kw: _decoder("LlamaConfig", num_key_value_heads=2, **kw),
    "mistral": lambda **kw: _decoder("MistralConfig", num_key_value_heads=2, sliding_window=None, **kw),
    "qwen2": lambda **kw: _decoder("Qwen2Config", num_key_value_heads=2, **kw),
    "gemma": lambda **kw: _decoder("GemmaConfig", num_key_value_heads=2, head_dim=8, **kw),
    "phi": lambda **kw: _decoder("PhiConfig", **kw),
    "gpt_neox": lambda **kw: _decoder("GPTNeoXConfig", **kw),
    "opt": lambda **kw: tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=HIDDEN, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **kw,
    ),
    "gpt2": lambda **kw: tf.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, **kw,
    ),
    "bert": lambda **kw: tf.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=0, **kw,
    ),
    "roberta": lambda **kw: tf.RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=130, pad_token_id=1, **kw,
    ),
    "t5": lambda **kw: tf.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, **kw,
    ),
}

CAUSAL = ["llama", "mistral", "qwen2", "gemma", "phi", "gpt_neox", "opt", "gpt2"]
ENCODERS = ["bert", "roberta"]


def causal_lm(arch: str = "llama", seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[arch](**config)).eval()


def classifier(arch: str = "bert", num_labels: int = 2, seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.AutoModelForSequenceClassification.from_config(CONFIGS[arch](num_labels=num_labels, **config)).eval()


def seq2seq(seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.T5ForConditionalGeneration(CONFIGS["t5"](**config)).eval()


def padded_batch(lengths: list[int], side: str = "right", seed: int = 0, pad: int = 0):
    """`input_ids, attention_mask` for prompts of these lengths, padded on `side`."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, span] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[i, span] = 1
    return ids, mask
