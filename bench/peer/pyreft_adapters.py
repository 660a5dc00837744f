"""Save small adapters with real pyreft 0.1.0, with their inputs and pyreft's outputs: run in .venv-peer.

The test data of `reft convert-pyreft` (tests/test_pyreft.py), regenerated with

    bash bench/peer/setup.sh && .venv-peer/bin/python bench/peer/pyreft_adapters.py

It writes tests/data/pyreft/: `base/` (a tiny random LLaMA, `save_pretrained`), and one folder per
adapter with `adapter/` (what `reft_model.save(dir)` writes: config.json and one `intkey_*.bin`
pickle per intervention), `meta.json` (positions, share_weights, what was built) and
`expected.safetensors` (input_ids, attention_mask, and pyreft's logits without and with the
interventions). Each adapter is first trained for a few steps with pyreft's own forward pass, so
that no weight (nor the orthogonal parametrization's `original`) is at its initial value.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "pyreft"
CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LENGTHS = [12, 9]  # two right-padded prompts: pyreft's positions assume right padding
D = CONFIG["hidden_size"]


def adapters():
    """`{name: (representations, positions, share_weights)}`, pyreft's way of writing them."""
    import pyreft

    def iv(cls, rank, **kw):
        return cls(embed_dim=D, low_rank_dimension=rank, dtype=torch.float32, **kw)

    def rep(layer, component, intervention):
        return {"layer": layer, "component": component, "low_rank_dimension": intervention.rotate_layer.weight.shape[-1]
                if hasattr(intervention, "rotate_layer") else intervention.learned_source.weight.shape[0],
                "intervention": intervention}

    return {
        # LoReFT rank 4 on both layers' outputs, first and last prompt token, one intervention per layer.
        "loreft": ([rep(i, "block_output", iv(pyreft.LoreftIntervention, 4)) for i in (0, 1)], "f1+l1", True),
        # share_weights=False: pyreft's examples list the layers twice, prefix half first, then suffix half.
        "loreft_untied": ([rep(1, "block_output", iv(pyreft.LoreftIntervention, 2)) for _ in range(2)], "f2+l2", False),
        # pyreft's other interventions, one per site, at the last prompt token.
        "variants": ([
            rep(0, "mlp_output", iv(pyreft.NoreftIntervention, 2, add_bias=False)),
            rep(0, "block_input", iv(pyreft.NodireftIntervention, 3, add_bias=False)),
            rep(1, "attention_output", iv(pyreft.DireftIntervention, 2)),
            rep(1, "mlp_input", iv(pyreft.ConsreftIntervention, 2)),
            rep(1, "block_output", iv(pyreft.LobireftIntervention, 3)),
        ], "l1", True),
    }


def locations(positions: str, lengths: list[int], count: int, share_weights: bool) -> list:
    """pyreft's unit_locations `[interventions][batch][positions]` for right-padded prompts."""
    from pyreft import get_intervention_locations

    first, last = (0, 0)
    for part in positions.split("+"):
        if part.startswith("f"):
            first = int(part[1:])
        else:
            last = int(part[1:])
    per_example = [
        get_intervention_locations(last_position=n, first_n=first, last_n=last, pad_mode="first",
                                   num_interventions=count, share_weights=share_weights)
        for n in lengths
    ]
    return [[example[i] for example in per_example] for i in range(count)]


def main() -> None:
    import pyreft
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    if OUT.exists():
        shutil.rmtree(OUT)
    base.save_pretrained(OUT / "base")
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(LENGTHS):
        ids[b, :n] = torch.randint(3, CONFIG["vocab_size"], (n,), generator=g)
        mask[b, :n] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    labels = torch.randint(3, CONFIG["vocab_size"], ids.shape, generator=g).masked_fill(mask == 0, -100)
    for name, (reps, positions, share_weights) in adapters().items():
        model = transformers.LlamaForCausalLM.from_pretrained(OUT / "base").eval()
        rm = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
        unit_locations = {"sources->base": (None, locations(positions, LENGTHS, len(reps), share_weights))}
        params = [p for iv in rm.interventions.values() for p in iv.parameters()]
        optimizer = torch.optim.Adam(params, lr=5e-2)
        for _ in range(5):  # move every weight off its initial value with pyreft's own forward pass
            _, out = rm(inputs, unit_locations=unit_locations, labels=labels)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        with torch.no_grad():
            base_logits = model(**inputs).logits
            _, out = rm(inputs, unit_locations=unit_locations)
        folder = OUT / name
        rm.save(str(folder / "adapter"))
        save_file({"input_ids": ids, "attention_mask": mask, "base_logits": base_logits.contiguous(),
                   "logits": out.logits.contiguous()}, folder / "expected.safetensors")
        meta = {
            "positions": positions,
            "share_weights": share_weights,
            "interventions": [f"layer {r['layer']} {r['component']}: {type(r['intervention']).__name__}" for r in reps],
            "made_with": f"pyreft 0.1.0, transformers {transformers.__version__}, torch {torch.__version__}",
            "max_abs_edit": float((out.logits - base_logits).abs().max()),
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(name, meta)


if __name__ == "__main__":
    main()
