"""Concept detection: an intervention's latent read over a text's tokens, as AxBench scores ReFT-r1.

`detection_scores(rm, tokenizer, texts)` runs the base model (the interventions disabled) on each
text, captures the hidden states at the detecting intervention's site with a temporary forward hook
(removed by its handle; the forward pass stops there), computes the intervention's `latent(h)` per
token and takes the maximum over the text's real tokens, as AxBench's `max_act` (stanfordnlp/axbench
`Model.predict_latent`): padding and the leading BOS token are left out. Each text starts with BOS,
as AxBench's inputs do; it is prepended when the tokenizer adds no special token of its own but has
a BOS token (SmolLM2): the first token of a sequence is an attention sink whose hidden state can be
a hundred times larger than the others', and it must not be a word of the text.
`reft.evaluate.auroc(scores, labels)` then scores the detector.

    >>> scores = detection_scores(rm, tokenizer, ["The tide rolled in.", "I filed my taxes."])
    >>> reft.evaluate.auroc(scores, [1, 0])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .data import leading_special_tokens
from .sites import resolve_site

if TYPE_CHECKING:
    from .model import IntervenableModel


class _Stop(Exception):
    """Raised by the capturing hook: the layers after the site are not needed."""


def token_latents(
    rm: "IntervenableModel", tokenizer: Any, texts: list[str], site: str | None = None, batch_size: int = 8
) -> list[torch.Tensor]:
    """The latent of every real token of every text: one `[n_i]` float32 tensor per text (on the CPU).

    Args:
        rm: a wrapped model with an intervention that has a `latent(h)` method (e.g. `reft.ReFTr1`).
        tokenizer: its tokenizer; each text is tokenized alone, as plain text after BOS (see the
            module docstring), which is left out.
        texts: the texts to read.
        site: the detecting intervention's site; None: the one site whose intervention has `latent`.
        batch_size: texts per forward pass.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one text")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"text {bad} must be a str, got {type(texts[bad]).__name__} {texts[bad]!r:.80}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    site, intervention = _detector(rm, site)
    lead = leading_special_tokens(tokenizer)
    bos = [] if lead or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    skip = len(lead) + len(bos)
    encoded = [bos + tokenizer(t)["input_ids"] for t in texts]
    empty = next((i for i, ids in enumerate(encoded) if len(ids) <= skip), None)
    if empty is not None:
        raise ValueError(f"text {empty} ({texts[empty]!r:.80}) has no tokens besides the tokenizer's special ones")
    device = next(rm.model.parameters()).device
    latents = []
    for start in range(0, len(texts), batch_size):
        rows = encoded[start : start + batch_size]
        T = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), T, dtype=torch.long)  # right padding, masked out: its id does not matter
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        h = _hidden_states(rm, site, input_ids.to(device), attention_mask.to(device))  # [B, T, d]
        with torch.no_grad():
            z = intervention.latent(h).float().cpu()  # [B, T]
        latents += [z[i, skip : len(r)] for i, r in enumerate(rows)]
    return latents


def detection_scores(
    rm: "IntervenableModel", tokenizer: Any, texts: list[str], site: str | None = None, batch_size: int = 8
) -> torch.Tensor:
    """One score per text, `[N]`: the maximum of the latent over its real tokens (see `token_latents`)."""
    return torch.stack([z.max() for z in token_latents(rm, tokenizer, texts, site, batch_size)])


def _detector(rm: "IntervenableModel", site: str | None) -> tuple[str, Any]:
    """`(site, intervention)` of the detecting intervention (one with a `latent` method)."""
    detecting = [s for s in rm.sites if callable(getattr(rm[s], "latent", None))]
    if site is None:
        if len(detecting) != 1:
            found = f"several: {', '.join(detecting)}; pass site=" if detecting else "none (e.g. reft.ReFTr1 has one)"
            raise ValueError(f"detection needs one intervention with a latent(h) method; rm has {found}")
        site = detecting[0]
    if site not in rm.sites:
        raise ValueError(f"no site {site!r}; sites: {', '.join(rm.sites)}")
    if site not in detecting:
        raise ValueError(f"the intervention at site {site!r} ({type(rm[site]).__name__}) has no latent(h) method")
    return site, rm[site]


@torch.no_grad()
def _hidden_states(rm: "IntervenableModel", site: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The base model's hidden states `[B, T, d]` at `site` (its input for input sites), unedited."""
    resolved = resolve_site(rm.model, site)
    captured = []

    def pre_hook(module, args, kwargs):
        captured.append(args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None)))
        raise _Stop

    def hook(module, args, output):
        if isinstance(output, tuple):
            output = output[0]
        elif not isinstance(output, torch.Tensor):
            output = next(iter(output.values()))  # a ModelOutput: its first field is the hidden states
        captured.append(output)
        raise _Stop

    if resolved.edits_input:
        handle = resolved.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = resolved.module.register_forward_hook(hook)
    try:
        with rm.disabled():
            rm.model(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"site {site!r}: its module did not run in the forward pass")
    h = captured[0]
    B, T = input_ids.shape
    return h.view(B, T, -1) if h.dim() == 2 else h  # some models (OPT) flatten the tokens around their FFN
