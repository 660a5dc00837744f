"""Quantized and half-precision bases: interventions train on torchao / optimum-quanto int8 weights,
fp16 autocast works with fp32 interventions and refuses fp16 ones, and a base without autograd
kernels does not train silently.

The reference for a quantized base is the same model with its int8 weights dequantized into plain
float32 tensors: the quantized model must edit, backpropagate and train exactly like it.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reft
from reft.data import build_generation_data
from reft.train import Trainer, TrainConfig

from . import tiny, tiny_text
from .train_worker import pairs


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread, above all on a shared machine."""


def _torchao(model):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def _quanto(model):
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8)
    freeze(model)
    return model


QUANTIZERS = {"torchao": ("torchao", _torchao), "quanto": ("optimum.quanto", _quanto)}
# `make test` installs torchao here, outside site-packages: transformers imports torchao in every process
# that can find it (seconds per process, and warnings about its CUDA libraries on stderr, which the
# notebook tests count), so only the process of the torchao test below sees it.
TORCHAO = Path(sys.prefix) / "torchao-only"


def _dequantized(quantized):
    """A plain float32 model whose weights are `quantized`'s int8 weights, dequantized."""
    plain = tiny.causal_lm(initializer_range=0.2)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            q = quantized.get_parameter(name)
            p.copy_(q.dequantize() if hasattr(q, "dequantize") else q)
    return plain


def _wrap(model):
    torch.manual_seed(1)
    ivs = {"layers.0.mlp_output": reft.RED(tiny.HIDDEN), "layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4)}
    rm = reft.IntervenableModel(model, ivs, positions={"layers.0.mlp_output": "all", "layers.1.block_output": "f1+l1"})
    with torch.no_grad():  # edits large enough to change the logits visibly
        for p in rm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    return rm


@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_int8_base_edits_and_trains_like_its_dequantized_weights(kind, tmp_path):
    module, quantize = QUANTIZERS[kind]
    if kind == "torchao" and importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is kept out of the test process (see TORCHAO): the next test runs this case in its own")
    pytest.importorskip(module, reason=f"the test extra installs {module}")
    quantized = quantize(tiny.causal_lm(initializer_range=0.2))
    assert type(quantized.model.layers[0].mlp.up_proj.weight).__name__ != "Parameter"  # really int8 tensors
    ref = _dequantized(quantized)
    assert (ref.model.layers[0].mlp.up_proj.weight - tiny.causal_lm(initializer_range=0.2).model.layers[0].mlp.up_proj.weight).abs().max() > 0
    ids, mask = tiny.padded_batch([7, 4, 6], side="left")

    results = []
    for model in (quantized, ref):
        rm = _wrap(model)
        out = rm(input_ids=ids, attention_mask=mask).logits
        (out.float() ** 2).mean().backward()
        results.append((rm, out.detach(), [p.grad.clone() for p in rm.trainable_parameters()]))
    (rq, a, ga), (rr, b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)

    tok = tiny_text.tokenizer()
    data = build_generation_data(tok, pairs(12))
    weight = quantized.model.layers[1].mlp.down_proj.weight.dequantize().clone()
    trained = []
    for rm in (rq, rr):
        rm.zero_grad(set_to_none=True)
        history = Trainer(rm, TrainConfig(lr=1e-2, batch_size=4, max_steps=3, log_every=1), data).fit()
        trained.append(([r["loss"] for r in history], [p.detach().clone() for p in rm.trainable_parameters()]))
    assert trained[0][0] == pytest.approx(trained[1][0], abs=1e-4)
    for x, y in zip(trained[0][1], trained[1][1]):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    assert torch.equal(quantized.model.layers[1].mlp.down_proj.weight.dequantize(), weight)  # the base stays frozen

    # the adapter does not depend on the quantization: it loads on the plain model
    rq.save_pretrained(tmp_path / "adapter")
    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(), tmp_path / "adapter")
    for x, y in zip(loaded.trainable_parameters(), rq.trainable_parameters()):
        assert torch.equal(x, y)


def test_torchao_int8_base_in_a_process_of_its_own():
    """The torchao case of the test above, in a pytest process that finds torchao (see TORCHAO)."""
    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is importable here: the test above runs it in this process")
    if not (TORCHAO / "torchao").is_dir():
        pytest.skip(f"torchao is not installed: make test puts it in {TORCHAO} (pip install --target {TORCHAO} torchao)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(TORCHAO), str(root)])}
    test = f"{Path(__file__).relative_to(root)}::test_int8_base_edits_and_trains_like_its_dequantized_weights[torchao]"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def test_fp16_precision_trains_fp32_interventions_on_an_fp16_base():
    tok = tiny_text.tokenizer()
    data = build_generation_data(tok, pairs(12))
    model = tiny.causal_lm(initializer_range=0.2).half()
    torch.manual_seed(1)
    rm = reft.IntervenableModel(model, {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4)}, positions="all")
    before = [p.detach().clone() for p in rm.trainable_parameters()]
    history = Trainer(rm, TrainConfig(lr=1e-2, batch_size=4, max_steps=3, log_every=1, precision="fp16"), data).fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert all(p.dtype == torch.float32 for p in rm.trainable_parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, rm.trainable_parameters()))


def test_fp16_intervention_parameters_with_fp16_precision_are_a_clear_error():
    tok = tiny_text.tokenizer()
    model = tiny.causal_lm(initializer_range=0.2).half()
    rm = reft.IntervenableModel(model, {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4, dtype=torch.float16)}, positions="all")
    with pytest.raises(ValueError, match=r"precision='fp16'.*'adapters\.default\.layers-1-block_output\.0\.[A-Za-z.]+' is torch\.float16"):
        Trainer(rm, TrainConfig(precision="fp16"), build_generation_data(tok, pairs(4)))
    with pytest.raises(ValueError, match="float32"):
        Trainer(rm, TrainConfig(precision="fp16"), build_generation_data(tok, pairs(4)))
    Trainer(rm, TrainConfig(precision="bf16"), build_generation_data(tok, pairs(4)))  # bf16 needs no scaler: fine


def test_a_base_without_autograd_kernels_does_not_train_silently():
    """`quantize_dynamic`'s int8 Linear has no backward: the interventions below it get no gradient."""
    model = torch.ao.quantization.quantize_dynamic(tiny.causal_lm(initializer_range=0.2), {torch.nn.Linear}, dtype=torch.qint8)
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.LoReFT(tiny.HIDDEN, 4)}, positions="f1+l1")
    tok = tiny_text.tokenizer()
    with pytest.raises(ValueError, match="no trainable parameter received a gradient.*quantize_dynamic"):
        Trainer(rm, TrainConfig(batch_size=4, max_steps=2), build_generation_data(tok, pairs(8))).fit()
