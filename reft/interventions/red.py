import torch
from torch import nn

from .base import Intervention, as_dtype, register_intervention


@register_intervention("red")
class RED(Intervention):
    """RED (Wu et al., ACL 2024): `h' = s ⊙ h + b`.

    A scaling vector `s` (init ones) and a bias vector `b` (init zeros), both of size `hidden_size`,
    so the edit is the identity at init. The paper applies it to every layer's FFN output at every
    position (`positions="all"`). Parameters: `2 * hidden_size`.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype | str = torch.float32):
        super().__init__(hidden_size)
        dt = as_dtype(dtype)
        self.scale = nn.Parameter(torch.ones(hidden_size, dtype=dt))  # s: [d]
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dt))  # b: [d]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.scale.dtype)
        return (x * self.scale + self.bias).to(h.dtype)
