import torch
from torch import nn

from .base import Intervention, as_dtype, register_intervention


@register_intervention("reft_r1")
class ReFTr1(Intervention):
    """ReFT-r1 (AxBench: Wu, Arora et al., 2025, arXiv 2501.17148): one direction that detects and steers a concept.

    With `v = w / ‖w‖` (a unit vector, `[hidden_size]`) and the tokens `h_1..h_T` the site edits:

        latent (detection):  ψ(h_i) = ReLU(h_i · v)                                  [..., T]
        edit (steering):     h'_i = h_i + (1/k ‖TopK(ψ(h_1), ..., ψ(h_T))‖₁) v        [..., T, d]

    so every edited token moves along `v` by the mean of the `k` largest latents of its sequence.
    This is AxBench's `TopKReLUIntervention` ("Phi(h) = h + Mean(TopK(ReLU(h@v)))*v",
    stanfordnlp/axbench `axbench/models/interventions.py`, trained by `axbench/models/lsreft.py`).
    As there (`exclude_bos=True`: its intervention locations start at token 1), the first token is
    neither counted nor edited (`exclude_first=True`): it is BOS or, without one, the attention sink,
    whose hidden state can be a hundred times larger than the others' (SmolLM2: norm ~22,700 against
    ~150 at layer 12) and would otherwise own the top k and the gradient of `v`.
    AxBench renormalises `w` to unit norm after every step and removes the gradient parallel to it;
    dividing by `‖w‖` in the forward pass is the same constraint (its gradient is orthogonal to `w`).

    Training (AxBench): the language-modelling loss with the edit, plus an L1 penalty on the latents
    outside the top k. With `l1 > 0`, each training-mode forward sets `self.penalty =
    l1 * Σ (latents not in the top k)` (a scalar); `reft.objectives` adds it to the summed loss (so
    after the trainer's division by the labelled-token count it is per labelled token). AxBench also
    ramps the coefficient up from 0 over training; here it is constant.

    Detection: `latent(h)` per token; `reft.detect.detection_scores` takes the maximum over a text's
    real tokens, as AxBench scores a text (`max_act`) before its AUROC.

    Shapes: `forward` reads dimension -2 as the tokens of one sequence (`[B, T, d]` at
    `positions="all"`, `[B, P, d]` at gathered positions); `latent` is per token. The top k run over
    every position the site gives but the first: padding tokens and empty (-1) slots count too, so
    train at `positions="all"` with right padding (a pad token then enters the top k only if its
    latent beats the k-th largest real one; with left padding the first column is padding, not BOS,
    for all but the longest row). A decode step of `generate` sees one token (T = 1, not excluded),
    which then steers by its own latent. Parameters: `hidden_size`.
    """

    def __init__(
        self,
        hidden_size: int,
        k: int = 8,
        l1: float = 0.0,
        exclude_first: bool = True,
        dtype: torch.dtype | str = torch.float32,
    ):
        super().__init__(hidden_size=hidden_size, k=k, l1=l1, exclude_first=exclude_first, dtype=dtype)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"ReFTr1 k (latents averaged for the steering magnitude) must be an int >= 1, got {k!r}")
        if not isinstance(l1, (int, float)) or isinstance(l1, bool) or l1 < 0:
            raise ValueError(f"ReFTr1 l1 (penalty on the latents outside the top k) must be a number >= 0, got {l1!r}")
        if not isinstance(exclude_first, bool):
            raise ValueError(f"ReFTr1 exclude_first must be a bool, got {exclude_first!r}")
        self.k, self.l1, self.exclude_first = k, float(l1), exclude_first
        self.w = nn.Parameter(torch.randn(hidden_size, dtype=as_dtype(dtype)) / hidden_size**0.5)  # a random direction
        self.penalty: torch.Tensor | None = None  # set by a training-mode forward when l1 > 0

    def direction(self) -> torch.Tensor:
        """`v = w / ‖w‖`, `[hidden_size]`."""
        return self.w / self.w.norm()

    def latent(self, h: torch.Tensor) -> torch.Tensor:
        """`ψ(h) = ReLU(h · v)`: `[..., d] -> [...]`, in the parameters' dtype."""
        return torch.relu(h.to(self.w.dtype) @ self.direction())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.exclude_first and h.shape[-2] > 1:
            return torch.cat([h[..., :1, :], self._steer(h[..., 1:, :])], dim=-2)
        return self._steer(h)

    def _steer(self, h: torch.Tensor) -> torch.Tensor:
        """The edit over every token of dimension -2 (no token left out)."""
        x = h.to(self.w.dtype)  # [..., T, d]
        v = self.direction()  # [d]
        z = torch.relu(x @ v)  # [..., T]
        top = z.topk(min(self.k, z.shape[-1]), dim=-1).values  # [..., k]
        magnitude = top.mean(-1, keepdim=True)  # [..., 1]
        if self.training and self.l1 > 0:
            self.penalty = self.l1 * (z.sum() - top.sum())
        return (x + magnitude.unsqueeze(-1) * v).to(h.dtype)
