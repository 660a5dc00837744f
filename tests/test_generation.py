"""`rm.generate` against references that recompute the whole sequence with plain forward calls,
and `rm.merge` against the unmerged model."""

import copy
import warnings

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

import reft

from . import tiny

PROMPTS = [7, 3, 5]  # a left-padded batch of three prompts of different lengths


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread, above all on a shared machine."""


def wrapped(arch="llama", spec="l1", site="block_output", seed=1):
    """A tiny LM with a random LoReFT at both layers, strong enough to change the greedy tokens."""
    model = tiny.causal_lm(arch, initializer_range=0.2)
    torch.manual_seed(seed)
    ivs = {f"layers.{i}.{site}": reft.LoReFT(tiny.HIDDEN, 4) for i in range(2)}
    with torch.no_grad():
        for iv in ivs.values():
            iv.W.weight.mul_(4)
            iv.W.bias.normal_(0, 2)
    return reft.IntervenableModel(model, ivs, positions=spec)


def prompt_positions(mask, spec):
    """The spec's positions in each prompt, by hand: lists of columns of a left-padded `mask`."""
    rows = []
    for row in mask.tolist():
        real = [c for c, m in enumerate(row) if m]
        if spec == "all":
            rows.append(real)
            continue
        counts = {part[0]: int(part[1:]) for part in spec.split("+")}  # "f2+l2" -> {"f": 2, "l": 2}
        first, last, n = counts.get("f", 0), counts.get("l", 0), len(real)
        rows.append(real[: max(0, min(first, n - last))] + real[max(0, n - last) :])
    return rows


def forward_with(rm, seq, mask, columns):
    """Logits of a plain forward pass over the whole sequence, edited at `columns` (lists per row)."""
    width = max(1, max(map(len, columns)))
    positions = torch.tensor([c + [-1] * (width - len(c)) for c in columns])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate derives from a left-padded mask
    with torch.no_grad():
        return rm(input_ids=seq, attention_mask=mask, position_ids=position_ids, positions=positions, use_cache=False).logits


def reference_greedy(rm, ids, mask, spec, new_tokens, every_token):
    """Greedy decoding without a cache: each step recomputes the whole sequence, edited at the
    prompt's positions (and, in mode every_token for a spec that reaches them, every generated one)."""
    P = ids.shape[1]
    prompt = prompt_positions(mask, spec)
    covers_new = every_token and (spec == "all" or "l" in spec)
    eos, pad = rm.model.generation_config.eos_token_id, rm.model.generation_config.pad_token_id
    seq, m = ids, mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(new_tokens):
        T = seq.shape[1]
        columns = [p + (list(range(P, T)) if covers_new else []) for p in prompt]
        token = forward_with(rm, seq, m, columns)[:, -1].argmax(-1)
        token = torch.where(done, pad, token)
        done |= token == eos
        seq, m = torch.cat([seq, token[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
        if done.all():
            break
    return seq


@pytest.mark.parametrize("spec", ["l1", "f2+l2", "f2", "all"])
@pytest.mark.parametrize("mode", ["prompt", "every_token"])
@pytest.mark.parametrize("cache", ["kv", "none", "chunked_prefill"])
def test_greedy_matches_a_no_cache_reference(spec, mode, cache):
    rm = wrapped(spec=spec)
    ids, mask = tiny.padded_batch(PROMPTS, side="left")
    options = {"kv": {}, "none": {"use_cache": False}, "chunked_prefill": {"prefill_chunk_size": 3}}[cache]
    with torch.no_grad():
        out = rm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, mode=mode, **options)
        with rm.disabled():
            base = rm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, reference_greedy(rm, ids, mask, spec, 8, mode == "every_token"))
    assert not torch.equal(out, base)  # the interventions do change the tokens


@pytest.mark.parametrize("arch,site", [("gpt2", "attention_output"), ("opt", "mlp_output"), ("gpt_neox", "block_output")])
@pytest.mark.parametrize("mode", ["prompt", "every_token"])
def test_greedy_matches_the_reference_on_other_architectures(arch, site, mode):
    rm = wrapped(arch, spec="f1+l2", site=site)  # OPT flattens [B, T, d] around fc2, its mlp_output
    ids, mask = tiny.padded_batch(PROMPTS, side="left", seed=3)
    for use_cache in (True, False):
        with torch.no_grad():
            out = rm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache, mode=mode)
        assert torch.equal(out, reference_greedy(rm, ids, mask, "f1+l2", 6, mode == "every_token"))


