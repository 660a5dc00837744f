"""docs/interop.md runs as written (transformers' Trainer, pipeline and peft on a tiny model)."""

import re
from pathlib import Path

import pytest

pytest.importorskip("peft")


def test_the_interop_page_runs(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "docs" / "interop.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/interop.md", "exec"), namespace)
    assert namespace["alone"].sites == ["layers.1.block_output"]
