"""Generation with a trained adapter: one batch of prompts of different lengths, left-padded.

`rm.generate` takes Hugging Face's `generate` arguments. The interventions' positions come from the
attention mask, so a left-padded batch needs nothing else: no location lists, no BOS search. In mode
"prompt" (the default) the prompt is edited once, in the prefill pass, and the KV cache carries the
edit into every generated token; mode "every_token" also edits each new token where the spec reaches
it (here `l1`: the last token, i.e. each new one).

    python tutorials/quickstart.py --output runs/pirate        # train and save the pirate adapter, or:
    reft train configs/smollm2_pirate.yaml                     # (saves runs/smollm2-pirate/adapter)
    python tutorials/generation.py --adapter runs/pirate       # then generate with it
    python tutorials/generation.py                             # no adapter: trains one first (minutes)
    python tutorials/generation.py --tiny                      # a random 2-layer model (CI)
"""

from __future__ import annotations

import argparse
import time

import torch

import reft
from reft.assets import load_smollm2
from quickstart import PAIRS, tiny_model  # the quickstart's ten pirate pairs, and its tiny model

PROMPTS = [
    "Hi!",
    "What is the capital of Italy?",
    "Explain in one sentence why the sea is salty, and what would happen if it were not.",
    "Name a fruit.",
]


def train_adapter(model, tokenizer, tiny: bool) -> reft.IntervenableModel:
    """The quickstart's training, for when no saved adapter is given."""
    torch.manual_seed(0)
    layer = min(15, model.config.num_hidden_layers - 1)
    rm = reft.IntervenableModel(model, {f"layers.{layer}.block_output": reft.LoReFT(model.config.hidden_size, rank=4)}, positions="l1")
    data = reft.data.build_generation_data(tokenizer, PAIRS)
    reft.Trainer(rm, reft.TrainConfig(lr=1e-2, epochs=2 if tiny else 30, batch_size=len(PAIRS), log_every=5, seed=0), data).fit()
    return rm


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="a saved adapter folder for SmolLM2 (default: train one first)")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer model and a 2-step adapter (CI)")
    args = parser.parse_args()

    model, tokenizer = tiny_model() if args.tiny else load_smollm2()
    if args.adapter:
        rm = reft.IntervenableModel.from_pretrained(model, args.adapter)
    else:
        rm = train_adapter(model, tokenizer, args.tiny)
    rm.eval()
    print(rm)

    # One batch: chat-formatted prompts of different lengths, padded on the left.
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in PROMPTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    n = batch["input_ids"].shape[1]
    new = 8 if args.tiny else 32
    common = dict(max_new_tokens=new, pad_token_id=tokenizer.pad_token_id)
    print(f"\nbatch: {len(PROMPTS)} prompts, {batch['attention_mask'].sum(1).tolist()} tokens, padded to {n}")

    with torch.no_grad():
        # Greedy, the whole batch at once; timed against the base model on the same batch.
        start = time.perf_counter()
        greedy = rm.generate(**batch, do_sample=False, **common)
        seconds = time.perf_counter() - start
        with rm.disabled():  # the same wrapper without its interventions: the base model
            start = time.perf_counter()
            base = rm.generate(**batch, do_sample=False, **common)
            base_seconds = time.perf_counter() - start
        print(f"\ngreedy ({seconds:.1f} s with the adapter, {base_seconds:.1f} s without):")
        for prompt, b, g in zip(PROMPTS, base[:, n:], greedy[:, n:]):
            print(f"  {prompt}\n    base:    {decode(tokenizer, b)}\n    adapter: {decode(tokenizer, g)}")

        # A prompt alone gives the same answer as in the padded batch (where finished rows get padding).
        alone = tokenizer(texts[1:2], return_tensors="pt", add_special_tokens=False)
        single = rm.generate(**alone, do_sample=False, **common)
        same = decode(tokenizer, single[0, alone["input_ids"].shape[1]:]) == decode(tokenizer, greedy[1, n:])
        print(f"\nprompt 2 alone == prompt 2 in the batch: {same}")

        # Sampling: two answers per prompt.
        torch.manual_seed(0)
        sampled = rm.generate(**batch, do_sample=True, temperature=0.8, top_p=0.95, num_return_sequences=2, **common)
        print("\nsampled, 2 per prompt:")
        for i, ids in enumerate(sampled[:, n:]):
            print(f"  [{PROMPTS[i // 2][:24]}] {decode(tokenizer, ids)}")

        # Beam search: the positions are expanded per beam.
        beams = rm.generate(**batch, num_beams=3, do_sample=False, **common)
        print("\nbeam search (3 beams):")
        for prompt, ids in zip(PROMPTS, beams[:, n:]):
            print(f"  {prompt[:24]:<24} {decode(tokenizer, ids)}")

        # Mode "every_token": the l1 intervention also edits each generated token.
        every = rm.generate(**batch, mode="every_token", do_sample=False, **common)
        print("\nmode every_token (l1 edits each new token too):")
        for prompt, ids in zip(PROMPTS, every[:, n:]):
            print(f"  {prompt[:24]:<24} {decode(tokenizer, ids)}")


if __name__ == "__main__":
    main()
