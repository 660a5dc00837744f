"""Prompt-mode generation with pyreft 0.1.0 (the peer) vs plain `model.generate`: run in .venv-peer.

The workload of `bench/generate.py`: batch 4 of 64-token prompts, 64 new tokens (greedy,
`min_new_tokens` = `max_new_tokens`, so every call decodes exactly 64 steps), LoReFT rank 8 on
every layer's block output at f7+l7 of the prompt, on the tiny LLaMA or SmolLM2-135M. pyreft edits
the prompt only with `intervene_on_prompt=True`, its prompt-mode generation; the positions are
its `[interventions, batch, positions]` lists, built per call as a pyreft user does.
Interleaved repetitions, medians; one JSON line per model.

With `--with-reft` (what `bench/run.py` passes), the same process also times reft's `rm.generate`
(mode "prompt", imported from the source tree) on transformers 4.45.1, with its LoReFT weights
copied from pyreft's, and reports how many generated tokens the two agree on (a check that both
edit the same positions with the same map).

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
sys.path.insert(2, str(HERE.parent.parent))  # the source tree, for `import reft` with --with-reft
import workloads as w  # noqa: E402

PROMPT, NEW, BATCH = 64, 64, 4
SETUP = {"tiny": (8, "f7+l7"), "smollm2": (8, "f7+l7")}  # rank, positions: as bench/generate.py
DEFAULT_REPS = {"tiny": 30, "smollm2": 5}


def reft_like(rm, base, layers: list[int], rank: int, positions: str):
    """reft's IntervenableModel with the same LoReFT weights as pyreft's `rm`, on a shared copy of `base`."""
    import reft

    from train_step import shared_copy

    ours = {}
    for i, iv in zip(layers, rm.interventions.values()):
        lo = reft.LoReFT(base.config.hidden_size, rank=rank)
        with torch.no_grad():
            lo.R.weight.copy_(iv.rotate_layer.weight.T)  # pyreft: [d, r] orthonormal columns
            lo.W.weight.copy_(iv.learned_source.weight)
            lo.W.bias.copy_(iv.learned_source.bias)
        ours[f"layers.{i}.block_output"] = lo
    return reft.IntervenableModel(shared_copy(base), ours, positions=positions)


def run(model_name: str, reps: int, with_reft: bool = False) -> dict:
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
    calls = {"plain": run_plain, "pyreft": run_pyreft}
    agreement = None
    if with_reft:
        ours = reft_like(rm, base, layers, rank, positions)

        def run_reft():
            with torch.no_grad():
                return ours.generate(**inputs, **options)

        calls["reft"] = run_reft
        agreement = (run_reft()[:, PROMPT:] == edited[:, PROMPT:]).float().mean().item()
    timings = w.interleaved(calls, reps=reps, warmup=1)
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
        **(
            {
                "reft_cpu_ratio_to_plain": w.ratio(timings["reft"].cpu_median_s, timings["plain"].cpu_median_s),
                "reft_cpu_ratio_to_pyreft": w.ratio(timings["reft"].cpu_median_s, timings["pyreft"].cpu_median_s),
                "reft_pyreft_same_tokens": agreement,
            }
            if with_reft
            else {}
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*SETUP, "both"], default="both")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--with-reft", action="store_true", help="also time reft's rm.generate in this process")
    args = parser.parse_args()
    w.set_threads()
    torch.manual_seed(0)
    for name in SETUP if args.model == "both" else [args.model]:
        w.emit(run(name, args.reps or DEFAULT_REPS[name], args.with_reft))


if __name__ == "__main__":
    main()
