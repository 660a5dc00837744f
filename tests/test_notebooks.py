"""In a Jupyter kernel: `import reft` prints nothing, training progress stays a few records, the quickstart notebook runs.

Notebooks run in a real kernel through nbclient (the `test` extra installs nbclient, nbformat,
ipykernel and ipywidgets), with this source tree on the kernel's PYTHONPATH, offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

NO_WIDGETS = "import sys\nsys.modules['ipywidgets'] = None  # as if ipywidgets were not installed"
TRAIN_40_STEPS = """
import torch, transformers
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
torch.manual_seed(0)
rm = reft.IntervenableModel(transformers.LlamaForCausalLM(config), {"layers.1.block_output": reft.LoReFT(32, rank=4)}, positions="l1")
example = {"input_ids": torch.tensor([5, 6, 7, 8, 9]), "labels": torch.tensor([-100, -100, -100, 8, 9]), "prompt_length": torch.tensor(3)}
data = reft.data.TokenizedData([example] * 4, task="generation", pad_token_id=0)
history = reft.Trainer(rm, reft.TrainConfig(lr=1e-2, max_steps=40, batch_size=1, log_every=5), data).fit()
print("steps", history[-1]["step"])
"""


def execute(nb, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


def notebook(*sources: str):
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])


def stderr(cell) -> list[str]:
    return [o["text"] for o in cell.outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]


def test_import_is_silent_and_progress_is_a_few_records_without_widgets(tmp_path, monkeypatch):
    nb = execute(notebook(NO_WIDGETS, "import reft", TRAIN_40_STEPS), tmp_path, monkeypatch)
    assert nb.cells[1].outputs == []  # no "IProgress not found", nothing at all
    records = stderr(nb.cells[2])
    bars = [r for r in records if "train:" in r]  # the bar's records (libraries may add their own lines)
    assert 2 <= len(bars) <= 8, records  # tqdm.auto's default wrote ~47 here
    assert "40/40" in bars[-1] and "loss=" in bars[-1]  # the last record is the finished bar, with the loss
    assert "steps 40" in "".join(o.get("text", "") for o in nb.cells[2].outputs)


def test_progress_is_one_widget_with_ipywidgets(tmp_path, monkeypatch):
    pytest.importorskip("ipywidgets")
    nb = execute(notebook("import reft", TRAIN_40_STEPS), tmp_path, monkeypatch)
    assert nb.cells[0].outputs == []
    assert not any("train:" in r for r in stderr(nb.cells[1]))
    widgets = [o for o in nb.cells[1].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) == 1


def test_quickstart_notebook_runs_in_its_tiny_setting(tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "tutorials" / "quickstart.ipynb", as_version=4)
    parameters = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("TINY = ")]
    assert len(parameters) == 1, "the notebook's first code cell sets TINY"
    parameters[0].source = "TINY = True"
    nb.cells.insert(0, nbformat.v4.new_code_cell(NO_WIDGETS))  # the text bars: the plainest notebook setup
    nb = execute(nb, tmp_path, monkeypatch)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Warning" not in text and "warn" not in text.lower(), text[:2000]
    training = next(c for c in nb.cells if "Trainer(" in c.source)
    assert 2 <= len([r for r in stderr(training) if "train:" in r]) <= 12  # at most ten redraws, and the first and last
    assert "trainable params:" in text and "final loss" in text
    assert "Q: What do cats like to eat?" in text and "LoReFT:" in text
    assert "same answer after reload: True" in text


def test_quickstart_notebook_is_saved_executed():
    """The notebook in the repo shows its outputs (a real SmolLM2 run): readers see what it does."""
    nb = json.loads((ROOT / "tutorials" / "quickstart.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code[0]["source"] in ("TINY = False  # True: a random 2-layer model with SmolLM2's tokenizer (what the tests run)",
                                 ["TINY = False  # True: a random 2-layer model with SmolLM2's tokenizer (what the tests run)"])
    assert all(c["execution_count"] for c in code)
    assert "same answer after reload: True" in "".join("".join(o.get("text", "")) for o in code[-1]["outputs"])
