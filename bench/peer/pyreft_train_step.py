"""Training step with pyreft 0.1.0 (the peer), vs its own frozen floor: run in .venv-peer.

The same workloads as `bench/train_step.py` (models, batches, floor and timing loop come from
`bench/workloads.py`), written as a pyreft user would: `ReftConfig` + `get_reft_model`,
`LoreftIntervention`, and pyreft's position format, an `intervention_locations` tensor
`[batch, interventions, positions]` turned into lists in every step as `ReftTrainer.compute_loss`
does (`permute(1, 0, 2).tolist()`). Tied f+l positions are pyreft's `share_weights=True` layout
(one intervention per layer, first and last positions in one list). pyreft has no RED, so RED is
written with pyvene's extension API (the same base classes as pyreft's own interventions), and
"all positions" is pyvene's `unit_locations=None` (the whole hidden state, no gather).

With `--with-reft` (what `bench/run.py` passes), the same process also times reft's variants
(`reft:loreft`, ...: `bench/train_step.py`'s, imported from the source tree) on the same models and
transformers 4.45.1, interleaved with pyreft's: the like-for-like ours/pyreft comparison.

    .venv-peer/bin/python bench/peer/pyreft_train_step.py --model tiny --reps 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE.parent.parent))  # the source tree, for `import reft` with --with-reft
import workloads as w  # noqa: E402
from train_step import DEFAULT_REPS, RANKS, SHAPES, VARIANTS, shared_copy  # noqa: E402


def red_intervention_class():
    import pyvene as pv

    class REDIntervention(pv.SourcelessIntervention, pv.TrainableIntervention, pv.DistributedRepresentationIntervention):
        """RED, `s * h + b` (s = 1, b = 0 at init), as a pyvene intervention."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs, keep_last_dim=True)
            self.scale = nn.Parameter(torch.ones(self.embed_dim))
            self.bias = nn.Parameter(torch.zeros(self.embed_dim))

        def forward(self, base, source=None, subspaces=None):
            return (base * self.scale + self.bias).to(base.dtype)

    return REDIntervention


def reft_model(model: nn.Module, kind: str, layers: list[int], rank: int):
    """A pyreft `ReftModel` with one intervention per layer (block_output for LoReFT, mlp_output for RED)."""
    import pyreft

    d = model.config.hidden_size
    if kind == "loreft":
        reps = [
            {
                "layer": i,
                "component": "block_output",
                "low_rank_dimension": rank,
                "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=rank, dtype=torch.float32),
            }
            for i in layers
        ]
    else:
        red = red_intervention_class()
        reps = [{"layer": i, "component": "mlp_output", "intervention": red(embed_dim=d)} for i in layers]
    return pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))


def intervention_locations(spec: str, batch: int, seq: int, count: int) -> torch.Tensor | None:
    """pyreft's collated `intervention_locations` `[batch, interventions, positions]` (share_weights=True)."""
    fl = w.first_last(spec)
    if fl is None:
        return None
    from pyreft import get_intervention_locations

    one = get_intervention_locations(
        last_position=seq, first_n=fl[0], last_n=fl[1], pad_mode="last", num_interventions=count, share_weights=True
    )
    return torch.tensor([one] * batch)


def build(model_name: str, variant: str, base: nn.Module) -> tuple[Callable[[], float], int]:
    """`(step, resident bytes of trainable state)` for one variant on a shared copy of `base`.

    `reft:<variant>` builds reft's own variant (bench/train_step.py) instead of pyreft's.
    """
    if variant.startswith("reft:"):
        import train_step

        return train_step.build(model_name, variant.removeprefix("reft:"), base)
    model = shared_copy(base)
    batch, seq = SHAPES[model_name]
    data = w.batch(model.config.vocab_size, batch, seq)
    if variant == "floor":
        return w.floor_step(model, data), model.config.hidden_size * 4 * 3
    if variant == "floor_l0":
        return w.floor_l0_step(model, data), model.config.hidden_size * 4 * 3
    kind, layers, positions = VARIANTS[model_name][variant]
    chosen = w.layers_for(layers, model.config.num_hidden_layers)
    rm = reft_model(model, kind, chosen, RANKS[model_name])
    locations = intervention_locations(positions, batch, seq, len(chosen))
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}

    def loss() -> torch.Tensor:
        unit_locations = None
        if locations is not None:  # as ReftTrainer.compute_loss does
            unit_locations = {"sources->base": (None, locations.permute(1, 0, 2).tolist())}
        _, out = rm(inputs, unit_locations=unit_locations, labels=data["labels"])
        return out.loss

    params = [p for p in rm.parameters() if p.requires_grad]
    held = sum(t.numel() * t.element_size() for iv in rm.interventions.values() for t in [*iv.parameters(), *iv.buffers()])
    return w.optimizer_step(loss, params), held + 2 * sum(p.numel() * p.element_size() for p in params)


def run(model_name: str, reps: int, variants: list[str] | None = None, with_reft: bool = False) -> dict:
    import transformers

    base = w.MODELS[model_name]()
    chosen = variants or list(VARIANTS[model_name])
    names = ["floor", "floor_l0", *chosen, *([f"reft:{v}" for v in chosen] if with_reft else [])]
    steps = {name: build(model_name, name, base)[0] for name in names}
    timings = w.interleaved(steps, reps=reps)
    floor = timings["floor"].median_s
    return {
        "bench": "train_step",
        "side": "pyreft",
        "model": model_name,
        "transformers": transformers.__version__,
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
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--variants", nargs="*", default=None)
    parser.add_argument("--with-reft", action="store_true", help="also time reft's variants in this process")
    args = parser.parse_args()
    w.set_threads()
    torch.manual_seed(0)
    for name in VARIANTS if args.model == "both" else [args.model]:
        w.emit(run(name, args.reps or DEFAULT_REPS[name], args.variants, args.with_reft))


if __name__ == "__main__":
    main()
