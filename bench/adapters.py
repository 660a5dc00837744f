"""Many adapters on one base model: a mixed batch vs one adapter, and mixed-batch generation vs peft's LoRA.

One JSON line per K (number of adapters, default 1, 4, 16, 64). K LoReFT adapters (rank 8, tied, f7+l7)
on every layer's block output (30 sites each on SmolLM2) sit on one `IntervenableModel`; a batch has
`max(rows, K)` rows (default 8), row i routed to adapter i % K, so every adapter has a row and from
K = 16 on each row has its own. In one process, interleaved, medians:
- `train`: a training step (forward with labels, backward, fused AdamW over the K adapters' parameters)
  on the mixed batch (`adapter_names=`) / the same step with one adapter for every row (no routing);
- `forward`: the same forward pass without gradients, mixed / one adapter;
- `generate`: `rm.generate(..., adapter_names=)` (mode "prompt": the prefill alone runs interventions)
  vs peft's mixed-batch LoRA (rank 8 on q_proj and v_proj, the same K adapter names,
  `model.generate(..., adapter_names=)`), on the same prompts, greedy, exactly `new` new tokens each
  (`min_new_tokens`). `reft/peft` is our tokens/s over peft's: above 1, ours is faster. With
  `--plain`, plain `generate` on the bare base model is timed beside them. Without peft installed
  only reft (and plain) are timed.
The parties run on module trees that share the base model's weight tensors.

Times are CPU time of this process (`time.process_time`, one intra-op thread) on a CPU, as
`bench/run.py` explains (on a shared machine wall-clock also counts waiting for a core; it is printed
beside them), and synchronized wall-clock time on CUDA. The model's 64 adapters are built once; a
call routes to the first K, so every K runs with the same adapters loaded.

Defaults (SmolLM2, one thread: about 10 minutes of CPU time, K = 64 half of it): 8 rows (16 at
K = 16, 64 at K = 64), 32 tokens per row (f7+l7 edits 14 of them), 32 prompt tokens and 16 new tokens
for generation, 3 repetitions after one warm-up call. Mixing adapters costs a fixed amount per edited
position and row, so shorter rows raise the mixed/one ratios (`--tokens 16`: 14 of 16 tokens edited,
near the worst case) and longer ones lower them.

    python bench/adapters.py                          # SmolLM2, K = 1 4 16 64
    python bench/adapters.py --model tiny --ks 1 4 --reps 1
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as w  # noqa: E402

KS = (1, 4, 16, 64)
RANK, POSITIONS = 8, "f7+l7"
ROWS, TOKENS, NEW, REPS = 8, 32, 16, 3
TARGET_K, TARGET = 16, 1.10  # mixed / one adapter, train step and forward, at K = 16


def reft_adapters(base: nn.Module, count: int):
    """`count` LoReFT adapters "a0".."a{count-1}" on `base`'s every layer; "a0" active."""
    import reft

    layers = base.config.num_hidden_layers
    config = reft.ReftConfig({f"layers.{i}.block_output": {"name": "loreft", "rank": RANK} for i in range(layers)}, positions=POSITIONS)
    torch.manual_seed(0)
    rm = reft.get_reft_model(base, config, adapter_name="a0")
    for k in range(1, count):
        rm.add_adapter(f"a{k}", config)
    return rm.eval()


