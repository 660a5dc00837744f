"""Where one intervention site's time goes: forward + backward of its pieces, CPU time, one JSON line.

Not part of `make bench`: the breakdown behind the training-step figures. For each shape (the tiny
LLaMA's selected f5+l5 positions, SmolLM2's f7+l7 and all positions) it times, in microseconds
(median CPU time of interleaved calls, one thread):
- `qr`: R's orthonormalisation (`OrthonormalRows`, a QR) forward + backward;
- `loreft`: the whole LoReFT forward + backward on the gathered positions (`qr` included);
- `apply_at`: `reft.model._apply_at` with an intervention that costs almost nothing (gather, mask,
  scatter-add back, and their backward), i.e. the index plumbing around an intervention;
- `red_all`: RED on every position;
- `resolve`: turning a position spec into index tensors (once per forward call, not per site);
- `adamw`: one AdamW step over the parameters of 4 LoReFT sites (12 tensors) vs one vector, for
  the default (for-loop) and `fused=True` implementations.

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
    from reft.model import _apply_at
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


def main() -> None:
    w.set_threads()
    w.emit(
        {
            "bench": "profile_site",
            "sites": [site(4, 32, 256, 4, "f5+l5"), site(4, 64, 576, 8, "f7+l7"), site(4, 64, 576, 8, "all")],
            "adamw_us": adamw(),
        }
    )


if __name__ == "__main__":
    main()
