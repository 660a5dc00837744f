import torch
from torch import nn

from .base import Intervention, OrthonormalRows, activation, as_dtype, check_rank, register_intervention

INITS = ("pyreft", "identity")  # W, b as pyreft draws them (nn.Linear's default), or W = R, b = 0
DROPOUT_AT = ("output", "edit")  # dropout on the whole h' (pyreft), or on the edit Rᵀ(...) only


@register_intervention("loreft")
class LoReFT(Intervention):
    """LoReFT (Wu, Arora et al., 2024, eq. 2): `h' = h + Rᵀ(act(Wh + b) − Rh)`.

    `R` is `[rank, hidden_size]` with orthonormal rows (re-orthonormalized once per forward call, see
    `OrthonormalRows`); `W, b` is a linear map `hidden_size -> rank`. The edit replaces the projection
    of `h` on the rank-dimensional row space of `R` by `act(Wh + b)`. Parameters:
    `2 * rank * hidden_size + rank`.

    Args:
        init: `"pyreft"` (default): R orthogonal, W and b `nn.Linear`'s default draw, as pyreft does,
            so the edit is not the identity at init. `"identity"`: W = R and b = 0, so `h' = h` at init
            (only with `act=None`: `act(Rh) − Rh` is not zero for a nonlinear `act`).
        dropout_at: `"output"` (default): dropout on the whole `h'`, as pyreft does, which also drops
            features of the residual stream; `"edit"`: `h' = h + dropout(Rᵀ(act(Wh + b) − Rh))`, so
            only the edit is dropped.
    """

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        dropout: float = 0.0,
        act: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        init: str = "pyreft",
        dropout_at: str = "output",
    ):
        super().__init__(hidden_size)
        check_rank(rank, hidden_size)
        if init not in INITS:
            raise ValueError(f"LoReFT init must be one of {', '.join(map(repr, INITS))}; got {init!r}")
        if dropout_at not in DROPOUT_AT:
            raise ValueError(f"LoReFT dropout_at must be one of {', '.join(map(repr, DROPOUT_AT))}; got {dropout_at!r}")
        dt = as_dtype(dtype)
        self.R = OrthonormalRows(rank, hidden_size, dtype=dt)
        self.W = nn.Linear(hidden_size, rank, dtype=dt)
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout)
        self.dropout_at = dropout_at
        if init == "identity":
            if not isinstance(self.act, nn.Identity):
                raise ValueError(f"LoReFT init='identity' is the identity only with act=None (linear); got act={act!r}")
            with torch.no_grad():
                self.W.weight.copy_(self.R())
                self.W.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.W.weight.dtype).reshape(-1, self.hidden_size)  # [N, d]
        R = self.R()  # [r, d]
        if isinstance(self.act, nn.Identity):  # Wx + b - Rx = (W - R)x + b: one projection, not two
            z = torch.addmm(self.W.bias, x, (self.W.weight - R).T)  # [N, r]
        else:
            z = self.act(self.W(x)) - x @ R.T
        if self.dropout_at == "edit":
            out = x + self.dropout(z @ R)
        else:
            out = self.dropout(torch.addmm(x, z, R))  # x + zR: no [N, d] temporary besides the output
        return out.view(h.shape).to(h.dtype)
