"""Generation: `rm.generate` (mode "prompt") vs plain `model.generate` on the same inputs, one JSON line.

Workload: batch 4 x 64 prompt tokens, 64 new tokens (greedy, `min_new_tokens` = 64 so both sides
decode exactly as many steps), LoReFT rank 8 on every layer's block output at f7+l7; the tiny
LLaMA (hidden 256, 4 layers) of `workloads.py`, or with `--model smollm2` SmolLM2-135M-Instruct
(`reft.assets.load_smollm2()`). Both sides run in one process on module trees that share the same
weight tensors (the wrapped one carries the hooks), interleaved, and the figures are medians. The
target is a ratio <= 1.03: in mode "prompt" the interventions run in the prefill pass only. The
record also gives the medians of process CPU time, which on a shared CPU machine leave out the time
spent waiting for a core (wall-clock medians there can move by 10% from one run to the next).

    python bench/generate.py --model tiny --reps 20 --json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as w  # noqa: E402

BATCH, PROMPT, NEW, RANK, POSITIONS = 4, 64, 64, 8, "f7+l7"
DEFAULT_REPS = {"tiny": 30, "smollm2": 5}
TARGET = 1.03


def load(model_name: str, device: str) -> torch.nn.Module:
    if model_name == "smollm2":
        import reft.assets

        model, _ = reft.assets.load_smollm2(dtype=torch.float32)
    else:
        model = w.tiny_llama()
    return model.to(device).eval()


def run(model_name: str, reps: int, device: str) -> dict:
    import reft

    base = load(model_name, device)
    plain = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})  # same weights, no hooks
    d, layers = base.config.hidden_size, base.config.num_hidden_layers
    torch.manual_seed(0)
    rm = reft.IntervenableModel(base, {f"layers.{i}.block_output": reft.LoReFT(d, rank=RANK) for i in range(layers)}, positions=POSITIONS)
    data = w.batch(base.config.vocab_size, BATCH, PROMPT)
    inputs = {k: data[k].to(device) for k in ("input_ids", "attention_mask")}
    options = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)

    cpu: dict[str, list[float]] = {"plain": [], "reft": []}

    def timed(name, generate):
        def call():
            t0 = time.process_time()
            with torch.no_grad():
                out = generate(**inputs, **options)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            cpu[name].append(time.process_time() - t0)
            assert out.shape == (BATCH, PROMPT + NEW)

        return call

    timings = w.interleaved({"plain": timed("plain", plain.generate), "reft": timed("reft", rm.generate)}, reps=reps)
    plain_s, reft_s = timings["plain"].median_s, timings["reft"].median_s
    cpu_s = {name: statistics.median(samples[-reps:]) for name, samples in cpu.items()}  # without the warm-up calls
    return {
        "bench": "generate",
        "model": model_name,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "shape": {"batch": BATCH, "prompt": PROMPT, "new": NEW},
        "interventions": f"LoReFT rank {RANK} on {layers} layers at {POSITIONS}, mode prompt",
        "reps": reps,
        "median_s": {"plain": plain_s, "reft": reft_s},
        "min_s": {name: min(t.samples) for name, t in timings.items()},
        "ratio": w.ratio(reft_s, plain_s),
        "target": TARGET,
        # process CPU time: on a shared CPU machine it leaves out the time spent waiting for a core
        "cpu_median_s": cpu_s,
        "cpu_ratio": w.ratio(cpu_s["reft"], cpu_s["plain"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per side")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    w.set_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = run(args.model, args.reps or DEFAULT_REPS[args.model], device)
    if not args.json:
        print(
            f"{args.model} on {record['device']}: plain generate {record['median_s']['plain']:.4f} s, "
            f"rm.generate {record['median_s']['reft']:.4f} s, ratio {record['ratio']} (target <= {TARGET}); "
            f"CPU time ratio {record['cpu_ratio']}",
            file=sys.stderr,
        )
    w.emit(record)


if __name__ == "__main__":
    main()
