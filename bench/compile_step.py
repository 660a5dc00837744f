"""Compiled training step (`TrainConfig.compile`): reft's step under torch.compile vs the eager floor.

The workload is `bench/train_step.py`'s `loreft` variant (LoReFT on every layer; tiny LLaMA at f5+l5,
SmolLM2-135M at f7+l7), timed interleaved with the eager floor and the eager reft step. The compiled
step is `torch.compile(rm)` (inductor; the forward and the backward compiled, AdamW eager), as
`TrainConfig(compile=True)` runs it. The one-time compile is timed apart and not counted in the
step. `bench/run.py` checks its target: compiled step / eager floor <= 0.85 (CPU time; one thread).

    python bench/compile_step.py --model tiny --reps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as w  # noqa: E402
from train_step import DEFAULT_REPS, RANKS, SHAPES, VARIANTS, build, shared_copy  # noqa: E402


def compiled_step(model_name: str, base: torch.nn.Module):
    """`(step, compile seconds, first loss)`: the `loreft` variant's step, its model under torch.compile."""
    import reft

    model = shared_copy(base)
    batch, seq = SHAPES[model_name]
    data = w.batch(model.config.vocab_size, batch, seq)
    _, layers, positions = VARIANTS[model_name]["loreft"]
    d = model.config.hidden_size
    torch.manual_seed(0)
    chosen = w.layers_for(layers, model.config.num_hidden_layers)
    rm = reft.IntervenableModel(model, {f"layers.{i}.block_output": reft.LoReFT(d, rank=RANKS[model_name]) for i in chosen},
                                positions=positions)
    compiled = torch.compile(rm)
    step = w.optimizer_step(lambda: compiled(**data).loss, rm.trainable_parameters())
    started = time.perf_counter()
    loss = step()  # compiles the forward and the backward
    return step, time.perf_counter() - started, loss


def run(model_name: str, reps: int) -> dict:
    base = w.MODELS[model_name]()
    steps = {name: build(model_name, name, base)[0] for name in ("floor", "loreft")}
    steps["loreft_compiled"], compile_s, _ = compiled_step(model_name, base)
    timings = w.interleaved(steps, reps=reps)
    cpu = {name: t.cpu_median_s for name, t in timings.items()}
    return {
        "bench": "compile_step",
        "side": "reft",
        "model": model_name,
        "shape": list(SHAPES[model_name]),
        "variant": list(map(str, VARIANTS[model_name]["loreft"])),
        "reps": reps,
        "threads": torch.get_num_threads(),
        "compile_s": round(compile_s, 1),
        "median_s": {name: t.median_s for name, t in timings.items()},
        "cpu_median_s": cpu,
        "cpu_ratio_to_floor": {name: w.ratio(cpu[name], cpu["floor"]) for name in cpu if name != "floor"},
        "compiled/eager": w.ratio(cpu["loreft_compiled"], cpu["loreft"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*VARIANTS, "both"], default="both")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per variant")
    args = parser.parse_args()
    w.set_threads()
    torch.manual_seed(0)
    for name in VARIANTS if args.model == "both" else [args.model]:
        w.emit(run(name, args.reps or DEFAULT_REPS[name]))


if __name__ == "__main__":
    main()
