import torch
from torch import nn

from .base import Intervention, as_dtype, register_intervention


@register_intervention("lofit")
class LoFiT(Intervention):
    """LoFiT (Yin et al., 2024): per-head edits of the attention heads' outputs, `z' = (1 + a) ⊙ z + b`.

    At site `layers.{i}.attention_heads` (the input of the attention's output projection, the heads'
    outputs side by side, `[..., num_heads * head_dim]`), head `k`'s slice `z_k` `[head_dim]` gets a
    scale `a_k` (init 0) and a bias `b_k` (init 0), so the edit is the identity at init. Only the
    `heads` listed are edited; the other slices pass through untouched. LoFiT's two steps: train
    `scale=True` on every head and pick the heads whose `a` grew most (`top_heads`), then train
    `bias=True` on those alone. Parameters: `len(heads) * head_dim` per enabled part.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        heads: list[int] | None = None,
        scale: bool = False,
        bias: bool = True,
        dtype: torch.dtype | str = torch.float32,
    ):
        super().__init__(hidden_size)
        if not isinstance(num_heads, int) or num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing hidden_size {hidden_size}, got {num_heads!r}")
        heads = list(range(num_heads)) if heads is None else list(heads)
        bad = [k for k in heads if not isinstance(k, int) or not 0 <= k < num_heads]
        if bad or not heads or len(set(heads)) != len(heads):
            raise ValueError(f"heads must be distinct ints in 0..{num_heads - 1}, got {heads!r}")
        if not (scale or bias):
            raise ValueError("LoFiT needs scale=True, bias=True or both")
        dt = as_dtype(dtype)
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.register_buffer("index", torch.tensor(heads, dtype=torch.long), persistent=False)  # [k]
        shape = (len(heads), self.head_dim)
        self.scale = nn.Parameter(torch.zeros(shape, dtype=dt)) if scale else None  # a: [k, head_dim]
        self.bias = nn.Parameter(torch.zeros(shape, dtype=dt)) if bias else None  # b: [k, head_dim]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dt = (self.scale if self.scale is not None else self.bias).dtype
        z = h.to(dt).unflatten(-1, (self.num_heads, self.head_dim))  # [..., heads, head_dim]
        picked = z.index_select(-2, self.index)  # [..., k, head_dim]
        edited = picked
        if self.scale is not None:
            edited = edited + self.scale * picked
        if self.bias is not None:
            edited = edited + self.bias
        return z.index_add(-2, self.index, edited - picked).flatten(-2).to(h.dtype)

    def head_norms(self) -> torch.Tensor:
        """`[num_heads]`: the norm of each head's scale `a` (0 for heads not edited), for `top_heads`."""
        norms = torch.zeros(self.num_heads, device=self.index.device)
        if self.scale is not None:
            norms[self.index] = self.scale.detach().float().norm(dim=-1)
        return norms


def top_heads(interventions: dict[str, LoFiT], k: int) -> dict[str, list[int]]:
    """LoFiT's head selection: the `k` heads, over all sites, whose trained scale `a` has the largest norm.

    Returns `{site: [head indices]}` (sites with none selected are left out), sorted.
    """
    scores = [(float(n), site, h) for site, iv in interventions.items() for h, n in enumerate(iv.head_norms())]
    if not 1 <= k <= len(scores):
        raise ValueError(f"k must be in 1..{len(scores)} (the heads at these sites), got {k!r}")
    chosen: dict[str, list[int]] = {}
    for _, site, h in sorted(scores, reverse=True)[:k]:
        chosen.setdefault(site, []).append(h)
    return {site: sorted(heads) for site, heads in chosen.items()}
