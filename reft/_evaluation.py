"""`Trainer.evaluate`: the objective's loss and accuracy on held-out data, summed over processes.

(The metrics that generate, `answer_accuracy` and others, are in `reft.evaluate`.)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._batches import to_device
from ._distributed import gather
from ._precision import autocast
from .data import IGNORE_INDEX
from .evaluate import eval_mode
from .objectives import label_count, logits_of, loss_from_logits


@torch.no_grad()
def evaluate(rm: nn.Module, data: Sequence[Any], collator: Callable, *, batch_size: int, device: torch.device,
             precision: str, rank: int, world: int, compute_metrics: Callable | None) -> dict[str, float]:
    """`Trainer.evaluate` with a cross-entropy objective: loss on `data`, plus accuracy for classification
    (token accuracy for causal LM) and `compute_metrics`'s results, all prefixed `eval_`. Runs in eval mode.

    Under torchrun each process evaluates every world-th example and the sums are all-reduced, so
    every process returns the same numbers for the whole set.
    """
    with eval_mode(rm):
        mine = list(range(rank, len(data), world))
        routed = isinstance(data[0], Mapping) and "adapter" in data[0]
        names = sorted({str(data[j].get("adapter")) for j in range(len(data))}) if routed else [""]
        sums = torch.zeros(len(names), 3, dtype=torch.float64, device=device)  # per adapter: loss, count, correct
        predictions, targets, kinds = [], [], set()
        for k, name in enumerate(names):  # batches of one adapter each, so each adapter is scored alone
            group = [j for j in mine if not routed or str(data[j].get("adapter")) == name]
            for i in range(0, len(group), batch_size):
                batch = to_device(collator([data[j] for j in group[i : i + batch_size]]), device)
                with autocast(device, precision):
                    logits = logits_of(rm, batch)
                labels = batch["labels"]
                kinds.add((labels.dim() == 2, labels.is_floating_point()))
                sums[k, 0] += loss_from_logits(logits, labels).double()
                sums[k, 1] += label_count(labels)
                pred, target = _predictions(logits, labels)
                if not target.is_floating_point():
                    sums[k, 2] += (pred == target).sum()
                if compute_metrics is not None:
                    predictions.append(pred)
                    targets.append(target)
        if world > 1:
            dist.all_reduce(sums)
        token_level, regression = kinds.pop() if kinds else (False, False)
        accuracy = "token_accuracy" if token_level else "accuracy"

        def scores(row: list[float], prefix: str) -> dict[str, float]:
            loss, count, correct = row
            out = {f"{prefix}loss": loss / max(count, 1)}
            if not regression:
                out[f"{prefix}{accuracy}"] = correct / max(count, 1)
            return out

        result = scores(sums.sum(0).tolist(), "eval_")
        if routed:
            for name, row in zip(names, sums.tolist()):
                result.update(scores(row, f"eval_{name}_"))
        if compute_metrics is not None:
            pred, target = (gather(torch.cat(x)) if world > 1 else torch.cat(x) for x in (predictions, targets))
            result.update({f"eval_{k}": float(v) for k, v in compute_metrics(pred.cpu(), target.cpu()).items()})
        return result


@torch.no_grad()
def evaluate_preference(rm: nn.Module, data: Sequence[Any], collator: Callable, objective, *, batch_size: int,
                        device: torch.device, precision: str, rank: int, world: int) -> dict[str, float]:
    """`Trainer.evaluate` with a preference objective: `eval_loss` (the objective's, per pair) and
    `eval_preference_accuracy` (the share of pairs whose chosen response is likelier than the rejected
    one under the edited model)."""
    with eval_mode(rm):
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, pairs, chosen likelier
        mine = list(range(rank, len(data), world))
        for i in range(0, len(mine), batch_size):
            batch = to_device(collator([data[j] for j in mine[i : i + batch_size]]), device)
            with autocast(device, precision):
                loss_sum, correct = objective.evaluate_sums(rm, batch)
            sums += torch.stack([loss_sum.double(), objective.count(batch).double(), correct.double()])
        if world > 1:
            dist.all_reduce(sums)
        loss, count, correct = sums.tolist()
        return {"eval_loss": loss / max(count, 1), "eval_preference_accuracy": correct / max(count, 1)}


def _predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(predictions, targets)`: per example, or at every labelled token (flattened)."""
    if labels.dim() == 2:
        keep = labels[:, 1:] != IGNORE_INDEX
        return logits[:, :-1].argmax(-1)[keep], labels[:, 1:][keep]
    if labels.is_floating_point():
        return logits.reshape(labels.shape).float(), labels
    return logits.argmax(-1), labels
