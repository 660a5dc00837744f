"""On a CUDA device: routing, generation, checkpointing and bf16 training (skipped without one).

`bash bench/gpu.sh` runs these (`pytest -m cuda`). Only torch, transformers and tokenizers are
needed, so they run on a machine with nothing else installed.
"""

import pytest
import torch
import torch.nn.functional as F

import reft
from reft.data import build_generation_data

from . import tiny
from . import tiny_text

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SITE = "layers.1.block_output"


def _strong(iv, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in iv.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return iv


def _adapters(model, spec="f2+l2"):
    """Adapters a and b (LoReFT, batched together at SITE) and c (DiReFT elsewhere), on model's device."""
    torch.manual_seed(0)
    rm = reft.IntervenableModel(model, {SITE: _strong(reft.LoReFT(tiny.HIDDEN, 4), 1)}, positions=spec, adapter_name="a")
    rm.add_adapter("b", reft.ReftConfig({SITE: {"name": "loreft", "rank": 4}}, positions=spec))
    rm.add_adapter("c", reft.ReftConfig({"layers.0.mlp_output": {"name": "direft", "rank": 2}}, positions=spec))
    for name, seed in (("b", 2), ("c", 3)):
        for ivs in rm.interventions_of(name).values():
            _strong(ivs[0], seed)
    return rm.eval()


def _alone(rm, name, **batch):
    with torch.no_grad():
        if name is None:
            with rm.disabled():
                return rm(**batch).logits
        rm.set_adapter(name)
        return rm(**batch).logits


def test_mixed_batch_on_cuda_equals_each_row_alone_and_the_cpu_result():
    rm = _adapters(tiny.causal_lm(initializer_range=0.2))
    ids, mask = tiny.padded_batch([7, 5, 6, 3, 8], side="left")
    route = ["a", "b", None, "c", "b"]
    with torch.no_grad():
        on_cpu = rm(input_ids=ids, attention_mask=mask, adapter_names=route).logits
    rm.cuda()
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        mixed = rm(input_ids=ids, attention_mask=mask, adapter_names=route).logits
    assert mixed.device.type == "cuda"
    torch.testing.assert_close(mixed.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
    for i, name in enumerate(route):
        alone = _alone(rm, name, input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_routed_generation_on_cuda_gives_each_row_its_tokens_alone():
    rm = _adapters(tiny.causal_lm(initializer_range=0.3), spec="f1+l2").cuda()
    ids, mask = tiny.padded_batch([5, 3, 6, 4], side="left")
    ids, mask = ids.cuda(), mask.cuda()
    route = ["a", "b", None, "c"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        out = rm.generate(input_ids=ids, attention_mask=mask, adapter_names=route, **kw)
        for i, name in enumerate(route):
            row = dict(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
            if name is None:
                with rm.disabled():
                    alone = rm.generate(**row, **kw)
            else:
                rm.set_adapter(name)
                alone = rm.generate(**row, **kw)
            assert torch.equal(out[i : i + 1], alone), (i, name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_on_cuda_gives_the_same_gradients(reentrant):
    model = tiny.causal_lm(initializer_range=0.2).cuda()
    sites = {f"layers.{i}.{c}": _strong(reft.LoReFT(tiny.HIDDEN, 2), 10 * i + k)
             for i in range(2) for k, c in enumerate(["block_output", "attention_output", "mlp_output"])}
    rm = reft.IntervenableModel(model, sites, positions="f1+l2").cuda()
    ids, mask = tiny.padded_batch([7, 4, 6], side="left")
    ids, mask = ids.cuda(), mask.cuda()
    labels = torch.randint(0, tiny.VOCAB, ids.shape, generator=torch.Generator().manual_seed(0)).cuda()

    def grads():
        rm.zero_grad(set_to_none=True)
        logits = rm(input_ids=ids, attention_mask=mask).logits
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
        return {n: p.grad.clone() for n, p in rm.named_parameters() if p.requires_grad}

    reference = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    checkpointed = grads()
    assert reference.keys() == checkpointed.keys()
    for name, g in reference.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_base_trains_float32_interventions_for_two_adapters_at_once():
    model = tiny.causal_lm(initializer_range=0.2).to("cuda", torch.bfloat16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    rm = reft.IntervenableModel(model, {SITE: reft.LoReFT(tiny.HIDDEN, 8)}, positions="all", adapter_name="x")
    rm.add_adapter("y", reft.ReftConfig({SITE: {"name": "loreft", "rank": 8}}, positions="all"))
    rows = [{"prompt": tiny_text.words(30 + i), "response": tiny_text.words(10, 11) if i % 2 else tiny_text.words(12, 13),
             "adapter": "x" if i % 2 else "y"} for i in range(8)]
    data = build_generation_data(tiny_text.tokenizer(), rows)
    config = reft.TrainConfig(max_steps=30, batch_size=8, lr=1e-2, log_every=1, gradient_checkpointing=True)
    trainer = reft.Trainer(rm, config, data, eval_data=data)
    history = trainer.fit()
    assert history[-1]["eval_x_loss"] < 0.5 * history[0]["loss"] and history[-1]["eval_y_loss"] < 0.5 * history[0]["loss"]
    for p in rm.trainable_parameters():
        assert p.device.type == "cuda" and p.dtype == torch.float32
    for n, p in model.named_parameters():
        assert torch.equal(p, frozen[n]), n  # the base model never changes
