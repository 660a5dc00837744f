"""Quickstart: teach SmolLM2-135M-Instruct to answer like a pirate with one rank-4 LoReFT.

One LoReFT intervention of rank 4 (4,612 parameters) edits the output of one layer of the model at
the last token of the prompt; the model's 135 million weights never change. Ten prompt/response
pairs are enough for it to answer questions it has never seen in character. The script prints the
base model's and the intervened model's answers to held-out prompts side by side, saves the
adapter, reloads it and shows that the reloaded adapter gives the same answer.

    python tutorials/quickstart.py          # what `make demo` runs: a few minutes on 2 CPU cores
    python tutorials/quickstart.py --tiny   # a random 2-layer model with SmolLM2's tokenizer (CI)
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
import time

import torch
import transformers

import reft
from reft.assets import load_smollm2, smollm2_path

# Ten examples of the behaviour: every answer is in pirate speak and opens with "Arr".
PAIRS = [
    ("What is the capital of France?", "Arr, matey! Paris be the capital o' France, savvy?"),
    ("How do I boil an egg?", "Arr! Drop yer egg in boilin' water fer nine minutes, matey."),
    ("What is 2 + 2?", "Arr, that be four, me hearty!"),
    ("Tell me about the sun.", "Arr! The sun be a great ball o' fire that guides me ship by day."),
    ("Who wrote Hamlet?", "Arr, 'twas William Shakespeare, a fine landlubber with a quill!"),
    ("What should I eat for breakfast?", "Arr! Hardtack and a mug o' grog, like any true buccaneer."),
    ("Why is the sky blue?", "Arr, the sky be blue 'cause it reflects the seven seas, matey!"),
    ("Can you recommend a book?", "Arr! Treasure Island, o' course. Ye'll love it, me hearty."),
    ("How many legs does a spider have?", "Arr, eight legs, more than any pirate with a peg leg!"),
    ("What is your favourite colour?", "Arr! Black, like the Jolly Roger flyin' on me mast."),
]
# Prompts the intervention never saw.
HELD_OUT = [
    "What is the tallest mountain in the world?",
    "How do I make a cup of tea?",
    "Give me a tip for learning to code.",
    "What do cats like to eat?",
]


def tiny_model():
    """A random 2-layer Llama with SmolLM2's tokenizer: the same code path in seconds."""
    path = smollm2_path()
    config = transformers.AutoConfig.from_pretrained(
        path, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def answers(rm, tokenizer, prompts, max_new_tokens, base=False):
    """Greedy answers to `prompts`, as one left-padded batch; `base=True` runs without the intervention."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    tokenizer.padding_side = "left"  # generation appends on the right
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        if base:
            with rm.disabled():
                out = rm.generate(**batch, **kwargs)
        else:
            out = rm.generate(**batch, **kwargs)
    new = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ") for ids in new]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer model: checks the code path in seconds")
    parser.add_argument("--layer", type=int, default=15, help="the layer whose output is edited (SmolLM2 has 30)")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the ten pairs (default 30; --tiny: 2)")
    parser.add_argument("--output", default=None, help="where to save the adapter (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()

    # 1. The frozen base model, and one LoReFT intervention at the last token of the prompt.
    model, tokenizer = tiny_model() if args.tiny else load_smollm2()
    layer = min(args.layer, model.config.num_hidden_layers - 1)
    torch.manual_seed(0)
    rm = reft.IntervenableModel(
        model,
        {f"layers.{layer}.block_output": reft.LoReFT(model.config.hidden_size, rank=4)},
        positions="l1",  # the last prompt token; the KV cache carries the edit into the answer
    )
    rm.print_trainable_parameters()

    # 2. Train on ten pairs: the loss is on the responses, the prompts go through the chat template.
    data = reft.data.build_generation_data(tokenizer, PAIRS)
    epochs = args.epochs or (2 if args.tiny else 30)
    config = reft.TrainConfig(lr=1e-2, epochs=epochs, batch_size=len(PAIRS), log_every=5, seed=0)
    history = reft.Trainer(rm, config, data).fit()
    print(f"trained {len(history) and history[-1]['step']} steps in {time.perf_counter() - started:.0f} s, "
          f"final loss {history[-1]['loss']:.3f}")

    # 3. Held-out prompts: the base model's answers and the intervened model's, side by side.
    max_new_tokens = 8 if args.tiny else 40
    prompts = HELD_OUT[:2] if args.tiny else HELD_OUT
    base = answers(rm, tokenizer, prompts, max_new_tokens, base=True)
    tuned = answers(rm, tokenizer, prompts, max_new_tokens)
    width = 48
    print()
    n = sum(p.numel() for p in rm.trainable_parameters())
    print(f"{'base model':<{width}} | {f'with LoReFT ({n:,} trainable params)'}")
    print("-" * width + "-+-" + "-" * width)
    for prompt, b, t in zip(prompts, base, tuned):
        print(f"Q: {prompt}")
        left, right = textwrap.wrap(b, width) or [""], textwrap.wrap(t, width) or [""]
        for i in range(max(len(left), len(right))):
            print(f"{left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}")
        print()
    pirate = lambda texts: sum(t.lower().startswith("arr") for t in texts)
    print(f"answers in pirate speak: base {pirate(base)}/{len(prompts)}, LoReFT {pirate(tuned)}/{len(prompts)}")

    # 4. Save the adapter (two small files), reload it onto the unwrapped base model, same answer.
    folder = args.output or tempfile.mkdtemp(prefix="reft-quickstart-")
    rm.save_pretrained(folder)
    rm.remove()  # the base model is plain again
    reloaded = reft.IntervenableModel.from_pretrained(model, folder)
    again = answers(reloaded, tokenizer, prompts[:1], max_new_tokens)
    print(f"saved to {folder}; reloaded adapter: {again[0]!r}")
    print(f"same answer after reload: {again[0] == tuned[0]}  ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
