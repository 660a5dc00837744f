"""Named adapters on one base: routing per example, hooks only inside the wrapper's calls, checkpointing."""

import json

import pytest
import torch
import torch.nn.functional as F

import reft
from reft.data import build_generation_data

from . import tiny
from . import tiny_text


def _strong(iv, seed):
    """Perturb an intervention's parameters so that its edit changes the logits visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in iv.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return iv


def _adapters(model, spec, tied, site="layers.1.block_output"):
    """A wrapper with four adapters: a, b (LoReFT, same shape: batched together), d (LoReFT, other spec), c (DiReFT)."""
    torch.manual_seed(0)
    rm = reft.IntervenableModel(model, {site: _strong(reft.LoReFT(tiny.HIDDEN, 4), 1)}, positions=spec, tied=tied, adapter_name="a")
    rm.add_adapter("b", reft.ReftConfig({site: {"name": "loreft", "rank": 4}}, positions=spec, tied=tied))
    rm.add_adapter("d", reft.ReftConfig({site: {"name": "loreft", "rank": 4}}, positions="l2"))
    rm.add_adapter("c", reft.ReftConfig({"layers.0.mlp_output": {"name": "direft", "rank": 2}}, positions=spec, tied=tied))
    for name, seed in (("b", 2), ("d", 3), ("c", 4)):
        for ivs in rm.interventions_of(name).values():
            for iv in ivs:
                _strong(iv, seed)
    return rm.eval()


def _alone(rm, name, **batch):
    """Logits of a batch through adapter `name` alone (the plain path, no routing), or the base for None."""
    with torch.no_grad():
        if name is None:
            with rm.disabled():
                return rm(**batch).logits
        rm.set_adapter(name)
        return rm(**batch).logits


ROUTE = ["a", "b", None, "c", "a", "d", "b"]


@pytest.mark.parametrize("spec,tied", [("all", True), ("l1", True), ("f2+l2", True), ("f2+l2", False)])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("prompt", [False, True], ids=["mask", "prompt_mask"])
def test_mixed_batch_rows_equal_each_row_alone_with_its_adapter(spec, tied, side, prompt):
    rm = _adapters(tiny.causal_lm(initializer_range=0.2), spec, tied)
    ids, mask = tiny.padded_batch([7, 5, 6, 3, 8, 4, 6], side=side)
    batch = {"input_ids": ids, "attention_mask": mask}
    if prompt:  # the first n - 2 real tokens are prompt
        batch["prompt_mask"] = mask * (mask.cumsum(1) <= mask.sum(1, keepdim=True) - 2)
    with torch.no_grad():
        mixed = rm(**batch, adapter_names=ROUTE).logits
    for i, name in enumerate(ROUTE):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        torch.testing.assert_close(mixed[i : i + 1], _alone(rm, name, **row), atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[0], _alone(rm, None, **{k: v[:1] for k, v in batch.items()})[0], atol=1e-3)


def test_mixed_batch_with_explicit_positions():
    rm = _adapters(tiny.causal_lm(initializer_range=0.2), "f1+l1", True)
    ids, mask = tiny.padded_batch([6, 4, 5, 6], side="left")
    positions = torch.tensor([[0, 5], [2, -1], [3, 4], [1, 1]])
    route = ["b", "a", None, "c"]
    with torch.no_grad():
        mixed = rm(input_ids=ids, attention_mask=mask, positions=positions, adapter_names=route).logits
    for i, name in enumerate(route):
        alone = _alone(rm, name, input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], positions=positions[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)


def test_generate_routes_each_prompt_to_its_adapter_and_decode_steps_run_no_intervention():
    rm = _adapters(tiny.causal_lm(initializer_range=0.3), "f1+l2", True)
    ids, mask = tiny.padded_batch([5, 3, 6, 4, 2], side="left")
    route = ["a", "b", None, "c", "a"]
    calls = []
    for name in rm.adapter_names:
        for ivs in rm.interventions_of(name).values():
            for iv in ivs:
                iv.register_forward_hook(lambda *a: calls.append(1))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        out = rm.generate(input_ids=ids, attention_mask=mask, adapter_names=route, max_new_tokens=6, **kw)
        prefill_calls = len(calls)
        calls.clear()
        rm.generate(input_ids=ids, attention_mask=mask, adapter_names=route, max_new_tokens=1, **kw)
        assert len(calls) == prefill_calls  # 6 tokens cost what 1 does: decode steps run no intervention code
        for i, name in enumerate(route):
            if name is None:
                with rm.disabled():
                    alone = rm.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], max_new_tokens=6, **kw)
            else:
                rm.set_adapter(name)
                alone = rm.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], max_new_tokens=6, **kw)
            assert torch.equal(out[i : i + 1], alone), (i, name)
    rows = {tuple(out[i, ids.shape[1] :].tolist()) for i in range(len(route))}
    assert len(rows) > 2  # the adapters steer to different tokens


def test_an_adapters_gradient_ignores_rows_routed_to_others():
    rm = _adapters(tiny.causal_lm(initializer_range=0.2), "f2+l2", True)
    rm.train()
    ids, mask = tiny.padded_batch([7, 5, 6, 3, 8, 4, 6], side="right")
    route = ROUTE

    def grads(labels):
        rm.zero_grad(set_to_none=True)
        logits = rm(input_ids=ids, attention_mask=mask, adapter_names=route).logits
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
        return {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None and ".a." in f".{n}."}

    labels = torch.randint(0, tiny.VOCAB, ids.shape, generator=torch.Generator().manual_seed(5))
    before = grads(labels)
    changed = labels.clone()
    others = [i for i, n in enumerate(route) if n != "a"]
    changed[others] = torch.randint(0, tiny.VOCAB, changed[others].shape, generator=torch.Generator().manual_seed(6))
    after = grads(changed)
    assert before.keys() == after.keys() and before
    for name in before:
        assert torch.equal(before[name], after[name]), name
    b_grad = [p.grad for n, p in rm.named_parameters() if n.startswith("adapters.b.")]
    assert all(g is not None and g.abs().sum() > 0 for g in b_grad)  # b got gradients through the batched path


def test_active_adapters_apply_in_order():
    model = tiny.causal_lm()
    ids, mask = tiny.padded_batch([5, 4])
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    site = "layers.0.block_output"
    rm = reft.IntervenableModel(model, {site: _strong(reft.RED(tiny.HIDDEN), 1)}, adapter_name="a")
    rm.add_adapter("b", reft.ReftConfig({site: "red"}))
    _strong(rm.interventions_of("b")[site][0], 2)
    after = []
    model.model.layers[0].register_forward_hook(lambda m, a, out: after.append(out[0] if isinstance(out, tuple) else out))
    rm.set_adapter(["a", "b"])
    with torch.no_grad():
        rm(input_ids=ids, attention_mask=mask)
    a, b = rm.interventions_of("a")[site][0], rm.interventions_of("b")[site][0]
    h = seen[-1]  # the user's hook ran before ours: the unedited output
    expected = b.scale * (a.scale * h + a.bias) + b.bias
    torch.testing.assert_close(after[-1], expected, atol=1e-6, rtol=0)
    assert rm.active_adapters == ["a", "b"] and rm.adapter_names == ["a", "b"]


def test_second_wrapper_raises_and_the_wrapped_base_runs_unedited_when_called_directly():
    model = tiny.causal_lm(initializer_range=0.2)
    ids, mask = tiny.padded_batch([6, 3], side="left")
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=mask).logits
        bare_tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    rm = reft.IntervenableModel(model, {"layers.1.block_output": _strong(reft.LoReFT(tiny.HIDDEN, 4), 1)}, positions="l1")
    with pytest.raises(ValueError, match=r"already wrapped by an IntervenableModel .*add_adapter"):
        reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(tiny.HIDDEN)})
    with pytest.raises(TypeError, match="already an IntervenableModel"):
        reft.IntervenableModel(rm, {"layers.0.block_output": reft.RED(tiny.HIDDEN)})
    with torch.no_grad():
        assert not torch.equal(rm(input_ids=ids, attention_mask=mask).logits, bare)
        assert torch.equal(rm.model(input_ids=ids, attention_mask=mask).logits, bare)
        direct = rm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(direct, bare_tokens)
    rm.remove()
    reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(tiny.HIDDEN)})  # allowed once removed


COMPONENTS = ["block_input", "block_output", "attention_output", "mlp_input", "mlp_output"]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients_at_every_component(reentrant):
    model = tiny.causal_lm(initializer_range=0.2)
    sites = {f"layers.{i}.{c}": _strong(reft.LoReFT(tiny.HIDDEN, 2), 10 * i + k) for i in range(2) for k, c in enumerate(COMPONENTS)}
    rm = reft.IntervenableModel(model, sites, positions="f1+l2")
    ids, mask = tiny.padded_batch([7, 4, 6], side="left")
    labels = torch.randint(0, tiny.VOCAB, ids.shape, generator=torch.Generator().manual_seed(0))
    mlp_runs = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: mlp_runs.append(1))  # a recompute may stop early

    def grads():
        rm.zero_grad(set_to_none=True)
        logits = rm(input_ids=ids, attention_mask=mask).logits
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
        return {n: p.grad.clone() for n, p in rm.named_parameters() if p.requires_grad}

    reference = grads()
    runs = len(mlp_runs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()  # checkpointing runs in train mode; the tiny model has no dropout
    checkpointed = grads()
    assert len(mlp_runs) == 3 * runs  # one forward without, then a forward and a recompute with checkpointing
    assert reference.keys() == checkpointed.keys()
    for name, g in reference.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-6, msg=name)


def _pairs(n):
    return [(tiny_text.words(5 + i), tiny_text.words(*[20 + i % 3] * (1 + i % 3))) for i in range(n)]


def test_trainer_gradient_checkpointing_matches_plain_training():
    histories, params = [], []
    for checkpointing in (False, True):
        tok = tiny_text.tokenizer()
        model = tiny.causal_lm(initializer_range=0.2, attention_dropout=0.3)  # base dropout must stay off
        torch.manual_seed(0)
        rm = reft.IntervenableModel(model, {"layers.0.mlp_output": reft.LoReFT(tiny.HIDDEN, 2)}, positions="f1+l1")
        runs = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: runs.append(1))
        config = reft.TrainConfig(max_steps=3, batch_size=4, lr=1e-2, gradient_checkpointing=checkpointing, log_every=1)
        histories.append(reft.Trainer(rm, config, build_generation_data(tok, _pairs(8))).fit())
        params.append([p.detach().clone() for p in rm.trainable_parameters()])
        assert len(runs) == 3 * (2 if checkpointing else 1)
    for a, b in zip(*histories):
        assert abs(a["loss"] - b["loss"]) < 1e-6
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_trainer_trains_several_adapters_at_once_and_scores_each():
    tok = tiny_text.tokenizer()
    model = tiny.causal_lm(initializer_range=0.2)
    site = "layers.1.block_output"
    torch.manual_seed(0)
    rm = reft.IntervenableModel(model, {site: reft.LoReFT(tiny.HIDDEN, 8)}, positions="all", adapter_name="ab")
    rm.add_adapter("cd", reft.ReftConfig({site: {"name": "loreft", "rank": 8}}, positions="all"))
    ab, cd = tiny_text.words(10, 11, 12), tiny_text.words(13, 14, 15)
    rows = [{"prompt": tiny_text.words(30 + i // 2), "response": ab if i % 2 else cd, "adapter": "ab" if i % 2 else "cd"} for i in range(16)]
    data = build_generation_data(tok, rows)
    trainer = reft.Trainer(rm, reft.TrainConfig(epochs=50, batch_size=8, lr=1e-2), data, eval_data=data)
    history = trainer.fit()
    final = history[-1]
    assert {"eval_loss", "eval_ab_loss", "eval_cd_loss", "eval_ab_token_accuracy", "eval_cd_token_accuracy"} <= final.keys()
    first = trainer.history[0]["loss"]
    for name in ("ab", "cd"):  # each adapter learned its own task
        assert final[f"eval_{name}_loss"] < 0.3 * first and final[f"eval_{name}_token_accuracy"] >= 0.9, (first, final)
    tok.padding_side = "left"
    prompts = tok([tiny_text.words(31)] * 2, return_tensors="pt", padding=True)  # one prompt, two adapters
    with torch.no_grad():
        out = rm.generate(**prompts, adapter_names=["ab", "cd"], mode="every_token", max_new_tokens=4, do_sample=False, pad_token_id=0)
    texts = [tok.decode(row[prompts["input_ids"].shape[1] :], skip_special_tokens=True) for row in out]
    assert texts == [ab, cd]  # each row answered in its own adapter's task


def test_save_load_layout_and_delete(tmp_path):
    model = tiny.causal_lm(initializer_range=0.2)
    site = "layers.1.block_output"
    rm = reft.IntervenableModel(model, {site: _strong(reft.LoReFT(tiny.HIDDEN, 4), 1)}, positions="l1")
    rm.add_adapter("pirate", reft.ReftConfig({site: {"name": "loreft", "rank": 4}, "layers.0.mlp_output": "red"}, positions="f1+l1", max_norm=0.5))
    for ivs in rm.interventions_of("pirate").values():
        _strong(ivs[0], 2)
    ids, mask = tiny.padded_batch([6, 4], side="left")
    expected = {name: _alone(rm, name, input_ids=ids, attention_mask=mask) for name in rm.adapter_names}
    rm.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "pirate"]
    saved = json.loads((tmp_path / "out" / "pirate" / "adapter_config.json").read_text())
    assert saved["max_norm"] == 0.5 and saved["sites"][1]["interventions"][0]["config"]["hidden_size"] == tiny.HIDDEN
    rm.remove()

    loaded = reft.IntervenableModel.from_pretrained(model, tmp_path / "out")
    loaded.load_adapter(tmp_path / "out" / "pirate", adapter_name="pirate")
    assert loaded.reft_config["pirate"].max_norm == 0.5
    for name in ("default", "pirate"):
        assert torch.equal(_alone(loaded, name, input_ids=ids, attention_mask=mask), expected[name])
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    loaded.delete_adapter("pirate")
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks - 1  # layers.0.mlp's hook went with it
    assert loaded.adapter_names == ["default"] and loaded.active_adapters == ["default"]
    with pytest.raises(ValueError, match=r"no adapter 'pirate'; adapters: \['default'\]"):
        loaded(input_ids=ids, attention_mask=mask, adapter_names=["pirate", None])
    with pytest.raises(ValueError, match="adapter_names has 1 names, but the batch has 2 examples"):
        loaded(input_ids=ids, attention_mask=mask, adapter_names=["default"])
    with pytest.raises(ValueError, match=r"adapter name '../x' is not valid"):
        loaded.add_adapter("../x", reft.ReftConfig({site: "red"}))


def test_max_norm_caps_each_tokens_edit():
    model = tiny.causal_lm()
    site = "layers.0.block_output"
    before, after = [], []
    model.model.layers[0].register_forward_hook(lambda m, a, out: before.append(out[0] if isinstance(out, tuple) else out))
    config = reft.ReftConfig({site: {"name": "red"}}, positions="all", max_norm=0.25)
    rm = reft.get_reft_model(model, config)
    _strong(rm[site], 3)
    model.model.layers[0].register_forward_hook(lambda m, a, out: after.append(out[0] if isinstance(out, tuple) else out))
    ids, mask = tiny.padded_batch([5, 3])
    with torch.no_grad():
        rm(input_ids=ids, attention_mask=mask)
    red = rm[site]
    raw = red.scale * before[-1] + red.bias - before[-1]  # the uncapped edit
    norm = raw.norm(dim=-1, keepdim=True)
    expected = before[-1] + raw * torch.clamp(0.25 / norm, max=1.0)
    torch.testing.assert_close(after[-1], expected, atol=1e-6, rtol=1e-5)
    assert (after[-1] - before[-1]).norm(dim=-1).max() <= 0.25 + 1e-5
    assert "max_norm: 0.25" in repr(rm)


@pytest.mark.integration
def test_the_docs_examples_run(monkeypatch, tmp_path):
    """docs/multi_adapter.md: every python block, in order, in one namespace (SmolLM2's tokenizer, a tiny model)."""
    import re
    from pathlib import Path

    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    text = (Path(__file__).resolve().parents[1] / "docs" / "multi_adapter.md").read_text()
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 6
    for block in blocks:
        exec(compile(block, "docs/multi_adapter.md", "exec"), namespace)
    assert namespace["served"].adapter_names == ["pirate", "caps"]


def test_bad_wrapper_inputs_are_clear_errors():
    model = tiny.causal_lm()
    ids, mask = tiny.padded_batch([5, 3])
    iv = reft.RED(tiny.HIDDEN)
    with pytest.raises(ValueError, match=r"sites 'layers.0.block_output' and 'layers.1.block_output' hold the same RED object"):
        reft.IntervenableModel(model, {"layers.0.block_output": iv, "layers.1.block_output": iv})
    with pytest.raises(ValueError, match=r"sites 'layers.0.block_output' and 'model.layers.0' name the same module"):
        reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(tiny.HIDDEN), "model.layers.0": reft.RED(tiny.HIDDEN)})
    with pytest.raises(ValueError, match=r"head 'model.embed_tokens' holds the model's input embeddings"):
        reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(tiny.HIDDEN)}, head="model.embed_tokens")
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(tiny.HIDDEN)}, positions="l1")
    for bad in (mask.bool(), mask.to(torch.uint8)):
        with pytest.raises(ValueError, match=r"positions must be an integer tensor .*a bool or uint8 tensor is a mask"):
            rm(input_ids=ids, attention_mask=mask, positions=bad)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 5\), but the inputs are \[batch, seq\] = \(2, 5\)"):
        rm(input_ids=ids, attention_mask=mask[:1])
    rm.remove()
    with pytest.raises(ValueError, match=r"rm was remove\(\)d"):
        reft.Trainer(rm, reft.TrainConfig(), build_generation_data(tiny_text.tokenizer(), _pairs(2)))