def peft_adapters(base: nn.Module, count: int) -> nn.Module | None:
    """peft's LoRA, rank 8 on q_proj and v_proj, adapters "a0".."a{count-1}"; None without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config, adapter_name="a0")
    for k in range(1, count):
        model.add_adapter(f"a{k}", config)
    with torch.no_grad():  # LoRA's B starts at zero; a trained adapter's is not (the cost is the same)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)
    return model.eval()


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same weight tensors (hooks and injected layers are per tree)."""
    return copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as `reft.Trainer` builds it: fused where the device and dtype allow."""
    try:
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


def run(base: nn.Module, model_name: str, ks=KS, rows: int = ROWS, tokens: int = TOKENS, new: int = NEW, reps: int = REPS,
        warmup: int = 1, plain: bool = False) -> list[dict]:
    """One record per K in `ks`, for `base` (any device and dtype; its weights are shared, not copied)."""
    device = next(base.parameters()).device
    cuda = device.type == "cuda"
    bare = shared_copy(base) if plain else None
    lora = peft_adapters(shared_copy(base), max(ks))
    rm = reft_adapters(base, max(ks))
    vocab = base.config.vocab_size

    def synced(fn):
        def call():
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            return out

        return call

    def train_step(data, route, params):
        opt = adamw(params)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = rm(**data, adapter_names=route).loss
            loss.backward()
            opt.step()
            return loss.item()

        return step

    def forward(data, route):
        def call():
            with torch.no_grad():
                return rm(input_ids=data["input_ids"], attention_mask=data["attention_mask"], adapter_names=route).logits

        return synced(call)

    records = []
    for K in ks:
        B = max(rows, K)
        names = [f"a{k}" for k in range(K)]
        route = [names[i % K] for i in range(B)]
        data = {k: v.to(device) for k, v in w.batch(vocab, B, tokens, seed=K).items()}
        rm.set_adapter("a0")
        params = {name: [p for p in rm.adapters[name].parameters()] for name in names}
        timings = w.interleaved(
            {
                "train_mixed": train_step(data, route, [p for n in names for p in params[n]]),
                "train_one": train_step(data, None, params["a0"]),
            },
            reps=reps,
            warmup=warmup,
        )
        timings |= w.interleaved({"forward_mixed": forward(data, route), "forward_one": forward(data, None)}, reps=reps, warmup=warmup)

        prompts = {k: v.to(device) for k, v in w.batch(vocab, B, tokens, seed=100 + K).items() if k != "labels"}
        options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=base.config.pad_token_id or 0)
        generators = {"generate_reft": lambda: rm.generate(**prompts, adapter_names=route, **options)}
        if bare is not None:
            generators["generate_plain"] = lambda: bare.generate(**prompts, **options)
        if lora is not None:
            generators["generate_peft"] = lambda: lora.generate(**prompts, adapter_names=route, **options)
        with torch.no_grad():
            timings |= w.interleaved({k: synced(f) for k, f in generators.items()}, reps=reps, warmup=warmup)

        def seconds(name: str, clock: str) -> float:
            t = timings[name]
            return t.median_s if clock == "wall" else t.cpu_median_s

        def figures(clock: str) -> dict:
            out = {
                part: {
                    "mixed_s": seconds(f"{part}_mixed", clock),
                    "one_s": seconds(f"{part}_one", clock),
                    "mixed/one": w.ratio(seconds(f"{part}_mixed", clock), seconds(f"{part}_one", clock)),
                }
                for part in ("train", "forward")
            }
            made = B * new  # tokens generated per call
            speed = {side: made / seconds(f"generate_{side}", clock) for side in ("reft", "plain", "peft") if f"generate_{side}" in timings}
            out["generate"] = {
                "tokens_per_s": {side: round(v, 2) for side, v in speed.items()},
                "reft/peft": w.ratio(speed["reft"], speed["peft"]) if "peft" in speed else None,
                "reft/plain": w.ratio(speed["reft"], speed["plain"]) if "plain" in speed else None,
                "peft/plain": w.ratio(speed["peft"], speed["plain"]) if "peft" in speed and "plain" in speed else None,
            }
            return out

        clock = "wall" if cuda else "cpu"
        record = {
            "bench": "adapters",
            "model": model_name,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "K": K,
            "shape": {"rows": B, "tokens": tokens, "prompt": tokens, "new": new},
            "adapters": f"LoReFT rank {RANK} at {POSITIONS} on {base.config.num_hidden_layers} layers; peft: LoRA rank {RANK} on q_proj, v_proj",
            "reps": reps,
            "clock": clock,
            **figures(clock),
        }
        if not cuda:
            record["wall"] = figures("wall")
        records.append(record)
        w.emit(record)
    return records


def targets(records: list[dict]) -> dict[str, dict]:
    """`{check: {value, limit, met}}`: mixed / one adapter <= 1.10 at K = 16; ahead of peft at every K."""
    found = {}
    for r in records:
        if r["K"] == TARGET_K:
            for part in ("train", "forward"):
                value = r[part]["mixed/one"]
                found[f"adapters/{r['model']}/{part} mixed/one at K={TARGET_K}"] = {"value": value, "limit": TARGET, "met": value <= TARGET}
        value = r["generate"]["reft/peft"]
        if value is not None:
            found[f"adapters/{r['model']}/generate reft/peft tokens/s at K={r['K']}"] = {"value": value, "limit": 1.0, "met": value > 1.0}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="numbers of adapters")
    parser.add_argument("--rows", type=int, default=ROWS, help="rows per batch (at least K)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per row, and prompt tokens")
    parser.add_argument("--new", type=int, default=NEW, help="new tokens per generated row")
    parser.add_argument("--reps", type=int, default=REPS, help="interleaved repetitions per variant")
    parser.add_argument("--plain", action="store_true", help="also time plain generate on the bare model")
    args = parser.parse_args()
    w.set_threads()
    if args.model == "smollm2":
        import reft.assets

        base, _ = reft.assets.load_smollm2(dtype=torch.float32)
    else:
        base = w.tiny_llama()
    run(base, args.model, args.ks, args.rows, args.tokens, args.new, args.reps, plain=args.plain)


if __name__ == "__main__":
    main()
