import torch
from torch import nn

from .base import Intervention, OrthonormalRows, as_dtype, check_rank, register_intervention


@register_intervention("lobireft")
class LoBiReFT(Intervention):
    """LoBiReFT (pyreft): `h' = h + Rᵀb`, a learned bias `b: [rank]` in R's orthonormal row space.

    Dropout applies to the edited output. Parameters: `rank * hidden_size + rank`.
    """

    def __init__(
        self, hidden_size: int, rank: int, dropout: float = 0.0, dtype: torch.dtype | str = torch.float32
    ):
        super().__init__(hidden_size)
        check_rank(rank, hidden_size)
        dt = as_dtype(dtype)
        self.R = OrthonormalRows(rank, hidden_size, dtype=dt)
        self.b = nn.Parameter(torch.rand(rank, dtype=dt))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.b.dtype)  # [..., d]
        out = x + self.b @ self.R()
        return self.dropout(out).to(h.dtype)
