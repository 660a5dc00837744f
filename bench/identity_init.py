"""LoReFT's init on a language model: pyreft's draw against the identity (`init="identity"`).

pyreft's LoReFT is not the identity at init (W and b drawn as `nn.Linear`'s), so an all-layer LoReFT
starts above the frozen model's loss; `LoReFT(init="identity")` sets W = R, b = 0 (`h' = h`). The
sentiment tutorial cannot tell them apart (its classifier head is new, so every run starts at ln 2;
docs/tutorials.md). This script asks on SmolLM2-135M-Instruct, next-token loss: LoReFT rank 4 on the
block output of all 30 layers at f1+l1 (tied), trained on 7 of tutorials/multi_adapter.py's pirate
answers and scored on the other 3 (held-out loss), for each init and seed. One JSON line per run:
held-out loss before training and after each `--every` steps, and the training loss of each step.

    python bench/identity_init.py                      # seeds 0 1 2, 30 steps, lr 1e-2 (a few minutes)
    python bench/identity_init.py --seeds 0 --steps 10 --tiny   # a random 2-layer model (the code path)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tutorials"))
from multi_adapter import ANSWERS, QUESTIONS  # noqa: E402
from quickstart import tiny_model  # noqa: E402

import reft  # noqa: E402
from reft.assets import load_smollm2  # noqa: E402


def run(model, tokenizer, init: str, seed: int, steps: int, lr: float, every: int) -> dict:
    rows = [(q, a) for q, a in zip(QUESTIONS, ANSWERS["pirate"])]
    train = reft.data.build_generation_data(tokenizer, rows[:7])
    held_out = reft.data.build_generation_data(tokenizer, rows[7:])
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    torch.manual_seed(seed)
    sites = {f"layers.{i}.block_output": reft.LoReFT(d, rank=4, init=init) for i in range(layers)}
    rm = reft.IntervenableModel(model, sites, positions="f1+l1")
    try:
        config = reft.TrainConfig(lr=lr, max_steps=steps, batch_size=7, log_every=1, eval_every=every, seed=seed)
        trainer = reft.Trainer(rm, config, train, eval_data=held_out)
        with rm.disabled():
            frozen = trainer.evaluate()["eval_loss"]
        curve = {0: trainer.evaluate()["eval_loss"]}
        started = time.process_time()
        history = trainer.fit()
        losses = [round(r["loss"], 4) for r in history if "loss" in r]
        curve.update({r["step"]: r["eval_loss"] for r in history if "eval_loss" in r})
        return {
            "bench": "identity_init", "init": init, "seed": seed, "lr": lr, "steps": steps,
            "frozen_held_out_loss": round(frozen, 4),
            "held_out_loss": {step: round(loss, 4) for step, loss in curve.items()},
            "train_loss": losses,
            "cpu_s": round(time.process_time() - started, 1),
        }
    finally:
        rm.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5, help="steps between held-out evaluations")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer model: checks the code path in seconds")
    args = parser.parse_args()
    model, tokenizer = tiny_model() if args.tiny else load_smollm2()
    for seed in args.seeds:
        for init in ("pyreft", "identity"):
            print(json.dumps(run(model, tokenizer, init, seed, args.steps, args.lr, args.every)), flush=True)


if __name__ == "__main__":
    main()