def test_every_token_differs_from_prompt_mode_and_prompt_mode_is_not_a_plain_forward():
    rm = wrapped(spec="l1")
    ids, mask = tiny.padded_batch(PROMPTS, side="left")
    with torch.no_grad():
        prompt = rm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        every = rm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, mode="every_token")
    assert not torch.equal(prompt, every)


@pytest.mark.parametrize("mode", ["prompt", "every_token"])
def test_untied_sites_with_equal_halves_generate_like_tied_ones(mode):
    tied = wrapped(spec="f2+l2")  # checked against the reference above
    ids, mask = tiny.padded_batch(PROMPTS, side="left")
    with torch.no_grad():
        want = tied.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, mode=mode)
    tied.remove()
    halves = {site: (tied[site], copy.deepcopy(tied[site])) for site in tied.sites}
    untied = reft.IntervenableModel(tied.model, halves, positions="f2+l2", tied=False)
    with torch.no_grad():
        out = untied.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, mode=mode)
    assert torch.equal(out, want)


def test_prompts_given_as_embeddings_generate_the_same_tokens():
    rm = wrapped(spec="f1+l1")
    ids, mask = tiny.padded_batch(PROMPTS, side="left")
    with torch.no_grad():
        by_ids = rm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        embeds = rm.model.get_input_embeddings()(ids)
        by_embeds = rm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(by_embeds, by_ids[:, ids.shape[1] :])


def test_decode_steps_run_no_intervention_code_in_prompt_mode():
    rm = wrapped(spec="f2+l2")
    calls = []
    for site in rm.sites:
        rm[site].register_forward_hook(lambda m, a, out: calls.append(a[0].shape[:-1]))
    ids, mask = tiny.padded_batch(PROMPTS, side="left")
    with torch.no_grad():
        rm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert len(calls) == 2  # one per site, in the prefill pass: a [B, 4] gather each
    assert all(shape == (3, 4) for shape in calls)
    calls.clear()
    with torch.no_grad():
        rm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, mode="every_token")
    assert len(calls) == 2 * 8  # the prefill, then the new token of each of the 7 decode steps
    assert all(shape == (3, 1) for shape in calls[2:])


def test_sampling_matches_a_reference_drawing_from_the_same_generator():
    rm = wrapped(spec="f1+l1")
    ids, mask = tiny.padded_batch(PROMPTS, side="left")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=2)
    torch.manual_seed(7)
    with torch.no_grad():
        out = rm.generate(input_ids=ids, attention_mask=mask, **kwargs)
    torch.manual_seed(7)
    with torch.no_grad():
        uncached = rm.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(out, uncached)
    # the reference: expand per returned sequence, then draw each token from the softmax
    seq, m = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    columns = prompt_positions(m, "f1+l1")
    eos = rm.model.generation_config.eos_token_id
    torch.manual_seed(7)
    for _ in range(6):
        logits = forward_with(rm, seq, m, columns)[:, -1]
        logits[:, eos] = -float("inf")  # min_new_tokens
        token = torch.multinomial(logits.softmax(-1), 1)
        seq, m = torch.cat([seq, token], 1), torch.cat([m, torch.ones_like(token)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_scores_match_a_no_cache_rescoring(use_cache):
    rm = wrapped(spec="f2+l2")
    ids, mask = tiny.padded_batch(PROMPTS, side="left")
    beams, P = 3, ids.shape[1]
    with torch.no_grad():
        out = rm.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, num_return_sequences=beams,
            do_sample=False, output_scores=True, return_dict_in_generate=True, use_cache=use_cache, length_penalty=1.0,
        )
    seq = out.sequences  # [B * beams, P + new]
    m = torch.cat([mask.repeat_interleave(beams, 0), torch.ones_like(seq[:, P:])], 1)
    columns = prompt_positions(mask.repeat_interleave(beams, 0), "f2+l2")
    log_probs = forward_with(rm, seq, m, columns).log_softmax(-1)
    eos = rm.model.generation_config.eos_token_id
    for r in range(seq.shape[0]):
        total, n = 0.0, 0
        for t in range(P, seq.shape[1]):
            total, n = total + log_probs[r, t - 1, seq[r, t]].item(), n + 1
            if seq[r, t] == eos:
                break
        assert out.sequences_scores[r].item() == pytest.approx(total / n, abs=1e-4)  # length_penalty 1
    with torch.no_grad(), rm.disabled():
        base = rm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, num_return_sequences=beams, do_sample=False)
    assert not torch.equal(seq, base)


