"""Compiled training step (`TrainConfig.compile`): reft's step under torch.compile vs the eager floor.

The workload is `bench/train_step.py`'s `loreft` variant (LoReFT on every layer; tiny LLaMA at f5+l5,
SmolLM2-135M at f7+l7), timed interleaved with the eager floor and the eager reft step. The compiled
step is `torch.compile(rm)` (inductor; the forward and the backward compiled, AdamW eager), as
`TrainConfig(compile=True)` runs it. The one-time compile is timed apart and not counted in the
step. `bench/run.py` checks its target: compiled step / eager floor <= 0.85 (CPU time; one thread).

    python bench/compile_step.py --model tiny --reps 20
    python bench/compile_step.py --model smollm2 --profile   # the matrix-product share of the eager floor

`--profile` bounds what a compiler that fuses everything else can reach: inductor on CPU hands the
matrix products (`mm`, `addmm`, `bmm`) to the same BLAS calls as eager and the attention to the same
SDPA kernels, so the compiled step is at least their share of the eager floor's CPU time (torch.profiler, self CPU time per operator, one step
after two warm-ups).
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


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile(model_name: str, reps: int = 5) -> dict:
    """The share of the eager floor step's CPU time spent in matrix products and attention kernels.

    Each of `reps` steps runs under torch.profiler: the kernels' self time over the step's wall-clock
    time (the profiler times operators by the wall clock, so both sides stretch alike when the machine
    is shared), median over the steps. The profiler's per-operator overhead lengthens the step a little
    (most on the tiny model, whose operators are small), so the shares are slight underestimates.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = build(model_name, "floor", w.MODELS[model_name]())[0]
    step(), step()
    rows = []
    for _ in range(reps):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            step()
            wall_ms = 1e3 * (time.perf_counter() - started)
        self_ms = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
        matmul = sum(self_ms.get(k, 0.0) for k in MATMULS)
        rows.append((matmul / wall_ms, (matmul + sum(self_ms.get(k, 0.0) for k in ATTENTION)) / wall_ms, wall_ms))
    median = sorted(rows)[len(rows) // 2]
    return {
        "bench": "compile_step_profile",
        "model": model_name,
        "shape": list(SHAPES[model_name]),
        "threads": torch.get_num_threads(),
        "reps": reps,
        "step_wall_ms": round(median[2], 1),
        "matmul_share": round(median[0], 3),
        "matmul_and_attention_share": round(median[1], 3),
        "all_matmul_shares": [round(r[0], 3) for r in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*VARIANTS, "both"], default="both")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per variant")
    parser.add_argument("--profile", action="store_true", help="print the matrix-product and attention share of the eager floor step instead")
    args = parser.parse_args()
    w.set_threads()
    torch.manual_seed(0)
    for name in VARIANTS if args.model == "both" else [args.model]:
        w.emit(profile(name) if args.profile else run(name, args.reps or DEFAULT_REPS[name]))


if __name__ == "__main__":
    main()
