"""LoFiT at `layers.{i}.attention_heads`: per-head scale and bias on the heads' outputs."""

import pytest
import torch

import reft
from reft.interventions import top_heads

from . import tiny

HEADS = 4
HEAD_DIM = tiny.HIDDEN // HEADS


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_head_edit_changes_only_its_heads_slice_of_the_heads_output(arch, attn):
    make = tiny.classifier if arch == "bert" else tiny.causal_lm
    model = make(arch, attn_implementation=attn)
    rm = reft.IntervenableModel(model, {"layers.1.attention_heads": reft.LoFiT(tiny.HIDDEN, HEADS, heads=[1, 3], scale=True)})
    module = rm.site_of("layers.1.attention_heads").module
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))  # runs after ours
    iv = rm["layers.1.attention_heads"]
    with torch.no_grad():
        iv.scale.normal_()
        iv.bias.normal_()
    ids, mask = tiny.padded_batch([6, 4])
    with torch.no_grad():
        with rm.disabled():
            rm(input_ids=ids, attention_mask=mask)
        rm(input_ids=ids, attention_mask=mask)
    before, after = (x.unflatten(-1, (HEADS, HEAD_DIM)) for x in seen)
    for k in (0, 2):
        assert torch.equal(after[..., k, :], before[..., k, :])
    for slot, k in enumerate((1, 3)):
        expected = (1 + iv.scale[slot]) * before[..., k, :] + iv.bias[slot]
        torch.testing.assert_close(after[..., k, :], expected, atol=1e-6, rtol=1e-6)


def test_identity_at_init_and_the_head_selection_step():
    model = tiny.causal_lm(initializer_range=0.2)
    ids, mask = tiny.padded_batch([5, 3])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    sites = {f"layers.{i}.attention_heads": reft.LoFiT(tiny.HIDDEN, HEADS, scale=True, bias=False) for i in range(2)}
    rm = reft.IntervenableModel(model, sites)
    with torch.no_grad():
        assert torch.equal(rm(input_ids=ids, attention_mask=mask).logits, base)
        rm["layers.0.attention_heads"].scale[2].fill_(3.0)
        rm["layers.1.attention_heads"].scale[0].fill_(2.0)
        rm["layers.1.attention_heads"].scale[3].fill_(0.5)
    chosen = top_heads({s: rm[s] for s in sites}, k=2)
    assert chosen == {"layers.0.attention_heads": [2], "layers.1.attention_heads": [0]}
    with pytest.raises(ValueError, match=r"k must be in 1..8"):
        top_heads({s: rm[s] for s in sites}, k=9)
    with pytest.raises(ValueError, match=r"heads must be distinct ints in 0..3, got \[4\]"):
        reft.LoFiT(tiny.HIDDEN, HEADS, heads=[4])


def test_bias_on_selected_heads_trains_and_round_trips(tmp_path):
    from reft.data import build_generation_data

    from . import tiny_text

    tok = tiny_text.tokenizer()
    model = tiny.causal_lm(initializer_range=0.2)
    config = reft.ReftConfig({"layers.1.attention_heads": {"name": "lofit", "num_heads": HEADS, "heads": [0, 2]}})
    rm = reft.get_reft_model(model, config)
    assert rm.reft_config["default"].sites["layers.1.attention_heads"][0]["config"]["hidden_size"] == tiny.HIDDEN
    assert sum(p.numel() for p in rm.trainable_parameters()) == 2 * HEAD_DIM
    data = build_generation_data(tok, [(tiny_text.words(5 + i), tiny_text.words(20, 21)) for i in range(8)])
    trainer = reft.Trainer(rm, reft.TrainConfig(max_steps=30, batch_size=8, lr=5e-2, log_every=30), data)
    before = trainer.evaluate(data)["eval_loss"]
    trainer.fit()
    assert trainer.evaluate(data)["eval_loss"] < 0.95 * before  # 16 numbers: a modest but real gain
    rm.save_pretrained(tmp_path / "a")
    ids, mask = tiny.padded_batch([5, 3])
    with torch.no_grad():
        expected = rm(input_ids=ids, attention_mask=mask).logits
    rm.remove()
    loaded = reft.IntervenableModel.from_pretrained(model, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
