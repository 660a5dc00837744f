"""Training step (forward + backward + AdamW step): reft vs the frozen floor, one JSON line per model.

Workloads (see `workloads.py` for the models, batches and the floor):
- tiny LLaMA (hidden 256, 4 layers), batch 4 x 32 tokens: LoReFT rank 4 on every layer's block
  output at f5+l5; RED on every FFN output at every position;
- SmolLM2-135M (hidden 576, 30 layers), batch 4 x 64 tokens: LoReFT rank 8 on all 30 layers at
  f7+l7; RED on every FFN output; LoReFT on 1, 4 and all layers (f7+l7); LoReFT on all layers at
  2 (f1+l1), 14 (f7+l7) and all positions.
Every variant gets its own copy of the module tree sharing the same weight tensors, so each keeps
its own hooks while the timing loop interleaves them in one process.

    python bench/train_step.py --model tiny --reps 20
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as w  # noqa: E402

# name -> (intervention kind, layers, positions); the floor is added to every model.
VARIANTS: dict[str, dict[str, tuple[str, int | str, str]]] = {
    "tiny": {
        "loreft": ("loreft", "all", "f5+l5"),
        "red": ("red", "all", "all"),
    },
    "smollm2": {
        "loreft": ("loreft", "all", "f7+l7"),
        "red": ("red", "all", "all"),
        "loreft_layers1": ("loreft", 1, "f7+l7"),
        "loreft_layers4": ("loreft", 4, "f7+l7"),
        "loreft_pos2": ("loreft", "all", "f1+l1"),
        "loreft_posall": ("loreft", "all", "all"),
    },
}
SHAPES = {"tiny": (4, 32), "smollm2": (4, 64)}  # batch, tokens
RANKS = {"tiny": 4, "smollm2": 8}
DEFAULT_REPS = {"tiny": 40, "smollm2": 11}


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same parameter tensors (hooks are per module object)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def build(model_name: str, variant: str, base: nn.Module) -> tuple[Callable[[], float], int]:
    """`(step, resident bytes of trainable state)` for one variant on a shared copy of `base`."""
    import reft

    model = shared_copy(base)
    batch, seq = SHAPES[model_name]
    data = w.batch(model.config.vocab_size, batch, seq)
    if variant == "floor":
        return w.floor_step(model, data), model.config.hidden_size * 4 * 3  # z, its grad, two Adam moments
    if variant == "floor_l0":
        return w.floor_l0_step(model, data), model.config.hidden_size * 4 * 3
    kind, layers, positions = VARIANTS[model_name][variant]
    d = model.config.hidden_size
    chosen = w.layers_for(layers, model.config.num_hidden_layers)
    if kind == "loreft":
        interventions = {f"layers.{i}.block_output": reft.LoReFT(d, rank=RANKS[model_name]) for i in chosen}
    else:
        interventions = {f"layers.{i}.mlp_output": reft.RED(d) for i in chosen}
    rm = reft.IntervenableModel(model, interventions, positions=positions)
    params = rm.trainable_parameters()
    step = w.optimizer_step(lambda: rm(**data).loss, params)
    return step, 3 * sum(p.numel() * p.element_size() for p in params)


def run(model_name: str, reps: int, variants: list[str] | None = None) -> dict:
    base = w.MODELS[model_name]()
    names = ["floor", "floor_l0", *(variants or VARIANTS[model_name])]
    steps = {name: build(model_name, name, base)[0] for name in names}
    timings = w.interleaved(steps, reps=reps)
    floor = timings["floor"].median_s
    return {
        "bench": "train_step",
        "side": "reft",
        "model": model_name,
        "shape": list(SHAPES[model_name]),
        "variants": {name: list(map(str, VARIANTS[model_name][name])) for name in names if not name.startswith("floor")},
        "reps": reps,
        "threads": torch.get_num_threads(),
        "median_s": {name: t.median_s for name, t in timings.items()},
        "ratio_to_floor": {name: w.ratio(t.median_s, floor) for name, t in timings.items() if name != "floor"},
        "ratio_to_floor_l0": {
            name: w.ratio(t.median_s, timings["floor_l0"].median_s) for name, t in timings.items() if not name.startswith("floor")
        },
        "cpu_median_s": {name: t.cpu_median_s for name, t in timings.items()},
        "cpu_ratio_to_floor": {
            name: w.ratio(t.cpu_median_s, timings["floor"].cpu_median_s) for name, t in timings.items() if name != "floor"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*VARIANTS, "both"], default="both")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per variant")
    parser.add_argument("--variants", nargs="*", default=None, help="a subset of the model's variants")
    args = parser.parse_args()
    w.set_threads()
    torch.manual_seed(0)
    for name in VARIANTS if args.model == "both" else [args.model]:
        w.emit(run(name, args.reps or DEFAULT_REPS[name], args.variants))


if __name__ == "__main__":
    main()
