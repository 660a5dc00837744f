"""Every ```python block of README.md and docs/*.md runs.

The blocks of one page run in order in one namespace (a page reads as one session), in a fresh
working folder where `configs/`, `tutorials/` and `tests/` (its data) are reachable as in the repo. Conventions, for
whoever writes a page:

- The offline models are small stand-ins here: `reft.assets.load_smollm2()` returns a random model
  with SmolLM2's tokenizer and its 30 layers but hidden size 64, `load_minilm_classifier()` one
  with MiniLM's tokenizer and 6 layers, hidden size 64. So take sizes from the model
  (`model.config.hidden_size`) rather than writing 576 or 384.
- `<!-- test-setup ... -->`, an HTML comment right before a block (not shown on the rendered
  page), holds Python that runs first: it defines what the block takes as given (`model`,
  `batch`, `train_data`, ...), with tiny models.
- `<!-- no-test: why -->` right before a block skips it; the reason is required. Keep these few:
  signatures and shell-like listings rather than code.
- Nothing reaches the network: the Hub is offline, its cache (`huggingface_hub.constants.HF_HUB_CACHE`)
  a fresh empty folder a setup may fill; `huggingface_hub.HfApi` is put back after each page, so a
  setup may replace it with a fake.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
COMMENTS = re.compile(r"(?:<!--(.*?)-->\s*)+\Z", re.S)
COMMENT = re.compile(r"<!--(.*?)-->", re.S)
MAX_SKIPPED = 6  # across all pages: a skip is for what cannot run, not for what is slow


@dataclass
class Block:
    page: Path
    line: int
    code: str
    setup: str = ""
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The page's python blocks, each with the test-setup / no-test comments right before it."""
    text = page.read_text(encoding="utf-8")
    found, previous_end = [], 0
    for match in FENCE.finditer(text):
        block = Block(page, text.count("\n", 0, match.start()) + 2, match[1])
        tail = COMMENTS.search(text[previous_end : match.start()])
        for comment in COMMENT.findall(tail[0]) if tail else []:
            body = comment.strip()
            if body.startswith("test-setup"):
                block.setup += body.removeprefix("test-setup").strip("\n") + "\n"
            elif body.startswith("no-test"):
                block.skip = body.removeprefix("no-test").lstrip(": ").strip()
                assert block.skip, f"{block.where}: <!-- no-test --> needs a reason: <!-- no-test: why -->"
        found.append(block)
        previous_end = match.end()
    return found


def small_smollm2(dtype=None, device=None):
    """SmolLM2's tokenizer and 30 layers, hidden size 64, random weights: the docs' stand-in for load_smollm2()."""
    import transformers

    from reft.assets import smollm2_path

    path = smollm2_path()
    config = transformers.AutoConfig.from_pretrained(path, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                     num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model, transformers.AutoTokenizer.from_pretrained(path)


def small_minilm_classifier(num_labels: int = 2, dtype=None, device=None):
    """MiniLM's tokenizer and 6 layers, hidden size 64, random weights, a fresh classification head."""
    import transformers

    from reft.assets import minilm_path

    path = minilm_path()
    config = transformers.AutoConfig.from_pretrained(path, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                     num_labels=num_labels)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model, transformers.AutoTokenizer.from_pretrained(path)


def test_pages_have_blocks_and_few_skips():
    every = [b for page in PAGES for b in blocks(page)]
    assert len(every) >= 10  # the harness finds the blocks at all
    skipped = [f"{b.where} ({b.skip})" for b in every if b.skip is not None]
    assert len(skipped) <= MAX_SKIPPED, f"too many <!-- no-test --> blocks: {skipped}"


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_page_blocks_run(page, tmp_path, monkeypatch, one_thread):
    import huggingface_hub
    from huggingface_hub import constants

    import reft.assets

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub, "HfApi", huggingface_hub.HfApi)  # put back after the page
    monkeypatch.setattr(reft.assets, "load_smollm2", small_smollm2)
    monkeypatch.setattr(reft.assets, "load_minilm_classifier", small_minilm_classifier)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for name in ("configs", "tutorials", "tests"):
        os.symlink(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.skip is not None:
            continue
        for what, code in (("test-setup before", block.setup), ("block", block.code)):
            if not code.strip():
                continue
            try:
                exec(compile(code, f"{block.where} ({what})", "exec"), namespace)
            except Exception as e:
                raise AssertionError(
                    f"the python {what} at {block.where} failed: {type(e).__name__}: {e}\n"
                    "(tests/test_docs.py's docstring lists the conventions: stand-in models, "
                    "<!-- test-setup ... -->, <!-- no-test: why -->)"
                ) from e
