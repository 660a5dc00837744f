"""Where one intervention site's time goes: forward + backward of its pieces, CPU time, one JSON line.

Not part of `make bench`: the breakdown behind the training-step figures. For each shape (the tiny
LLaMA's selected f5+l5 positions, SmolLM2's f7+l7 and all positions) it times, in microseconds
(median CPU time of interleaved calls, one thread):
- `qr`: R's orthonormalisation (`OrthonormalRows`, a QR) forward + backward;
- `loreft`: the whole LoReFT forward + backward on the gathered positions (`qr` included);
- `apply_at`: `reft._edit.apply_at` with an intervention that costs almost nothing (gather, mask,
  scatter-add back, and their backward), i.e. the index plumbing around an intervention;
- `red_all`: RED on every position;
- `resolve`: turning a position spec into index tensors (once per forward call, not per site);
- `adamw`: one AdamW step over the parameters of 4 LoReFT sites (12 tensors) vs one vector, for
  the default (for-loop) and `fused=True` implementations;
- `mixed`: one LoReFT site of a mixed batch (K adapters stacked, each row through its own, as
  `reft._edit` runs them) vs the same rows through one adapter, forward + backward and forward
  alone, at SmolLM2's shape with f7+l7 (what `bench/adapters.py` adds per site).

    python bench/profile_site.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as w  # noqa: E402


def median_us(calls: dict, n: int = 400) -> dict[str, float]:
    samples = {k: [] for k in calls}
    for _ in range(20):
        for f in calls.values():
            f()
    for _ in range(n):
        for k, f in calls.items():
            t0 = time.process_time()
            f()
            samples[k].append(time.process_time() - t0)
    return {k: round(statistics.median(v) * 1e6, 1) for k, v in samples.items()}


def site(B: int, T: int, d: int, rank: int, spec: str) -> dict:
    import reft
    from reft._edit import apply_at as _apply_at
    from reft.positions import PositionSpec, resolve

    torch.manual_seed(0)
    lo, red = reft.LoReFT(d, rank=rank), reft.RED(d)
    h0 = torch.randn(B, T, d, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    parsed = PositionSpec.parse(spec)
    index = None if parsed.all else torch.cat(resolve(parsed, mask), 1)
    P = T if index is None else index.shape[1]
    selected = torch.randn(B, P, d)
    s = torch.nn.Parameter(torch.ones(d))

    def base():  # the cost every variant below also pays: h = f(h0) and a backward into h0
        (h0 * 1.0).sum().backward()

    calls = {
        "base": base,
        "qr": lambda: lo.R().sum().backward(),
        "loreft": lambda: lo(selected).sum().backward(),
        "red_all": lambda: red(h0 * 1.0).sum().backward(),
    }
    if index is not None:
        calls["apply_at"] = lambda: _apply_at(lambda x: x * s, h0 * 1.0, index).sum().backward()
        calls["resolve"] = lambda: resolve(parsed, mask)
    us = median_us(calls)
    for key in ("red_all", "apply_at"):
        if key in us:
            us[key] = round(us[key] - us["base"], 1)  # above the base's own cost
    return {"shape": [B, T, d], "rank": rank, "positions": spec, "us": us}


def adamw() -> dict:
    def params(count):
        ps = [torch.nn.Parameter(torch.randn(*shape)) for _ in range(count) for shape in ((4, 256), (4, 256), (4,))]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    z = torch.nn.Parameter(torch.zeros(256))
    z.grad = torch.randn(256)
    opts = {
        "12_tensors": torch.optim.AdamW(params(4), lr=1e-3, weight_decay=0.0),
        "12_tensors_fused": torch.optim.AdamW(params(4), lr=1e-3, weight_decay=0.0, fused=True),
        "1_vector": torch.optim.AdamW([z], lr=1e-3, weight_decay=0.0),
    }
    return median_us({k: o.step for k, o in opts.items()})


def mixed(K: int, B: int, T: int, d: int = 576, rank: int = 8) -> dict:
    """One site, f7+l7: K stacked LoReFTs (row i through unit i % K) vs one LoReFT for every row, in µs."""
    import reft
    from reft._edit import Unit, _stacked, apply_at

    torch.manual_seed(0)
    units = [Unit(f"a{k}", None, None, "both", reft.LoReFT(d, rank=rank)) for k in range(K)]
    slot = torch.arange(B) % K
    h0 = torch.randn(B, T, d, requires_grad=True)
    index = torch.cat([torch.arange(7).expand(B, 7), torch.arange(T - 7, T).expand(B, 7)], 1)
    one = units[0].intervention

    def backward(fn):
        return lambda: apply_at(fn, h0 * 1.0, index).sum().backward()

    def forward(make):  # the stacked weights are built inside no_grad too, as in a forward-only call
        def call():
            with torch.no_grad():
                apply_at(make(), h0 * 1.0, index)

        return call

    us = median_us({
        "base": lambda: (h0 * 1.0).sum().backward(),
        "one": backward(one),
        "mixed": lambda: apply_at(_stacked(units, slot), h0 * 1.0, index).sum().backward(),
        "base_forward": lambda: h0 * 1.0,
        "one_forward": forward(lambda: one),
        "mixed_forward": forward(lambda: _stacked(units, slot)),
    }, n=100)
    above = {k: round(us[k] - us["base_forward" if k.endswith("forward") else "base"], 1) for k in us if not k.startswith("base")}
    return {"K": K, "shape": [B, T, d], "rank": rank, "positions": "f7+l7", "us": above}


def main() -> None:
    w.set_threads()
    w.emit(
        {
            "bench": "profile_site",
            "sites": [site(4, 32, 256, 4, "f5+l5"), site(4, 64, 576, 8, "f7+l7"), site(4, 64, 576, 8, "all")],
            "adamw_us": adamw(),
            "mixed": [mixed(16, 16, 32), mixed(64, 64, 32)],
        }
    )


if __name__ == "__main__":
    main()
