"""Position specs (`"all"`, `"f7"`, `"l1"`, `"f7+l7"`) and their resolution to index tensors.

A spec is resolved against a mask `[B, T]` (1 on the tokens it counts: the attention mask, or the
prompt mask while training on prompt + response) into index tensors `[B, P]` of token positions,
with -1 where an example has no position in that slot. Everything is tensor code on the mask's
device: left and right padding, and prompts of different lengths, need no host sync. A spec that
asks for more tokens than a sequence has (`"l100000000"`) takes the whole sequence: the index tensors
are at most `[B, T]` wide, whatever the counts in the spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ._errors import short

_SPEC = re.compile(r"f(\d{1,18})\+l(\d{1,18})|f(\d{1,18})|l(\d{1,18})")  # counts past any sequence still parse


@dataclass(frozen=True)
class PositionSpec:
    """Which tokens a site edits: every token (`all`), or the first `first` and last `last` ones."""

    first: int = 0
    last: int = 0
    all: bool = False

    def __post_init__(self):
        for name in ("first", "last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"PositionSpec.{name} must be an int >= 0, got {short(value)}")

    @classmethod
    def parse(cls, spec: "str | PositionSpec") -> "PositionSpec":
        if isinstance(spec, PositionSpec):
            return spec
        text = spec.strip().lower() if isinstance(spec, str) else ""
        if text == "all":
            return cls(all=True)
        match = _SPEC.fullmatch(text)
        first, last = (int(match[1] or match[3] or 0), int(match[2] or match[4] or 0)) if match else (0, 0)
        if first + last == 0:
            raise ValueError(
                f"malformed position spec {short(spec)}; valid: 'all', 'f<n>', 'l<n>' or 'f<n>+l<m>' "
                "with n, m >= 0 (at most 18 digits) and n + m >= 1 (e.g. 'l1', 'f7+l7')"
            )
        return cls(first=first, last=last)

    @property
    def two_sided(self) -> bool:
        return self.first > 0 and self.last > 0

    def __str__(self) -> str:
        if self.all:
            return "all"
        return "+".join(part for part in (f"f{self.first}" * bool(self.first), f"l{self.last}" * bool(self.last)) if part)


def rank_to_position(mask: torch.Tensor) -> torch.Tensor:
    """`[B, T]` mask -> `[B, T]` where entry k is the position of the k-th masked-in token, or -1."""
    B, T = mask.shape
    mask = mask.bool()
    rank = mask.long().cumsum(1) - 1  # rank of each masked-in token
    target = torch.where(mask, rank, T)  # others go to a spill column, dropped below
    table = torch.full((B, T + 1), -1, dtype=torch.long, device=mask.device)
    table.scatter_(1, target, torch.arange(T, device=mask.device).expand(B, T))
    return table[:, :T]


def resolve(spec: PositionSpec, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors `(prefix [B, min(first, T)], suffix [B, min(last, T)])` for `spec` under `mask` `[B, T]`.

    When an example has fewer than `first + last` tokens, the suffix takes the last `min(last, n)`
    tokens and the prefix only what precedes them, so no token is edited twice; empty slots are -1.
    Counts above T resolve as T (no example has more tokens), so the tensors are at most `[B, T]`.
    """
    if spec.all:
        raise ValueError("spec 'all' covers every token and has no index tensors")
    if mask.dim() != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(
            f"position spec {str(spec)!r}: the mask has shape {tuple(mask.shape)}; it must be [batch, seq] "
            "with batch >= 1 and seq >= 1 (an empty batch or a zero-length sequence has no positions)"
        )
    B, T = mask.shape
    device = mask.device
    n_first, n_last = min(spec.first, T), min(spec.last, T)
    table = rank_to_position(mask)  # [B, T]
    count = mask.bool().sum(1, keepdim=True)  # [B, 1] tokens per example

    def at(ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        picked = table.gather(1, ranks.clamp(0, T - 1).expand(B, -1))
        return torch.where(valid, picked, -1)

    first = torch.arange(n_first, device=device).unsqueeze(0)  # [1, n]
    prefix = at(first, first < (count - n_last).clamp(min=0))
    last = count - n_last + torch.arange(n_last, device=device)  # [B, m]
    suffix = at(last, last >= 0)
    return prefix, suffix
