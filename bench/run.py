"""`make bench`: every benchmark, ours and pyreft's, one JSON line each, then the comparisons.

Runs, model by model, each side in its own process (ours in this interpreter's venv, pyreft 0.1.0 in
`.venv-peer`, built by `bench/peer/setup.sh`); each side measures against its own frozen floor in
one process with interleaved repetitions and medians (their transformers versions differ):
1. training step: `bench/train_step.py` and `bench/peer/pyreft_train_step.py`;
2. prompt-mode generation vs plain `generate`: `bench/generate.py` and `bench/peer/pyreft_generate.py`;
3. peak memory of a training step vs the floor's: `bench/memory.py` (a fresh process per configuration),
   and on SmolLM2 `TrainConfig(gradient_checkpointing=True)` vs off (`bench/memory.py --checkpointing`);
4. many adapters on SmolLM2 (ours only; peft's LoRA in the same process): `bench/adapters.py`;
5. the compiled training step (`TrainConfig(compile=True)`) vs the eager floor: `bench/compile_step.py`;
then one `*_vs_pyreft` line per workload and a last `targets` line that says which targets are met.
The ours/pyreft ratios come from the peer's process: with `--with-reft` it times reft's variants
interleaved with pyreft's on the same transformers (4.45.1), so the ratio compares the libraries,
not two transformers versions; the across-venv ratios are printed beside them.

Timings are medians of both wall-clock and CPU time (`time.process_time`; one intra-op thread, so
the process's CPU time is the work done). The comparisons and targets use CPU time: on a machine
shared with other work, wall-clock time also counts the time spent waiting for a core, which swamps
differences of a few percent; the wall-clock figures are printed beside them.

    python bench/run.py            # everything (35-45 minutes on 2 shared CPU cores; compiling SmolLM2 is most of the rest)
    python bench/run.py --quick    # a smoke run with few repetitions (figures not meaningful)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
MODELS = ("tiny", "smollm2")
QUICK_REPS = {"tiny": 3, "smollm2": 1}
TARGETS = {"train_step": 1.05, "red": 1.03, "generate": 1.03, "memory": 1.05, "checkpointing": 0.70, "compile": 0.85}
PARTS = ["train_step", "generate", "memory", "adapters", "compile"]

sys.path.insert(0, str(HERE))
import adapters  # noqa: E402
import workloads as w  # noqa: E402


def bench(python: Path | str, script: str, *args: str) -> list[dict]:
    """Run one benchmark script, echo its JSON lines as they come, and return them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(python), str(HERE / script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = []
    for line in proc.stdout:
        if line.startswith("{"):
            records.append(json.loads(line))
            print(line, end="", flush=True)
    stderr = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-4000:]}")
    return records


def reps(args, model: str) -> list[str]:
    return ["--reps", str(QUICK_REPS[model])] if args.quick else []


def vs_pyreft_train(ours: dict, peer: dict) -> dict:
    """Per variant: reft/pyreft timed in one process on transformers 4.45.1 (like for like), and each
    side against its own floor, reft's in its own venv (transformers 5) and pyreft's."""
    rows = {}
    cpu = peer["cpu_median_s"]
    for variant in ours["median_s"]:
        if variant.startswith("floor") or variant not in cpu:
            continue
        rows[variant] = {
            "reft/pyreft": w.ratio(cpu[f"reft:{variant}"], cpu[variant]) if f"reft:{variant}" in cpu else None,
            "reft/floor": ours["cpu_ratio_to_floor"][variant],
            "pyreft/floor": peer["cpu_ratio_to_floor"][variant],
            "reft/floor_on_4.45": peer["cpu_ratio_to_floor"].get(f"reft:{variant}"),
            "across_venvs": {
                "reft/pyreft": w.ratio(ours["cpu_median_s"][variant], cpu[variant]),
                "floor_reft_venv/floor_pyreft_venv": w.ratio(ours["cpu_median_s"]["floor"], cpu["floor"]),
            },
            "wall": {
                "reft/pyreft": w.ratio(peer["median_s"][f"reft:{variant}"], peer["median_s"][variant]) if f"reft:{variant}" in cpu else None,
                "reft/floor": ours["ratio_to_floor"][variant],
                "pyreft/floor": peer["ratio_to_floor"][variant],
            },
        }
    return {"bench": "train_step_vs_pyreft", "model": ours["model"], "variants": rows}


def vs_pyreft_generate(ours: dict | None, peer: dict) -> dict:
    record = {
        "bench": "generate_vs_pyreft",
        "model": peer["model"],
        "reft/pyreft": peer.get("reft_cpu_ratio_to_pyreft"),
        "reft/plain": ours["cpu_ratio"] if ours else None,
        "pyreft/plain": peer["cpu_ratio_to_plain"],
        "reft/plain_on_4.45": peer.get("reft_cpu_ratio_to_plain"),
        "same_tokens": peer.get("reft_pyreft_same_tokens"),
    }
    if ours:
        record["across_venvs"] = {
            "reft/pyreft": w.ratio(ours["cpu_median_s"]["reft"], peer["cpu_median_s"]["pyreft"]),
            "plain_reft_venv/plain_pyreft_venv": w.ratio(ours["cpu_median_s"]["plain"], peer["cpu_median_s"]["plain"]),
        }
        record["wall"] = {"reft/plain": ours["ratio"], "pyreft/plain": peer["ratio_to_plain"]}
    return record


