"""The benchmark workloads, shared by our side (`.venv`) and the peer's (`.venv-peer`, pyreft 0.1.0).

Only torch and transformers are imported here, so both virtualenvs run exactly the same models,
batches, floors and timing loop; what differs is the library under test and the transformers version.

- The models: a tiny random LLaMA (hidden 256, 4 layers) and SmolLM2-135M-Instruct (hidden 576,
  30 layers), both float32, eval mode, SDPA attention.
- The floor: the frozen model doing the same forward and backward pass with one trainable zero
  vector added to the input embeddings, so the backward pass runs through the whole model. No ReFT
  step can cost less than that.
- The timing: one process, every variant warmed up, then interleaved repetitions (the order rotates
  each round, so drift and neighbours' load spread over all variants alike) and medians.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

# Tiny LLaMA: the "hidden 256, 4 layers"; the other sizes are ours, fixed here for both sides.
TINY = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def smollm2_dir() -> Path:
    """The safetensors folder `reft.assets.smollm2_path()` writes (converted once from the offline GGUF)."""
    if os.environ.get("REFT_CACHE"):
        root = Path(os.environ["REFT_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reft"
    return root / "SmolLM2-135M-Instruct"


def smollm2() -> nn.Module:
    """SmolLM2-135M-Instruct, float32, eval mode, from the converted folder.

    The folder is written by transformers 5, whose config keeps RoPE's theta under `rope_parameters`;
    transformers 4.45 (the peer's) reads `rope_theta`, so the config is built here for either version.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = smollm2_dir()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: run `python -c 'import reft.assets as a; a.smollm2_path()'` in .venv first")
    raw = json.loads((path / "config.json").read_text())
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope:
        raw.setdefault("rope_theta", rope["rope_theta"])
    keep = {k: v for k, v in raw.items() if k not in ("rope_parameters", "rope_scaling", "architectures", "transformers_version", "dtype", "torch_dtype")}
    config = LlamaConfig(**keep, attn_implementation="sdpa")
    model = LlamaForCausalLM.from_pretrained(path, config=config, torch_dtype=torch.float32)
    return model.float().eval()


MODELS: dict[str, Callable[[], nn.Module]] = {"tiny": tiny_llama, "smollm2": smollm2}

# Random-weight models of real shapes, built from a config (nothing to download): bench/gpu.py.
SHAPES = {
    "tiny": TINY,
    "smollm2": dict(  # SmolLM2-135M-Instruct
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2,
    ),
    "llama7b": dict(  # LLaMA-7B (Touvron et al., 2023)
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    ),
}


def shaped(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A random-weight LLaMA of shape `SHAPES[name]`, built directly on `device` in `dtype`, eval mode.

    Weights are allocated on the device in their final dtype (the default dtype is switched while the
    model is built), so a 7B model never exists in float32 or on the host.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[name], attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def set_threads() -> int:
    """Intra-op threads from `$BENCH_THREADS` (default 1), the same on both sides.

    One thread by default: on a 2-core machine shared with other work, two OpenMP threads that
    spin-wait on each other can make a step 10x slower and the figures meaningless.
    """
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (ids < 3 are special and avoided), full attention mask, labels = inputs."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def floor_step(model: nn.Module, data: dict[str, torch.Tensor]) -> Callable[[], float]:
    """The floor: the frozen model's forward + backward with one trainable zero vector on the embeddings."""
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    z = nn.Parameter(torch.zeros(embed.weight.shape[1], dtype=embed.weight.dtype, device=embed.weight.device))
    opt = torch.optim.AdamW([z], lr=1e-3, weight_decay=0.0)
    ids, mask, labels = data["input_ids"], data["attention_mask"], data["labels"]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(inputs_embeds=embed(ids) + z, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        return loss.item()

    return step


def floor_l0_step(model: nn.Module, data: dict[str, torch.Tensor]) -> Callable[[], float]:
    """A tighter floor: the trainable zero vector is added to layer 0's output (one forward hook).

    Every benchmarked variant edits layer 0, so its backward pass stops there: it skips layer 0's
    backward and the embeddings', which the floor above runs. This floor skips them too, which makes
    it the exact lower bound of such a variant: its ratio is the interventions' own overhead.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    z = nn.Parameter(torch.zeros(model.config.hidden_size))

    def add_z(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + z, *output[1:])
        return output + z

    model.model.layers[0].register_forward_hook(add_z)
    return optimizer_step(lambda: model(**data).loss, [z])


def optimizer_step(loss_fn: Callable[[], torch.Tensor], params: list[nn.Parameter]) -> Callable[[], float]:
    """A training step (zero_grad, forward, backward, AdamW step) around `loss_fn`.

    No weight decay (Hugging Face Trainer's default, which pyreft trains with): with decay, pyreft's
    `parametrizations.orthogonal` R collapses to zero after one step (its Householder map reads the
    signs off the parameter's diagonal with `.int()`, and decay moves 1.0 to 0.99999), and its LoReFT
    would silently become the identity.
    """
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def layers_for(count: int | str, num_layers: int) -> list[int]:
    """`1` -> [0]; `4` -> evenly spread from 0 to the last; `"all"` -> every layer.

    Layer 0 is always edited, so the backward pass reaches the bottom of the stack in every
    configuration and the figures differ only by the interventions' own cost.
    """
    if count == "all" or count >= num_layers:
        return list(range(num_layers))
    if count == 1:
        return [0]
    step = (num_layers - 1) / (count - 1)
    return sorted({round(i * step) for i in range(count)})


def first_last(spec: str) -> tuple[int, int] | None:
    """`"f7+l7"` -> (7, 7); `"all"` -> None."""
    if spec == "all":
        return None
    first, last = 0, 0
    for part in spec.split("+"):
        if part.startswith("f"):
            first = int(part[1:])
        elif part.startswith("l"):
            last = int(part[1:])
    return first, last


@dataclass
class Timing:
    median_s: float  # wall clock
    samples: list[float]
    cpu_median_s: float = 0.0  # CPU time of this process (time.process_time)
    cpu_samples: list[float] | None = None


def interleaved(steps: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, Timing]:
    """Time each callable `reps` times, interleaved (the order rotates every round); medians.

    Every callable is warmed up first (`warmup` calls each), so one-time costs (allocator growth,
    lazy initialisation, first-call dispatch) are not counted. Wall-clock and CPU time are both
    recorded: on a machine shared with other work, CPU time is not inflated by waiting for a core.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            steps[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {
        name: Timing(statistics.median(wall[name]), wall[name], statistics.median(cpu[name]), cpu[name]) for name in names
    }


def peak_step_bytes(step: Callable[[], object]) -> int:
    """Peak bytes of tensor memory allocated during one call of `step`, above what was live before it.

    Measured with torch.profiler's allocation events (every CPU allocation and free, in order):
    activations kept for backward, gradients, temporaries and optimizer state created in the step.
    Memory held before the call (weights, parameters, existing optimizer state) is not counted here.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def rss_bytes() -> tuple[int, int]:
    """`(current, peak)` resident set size of this process, from /proc/self/status (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def tensor_bytes(*modules_or_tensors) -> int:
    """Bytes held by the parameters and buffers of modules (deduplicated) and by loose tensors."""
    seen, total = set(), 0
    for obj in modules_or_tensors:
        tensors = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, nn.Module) else [obj]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def memory_of(step: Callable[[], object], resident: int) -> dict[str, float]:
    """Memory figures of a training step, in a fresh process that built only this configuration.

    `resident`: bytes of tensors held before the step (weights, interventions, optimizer state).
    Returns MiB: the RSS high-water rise over the first three steps (allocator, lazy initialisation
    and Python overhead included), then, after those warm-up steps, one step's tensor peak above
    what was live before it (profiler), and resident + that peak.
    """
    import gc

    gc.collect()
    rss0, _ = rss_bytes()
    reset_peak_rss()
    for _ in range(3):
        step()
    _, hwm = rss_bytes()
    gc.collect()
    peak = peak_step_bytes(step)
    mib = 1024 * 1024
    return {"step_peak_mib": peak / mib, "resident_mib": resident / mib, "total_peak_mib": (resident + peak) / mib, "rss_rise_mib": (hwm - rss0) / mib}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def emit(record: dict) -> None:
    """Print one JSON line (figures rounded for reading)."""

    def tidy(v):
        if isinstance(v, float):
            return round(v, 5)
        if isinstance(v, dict):
            return {k: tidy(x) for k, x in v.items()}
        if isinstance(v, list):
            return [tidy(x) for x in v]
        return v

    print(json.dumps(tidy(record)), flush=True)