def test_a_model_trained_in_prompt_mode_generates_its_learned_responses():
    model = tiny.causal_lm(initializer_range=0.2, hidden_size=64, intermediate_size=128)
    prompts = [[5, 17, 33, 9, 41, 12, 60], [70, 8, 22, 44]]
    responses = [[30, 31, 32, 33, 2], [50, 51, 52, 53, 2]]  # 2 = EOS
    torch.manual_seed(0)
    rm = reft.IntervenableModel(model, {f"layers.{i}.block_output": reft.LoReFT(64, 8) for i in range(2)}, positions="f3+l3")
    # training batch: prompt + response, right-padded; the positions count prompt tokens only
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids, mask = torch.zeros(2, L, dtype=torch.long), torch.zeros(2, L, dtype=torch.long)
    prompt_mask, labels = torch.zeros_like(mask), torch.full_like(ids, -100)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[b, :n], mask[b, :n], prompt_mask[b, : len(p)], labels[b, len(p) : n] = torch.tensor(p + r), 1, 1, torch.tensor(r)
    optimizer = torch.optim.Adam(rm.trainable_parameters(), lr=1e-2)
    rm.train()
    for _ in range(300):
        loss = rm(input_ids=ids, attention_mask=mask, prompt_mask=prompt_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rm.eval()
    P = max(map(len, prompts))
    prompt_ids, prompt_attention = torch.zeros(2, P, dtype=torch.long), torch.zeros(2, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        prompt_ids[b, P - len(p) :], prompt_attention[b, P - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = rm.generate(input_ids=prompt_ids, attention_mask=prompt_attention, max_new_tokens=5, do_sample=False)
        with rm.disabled():
            base = rm.generate(input_ids=prompt_ids, attention_mask=prompt_attention, max_new_tokens=5, do_sample=False)
    assert out[:, P:].tolist() == responses
    assert base[:, P:].tolist() != responses


def test_generate_on_an_encoder_decoder_edits_the_encoder_input():
    model = tiny.seq2seq()
    torch.manual_seed(1)
    rm = reft.IntervenableModel(model, {"encoder.layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4)}, positions="l1")
    ids, mask = tiny.padded_batch(PROMPTS, side="right")
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = rm.generate(input_ids=ids, attention_mask=mask, **kwargs)
        start = torch.zeros(3, 1, dtype=torch.long)
        encoded = rm(input_ids=ids, attention_mask=mask, decoder_input_ids=start).encoder_last_hidden_state
        with rm.disabled():
            base = rm.generate(input_ids=ids, attention_mask=mask, **kwargs)
            again = rm.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), attention_mask=mask, **kwargs)
    assert torch.equal(out.sequences, again.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(again.scores), atol=1e-5, rtol=0)
    assert (torch.stack(out.scores) - torch.stack(base.scores)).abs().max() > 1e-3


def test_generate_rejects_bad_arguments():
    rm = wrapped()
    ids, mask = tiny.padded_batch(PROMPTS, side="left")
    with pytest.raises(ValueError, match=r"mode 'every' is not one of 'prompt', 'every_token'"):
        rm.generate(input_ids=ids, attention_mask=mask, mode="every")
    with pytest.raises(ValueError, match=r"no positions=: the prompt positions come from the attention_mask"):
        rm.generate(input_ids=ids, attention_mask=mask, positions=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 4\), but the prompt is \[batch, seq\] = \(3, 7\)"):
        rm.generate(input_ids=ids, attention_mask=mask[:, :4])


# ----------------------------------------------------------------- merge
def red(seed=0):
    """A RED with random s and b, far from the identity."""
    torch.manual_seed(seed)
    iv = reft.RED(tiny.HIDDEN)
    with torch.no_grad():
        iv.scale.uniform_(0.5, 1.5)
        iv.bias.normal_(0, 0.5)
    return iv


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


MERGEABLE = [
    ("llama", "layers.{i}.mlp_output"),  # down_proj, no bias: the config gets mlp_bias=True
    ("llama", "layers.{i}.attention_output"),  # o_proj inside a tuple output: attention_bias=True
    ("gpt2", "layers.{i}.mlp_output"),  # Conv1D c_proj, then dropout
    ("opt", "layers.{i}.mlp_output"),  # the fc2 Linear itself, on flattened [B * T, d]
    ("qwen2", "model.layers.{i}.mlp.down_proj"),  # a module path
]


@pytest.mark.parametrize("arch,site", MERGEABLE)
def test_merged_red_gives_the_same_logits_without_hooks(arch, site, tmp_path):
    model = tiny.causal_lm(arch, initializer_range=0.2)
    ids, mask = tiny.padded_batch(PROMPTS, side="left")
    base = model(input_ids=ids, attention_mask=mask).logits.detach()
    rm = reft.IntervenableModel(model, {site.format(i=i): red(i) for i in range(2)})
    with torch.no_grad():
        edited = rm(input_ids=ids, attention_mask=mask).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = rm.merge()
        dropped = [w for w in caught if "from_pretrained would drop" in str(w.message)]
        assert len(dropped) == (arch == "qwen2")  # Qwen2's MLP has no bias flag in its config
        assert hooks(merged) == 0 and type(merged) is type(model)
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, edited, atol=1e-5, rtol=0)
        assert (edited - base).abs().max() > 1e-2
        # the wrapped model is untouched and still edited by rm
        torch.testing.assert_close(rm(input_ids=ids, attention_mask=mask).logits, edited, atol=0, rtol=0)
        with rm.disabled():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)
    if arch != "qwen2":  # save_pretrained / from_pretrained round-trips, biases included
        merged.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, edited, atol=1e-5, rtol=0)


