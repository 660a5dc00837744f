"""Writing your own intervention: a short class, registered by name, trained, saved and reloaded.

An intervention is an `nn.Module` that maps hidden states `[..., d] -> [..., d]`. Subclass
`reft.Intervention` (its constructor's arguments are recorded from its signature: that is what an
adapter on disk stores), and register the class under a name: configs, recipes and adapters refer to
it by that name, and loading an adapter builds only registered classes, never code named in a file.

Here: a gated steering vector, `h' = h + σ(wᵀh + c) · v`, which adds one learned direction `v` to
the hidden state, as much as the state's projection on `w` calls for. It is trained on the first
token of every layer of all-MiniLM-L6-v2 to classify the sentiment of Rotten Tomatoes snippets.

    python tutorials/custom_intervention.py          # about a minute on 2 CPU cores
    python tutorials/custom_intervention.py --tiny   # a few steps (CI)
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
from torch import nn

import reft
from reft.assets import load_minilm_classifier, rotten_tomatoes


@reft.register_intervention("gated_steer")
class GatedSteer(reft.Intervention):
    """`h' = h + σ(wᵀh + c) · v`: a learned direction `v` `[d]`, gated per token by `w` `[d]`, `c`.

    The identity at init (`v = 0`). Parameters: `2 * hidden_size + 1`.
    """

    def __init__(self, hidden_size: int, init_gate: float = 0.0):
        super().__init__(hidden_size)  # self.config records every argument, init_gate included
        self.gate = nn.Linear(hidden_size, 1)  # w, c
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, init_gate)
        self.v = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.v.dtype)  # [..., d]
        return (x + torch.sigmoid(self.gate(x)) * self.v).to(h.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="64 examples, 2 steps (CI)")
    parser.add_argument("--output", default=None, help="where to save the adapter (default: a temporary folder)")
    args = parser.parse_args()

    # 1. It is registered: build it by name, as a recipe or an adapter does. The identity at init.
    print("registered:", ", ".join(reft.registered_interventions()))
    steer = reft.make_intervention("gated_steer", hidden_size=384)
    h = torch.randn(2, 5, 384)
    assert torch.equal(steer(h), h)
    print(steer)

    # 2. Put one on the first token ([CLS]) of every layer and train it with the classifier head.
    torch.manual_seed(0)
    model, tokenizer = load_minilm_classifier(num_labels=2)
    model.bert.pooler.dense, model.bert.pooler.activation = nn.Identity(), nn.Identity()  # see sentiment.py
    sites = {f"layers.{i}.block_output": GatedSteer(384) for i in range(model.config.num_hidden_layers)}
    rm = reft.IntervenableModel(model, sites, positions="f1", head="classifier")
    rm.print_trainable_parameters()

    rows = rotten_tomatoes()
    random.Random(0).shuffle(rows)
    train, test = rows[:-973], rows[-973:]
    if args.tiny:
        train, test = train[:64], test[:64]
    else:
        train = train[:1600]
    train_data = reft.data.build_classification_data(tokenizer, *zip(*train), max_length=128, num_labels=2)
    test_data = reft.data.build_classification_data(tokenizer, *zip(*test), max_length=128, num_labels=2)
    config = reft.TrainConfig(lr=1e-2, epochs=1, batch_size=32, max_steps=2 if args.tiny else None, log_every=10, seed=0)
    trainer = reft.Trainer(rm, config, train_data)
    trainer.fit()
    print(f"held-out accuracy: {100 * trainer.evaluate(test_data)['eval_accuracy']:.1f}% on {len(test)} snippets")

    # 3. Save: the adapter names the intervention "gated_steer" and records its arguments.
    folder = Path(args.output or tempfile.mkdtemp(prefix="reft-custom-"))
    rm.save_pretrained(folder)
    config_json = json.loads((folder / "adapter_config.json").read_text())
    print("saved:", json.dumps(config_json["sites"][0]["interventions"]))

    # 4. Reload onto a fresh copy of the base model: the same predictions.
    batch = reft.data.Collator(tokenizer)([test_data[i] for i in range(8)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    rm.eval()
    with torch.no_grad():
        before = rm(**inputs).logits
    fresh, _ = load_minilm_classifier(num_labels=2)
    fresh.bert.pooler.dense, fresh.bert.pooler.activation = nn.Identity(), nn.Identity()
    reloaded = reft.IntervenableModel.from_pretrained(fresh, folder).eval()
    with torch.no_grad():
        after = reloaded(**inputs).logits
    print(f"reloaded from {folder}: same logits: {torch.equal(before, after)}")


if __name__ == "__main__":
    main()
