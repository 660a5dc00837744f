"""A training run killed with SIGKILL after a checkpoint, then resumed, ends bit-identical to one that
never stopped: same interventions, optimizer, schedule, RNG (dropout) and position in the data."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_worker.py"
# 40 examples in micro-batches of 4 (2 per process on two), 2 per step: 5 steps per epoch, 15 in all;
# checkpoints at 4, 8, 12, 15. Dropout 0.3, so the resumed run must also continue the RNG stream exactly.
ARGS = ["--grad-accum", "2", "--epochs", "3", "--dropout", "0.3", "--save-every", "4"]


def worker(out: Path, output_dir: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    """One run of the worker: one process, or `processes` under torchrun sharing the same global batch."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [sys.executable, *launcher, str(WORKER), *ARGS, "--batch-size", str(4 // processes),
           "--out", str(out), "--output-dir", str(output_dir), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def resume_and_run_straight(tmp_path: Path, *extra: str, processes: int = 1) -> None:
    """Resume the killed run in tmp_path/run, run the same training uninterrupted, and check that both
    end with identical trainable parameters."""
    resumed = worker(tmp_path / "resumed.safetensors", tmp_path / "run", "--resume", *extra, processes=processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = worker(tmp_path / "straight.safetensors", tmp_path / "straight", *extra, processes=processes)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = load_file(tmp_path / "resumed.safetensors"), load_file(tmp_path / "straight.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path):
    # killed while collating the 21st micro-batch (step 11, in the middle of epoch 2), after checkpoint-8
    killed = worker(tmp_path / "unused.safetensors", tmp_path / "run", "--kill-at", "21")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-8"]
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8, 10]  # step 10 was logged after the checkpoint it resumes from

    resume_and_run_straight(tmp_path)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    log = lambda d: [strip(json.loads(line)) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log("run") == log("straight")  # the records past checkpoint-8 were replaced, not duplicated


def test_two_processes_killed_then_resumed_match_an_uninterrupted_run(tmp_path):
    """Each process restores its own RNG state. LoReFT's dropout at every token draws as many random
    numbers as its batch has tokens, so the processes' RNG streams part ways after the first step."""
    every_token = ("--positions", "all")
    killed = worker(tmp_path / "unused.safetensors", tmp_path / "run", "--kill-at", "21", *every_token, processes=2)
    assert killed.returncode != 0
    assert (tmp_path / "run" / "checkpoint-8").is_dir()
    resume_and_run_straight(tmp_path, *every_token, processes=2)
