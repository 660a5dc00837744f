"""Every tutorial runs in its tiny setting (`--tiny`: a small or random model, a few steps)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
pytestmark = pytest.mark.integration


def run(*args: str, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_every_tutorial_is_tested():
    tested = {"quickstart", "sentiment", "custom_intervention", "generation", "distributed", "multi_adapter", "preference", "concept_detection"}
    assert {p.stem for p in TUTORIALS.glob("*.py")} == tested


def test_quickstart(tmp_path):
    out = run(str(TUTORIALS / "quickstart.py"), "--tiny", "--output", str(tmp_path / "adapter"))
    assert "trainable params:" in out and "| with LoReFT" in out
    assert "answers in pirate speak: base" in out
    assert "same answer after reload: True" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_sentiment(tmp_path):
    methods = "head only,RED,LoReFT,DiReFT,LoRA,LoRA+LoReFT,full"  # the LoRA rows are skipped where peft is missing
    # LoReFT's non-default init and dropout placement (the quickstart runs the defaults)
    out = run(str(TUTORIALS / "sentiment.py"), "--tiny", "--methods", methods, "--init", "identity", "--dropout-at", "edit",
              "--plot", str(tmp_path / "sentiment.png"))
    assert "| method" in out
    has_peft = importlib.util.find_spec("peft") is not None
    for method in ("head only", "RED", "LoReFT", "DiReFT", "full") + (("LoRA", "LoRA+LoReFT") if has_peft else ()):
        assert re.search(rf"^\| {re.escape(method)} +\|", out, re.M), method
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "sentiment.png").is_file() == has_matplotlib


def test_custom_intervention(tmp_path):
    out = run(str(TUTORIALS / "custom_intervention.py"), "--tiny", "--output", str(tmp_path / "adapter"))
    assert "gated_steer" in out.split("registered:")[1].splitlines()[0]
    assert '"name": "gated_steer"' in out
    assert "same logits: True" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_generation():
    out = run(str(TUTORIALS / "generation.py"), "--tiny")
    assert "batch: 4 prompts" in out
    for section in ("greedy (", "sampled, 2 per prompt:", "beam search (3 beams):", "mode every_token"):
        assert section in out
    assert "prompt 2 alone == prompt 2 in the batch:" in out  # random tiny model: no claim on the value


def test_multi_adapter():
    out = run(str(TUTORIALS / "multi_adapter.py"), "--tiny")
    assert "adapters ['pirate', 'french', 'caps']" in out
    assert "training-set loss per adapter: pirate" in out
    assert "one batch of 4 rows, adapter_names=[None, 'pirate', 'french', 'caps']" in out
    gap, same = re.search(r"row 3 \(caps\) alone: prompt logits within (\S+) of the mixed batch's, the same first (\d+) of 8", out).groups()
    assert float(gap) < 1e-4  # a random model: no claim on the tokens


def test_distributed_under_torchrun(tmp_path):
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TUTORIALS / "distributed.py"), "--tiny",
              "--output", str(tmp_path / "adapter"))
    assert "rank 0 of 2" in out and "rank 1 of 2" in out
    assert "world size 2: held-out accuracy" in out


def test_preference():
    out = run(str(TUTORIALS / "preference.py"), "--tiny")
    assert "train: TokenizedData(preference: 4 examples" in out
    assert "| base model           |" in out and "| + LoReFT, DPO        |" in out
    assert "dpo: 2 steps in" in out and "Q: " in out


def test_concept_detection():
    out = run(str(TUTORIALS / "concept_detection.py"), "--tiny")
    assert "| random (before training)  |" in out and "| ReFT-r1 (trained)         |" in out
    assert "top tokens:" in out


def test_readme_training_example_runs(monkeypatch, tmp_path, capsys):
    """The README's "Train on a real model" block, with a tiny random model standing in for SmolLM2."""
    import re

    import reft.assets

    sys.path.insert(0, str(TUTORIALS))
    try:
        from quickstart import tiny_model
    finally:
        sys.path.remove(str(TUTORIALS))
    code = re.search(r"## Train on a real model\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    monkeypatch.setattr(reft.assets, "load_smollm2", tiny_model)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README training example", "exec"), {})
    assert capsys.readouterr().out.count("\n") >= 2  # one answer per prompt
    assert (tmp_path / "runs" / "pirate" / "adapter_config.json").is_file()
