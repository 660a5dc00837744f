"""On a CUDA machine: training-step, generation and mixed-adapter ratios on random-weight bf16 models.

`bench/gpu.sh` runs this after the CUDA tests. The models are built from configs with random weights
(nothing to download), in bf16 on the GPU: SmolLM2-shaped (135M: hidden 576, 30 layers) and
LLaMA-7B-shaped (hidden 4096, 32 layers). Per model, one JSON line each:
- `gpu_train_step`: a training step (forward with labels, backward, fused AdamW) with LoReFT rank 8
  at f7+l7 on every layer's block output / the floor's (the frozen model with one trainable zero
  vector on the input embeddings: the least a step that trains anything can cost); batch 8 x 256;
- `gpu_generate`: `rm.generate` (mode "prompt", the same LoReFT) / plain `generate`; batch 8, 128
  prompt tokens, exactly 64 new tokens, greedy;
- `adapters`: `bench/adapters.py` on the same model: for K = 1, 4, 16, 64 adapters, a mixed batch /
  one adapter (training step and forward), and mixed-batch generation tokens/s against peft's LoRA
  (when peft is importable; else against plain `generate` only).
Interventions keep their default float32 parameters (they compute in float32 and return bf16). Times
are wall-clock with `torch.cuda.synchronize()`, medians of interleaved repetitions after warm-up.

    python bench/gpu.py                          # both models, on cuda
    python bench/gpu.py --device cpu --tiny      # the same code on a tiny model, float32 (a smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapters  # noqa: E402
import workloads as w  # noqa: E402

RANK, POSITIONS = 8, "f7+l7"
FULL = dict(train=(8, 256), prompt=(8, 128), new=64, reps=10, gen_reps=5, ks=(1, 4, 16, 64), rows=16, tokens=32, ad_new=16, ad_reps=3)
TINY = dict(train=(2, 16), prompt=(2, 16), new=4, reps=1, gen_reps=1, ks=(1, 4), rows=4, tokens=16, ad_new=4, ad_reps=1)


def loreft_everywhere(model):
    import reft

    layers = model.config.num_hidden_layers
    config = reft.ReftConfig({f"layers.{i}.block_output": {"name": "loreft", "rank": RANK} for i in range(layers)}, positions=POSITIONS)
    torch.manual_seed(0)
    return reft.get_reft_model(model, config)


def synced(fn, device: torch.device):
    def call():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


def train_step(base, name: str, device: torch.device, shape: tuple[int, int], reps: int) -> dict:
    """LoReFT on every layer vs the floor, on two module trees over the same weights."""
    data = {k: v.to(device) for k, v in w.batch(base.config.vocab_size, *shape).items()}
    floor = w.floor_step(adapters.shared_copy(base), data)
    rm = loreft_everywhere(adapters.shared_copy(base))
    step = w.optimizer_step(lambda: rm(**data).loss, rm.trainable_parameters())
    t = w.interleaved({"floor": synced(floor, device), "loreft": synced(step, device)}, reps=reps)
    rm.remove()
    return {"bench": "gpu_train_step", "model": name, "shape": list(shape), "reps": reps,
            "median_s": {k: v.median_s for k, v in t.items()}, "loreft/floor": w.ratio(t["loreft"].median_s, t["floor"].median_s)}


def generate(base, name: str, device: torch.device, shape: tuple[int, int], new: int, reps: int) -> dict:
    """`rm.generate` (mode "prompt") vs plain `generate`: the same prompts and number of new tokens."""
    plain = adapters.shared_copy(base)
    rm = loreft_everywhere(adapters.shared_copy(base))
    prompts = {k: v.to(device) for k, v in w.batch(base.config.vocab_size, *shape).items() if k != "labels"}
    options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=base.config.pad_token_id or 0)
    with torch.no_grad():
        t = w.interleaved({"plain": synced(lambda: plain.generate(**prompts, **options), device),
                           "reft": synced(lambda: rm.generate(**prompts, **options), device)}, reps=reps)
    rm.remove()
    return {"bench": "gpu_generate", "model": name, "shape": {"batch": shape[0], "prompt": shape[1], "new": new}, "reps": reps,
            "median_s": {k: v.median_s for k, v in t.items()}, "reft/plain": w.ratio(t["reft"].median_s, t["plain"].median_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", choices=["smollm2", "llama7b"], default=["smollm2", "llama7b"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and one repetition: checks the code path")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny to check the code path")
    s = TINY if args.tiny else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type != "cuda":
        w.set_threads()
    summary = []
    for name in args.models:
        started = time.perf_counter()
        base = w.shaped("tiny" if args.tiny else name, dtype=dtype, device=device)
        label = f"{name}-shaped" + (" (tiny)" if args.tiny else "")
        records = [train_step(base, label, device, s["train"], s["reps"]), generate(base, label, device, s["prompt"], s["new"], s["gen_reps"])]
        for r in records:
            w.emit(r)
        mixed = adapters.run(base, label, ks=s["ks"], rows=s["rows"], tokens=s["tokens"], new=s["ad_new"], reps=s["ad_reps"], plain=True)
        summary.append((label, records, mixed, time.perf_counter() - started))
        del base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    clock = "wall-clock medians" if device.type == "cuda" else "a smoke run on CPU: the figures mean nothing"
    print(f"\n{where}, {str(dtype).replace('torch.', '')}, {clock}")
    for label, (step, gen), mixed, seconds in summary:
        print(f"{label}: train step LoReFT/floor {step['loreft/floor']}, generate reft/plain {gen['reft/plain']} ({seconds:.0f} s)")
        for r in mixed:
            g = r["generate"]
            print(f"  K={r['K']:<3} rows {r['shape']['rows']:<3} train mixed/one {r['train']['mixed/one']:<6} forward mixed/one "
                  f"{r['forward']['mixed/one']:<6} generate reft/peft {g['reft/peft']} reft/plain {g['reft/plain']} "
                  f"(tokens/s {g['tokens_per_s']})")


if __name__ == "__main__":
    main()