def vs_pyreft_memory(ours: dict, peer: dict) -> dict:
    rows = {}
    for variant, figures in ours["mib"].items():
        if variant == "floor" or variant not in peer["mib"]:
            continue
        theirs = peer["mib"][variant]
        rows[variant] = {key: {"reft": figures[key], "pyreft": theirs[key], "reft/pyreft": w.ratio(figures[key], theirs[key])} for key in ("total_peak_mib", "step_peak_mib")}
    return {"bench": "memory_vs_pyreft", "model": ours["model"], "variants": rows}


def targets(records: list[dict]) -> dict:
    """Each target with its measured figure (CPU-time ratios; see the module docstring) and whether it is met."""
    found = {}

    def check(name: str, value: float, limit: float, below: bool = True):
        found[name] = {"value": value, "limit": limit, "met": value <= limit if below else value < limit}

    for r in records:
        side, bench_name, model = r.get("side"), r["bench"], r.get("model")
        if bench_name == "train_step" and side == "reft":
            for variant, value in r["cpu_ratio_to_floor"].items():
                if variant in ("loreft", "red"):
                    limit = TARGETS["red" if variant == "red" else "train_step"]
                    check(f"train_step/{model}/{variant} vs floor", value, limit)
        elif bench_name == "generate" and side is None:  # bench/generate.py: ours
            check(f"generate/{model} vs plain generate", r["cpu_ratio"], TARGETS["generate"])
        elif bench_name == "memory" and side == "reft":
            for variant, ratios in r["ratio_to_floor"].items():
                for key in ("total_peak_mib", "step_peak_mib"):
                    check(f"memory/{model}/{variant} {key} vs floor", ratios[key], TARGETS["memory"])
        elif bench_name == "compile_step":
            check(f"compile_step/{model}/loreft compiled vs eager floor", r["cpu_ratio_to_floor"]["loreft_compiled"], TARGETS["compile"])
        elif bench_name == "train_step_vs_pyreft":
            for variant, row in r["variants"].items():
                if row["reft/pyreft"] is not None:
                    check(f"faster than pyreft: train_step/{model}/{variant}", row["reft/pyreft"], 1.0, below=False)
        elif bench_name == "generate_vs_pyreft" and r["reft/pyreft"] is not None:
            check(f"faster than pyreft: generate/{model}", r["reft/pyreft"], 1.0, below=False)
        elif bench_name == "memory_checkpointing":
            check(f"memory/{model} gradient checkpointing total_peak_mib vs off", r["checkpointing/plain"]["total_peak_mib"], TARGETS["checkpointing"])
    found.update(adapters.targets([r for r in records if r["bench"] == "adapters"]))
    met = sum(t["met"] for t in found.values())
    return {"bench": "targets", "met": met, "of": len(found), "missed": [k for k, t in found.items() if not t["met"]], "figures": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run, not figures")
    parser.add_argument("--only", nargs="*", choices=PARTS, default=None)
    parser.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS))
    parser.add_argument("--no-peer", action="store_true", help="skip pyreft (no .venv-peer)")
    args = parser.parse_args()
    parts = args.only or PARTS
    peer = not args.no_peer
    if peer and not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} not found: run bench/peer/setup.sh first (or pass --no-peer)")
    if "smollm2" in args.models:
        import reft.assets

        reft.assets.smollm2_path()  # converted once; the peer reads the same folder

    records: list[dict] = []
    if "train_step" in parts:
        for model in args.models:
            ours = bench(sys.executable, "train_step.py", "--model", model, *reps(args, model))
            records += ours
            if peer:
                theirs = bench(PEER_PYTHON, "peer/pyreft_train_step.py", "--model", model, "--with-reft", *reps(args, model))
                records += theirs
                records.append(vs_pyreft_train(ours[0], theirs[0]))
                w.emit(records[-1])
    if "generate" in parts:
        for model in args.models:
            ours = []
            if (HERE / "generate.py").exists():
                ours = bench(sys.executable, "generate.py", "--model", model, "--json", *reps(args, model))
                records += ours
            if peer:
                theirs = bench(PEER_PYTHON, "peer/pyreft_generate.py", "--model", model, "--with-reft", *reps(args, model))
                records += theirs
                records.append(vs_pyreft_generate(ours[0] if ours else None, theirs[0]))
                w.emit(records[-1])
    if "memory" in parts:
        for model in args.models:
            ours = bench(sys.executable, "memory.py", "--side", "reft", "--model", model)
            records += ours
            if peer:
                theirs = bench(sys.executable, "memory.py", "--side", "pyreft", "--model", model)
                records += theirs
                records.append(vs_pyreft_memory(ours[0], theirs[0]))
                w.emit(records[-1])
        if "smollm2" in args.models:
            records += bench(sys.executable, "memory.py", "--checkpointing", "--model", "smollm2")
    if "adapters" in parts and "smollm2" in args.models:
        records += bench(sys.executable, "adapters.py", "--model", "smollm2", *(["--reps", "1"] if args.quick else []))
    if "compile" in parts:
        for model in args.models:
            records += bench(sys.executable, "compile_step.py", "--model", model, *reps(args, model))
    w.emit(targets(records))


if __name__ == "__main__":
    main()
