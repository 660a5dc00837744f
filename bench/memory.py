"""Peak memory of a training step vs the frozen floor's, each configuration in a fresh process (CPU).

What is measured, per configuration (model x variant), in a new Python process that builds only
that configuration:
- `step_peak_mib`: the peak of live tensor bytes during one training step (after three warm-up
  steps) above what was live before it, from torch.profiler's allocation events (every CPU allocation and free, in order):
  activations saved for backward, gradients, temporaries. This is the memory a step adds.
- `total_peak_mib`: that plus the tensors held throughout (weights, interventions and any buffers
  they keep, optimizer state): the tensor-memory high-water mark of training.
- `rss_rise_mib`: the rise of the process's resident set over its first three training steps (VmHWM
  reset just before them, minus the RSS then), with glibc's mmap threshold fixed at 128 KiB so that
  freed tensors go back to the system; it adds allocator, lazy initialisation and Python overhead,
  and is noisier.
tracemalloc would see none of this (torch allocates outside Python's allocator).

`--checkpointing` measures `TrainConfig(gradient_checkpointing=True)` against the same training without
it: LoReFT rank 8 at f7+l7 on all 30 layers of SmolLM2, batch 8 x 256 tokens, each step a
`reft.Trainer(...).fit()` of one optimizer step (public API only; a new optimizer each time, whose
state is a few MiB in both configurations); each row is 128 prompt and 128 response tokens. Target: peak memory at most 0.70x (30% less).

    python bench/memory.py                # ours (and pyreft's, when .venv-peer exists)
    python bench/memory.py --side reft
    python bench/memory.py --checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import workloads as w  # noqa: E402

CONFIGS = {"tiny": ["floor", "loreft", "red"], "smollm2": ["floor", "loreft", "red"]}
CHECKPOINTING = {"model": "smollm2", "shape": (8, 256), "rank": 8, "positions": "f7+l7", "target": 0.70}
PYTHON = {"reft": Path(sys.executable), "pyreft": ROOT / ".venv-peer" / "bin" / "python"}


def measure_one(side: str, model_name: str, variant: str) -> dict:
    """Build one configuration in this process and measure it (the worker's job)."""
    import torch

    w.set_threads()
    torch.manual_seed(0)
    if variant in ("trainer", "trainer_checkpointing"):
        build = trainer_step
    elif side == "reft":
        from train_step import build
    else:
        sys.path.insert(0, str(HERE / "peer"))
        from pyreft_train_step import build
    base = w.MODELS[model_name]()
    with torch.no_grad():  # weights loaded from safetensors are file-backed pages until first read
        for t in [*base.parameters(), *base.buffers()]:
            t.sum()
    step, trainable_state = build(model_name, variant, base)
    return w.memory_of(step, w.tensor_bytes(base) + trainable_state)


def trainer_step(model_name: str, variant: str, base) -> tuple:
    """`(step, resident bytes of trainable state)`: one `reft.Trainer` step, with or without checkpointing."""
    import torch

    import reft

    batch, seq = CHECKPOINTING["shape"]
    d, layers = base.config.hidden_size, base.config.num_hidden_layers
    rm = reft.IntervenableModel(
        base, {f"layers.{i}.block_output": reft.LoReFT(d, rank=CHECKPOINTING["rank"]) for i in range(layers)},
        positions=CHECKPOINTING["positions"],
    )
    ids = w.batch(base.config.vocab_size, batch, seq)["input_ids"]
    prompt = seq // 2  # prompt, then response: the loss is on the response, positions count prompt tokens
    labels = ids.clone()
    labels[:, :prompt] = -100
    data = [{"input_ids": i, "labels": l, "prompt_length": torch.tensor(prompt)} for i, l in zip(ids, labels)]
    collator = reft.data.Collator(padding_side="right", pad_token_id=0)
    config = reft.TrainConfig(max_steps=1, batch_size=batch, gradient_checkpointing=variant == "trainer_checkpointing")

    def step() -> None:
        reft.Trainer(rm, config, data, collator=collator).fit()

    params = rm.trainable_parameters()
    return step, 3 * sum(p.numel() * p.element_size() for p in params)  # weights, gradients, two Adam moments (2x)


def spawn(side: str, model_name: str, variant: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    cmd = [str(PYTHON[side]), str(Path(__file__).resolve()), "--worker", side, model_name, variant]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(side: str, model_name: str) -> dict:
    figures = {variant: spawn(side, model_name, variant) for variant in CONFIGS[model_name]}
    floor = figures["floor"]
    ratios = {
        variant: {key: w.ratio(f[key], floor[key]) for key in ("step_peak_mib", "total_peak_mib", "rss_rise_mib") if floor[key] > 0}
        for variant, f in figures.items()
        if variant != "floor"
    }
    return {"bench": "memory", "side": side, "model": model_name, "mib": figures, "ratio_to_floor": ratios}


def checkpointing(model_name: str = CHECKPOINTING["model"]) -> dict:
    """Trainer step peak memory with and without `gradient_checkpointing` (each in a fresh process)."""
    figures = {variant: spawn("reft", model_name, variant) for variant in ("trainer", "trainer_checkpointing")}
    plain, checkpointed = figures["trainer"], figures["trainer_checkpointing"]
    return {
        "bench": "memory_checkpointing",
        "model": model_name,
        "shape": list(CHECKPOINTING["shape"]),
        "interventions": f"LoReFT rank {CHECKPOINTING['rank']} at {CHECKPOINTING['positions']} on every layer",
        "mib": figures,
        "checkpointing/plain": {key: w.ratio(checkpointed[key], plain[key]) for key in ("step_peak_mib", "total_peak_mib", "rss_rise_mib")},
        "target": CHECKPOINTING["target"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["reft", "pyreft", "both"], default="both")
    parser.add_argument("--model", choices=[*CONFIGS, "both"], default="both")
    parser.add_argument("--checkpointing", action="store_true", help="TrainConfig(gradient_checkpointing=True) vs off")
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure_one(*args.worker)))
        return
    if args.checkpointing:
        w.emit(checkpointing(CHECKPOINTING["model"] if args.model == "both" else args.model))
        return
    sides = ["reft", "pyreft"] if args.side == "both" else [args.side]
    sides = [s for s in sides if PYTHON[s].exists() or s == "reft"]
    for model_name in CONFIGS if args.model == "both" else [args.model]:
        for side in sides:
            w.emit(run(side, model_name))


if __name__ == "__main__":
    main()
