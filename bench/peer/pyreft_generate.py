"""Prompt-mode generation with pyreft 0.1.0 (the peer) vs plain `model.generate`: run in .venv-peer.

The workload of `bench/generate.py`: batch 4 of 64-token prompts, 64 new tokens (greedy,
`min_new_tokens` = `max_new_tokens`, so every call decodes exactly 64 steps), LoReFT rank 8 on
every layer's block output at f7+l7 of the prompt, on the tiny LLaMA or SmolLM2-135M. pyreft edits
the prompt only with `intervene_on_prompt=True`, its prompt-mode generation; the positions are
its `[interventions, batch, positions]` lists, built per call as a pyreft user does.
Interleaved repetitions, medians; one JSON line per model.

    .venv-peer/bin/python bench/peer/pyreft_generate.py --model tiny --reps 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import workloads as w  # noqa: E402

PROMPT, NEW, BATCH = 64, 64, 4
SETUP = {"tiny": (8, "f7+l7"), "smollm2": (8, "f7+l7")}  # rank, positions: as bench/generate.py
DEFAULT_REPS = {"tiny": 10, "smollm2": 3}


def run(model_name: str, reps: int) -> dict:
    import transformers

    from pyreft_train_step import reft_model as pyreft_model
    from train_step import shared_copy

    base = w.MODELS[model_name]()
    rank, positions = SETUP[model_name]
    layers = list(range(base.config.num_hidden_layers))
    prompt = w.batch(base.config.vocab_size, BATCH, PROMPT)
    inputs = {"input_ids": prompt["input_ids"], "attention_mask": prompt["attention_mask"]}
    options = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)

    plain = shared_copy(base)
    rm = pyreft_model(shared_copy(base), "loreft", layers, rank)
    first, last = w.first_last(positions)
    one = list(range(first)) + list(range(PROMPT - last, PROMPT))

    def run_plain():
        return plain.generate(**inputs, **options)

    def run_pyreft():
        locations = {"sources->base": (None, [[one] * BATCH] * len(layers))}
        _, out = rm.generate(inputs, unit_locations=locations, intervene_on_prompt=True, **options)
        return out

    edited, unedited = run_pyreft(), run_plain()
    assert edited.shape == (BATCH, PROMPT + NEW)
    assert not torch.equal(edited, unedited), "pyreft's generation did not change the output: no edit happened"
    timings = w.interleaved({"plain": run_plain, "pyreft": run_pyreft}, reps=reps, warmup=1)
    return {
        "bench": "generate",
        "side": "pyreft",
        "model": model_name,
        "transformers": transformers.__version__,
        "prompt": PROMPT,
        "new_tokens": NEW,
        "batch": BATCH,
        "positions": positions,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "median_s": {name: t.median_s for name, t in timings.items()},
        "ratio_to_plain": w.ratio(timings["pyreft"].median_s, timings["plain"].median_s),
        "cpu_median_s": {name: t.cpu_median_s for name, t in timings.items()},
        "cpu_ratio_to_plain": w.ratio(timings["pyreft"].cpu_median_s, timings["plain"].cpu_median_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*SETUP, "both"], default="both")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    w.set_threads()
    torch.manual_seed(0)
    for name in SETUP if args.model == "both" else [args.model]:
        w.emit(run(name, args.reps or DEFAULT_REPS[name]))


if __name__ == "__main__":
    main()
