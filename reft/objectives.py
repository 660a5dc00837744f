"""Training objectives: what `reft.Trainer` minimises, chosen with `TrainConfig.objective`.

An objective turns a batch into a summed loss and says what the sum runs over (`count`): the
trainer adds the sums of an optimizer step's micro-batches on every process and divides by the
total count, so gradient accumulation and many processes equal one large batch.

- `"ce"` (`CrossEntropy`): next-token cross-entropy summed over the labelled tokens (count: labelled
  tokens), or per example for sequence classification (count: examples).
- `"dpo"` (`DPO`): direct preference optimisation (Rafailov et al., 2023, eq. 7) per
  (prompt, chosen, rejected) pair (count: pairs). The reference model is the frozen base model with
  the interventions disabled (`rm.disabled()`): no second copy of the weights.
- `"reps"` (`RePS`): reference-free bidirectional preference steering (Wu, Yu et al., 2025,
  "Improved Representation Steering for Language Models", arXiv 2505.20809) per pair.

Preference batches (`reft.data.build_preference_data` and `reft.data.Collator`) hold `2B` rows: the
B chosen responses, then the B rejected ones, in the same order. A log-probability of a response is
the sum over its labelled tokens of `log p(token | the tokens before it)`.

Interventions with a training penalty (e.g. `ReFTr1(l1=...)`) set `intervention.penalty` (a scalar)
in their training-mode forward pass; every objective adds those penalties to its summed loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX
from .interventions.base import Intervention

OBJECTIVES = ("ce", "dpo", "reps")
_INPUTS = ("input_ids", "attention_mask", "prompt_mask", "positions", "adapter_names")  # the keys a model call takes


# =================================================================== log-probabilities and losses
def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`Σ_t log p(labels[t+1] | tokens ≤ t)` over each row's labelled tokens: `logits [N, T, V]`,
    `labels [N, T]` (-100 = no label) -> `[N]`, in float32."""
    vocab = logits.shape[-1]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.view(labels.shape[0], -1).sum(1)


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Labelled (response) tokens per row: `labels [N, T]` -> `[N]`."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO per pair (Rafailov et al., 2023, eq. 7), from response log-probabilities `[B]`:

        −log σ(β [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])
    """
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


def reps_loss(
    plus_chosen: torch.Tensor,
    plus_rejected: torch.Tensor,
    minus_chosen: torch.Tensor,
    minus_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_length: torch.Tensor,
    rejected_length: torch.Tensor,
) -> torch.Tensor:
    """RePS per pair (arXiv 2505.20809), from response log-probabilities `[B]`.

    With y^c the chosen (steered) response, y the rejected (original) one, `plus_*` under the edit,
    `minus_*` under the negated edit and `reference_*` under the base model (no gradient):

        β⁺ = max(log p(y|x) − log p(y^c|x), 1)     Δ⁺ = β⁺/|y^c| log p⁺(y^c|x) − 1/|y| log p⁺(y|x)
        β⁻ = max(log p(y^c|x) − log p(y|x), 1)     Δ⁻ = β⁻/|y| log p⁻(y|x) − 1/|y^c| log p⁻(y^c|x)
        loss = −log σ(Δ⁺) − log σ(Δ⁻)

    "Reference-free": the base model only sets the weights β, it is not subtracted as in DPO.
    Sources: the paper's definitions of Δ⁺, Δ⁻ and β± (arXiv 2505.20809, as summarised at
    themoonlight.io), and AxBench's preference trainer, whose `scaled_simpo` loss is `−log σ(Δ⁺)`
    with the same β⁺ and summed (not averaged) log-probabilities from `_get_batch_logps`; its
    negative pair swaps the responses and negates the steering factor.
    """
    beta_plus = torch.clamp(reference_rejected - reference_chosen, min=1.0).detach()
    beta_minus = torch.clamp(reference_chosen - reference_rejected, min=1.0).detach()
    chosen_length, rejected_length = chosen_length.float(), rejected_length.float()
    plus = beta_plus * plus_chosen / chosen_length - plus_rejected / rejected_length
    minus = beta_minus * minus_rejected / rejected_length - minus_chosen / chosen_length
    return -F.logsigmoid(plus) - F.logsigmoid(minus)


# =================================================================== objectives
class Objective:
    """What the trainer minimises: `loss_sum(model, rm, batch)` summed over `count(batch)` units.

    `model` is what the gradient flows through (`rm`, or `rm` wrapped in DistributedDataParallel);
    `rm` is the `IntervenableModel` itself, for what DDP must not see (the reference passes).
    """

    name = ""
    preference = False  # trains on preference pairs (reft.data.build_preference_data)

    def count(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss_sum(self, model: nn.Module, rm: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def check(self, rm: nn.Module, data: Any, name: str) -> None:
        """A clear error, before any training, when `data` or `rm` does not suit this objective."""
        task = getattr(data, "task", None)
        if self.preference and task is not None and task != "preference":
            raise ValueError(
                f"objective {self.name!r} trains on preference pairs, but {name} is {task} data; build it with "
                "reft.data.build_preference_data(tokenizer, [(prompt, chosen, rejected), ...])"
            )
        if not self.preference and task == "preference":
            raise ValueError(f"{name} holds preference pairs: train it with TrainConfig(objective='dpo') or 'reps', not {self.name!r}")
        if self.preference and not hasattr(rm, "disabled"):
            raise ValueError(
                f"objective {self.name!r} needs an IntervenableModel (its reference model is the base model "
                f"under rm.disabled()), got {type(rm).__name__}"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class CrossEntropy(Objective):
    """Next-token cross-entropy over labelled tokens (labels `[B, T]`), or per example for sequence
    classification (labels `[B]`; mean squared error when they are floats)."""

    name = "ce"

    def count(self, batch):
        return label_count(batch["labels"])

    def loss_sum(self, model, rm, batch):
        logits, penalty = _forward(model, rm, batch)
        return loss_from_logits(logits, batch["labels"]) + penalty


class _Preference(Objective):
    """An objective on preference pairs: the mean of `_losses` per pair; routed batches refused."""

    preference = True

    def count(self, batch):
        return _pair_count(batch)

    def loss_sum(self, model, rm, batch):
        losses, _, _, penalty = self._losses(model, rm, batch)
        return losses.sum() + penalty

    def evaluate_sums(self, rm, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """`(loss sum, pairs whose chosen response is the likelier one under rm)`, for `Trainer.evaluate`."""
        losses, chosen, rejected, _ = self._losses(rm, rm, batch)
        return losses.sum(), (chosen > rejected).sum()

    def _losses(self, model, rm, batch):
        """`(losses [B], chosen log-probs [B], rejected log-probs [B], penalty)` of a batch of B pairs."""
        raise NotImplementedError

    def _refuse_routed(self, batch, why: str = "") -> None:
        if "adapter_names" in batch:
            raise ValueError(f"objective {self.name!r}{why}: train one adapter at a time (no 'adapter' field)")


class DPO(_Preference):
    """DPO against the base model (`dpo_loss`); `beta` weighs the log-probability margin (default 0.1)."""

    name = "dpo"

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def _losses(self, model, rm, batch):
        self._refuse_routed(batch, " takes no routed batches")
        labels = batch["labels"]
        logits, penalty = _forward(model, rm, batch)
        chosen, rejected = sequence_logprobs(logits, labels).chunk(2)
        reference_chosen, reference_rejected = _reference_logprobs(rm, batch).chunk(2)
        return dpo_loss(chosen, rejected, reference_chosen, reference_rejected, self.beta), chosen, rejected, penalty


class RePS(_Preference):
    """RePS (`reps_loss`): the edit should make the chosen response likelier, the negated edit
    `h − (Φ(h) − h)` the rejected one; no parameter.

    The paper's negative term uses the intervention with a negated steering factor (for a steering
    vector `h + αw`: `h − αw`, stanfordnlp/axbench's `steering_factors` times −1); for any
    intervention the negated edit is that. The paper's other choices (sampled factors α, its
    "null it out" variant) are not implemented. One forward pass runs both signs (4B rows), so DDP
    sees one graph per micro-batch.
    """

    name = "reps"

    def _losses(self, model, rm, batch):
        self._refuse_routed(batch, " signs every intervention's edit per row")
        labels = batch["labels"]
        rows = labels.shape[0]  # 2B: chosen, rejected
        doubled = {k: torch.cat([batch[k], batch[k]]) for k in (*_INPUTS, "labels") if k in batch}
        sign = torch.cat([torch.ones(rows), -torch.ones(rows)]).to(labels.device)  # [4B]: +edit, then −edit
        with _signed_edits(rm, sign):
            logits, penalty = _forward(model, rm, doubled)
        plus, minus = sequence_logprobs(logits, doubled["labels"]).chunk(2)
        (plus_chosen, plus_rejected), (minus_chosen, minus_rejected) = plus.chunk(2), minus.chunk(2)
        reference_chosen, reference_rejected = _reference_logprobs(rm, batch).chunk(2)
        chosen_length, rejected_length = response_lengths(labels).chunk(2)
        losses = reps_loss(
            plus_chosen, plus_rejected, minus_chosen, minus_rejected,
            reference_chosen, reference_rejected, chosen_length, rejected_length,
        )
        return losses, plus_chosen, plus_rejected, penalty


_CLASSES = {"ce": CrossEntropy, "dpo": DPO, "reps": RePS}


def make_objective(name: str = "ce", beta: float = 0.1) -> Objective:
    """The objective named `name` (one of `OBJECTIVES`); `beta` is DPO's."""
    if name not in _CLASSES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(map(repr, OBJECTIVES))}")
    return DPO(beta) if name == "dpo" else _CLASSES[name]()


