"""The benchmark scripts run end to end on a tiny model (their figures are not checked: a smoke test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def run(*args: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_adapters_bench_prints_one_line_per_k():
    records = run("bench/adapters.py", "--model", "tiny", "--ks", "1", "4", "--rows", "4", "--tokens", "16", "--new", "4", "--reps", "1", "--plain")
    assert [r["K"] for r in records] == [1, 4]
    for r in records:
        assert r["shape"] == {"rows": 4, "tokens": 16, "prompt": 16, "new": 4} and r["clock"] == "cpu"
        assert r["train"]["mixed/one"] > 0 and r["forward"]["mixed/one"] > 0
        assert r["generate"]["reft/plain"] > 0
        assert (r["generate"]["reft/peft"] is None) == (r["generate"]["tokens_per_s"].get("peft") is None)


def test_gpu_bench_runs_on_cpu_with_tiny_shapes():
    records = run("bench/gpu.py", "--device", "cpu", "--tiny", "--models", "llama7b")
    assert [r["bench"] for r in records] == ["gpu_train_step", "gpu_generate", "adapters", "adapters"]
    assert records[0]["model"] == "llama7b-shaped (tiny)" and records[0]["loreft/floor"] > 0


def test_identity_init_bench_starts_identity_at_the_frozen_loss():
    records = run("bench/identity_init.py", "--tiny", "--seeds", "0", "--steps", "2", "--every", "1")
    assert [r["init"] for r in records] == ["pyreft", "identity"]
    pyreft, identity = records
    assert identity["held_out_loss"]["0"] == identity["frozen_held_out_loss"]  # h' = h at init
    assert pyreft["held_out_loss"]["0"] != pyreft["frozen_held_out_loss"]
    assert len(identity["train_loss"]) == 2 and set(identity["held_out_loss"]) == {"0", "1", "2"}


def test_compile_profile_reports_kernel_shares():
    (record,) = run("bench/compile_step.py", "--model", "tiny", "--profile")
    assert 0 < record["matmul_share"] <= record["matmul_and_attention_share"]
