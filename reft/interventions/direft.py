import torch
from torch import nn

from .base import Intervention, activation, orthonormal_init, as_dtype, check_rank, register_intervention


@register_intervention("direft")
class DiReFT(Intervention):
    """DiReFT (Wu, Arora et al., 2024, eq. 3): `h' = h + W₂ᵀ act(W₁h + b)`.

    LoReFT without the orthogonality constraint and without subtracting the projection `Rh`: a
    low-rank additive edit. `W₁, b`: linear `hidden_size -> rank`; `W₂`: `[rank, hidden_size]`,
    initialised with orthonormal rows (as in pyreft) but trained freely. Dropout applies to the
    edited output. Parameters: `2 * rank * hidden_size + rank`.
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
        out = x + self.act(self.W1(x)) @ self.W2
        return self.dropout(out).to(h.dtype)