# =================================================================== helpers
def logits_of(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**{k: batch[k] for k in _INPUTS if k in batch}).logits


def _forward(model: nn.Module, rm: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """`(logits, the interventions' penalties from this forward pass, 0 when none)`."""
    _take_penalties(rm)  # drop any left by a forward pass whose loss was not taken
    logits = logits_of(model, batch)
    return logits, _take_penalties(rm)


def _take_penalties(rm: nn.Module) -> Any:
    """The sum of the `penalty` tensors the interventions set, each cleared once read."""
    total = 0.0
    interventions = getattr(rm, "adapters", None)
    for module in interventions.modules() if interventions is not None else ():
        penalty = getattr(module, "penalty", None)
        if isinstance(penalty, torch.Tensor):
            total = total + penalty.float()
            module.penalty = None
    return total


@torch.no_grad()
def _reference_logprobs(rm: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities `[N]` of the labelled responses under the base model (interventions off)."""
    with rm.disabled():
        return sequence_logprobs(logits_of(rm, batch), batch["labels"])


@contextmanager
def _signed_edits(rm: nn.Module, sign: torch.Tensor) -> Iterator[None]:
    """Inside the block every intervention's edit of batch row n is multiplied by `sign[n]`:
    `h + s (Φ(h) − h)`, by forward hooks on the interventions, removed afterwards by handle.

    An intervention sees `[N, ...]` rows, or `[N * T, d]` where a model flattens its tokens (OPT's
    FFN); either way each of the N rows of the batch is a block of consecutive rows.
    """
    n = sign.shape[0]

    def hook(module, args, output):
        h = args[0].to(output.dtype)
        if h.shape[0] % n:
            raise ValueError(f"{type(module).__name__} sees {h.shape[0]} rows, not a multiple of the batch's {n}")
        s = sign.to(output.dtype).repeat_interleave(h.shape[0] // n).view(-1, *([1] * (h.dim() - 1)))
        return h + s * (output - h)

    handles = [m.register_forward_hook(hook) for m in rm.adapters.modules() if isinstance(m, Intervention)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pair_count(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["labels"]
    return torch.tensor(labels.shape[0] // 2, device=labels.device)


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed loss: token cross-entropy (t predicts t + 1) for labels `[B, T]`, else per example."""
    if labels.dim() == 2:
        vocab = logits.shape[-1]
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    if labels.is_floating_point():
        return F.mse_loss(logits.reshape(labels.shape).float(), labels.float(), reduction="sum")
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def label_count(labels: torch.Tensor) -> torch.Tensor:
    if labels.dim() == 2:
        return (labels[:, 1:] != IGNORE_INDEX).sum()
    return torch.tensor(labels.shape[0], device=labels.device)
