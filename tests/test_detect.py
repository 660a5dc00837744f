"""`reft.detect`: latents read at the site from the base model's own hidden states, per real token."""

import pytest
import torch

import reft
from reft.detect import detection_scores, token_latents

from . import tiny, tiny_text
from .tiny_text import words


def detector(site: str = "layers.0.block_output", arch: str = "llama"):
    model = tiny.causal_lm(arch, initializer_range=0.2)
    torch.manual_seed(0)
    ivs = {site: reft.ReFTr1(tiny.HIDDEN, k=2), "layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4)}
    return reft.IntervenableModel(model, ivs, positions="all")


def block_states(model, ids: list[int], layer: int, output: bool) -> torch.Tensor:
    """The output (or input) of block `layer` of an unwrapped model, `[T, d]`, by a plain hook."""
    seen = []
    block = model.model.layers[layer]
    if output:
        handle = block.register_forward_hook(lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    else:
        handle = block.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    handle.remove()
    return seen[0][0]


@pytest.mark.parametrize("site,layer,output", [("layers.0.block_output", 0, True), ("layers.1.block_input", 1, False), ("layers.1.block_output", 1, True)])
def test_latents_are_read_from_the_unedited_hidden_states_of_real_tokens(site, layer, output):
    model = tiny.causal_lm(initializer_range=0.2)
    torch.manual_seed(0)
    ivs = {site: reft.ReFTr1(tiny.HIDDEN, k=2)}
    if site != "layers.0.block_output":
        ivs["layers.0.block_output"] = reft.LoReFT(tiny.HIDDEN, 4)  # an edit upstream: detection must not see it
    rm = reft.IntervenableModel(model, ivs, positions="all")
    texts = [words(1, 2, 3), words(4), words(5, 6, 7, 8, 9)]
    got = token_latents(rm, tiny_text.tokenizer(), texts, site=site, batch_size=2)
    base = tiny.causal_lm(initializer_range=0.2)  # the same weights, unwrapped
    v = rm[site].direction().detach()
    for text, z in zip(texts, got):
        ids = tiny_text.tokenizer()(text)["input_ids"]  # BOS first
        h = block_states(base, ids, layer, output)  # [T, d]
        expected = [max(0.0, float(row @ v)) for row in h[1:]]  # BOS left out
        torch.testing.assert_close(z, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    scores = detection_scores(rm, tiny_text.tokenizer(), texts, site=site)
    assert scores.tolist() == pytest.approx([float(z.max()) for z in got], abs=1e-5)  # other batches: other padding


def test_the_hook_is_removed_and_the_edits_still_apply():
    rm = detector()
    ids, mask = tiny.padded_batch([4, 6])
    with torch.no_grad():
        before = rm(input_ids=ids, attention_mask=mask).logits
    detection_scores(rm, tiny_text.tokenizer(), [words(1, 2)])
    module = rm.model.model.layers[0]
    assert len(module._forward_hooks) == 1  # the wrapper's own hook only
    with torch.no_grad():
        assert torch.equal(rm(input_ids=ids, attention_mask=mask).logits, before)


def test_bad_input_names_the_problem():
    tok = tiny_text.tokenizer()
    rm = detector()
    with pytest.raises(ValueError, match="texts is empty"):
        detection_scores(rm, tok, [])
    with pytest.raises(ValueError, match="text 1 must be a str, got int"):
        detection_scores(rm, tok, [words(1), 3])
    with pytest.raises(ValueError, match="site 'layers.1.block_output' \\(LoReFT\\) has no latent\\(h\\) method"):
        detection_scores(rm, tok, [words(1)], site="layers.1.block_output")
    with pytest.raises(ValueError, match="no site 'layers.5.block_output'"):
        detection_scores(rm, tok, [words(1)], site="layers.5.block_output")
    with pytest.raises(ValueError, match="text 0 \\(''\\) has no tokens besides the tokenizer's special ones"):
        detection_scores(rm, tok, [""])
    plain = reft.IntervenableModel(tiny.causal_lm(), {"layers.0.block_output": reft.LoReFT(tiny.HIDDEN, 2)})
    with pytest.raises(ValueError, match="detection needs one intervention with a latent\\(h\\) method; rm has none"):
        detection_scores(plain, tok, [words(1)])
