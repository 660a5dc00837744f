import pytest
import torch

import reft
from reft.sites import find_stacks, resolve_site

from . import tiny

COMPONENTS = ["block_output", "mlp_output", "attention_output", "block_input", "mlp_input", "attention_input"]
MODELS = [(arch, "causal") for arch in tiny.CAUSAL] + [(arch, "classifier") for arch in tiny.CAUSAL + tiny.ENCODERS]


def build(arch, head):
    return tiny.causal_lm(arch) if head == "causal" else tiny.classifier(arch)


@pytest.mark.parametrize("arch,head", MODELS)
def test_every_architecture_resolves_sites_and_trains(arch, head):
    model = build(arch, head)
    ivs = {f"layers.0.{c}": reft.LoReFT(tiny.HIDDEN, 2) for c in COMPONENTS}
    ivs["layers.1.block_output"] = reft.RED(tiny.HIDDEN)
    rm = reft.IntervenableModel(model, ivs, positions="f2+l2")
    ids, mask = tiny.padded_batch([6, 4], side="right")
    out = rm(input_ids=ids, attention_mask=mask)
    out.logits.float().pow(2).mean().backward()
    for site in ivs:
        grads = [p.grad for p in rm[site].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), site
        assert any(g.abs().sum() > 0 for g in grads), site
    assert all(p.grad is None for p in model.parameters())


def test_encoder_decoder_names_its_stacks():
    model = tiny.seq2seq()
    assert set(find_stacks(model)) == {"encoder", "decoder"}
    ivs = {
        "encoder.layers.0.mlp_output": reft.LoReFT(tiny.HIDDEN, 2),
        "decoder.layers.1.attention_output": reft.LoReFT(tiny.HIDDEN, 2),
        "decoder.layers.0.block_output": reft.RED(tiny.HIDDEN),
    }
    rm = reft.IntervenableModel(model, ivs, positions={**{k: "l1" for k in ivs}, "decoder.layers.0.block_output": "all"})
    ids, mask = tiny.padded_batch([5, 3])
    labels = torch.randint(3, tiny.VOCAB, (2, 4))
    rm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for site in ivs:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rm[site].parameters()), site
    assert resolve_site(model, "decoder.layers.1.mlp_input").stack == "decoder"
    with pytest.raises(ValueError, match=r"no single layer stack; use 'encoder\.layers"):
        resolve_site(model, "layers.0.block_output")


def test_opt_and_bert_use_their_ffn_linears():
    opt = tiny.causal_lm("opt")
    assert resolve_site(opt, "layers.1.mlp_output").module is opt.model.decoder.layers[1].fc2
    assert resolve_site(opt, "layers.1.mlp_input").module is opt.model.decoder.layers[1].fc1
    bert = tiny.classifier("bert")
    assert resolve_site(bert, "layers.0.mlp_output").module is bert.bert.encoder.layer[0].output.dense
    assert resolve_site(bert, "layers.0.mlp_input").module is bert.bert.encoder.layer[0].intermediate.dense


def test_module_paths_inside_a_block_and_in_the_model():
    model = tiny.causal_lm("llama")
    site = resolve_site(model, "layers.1.mlp.down_proj")
    assert site.module is model.model.layers[1].mlp.down_proj and site.hidden_size == tiny.HIDDEN
    site = resolve_site(model, "model.layers.0.self_attn.o_proj")
    assert site.module is model.model.layers[0].self_attn.o_proj and not site.edits_input


@pytest.mark.parametrize("arch,head", [("llama", "causal"), ("gpt2", "causal"), ("bert", "classifier")])
def test_attention_input_edits_what_the_attention_module_receives(arch, head):
    """RED `s ⊙ h + b` at `attention_input`: the attention module sees exactly its old input, edited."""
    model = build(arch, head).eval()
    attention = resolve_site(model, "layers.1.attention_output").module
    site = resolve_site(model, "layers.1.attention_input")
    assert site.module is attention and site.edits_input and site.hidden_size == tiny.HIDDEN
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    ids, mask = tiny.padded_batch([6, 4], side="right")
    handle = attention.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        red = reft.RED(tiny.HIDDEN)
        red.scale.copy_(torch.linspace(0.5, 2.0, tiny.HIDDEN))
        red.bias.copy_(torch.linspace(-1.0, 1.0, tiny.HIDDEN))
        rm = reft.IntervenableModel(model, {"layers.1.attention_input": red}, positions="all")
        handle.remove()
        handle = attention.register_forward_pre_hook(record, with_kwargs=True)  # after rm's: sees the edit
        rm(input_ids=ids, attention_mask=mask)
    handle.remove()
    before, after = seen
    s, b = torch.linspace(0.5, 2.0, tiny.HIDDEN), torch.linspace(-1.0, 1.0, tiny.HIDDEN)
    torch.testing.assert_close(after, before * s + b)


@pytest.mark.parametrize(
    "site,message",
    [
        ("layers.2.block_output", r"site 'layers\.2\.block_output': model has 2 layers \(0–1\)"),
        ("layers.-1.block_output", r"model has 2 layers \(0–1\)"),
        (
            "layers.0.mlp_out",
            r"unknown component 'mlp_out'; valid: block_input, block_output, attention_input, attention_output, attention_heads, "
            r"mlp_input, mlp_output, or a module path inside the block such as 'mlp\.down_proj'",
        ),
        ("model.layers.0.mlpp", r"no module 'model\.layers\.0\.mlpp' in LlamaForCausalLM.*did you mean 'model\.layers\.0\.mlp'"),
        ("encoder.layers.0.block_output", r"no encoder layer stack"),
    ],
)
def test_bad_sites_name_the_value_and_the_valid_range(site, message):
    with pytest.raises(ValueError, match=message):
        resolve_site(tiny.causal_lm("llama"), site)