def test_merge_on_encoders_and_encoder_decoders():
    bert = tiny.classifier("bert")
    ids, mask = tiny.padded_batch([6, 4])
    rm = reft.IntervenableModel(bert, {"layers.0.mlp_output": red(), "layers.1.mlp_output": red(1)})
    with torch.no_grad():
        torch.testing.assert_close(rm.merge()(input_ids=ids, attention_mask=mask).logits, rm(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    t5 = tiny.seq2seq()
    rm = reft.IntervenableModel(t5, {"encoder.layers.0.mlp_output": red(), "decoder.layers.1.mlp_output": red(1)})
    labels = torch.randint(3, tiny.VOCAB, (2, 3))
    with torch.no_grad(), pytest.warns(UserWarning, match=r"merge added biases to .*wo"):
        merged = rm.merge()
        torch.testing.assert_close(
            merged(input_ids=ids, attention_mask=mask, labels=labels).logits,
            rm(input_ids=ids, attention_mask=mask, labels=labels).logits, atol=1e-5, rtol=0,
        )


def test_merge_explains_what_cannot_be_merged():
    model = tiny.causal_lm()
    rm = reft.IntervenableModel(model, {"layers.0.mlp_output": reft.LoReFT(tiny.HIDDEN, 2), "layers.1.mlp_output": red()})
    with pytest.raises(ValueError, match=r"site 'layers.0.mlp_output' holds LoReFT, only RED"):
        rm.merge()
    rm = reft.IntervenableModel(tiny.causal_lm(), {"layers.0.mlp_output": red()}, positions="l1")
    with pytest.raises(ValueError, match=r"site 'layers.0.mlp_output' edits positions 'l1'; .*needs 'all'"):
        rm.merge()
    rm = reft.IntervenableModel(tiny.causal_lm(), {"layers.0.block_output": red(), "layers.1.mlp_input": red()})
    with pytest.raises(ValueError, match=r"site 'layers.1.mlp_input' edits a module's input"):
        rm.merge()
    rm = reft.IntervenableModel(tiny.causal_lm(), {"layers.0.block_output": red()})
    with pytest.raises(ValueError, match=r"site 'layers.0.block_output': the output of LlamaDecoderLayer is not the output of a linear layer"):
        rm.merge()
    rm = reft.IntervenableModel(tiny.causal_lm(), {"layers.0.mlp.act_fn": red()})
    with pytest.raises(ValueError, match=r"site 'layers.0.mlp.act_fn': the output of SiLU"):
        rm.merge()
    rm = reft.IntervenableModel(tiny.causal_lm(), {"layers.0.mlp_output": red(), "model.layers.0.mlp.down_proj": red(1)})
    with pytest.raises(ValueError, match=r"sites 'layers.0.mlp_output' and 'model.layers.0.mlp.down_proj' both edit"):
        rm.merge()



def test_the_docs_examples_run():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "generation.md").read_text()
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):  # one namespace, in order
        exec(compile(block, "docs/generation.md", "exec"), namespace)
