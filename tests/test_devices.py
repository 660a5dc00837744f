"""Interventions on the execution device of their site: accelerate's CPU and disk offload and device maps.

Every dispatched model is compared with the same model un-dispatched (plain tensors on the CPU):
logits, intervention gradients, greedy generation and two Trainer steps agree to 1e-5. On a CPU-only
machine every execution device is the CPU, so these tests catch interventions put on `meta` (where
offloaded weights live) and inputs sent there; a model split over two real devices is tested by the
CUDA-marked test at the end (bench/gpu.sh), which skips without a GPU.
"""

import pytest
import torch
from accelerate import cpu_offload, disk_offload, dispatch_model, infer_auto_device_map
from accelerate.utils import compute_module_sizes

import reft
from reft.data import build_generation_data
from reft.train import Trainer, TrainConfig

from . import tiny, tiny_text
from .train_worker import pairs

@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread, above all on a shared machine."""


SITES = {"layers.0.mlp_output": "all", "layers.1.block_output": "f1+l1"}


def _wrap(model, sites=SITES):
    torch.manual_seed(1)
    ivs = {"layers.0.mlp_output": reft.RED(tiny.HIDDEN), "layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4)}
    rm = reft.IntervenableModel(model, ivs, positions=sites)
    with torch.no_grad():  # edits large enough to change the logits visibly
        for p in rm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    return rm


def _offloaded(how: str, tmp_path):
    """A tiny LLaMA (the same weights as `tiny.causal_lm(initializer_range=0.2)`) dispatched by accelerate."""
    model = tiny.causal_lm(initializer_range=0.2)
    if how == "cpu_offload":
        return cpu_offload(model, execution_device="cpu")
    if how == "disk_offload":
        return disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    if how == "device_map":  # layer 0 resident, layer 1 on disk: one site's weights offloaded, the other's not
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                      "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}
        return dispatch_model(model, device_map, offload_dir=str(tmp_path / "offload"))
    sizes = compute_module_sizes(model)
    budget = sizes["model.embed_tokens"] + sizes["model.layers.0"]  # less than the model: the rest goes to disk
    if how == "auto_device_map":
        device_map = infer_auto_device_map(model, max_memory={"cpu": budget}, no_split_module_classes=["LlamaDecoderLayer"])
        assert set(device_map.values()) == {"cpu", "disk"}, device_map
        return dispatch_model(model, device_map, offload_dir=str(tmp_path / "offload"))
    assert how == "from_pretrained"  # transformers' own loading with device_map="auto" and a memory cap
    import transformers as tf

    model.save_pretrained(tmp_path / "saved")
    loaded = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "saved", device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert "disk" in set(loaded.hf_device_map.values()), loaded.hf_device_map
    return loaded


HOW = ["cpu_offload", "disk_offload", "device_map", "auto_device_map", "from_pretrained"]


@pytest.mark.parametrize("how", HOW)
def test_offloaded_model_edits_like_the_plain_one(how, tmp_path):
    plain = _wrap(tiny.causal_lm(initializer_range=0.2))
    offloaded = _wrap(_offloaded(how, tmp_path))
    assert any(p.device.type == "meta" for p in offloaded.model.parameters())  # weights really offloaded
    assert all(p.device.type == "cpu" for p in offloaded.trainable_parameters())  # never on meta
    ids, mask = tiny.padded_batch([7, 4, 6], side="left")

    # forward and the interventions' gradients
    grads = []
    for rm in (plain, offloaded):
        rm.zero_grad()
        out = rm(input_ids=ids, attention_mask=mask).logits
        (out.float() ** 2).mean().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.requires_grad}))
    (a, ga), (b, gb) = grads
    with torch.no_grad(), plain.disabled():
        base = plain(input_ids=ids, attention_mask=mask).logits
    assert (a - base).abs().max() > 1e-2  # the edits matter
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=0)

    # generation
    with torch.no_grad():
        tokens = [rm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False) for rm in (plain, offloaded)]
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("how", ["cpu_offload", "device_map"])
def test_trainer_steps_on_an_offloaded_model_match_the_plain_one(how, tmp_path):
    tok = tiny_text.tokenizer()
    data = build_generation_data(tok, pairs(8))
    trained = []
    for rm in (_wrap(tiny.causal_lm(initializer_range=0.2)), _wrap(_offloaded(how, tmp_path))):
        trainer = Trainer(rm, TrainConfig(lr=1e-2, batch_size=4, max_steps=2, log_every=1), data)
        assert trainer.device == torch.device("cpu")  # the execution device, not meta
        history = trainer.fit()
        trained.append(({n: p.detach().clone() for n, p in rm.named_parameters() if p.requires_grad}, history))
    (a, ha), (b, hb) = trained
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-5, rtol=0)
    assert [r["loss"] for r in hb] == pytest.approx([r["loss"] for r in ha], abs=1e-5)


def test_a_model_on_meta_gets_its_interventions_off_meta():
    """A base built on `meta` (its weights to be loaded later) has no execution device yet: the
    interventions go to the CPU, never to `meta`, and train once the weights are there."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(tiny.CONFIGS["llama"](initializer_range=0.2)).eval()
    rm = _wrap(model)
    assert all(p.device.type == "cpu" for p in rm.trainable_parameters())
    model.to_empty(device="cpu")
    reference = tiny.causal_lm(initializer_range=0.2)
    model.load_state_dict(reference.state_dict())
    model.model.rotary_emb.inv_freq.copy_(reference.model.rotary_emb.inv_freq)  # a buffer outside the state dict
    plain = _wrap(reference)
    ids, mask = tiny.padded_batch([7, 4, 6], side="left")
    with torch.no_grad():
        torch.testing.assert_close(rm(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu.sh)")
@pytest.mark.parametrize("split", ["cuda_and_cpu", "cpu_offload_to_cuda"])
def test_model_split_over_devices_edits_like_the_plain_one(split):
    """Layer 0 on cuda:0 and layer 1 on the CPU (both executing there), or layer 1's weights kept on the
    CPU and run on cuda:0: each intervention on its layer's execution device, routing across both."""
    sites = {"layers.0.mlp_output": "f1+l1", "layers.1.block_output": "f1+l1"}  # the same spec on both devices
    plain = _wrap(tiny.causal_lm(initializer_range=0.2), sites)
    plain.add_adapter("b", reft.ReftConfig({"layers.1.block_output": {"name": "loreft", "rank": 4}}, positions="l2"))
    split_model = tiny.causal_lm(initializer_range=0.2)
    on_gpu = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0}
    rest = {"model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    main = "cpu" if split == "cuda_and_cpu" else 0  # main "cpu": the CPU modules execute there; else offloaded to cuda:0
    split_model = dispatch_model(split_model, {**on_gpu, **rest}, main_device=main)
    rm = _wrap(split_model, sites)
    rm.add_adapter("b", reft.ReftConfig({"layers.1.block_output": {"name": "loreft", "rank": 4}}, positions="l2"))
    rm.load_state_dict({k: v for k, v in plain.state_dict().items() if k.startswith("adapters.")}, strict=False)
    layer1 = "cpu" if split == "cuda_and_cpu" else "cuda"
    assert rm["layers.0.mlp_output"].scale.device.type == "cuda"
    assert all(p.device.type == layer1 for p in rm["layers.1.block_output"].parameters())
    ids, mask = tiny.padded_batch([7, 4, 6], side="left")
    route = ["default", "b", None]
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=mask, adapter_names=route).logits
        got = rm(input_ids=ids.cuda(), attention_mask=mask.cuda(), adapter_names=route).logits
        torch.testing.assert_close(got.cpu().float(), want, atol=1e-4, rtol=0)
        tokens = [m.generate(input_ids=x, attention_mask=y, adapter_names=route, max_new_tokens=4, do_sample=False).cpu()
                  for m, x, y in ((plain, ids, mask), (rm, ids.cuda(), mask.cuda()))]
    assert torch.equal(tokens[0], tokens[1])
