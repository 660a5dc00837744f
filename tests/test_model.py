import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reft

from . import tiny


@reft.register_intervention("test_add_one")
class AddOne(reft.Intervention):
    """Adds 1 to every coordinate: an edit whose count is visible in the output."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size=hidden_size)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, h):
        return h + 1 + 0 * self.dummy


def logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def test_red_at_init_leaves_logits_unchanged():
    model = tiny.causal_lm()
    ids, mask = tiny.padded_batch([7, 4, 5], side="left")
    base = logits(model, ids, mask)
    rm = reft.IntervenableModel(model, {f"layers.{i}.mlp_output": reft.RED(tiny.HIDDEN) for i in range(2)})
    torch.testing.assert_close(logits(rm, ids, mask), base, atol=1e-6, rtol=0)


@settings(max_examples=12, deadline=None)
@given(
    side=st.sampled_from(["left", "right"]),
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    arch=st.sampled_from(["llama", "gpt2", "gpt_neox"]),
)
def test_last_token_edit_leaves_earlier_logits_exactly_equal(side, lengths, arch):
    model = tiny.causal_lm(arch, initializer_range=0.2)
    ids, mask = tiny.padded_batch(lengths, side=side)
    base = logits(model, ids, mask)
    torch.manual_seed(1)
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.LoReFT(tiny.HIDDEN, 4)}, positions="l1")
    edited = logits(rm, ids, mask)
    for b, n in enumerate(lengths):
        real = mask[b].nonzero().flatten().tolist()
        assert torch.equal(edited[b, real[:-1]], base[b, real[:-1]])
        assert not torch.allclose(edited[b, real[-1]], base[b, real[-1]])


@settings(max_examples=25, deadline=None)
@given(
    side=st.sampled_from(["left", "right"]),
    lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3),
    first=st.integers(0, 5),
    last=st.integers(1, 5),
    tied=st.booleans(),
)
def test_first_and_last_positions_edit_each_token_at_most_once(side, lengths, first, last, tied):
    model = tiny.causal_lm()
    ids, mask = tiny.padded_batch(lengths, side=side)
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out))
    rm = reft.IntervenableModel(
        model, {"layers.0.block_output": AddOne(tiny.HIDDEN)}, positions=f"f{first}+l{last}", tied=tied
    )
    with torch.no_grad():
        with rm.disabled():
            rm(input_ids=ids, attention_mask=mask)
        rm(input_ids=ids, attention_mask=mask)
    # the user's hook ran before ours; capture ours with a hook registered after wrapping
    edited = []
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: edited.append(out))
    with torch.no_grad():
        rm(input_ids=ids, attention_mask=mask)
    handle.remove()
    delta = (edited[0] - seen[0]).mean(-1).round()  # [B, T]: how many times each token was edited
    for b, n in enumerate(lengths):
        real = mask[b].nonzero().flatten().tolist()
        want = [1 if (k < first or k >= n - last) else 0 for k in range(n)]
        assert delta[b, real].tolist() == want
        assert delta[b].sum() == min(n, first + last)


def test_prompt_mask_counts_prompt_tokens_only():
    model = tiny.causal_lm()
    ids, mask = tiny.padded_batch([8, 6], side="right")
    prompt = torch.zeros_like(mask)
    prompt[0, :5], prompt[1, :3] = 1, 1  # prompt, then response
    after = []
    rm = reft.IntervenableModel(model, {"layers.1.block_output": AddOne(tiny.HIDDEN)}, positions="l1")
    model.model.layers[1].register_forward_hook(lambda m, a, out: after.append(out))
    with torch.no_grad():
        with rm.disabled():
            rm(input_ids=ids, attention_mask=mask, prompt_mask=prompt)
        rm(input_ids=ids, attention_mask=mask, prompt_mask=prompt)
    edited = (after[1] - after[0]).mean(-1).round()
    assert edited[0].nonzero().flatten().tolist() == [4]
    assert edited[1].nonzero().flatten().tolist() == [2]


def test_explicit_positions_match_the_spec_they_spell_out():
    model = tiny.causal_lm(initializer_range=0.2)
    ids, mask = tiny.padded_batch([6, 4], side="left")
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.LoReFT(tiny.HIDDEN, 2)}, positions="f1+l1")
    by_spec = logits(rm, ids, mask)
    explicit = torch.tensor([[0, 5], [2, 5]])
    torch.testing.assert_close(logits(rm, ids, mask, positions=explicit), by_spec, atol=0, rtol=0)
    padded = torch.tensor([[0, 5, -1], [2, -1, 5]])  # -1 = no position
    torch.testing.assert_close(logits(rm, ids, mask, positions=padded), by_spec, atol=0, rtol=0)


def test_user_hooks_keep_firing_and_ours_are_removed_by_handle():
    model = tiny.causal_lm()
    calls = []
    model.model.layers[0].register_forward_hook(lambda *a: calls.append("user"))
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append("user-pre"))
    ids, mask = tiny.padded_batch([4])
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(tiny.HIDDEN)})
    logits(rm, ids, mask)
    assert calls == ["user-pre", "user"]
    assert len(model.model.layers[0]._forward_hooks) == 2
    rm.remove()
    logits(rm, ids, mask)
    assert calls == ["user-pre", "user"] * 2
    assert len(model.model.layers[0]._forward_hooks) == 1


def test_hooks_are_registered_once_not_per_call():
    model = tiny.causal_lm()
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(tiny.HIDDEN)})
    ids, mask = tiny.padded_batch([4, 3])
    for _ in range(3):
        logits(rm, ids, mask)
    assert len(model.model.layers[0]._forward_hooks) == 1


def test_only_intervention_and_head_parameters_require_grad():
    model = tiny.classifier("bert")
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.LoReFT(tiny.HIDDEN, 2)}, positions="f1")
    names = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert names == {"adapters.default.layers-0-block_output.0.R.weight", "adapters.default.layers-0-block_output.0.W.weight", "adapters.default.layers-0-block_output.0.W.bias"}
    rm = reft.IntervenableModel(tiny.classifier("bert"), {"layers.0.block_output": reft.RED(tiny.HIDDEN)}, head="classifier")
    names = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert names == {"adapters.default.layers-0-block_output.0.scale", "adapters.default.layers-0-block_output.0.bias", "model.classifier.weight", "model.classifier.bias"}
    assert sum(p.numel() for p in rm.trainable_parameters()) == 2 * tiny.HIDDEN + tiny.HIDDEN * 2 + 2


def test_untied_sites_have_separate_prefix_and_suffix_interventions():
    model = tiny.causal_lm()
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.LoReFT(tiny.HIDDEN, 2)}, positions="f2+l2", tied=False)
    prefix, suffix = rm["layers.0.block_output"]
    assert prefix is not suffix and not torch.equal(prefix.W.weight, suffix.W.weight)
    assert sum(p.numel() for p in rm.trainable_parameters()) == 2 * (2 * 2 * tiny.HIDDEN + 2)
    assert "untied" in repr(rm)
    one_sided = reft.IntervenableModel(tiny.causal_lm(), {"layers.0.block_output": reft.LoReFT(tiny.HIDDEN, 2)}, positions="l2", tied=False)
    assert isinstance(one_sided["layers.0.block_output"], reft.LoReFT)


def test_interventions_follow_train_eval_and_to():
    rm = reft.IntervenableModel(tiny.causal_lm(), {"layers.0.block_output": reft.LoReFT(tiny.HIDDEN, 2, dropout=0.1)})
    iv = rm["layers.0.block_output"]
    rm.train()
    assert iv.training
    rm.eval()
    assert not iv.training
    rm.to(torch.float64)
    assert iv.W.weight.dtype == torch.float64


def test_bfloat16_model_with_float32_interventions():
    model = tiny.causal_lm().to(torch.bfloat16)
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.LoReFT(tiny.HIDDEN, 2)}, positions="f1+l1")
    ids, mask = tiny.padded_batch([5, 3], side="left")
    out = rm(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert rm["layers.0.block_output"].W.weight.grad.dtype == torch.float32


def test_repr_and_trainable_parameter_summary(capsys):
    rm = reft.IntervenableModel(tiny.causal_lm(), {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4)}, positions="f7+l7")
    text = repr(rm)
    assert "LlamaForCausalLM: 1 sites" in text and "layers.1.block_output [f7+l7]: LoReFT(hidden_size=32, rank=4" in text
    rm.print_trainable_parameters()
    trainable = 2 * 4 * tiny.HIDDEN + 4
    total = sum(p.numel() for p in rm.parameters())
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    assert rm.sites == ["layers.1.block_output"] and rm.site_positions() == {"layers.1.block_output": ("f7+l7", True)}


def test_bad_inputs_name_the_value_and_the_valid_range():
    model = tiny.causal_lm()
    ids, mask = tiny.padded_batch([5, 3])
    with pytest.raises(ValueError, match=r"has hidden_size 16, but the site's hidden size is 32"):
        reft.IntervenableModel(model, {"layers.0.block_output": reft.LoReFT(16, 2)})
    with pytest.raises(ValueError, match=r"malformed position spec 'last'"):
        reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(32)}, positions="last")
    with pytest.raises(ValueError, match=r"model has 2 layers \(0–1\)"):
        reft.IntervenableModel(model, {"layers.5.block_output": reft.RED(32)})
    with pytest.raises(ValueError, match=r"positions dict must name exactly the intervention sites; missing \['layers.0.block_output'\]"):
        reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(32)}, positions={"layers.1.block_output": "l1"})
    with pytest.raises(TypeError, match=r"expected a reft.Intervention"):
        reft.IntervenableModel(model, {"layers.0.block_output": torch.nn.Linear(32, 32)})
    with pytest.raises(ValueError, match=r"head 'clasifier': no such module"):
        reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(32)}, head="clasifier")
    with pytest.raises(ValueError, match="interventions is empty"):
        reft.IntervenableModel(model, {})
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(32)}, positions="l1")
    with pytest.raises(ValueError, match=r"position 5 is out of range for sequence length 5 \(valid: 0\.\.4, or -1 for none\)"):
        rm(input_ids=ids, attention_mask=mask, positions=torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(ValueError, match=r"position -3 is out of range"):
        rm(input_ids=ids, attention_mask=mask, positions=torch.tensor([[0, -3], [1, 2]]))
    with pytest.raises(ValueError, match=r"positions has batch size 1, but the inputs have 2"):
        rm(input_ids=ids, attention_mask=mask, positions=torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"positions must be an integer tensor \[batch, P\]"):
        rm(input_ids=ids, attention_mask=mask, positions=torch.tensor([0.5, 1.0]))
