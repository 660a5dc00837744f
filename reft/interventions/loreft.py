import torch
from torch import nn

from .base import Intervention, OrthonormalRows, activation, as_dtype, check_rank, register_intervention


@register_intervention("loreft")
class LoReFT(Intervention):
    """LoReFT (Wu, Arora et al., 2024, eq. 2): `h' = h + Rᵀ(act(Wh + b) − Rh)`.

    `R` is `[rank, hidden_size]` with orthonormal rows (re-orthonormalized once per forward call, see
    `OrthonormalRows`); `W, b` is a linear map `hidden_size -> rank`. The edit replaces the projection
    of `h` on the rank-dimensional row space of `R` by `act(Wh + b)`. Initialised as pyreft does
    (R orthogonal, W default `nn.Linear`), so it is not the identity at init. As in pyreft, dropout
    applies to the edited output. Parameters: `2 * rank * hidden_size + rank`.
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
        x = h.to(self.W.weight.dtype).reshape(-1, self.hidden_size)  # [N, d]
        R = self.R()  # [r, d]
        if isinstance(self.act, nn.Identity):  # Wx + b - Rx = (W - R)x + b: one projection, not two
            z = torch.addmm(self.W.bias, x, (self.W.weight - R).T)  # [N, r]
        else:
            z = self.act(self.W(x)) - x @ R.T
        out = torch.addmm(x, z, R)  # x + zR: no [N, d] temporary besides the output
        return self.dropout(out).view(h.shape).to(h.dtype)
