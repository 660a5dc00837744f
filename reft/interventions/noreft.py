import torch
from torch import nn

from .base import Intervention, activation, orthonormal_init, as_dtype, check_rank, register_intervention


@register_intervention("noreft")
class NoReFT(Intervention):
    """NoReFT (pyreft's LoReFT ablation without orthogonality): `h' = h + W₂ᵀ(act(W₁h + b) − W₂h)`.

    `W₁, b`: linear `hidden_size -> rank`; `W₂`: `[rank, hidden_size]`, unconstrained.
    Dropout applies to the edited output. Parameters: `2 * rank * hidden_size + rank`.
    """

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        dropout: float = 0.0,
        act: str | None = None,
        dtype: torch.dtype | str = torch.float32,
    ):
        super().__init__(hidden_size)
        check_rank(rank, hidden_size)
        dt = as_dtype(dtype)
        self.W1 = nn.Linear(hidden_size, rank, dtype=dt)
        self.W2 = nn.Parameter(orthonormal_init(rank, hidden_size, dt))
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.W2.dtype)  # [..., d]
        out = x + (self.act(self.W1(x)) - x @ self.W2.T) @ self.W2
        return self.dropout(out).to(h.dtype)
