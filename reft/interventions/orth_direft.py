import torch
from torch import nn

from .base import Intervention, OrthonormalRows, activation, as_dtype, check_rank, register_intervention


@register_intervention("orth_direft")
class OrthDiReFT(Intervention):
    """DiReFT with an orthonormal R (the paper's ablation): `h' = h + Rᵀ act(Wh + b)`.

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
        self.R = OrthonormalRows(rank, hidden_size, dtype=dt)
        self.W = nn.Linear(hidden_size, rank, dtype=dt)
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.W.weight.dtype)  # [..., d]
        out = x + self.act(self.W(x)) @ self.R()
        return self.dropout(out).to(h.dtype)
