"""`TrainConfig.compile`: the forward and backward under torch.compile, as one graph, with eager's losses.

Graph breaks and recompiles are counted by dynamo itself (`torch._dynamo.explain`, its counters).
The training comparisons run with the `aot_eager` backend (dynamo's graph capture and AOTAutograd's
forward/backward split, without code generation: seconds, not minutes) and once with inductor, the
default, whose C++ kernels take a minute to build on a cold cache on 2 cores.
"""

import os
import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import reft
from reft.data import Collator, build_generation_data
from reft.train import Trainer, TrainConfig

from . import tiny, tiny_text
from .train_worker import pairs


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):
    """Each test starts with no compiled code and zeroed counters (and on one thread, as the tests do)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _wrap(spec: str = "f1+l1", tied: bool = True, layers: int = 2):
    torch.manual_seed(1)
    model = tiny.causal_lm(initializer_range=0.2, num_hidden_layers=layers)
    top = f"layers.{layers - 1}.block_output"
    ivs = {"layers.0.mlp_output": reft.RED(tiny.HIDDEN), top: reft.LoReFT(tiny.HIDDEN, 4)}
    return reft.IntervenableModel(model, ivs, positions={"layers.0.mlp_output": "all", top: spec}, tied=tied)


def _graphs(rm, **batch):
    """`(graphs, breaks, reasons)` of one forward of `rm` traced by dynamo."""
    explain = torch._dynamo.explain(lambda **kw: rm(**kw).logits)(**batch)
    return explain.graph_count, explain.graph_break_count, [str(b.reason)[:300] for b in explain.break_reasons]


# ------------------------------------------------------------------ one graph per forward
@pytest.mark.parametrize(
    "spec,tied,prompt",
    [("all", True, False), ("f3", True, False), ("l2", True, False), ("f1+l1", True, False), ("f2+l2", False, False),
     ("f2+l2", True, True)],
)
def test_a_forward_is_one_graph_for_every_position_spec(spec, tied, prompt):
    ids, mask = tiny.padded_batch([7, 4, 6], side="right")
    batch = {"input_ids": ids, "attention_mask": mask}
    if prompt:  # specs counted on the prompt: its first 3 tokens
        batch["prompt_mask"] = mask * (torch.arange(7) < 3)
    graphs, breaks, reasons = _graphs(_wrap(spec, tied), **batch)
    assert (graphs, breaks) == (1, 0), reasons


def test_a_forward_with_explicit_positions_is_one_graph():
    ids, mask = tiny.padded_batch([7, 4, 6], side="right")
    positions = torch.tensor([[0, 6], [1, 3], [2, -1]])
    graphs, breaks, reasons = _graphs(_wrap("all"), input_ids=ids, attention_mask=mask, positions=positions)
    assert (graphs, breaks) == (1, 0), reasons


def test_compiled_explicit_positions_out_of_range_are_an_error():
    rm = _wrap("all")
    compiled = torch.compile(rm, backend="aot_eager")
    ids, mask = tiny.padded_batch([7, 4, 6], side="right")
    good = torch.tensor([[0, 6], [1, 3], [2, -1]])
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask, positions=good).logits,
                                   rm(input_ids=ids, attention_mask=mask, positions=good).logits, atol=1e-5, rtol=0)
        with pytest.raises(RuntimeError, match="positions out of range"):
            compiled(input_ids=ids, attention_mask=mask, positions=torch.tensor([[0, 7], [1, 3], [2, -1]]))
    assert counters["stats"]["unique_graphs"] == 1  # the bad batch ran the same graph, whose assert failed


def test_a_routed_forward_is_one_graph():
    rm = _wrap("l1")
    rm.add_adapter("b", reft.ReftConfig({"layers.1.block_output": {"name": "loreft", "rank": 4}}, positions="l2"))
    ids, mask = tiny.padded_batch([7, 4, 6], side="right")
    graphs, breaks, reasons = _graphs(rm, input_ids=ids, attention_mask=mask, adapter_names=["default", "b", None])
    assert (graphs, breaks) == (1, 0), reasons


def _two_adapters():
    rm = _wrap("l1")
    rm.add_adapter("b", reft.ReftConfig({"layers.1.block_output": {"name": "loreft", "rank": 4}}, positions="l2"))
    with torch.no_grad():
        for p in rm.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return rm


ROUTES = [["default", "b", "b", "default"], ["b", "b", "b", None], ["default", "default", "b", None], [None, None, "b", "b"]]


def test_routing_by_adapter_index_compiles_once_and_matches_the_names():
    rm = _two_adapters()
    ids, mask = tiny.padded_batch([7, 4, 6, 5], side="right")
    compiled = torch.compile(rm, backend="aot_eager")
    for names in ROUTES:
        index = rm.adapter_index(names)
        assert index.tolist() == [rm.adapter_names.index(n) if n else -1 for n in names]
        with torch.no_grad():
            got = compiled(input_ids=ids, attention_mask=mask, adapter_names=index).logits
            want = rm(input_ids=ids, attention_mask=mask, adapter_names=names).logits  # eager, by names
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1 and dict(counters["graph_break"]) == {}


def test_a_bad_adapter_index_is_an_error():
    rm = _two_adapters()
    ids, mask = tiny.padded_batch([7, 4], side="right")
    with pytest.raises(ValueError, match=r"adapter index 2 is out of range: valid are -1 \(none\) and 0..1"):
        rm(input_ids=ids, attention_mask=mask, adapter_names=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"adapter_names has 3 entries, but the batch has 2 examples"):
        rm(input_ids=ids, attention_mask=mask, adapter_names=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"\[batch\] integer indices .* got \(2,\) torch.float32"):
        rm(input_ids=ids, attention_mask=mask, adapter_names=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="no adapter 'c'"):
        rm.adapter_index(["default", "c"])


def test_compiled_multi_adapter_training_matches_eager_without_a_graph_per_batch():
    tok = tiny_text.tokenizer()
    rows = [{"prompt": p, "response": r, "adapter": "default" if i % 3 else "b"} for i, (p, r) in enumerate(pairs(16, seed=4))]
    data = build_generation_data(tok, rows)

    def train(compile):
        rm = _two_adapters()
        config = TrainConfig(lr=1e-2, batch_size=4, max_steps=4, log_every=1, seed=0, compile=compile)
        history = Trainer(rm, config, data, collator=Collator(tok, pad_to_multiple_of=16)).fit()
        return [r["loss"] for r in history], {n: p.detach() for n, p in rm.named_parameters() if p.requires_grad}

    eager_losses, eager_params = train(False)
    losses, params = train("aot_eager")
    assert losses == pytest.approx(eager_losses, abs=1e-5)
    for n in params:
        torch.testing.assert_close(params[n], eager_params[n], atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] <= 2 and dict(counters["graph_break"]) == {}  # 4 batches, each its own routing


# ------------------------------------------------------------------ training
def _train(compile, pad_to_multiple_of: int, steps: int, layers: int = 2):
    tok = tiny_text.tokenizer()
    data = build_generation_data(tok, pairs(4 * steps, seed=3))
    rm = _wrap("f1+l1", layers=layers)
    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=steps, log_every=1, compile=compile)
    history = Trainer(rm, config, data, collator=Collator(tok, pad_to_multiple_of=pad_to_multiple_of)).fit()
    return [r["loss"] for r in history], {n: p.detach() for n, p in rm.named_parameters() if p.requires_grad}


def test_compiled_steps_match_eager_on_batches_of_several_padded_lengths():
    tok = tiny_text.tokenizer()
    collator = Collator(tok, pad_to_multiple_of=4)
    data = build_generation_data(tok, pairs(4 * 8, seed=3))
    lengths = {collator([data[i]])["input_ids"].shape[1] for i in range(len(data))}
    assert len(lengths) >= 3, lengths  # batches of at least three padded lengths
    eager_losses, eager_params = _train(False, 4, 8)
    losses, params = _train("aot_eager", 4, 8)
    assert losses == pytest.approx(eager_losses, abs=1e-5)
    for n in params:
        torch.testing.assert_close(params[n], eager_params[n], atol=1e-5, rtol=0)
    assert dict(counters["graph_break"]) == {}


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("clang++") is None,
    reason="inductor on the CPU needs a C++ compiler (g++ or clang++; apt-get install g++)",
)
def test_compile_true_compiles_with_inductor_and_matches_eager():
    eager_losses, eager_params = _train(False, 16, 3, layers=1)
    losses, params = _train(True, 16, 3, layers=1)
    assert losses == pytest.approx(eager_losses, abs=1e-5)
    for n in params:
        torch.testing.assert_close(params[n], eager_params[n], atol=1e-5, rtol=0)
    assert dict(counters["graph_break"]) == {}
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 2  # forward, backward


def test_padded_lengths_compile_at_most_two_graphs():
    """The first length compiles a graph, the next one a graph with a dynamic length that serves every
    later length: no recompilation per batch."""
    tok = tiny_text.tokenizer()
    collator = Collator(tok, pad_to_multiple_of=4)
    data = build_generation_data(tok, pairs(4 * 8, seed=3))
    rm = _wrap("f1+l1")
    compiled = torch.compile(rm, backend="aot_eager")
    order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))  # batches of similar lengths
    seen = set()
    for i in range(0, len(data), 4):
        batch = collator([data[j] for j in order[i : i + 4]])
        seen.add(batch["input_ids"].shape[1])
        compiled(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum().backward()
    assert len(seen) >= 3, seen
    assert counters["stats"]["unique_graphs"] <= 2 and dict(counters["graph_break"]) == {}


def test_compile_setting_is_checked():
    with pytest.raises(ValueError, match=r"TrainConfig.compile = 'inductr': must be True, False or a torch.compile backend"):
        TrainConfig(compile="inductr")
