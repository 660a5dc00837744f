"""`TrainConfig` and `Trainer`: a thin training loop for interventions (and an optional task head).

The loop is ours, not a subclass of Hugging Face's `Trainer`: AdamW over `rm.trainable_parameters()`
only, a warm-up + decay schedule, gradient accumulation with exact token-count normalisation, autocast
precision, periodic logging / evaluation / checkpoints. The same script runs on one CPU, one GPU, or
many processes under `torchrun` (DDP over the trainable parameters, or, when the base is sharded with
FSDP2's `fully_shard`, one all-reduce of their gradients per step; a distributed sampler; logs and
checkpoints on rank 0 only).

Loss. `TrainConfig.objective` picks it (`reft.objectives`). With `"ce"` (the default), for token labels
`[B, T]` (causal LM) the loss of an optimizer step is the sum of the per-token cross-entropies (token t
predicts token t + 1) over all its micro-batches on all processes, divided by the number of labelled
tokens in all of them, so `grad_accum=2, batch_size=4` equals `batch_size=8`, and N processes equal one
with N times the batch. For labels `[B]` (sequence classification) it is the mean cross-entropy per
example (mean squared error when the head has one output). `"dpo"` and `"reps"` train on preference
pairs (`reft.data.build_preference_data`): the mean loss per pair, normalised the same way.

Modes. While training, the interventions (and the head) are in train mode (their dropout on) and the
frozen base model in eval mode (deterministic; `base_dropout=True` puts it in train mode too, as pyreft
does); `evaluate()` puts everything in eval mode and restores the previous modes afterwards.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping as AbcMapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._errors import short
from .data import IGNORE_INDEX, Collator, TokenizedData
from .evaluate import eval_mode
from .interventions.base import OrthonormalRows
from .objectives import OBJECTIVES, label_count, logits_of, loss_from_logits, make_objective

_SCHEDULES = ("linear", "cosine", "constant")
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG_NAME = "log.jsonl"
# How a resumed run's TrainConfig may differ from its checkpoint's: these fields only decide what is
# logged, evaluated and saved, and where; these may change on purpose, with fit(allow_changes=[...]);
# every other field (the data order: batch_size, grad_accum, seed, group_by_length; precision,
# base_dropout) must stay the same.
_BOOKKEEPING = ("log_every", "eval_every", "save_every", "output_dir")
_CHANGEABLE = ("lr", "max_steps", "epochs", "warmup_ratio", "schedule", "weight_decay", "max_grad_norm")


@dataclass
class TrainConfig:
    """How to train. The defaults train a LoReFT/RED adapter on a small dataset reasonably well."""

    lr: float = 4e-3  # peak learning rate; ReFT papers use 1e-3..9e-3 for these tiny modules
    epochs: float = 3  # passes over train_data (a fraction stops part-way); ignored when max_steps is set
    max_steps: int | None = None  # optimizer steps in all; None: `epochs` decides
    batch_size: int = 8  # examples per micro-batch and process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * processes
    warmup_ratio: float = 0.0  # fraction of the steps over which lr rises linearly to `lr`
    schedule: str = "linear"  # after warm-up: "linear" or "cosine" decay to 0, or "constant"
    weight_decay: float = 0.0  # AdamW decay on matrices only: never on R (orthonormal rows) nor vectors/biases
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    seed: int = 42  # data order (per epoch) and dropout
    precision: str = "fp32"  # "fp32", or "bf16" / "fp16" autocast (parameters stay in their own dtype)
    eval_every: int | None = None  # steps between evaluations on eval_data; None: once, after the last step
    log_every: int = 10  # steps between log records: the only host syncs of the loss
    save_every: int | None = None  # steps between checkpoints in output_dir (and one at the end); None: none
    output_dir: str | None = None  # log.jsonl and checkpoint-{step}/ go here; None: write nothing
    base_dropout: bool = False  # run the frozen base model in train mode while training (its own dropout on)
    group_by_length: bool = False  # batch examples of similar length (less padding, faster); order stays seeded
    gradient_checkpointing: bool = False  # recompute each layer in the backward: less memory, ~1.3x the time
    objective: str = "ce"  # "ce" (cross-entropy), or "dpo" / "reps" on preference pairs (reft.objectives)
    beta: float = 0.1  # DPO's weight on the log-probability margin
    compile: bool | str = False  # torch.compile the forward and backward (True: inductor, or a backend name); see training.md

    def __post_init__(self):
        def bad(name: str, valid: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} = {short(getattr(self, name))}: must be {valid}")

        if not (_is_number(self.lr) and 0 < self.lr < 1):
            raise bad("lr", "a number in (0, 1), e.g. 4e-3")
        if self.max_steps is None and not (_is_number(self.epochs) and 0 < self.epochs < math.inf):
            raise bad("epochs", "a positive finite number (or set max_steps)")
        if self.max_steps is not None and not (_is_int(self.max_steps) and self.max_steps >= 1):
            raise bad("max_steps", "an int >= 1 or None")
        for name in ("batch_size", "grad_accum", "log_every"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an int >= 1")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) is not None and not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an int >= 1 or None")
        if not (_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise bad("warmup_ratio", "a number in [0, 1)")
        if not (isinstance(self.schedule, str) and self.schedule in _SCHEDULES):
            raise bad("schedule", f"one of {', '.join(_SCHEDULES)}")
        if not (_is_number(self.weight_decay) and 0 <= self.weight_decay < math.inf):
            raise bad("weight_decay", "a finite number >= 0")
        if self.max_grad_norm is not None and not (_is_number(self.max_grad_norm) and 0 < self.max_grad_norm < math.inf):
            raise bad("max_grad_norm", "a finite number > 0 or None")
        if not (isinstance(self.precision, str) and self.precision in _PRECISIONS):
            raise bad("precision", f"one of {', '.join(_PRECISIONS)}")
        if not _is_int(self.seed):
            raise bad("seed", "an int")
        for name in ("base_dropout", "group_by_length", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.output_dir is not None and not isinstance(self.output_dir, (str, os.PathLike)):
            raise bad("output_dir", "a folder path or None")
        if self.objective not in OBJECTIVES:
            raise bad("objective", f"one of {', '.join(OBJECTIVES)}")
        if not (isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and self.beta > 0):
            raise bad("beta", "a number > 0, e.g. 0.1")
        if not isinstance(self.compile, bool) and self.compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise bad("compile", "True, False or a torch.compile backend name such as 'inductor' or 'aot_eager' (torch._dynamo.list_backends())")
        if self.save_every is not None and self.output_dir is None:
            raise ValueError(f"TrainConfig.save_every = {self.save_every}: checkpoints need an output_dir")


class Trainer:
    """Train `rm`'s interventions (and head) on `train_data`; see the module docstring.

    Args:
        rm: an `IntervenableModel`, on the device to train on (under torchrun with CUDA, each process
            moves it to `cuda:{LOCAL_RANK}`).
        config: a `TrainConfig` (default: `TrainConfig()`).
        train_data, eval_data: `TokenizedData` from `reft.data`, or any sequence of examples when a
            `collator` is given.
        collator: turns a list of examples into a batch dict; default: `Collator.for_data(train_data)`.
        compute_metrics: `f(predictions, labels) -> {name: float}` for `evaluate()`. Classification:
            predictions `[N]` (argmax class, or the score for regression) and labels `[N]`; causal LM:
            the argmax token and the target at every labelled position, both `[M]`.

    Example:
        >>> trainer = Trainer(rm, TrainConfig(epochs=5, output_dir="out"), data)
        >>> history = trainer.fit()
    """

    def __init__(
        self,
        rm: nn.Module,
        config: TrainConfig | None = None,
        train_data: Sequence[Any] | None = None,
        eval_data: Sequence[Any] | None = None,
        collator: Callable[[list], dict[str, torch.Tensor]] | None = None,
        compute_metrics: Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]] | None = None,
    ):
        self.rm = rm
        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a reft.TrainConfig, got {type(self.config).__name__}")
        if train_data is None:
            raise ValueError("train_data is required (e.g. reft.data.build_generation_data(tokenizer, pairs))")
        if collator is None and not isinstance(train_data, TokenizedData):
            raise ValueError(
                f"train_data is a {type(train_data).__name__}, not reft.data.TokenizedData: pass a collator= "
                "that turns a list of its examples into a batch of tensors"
            )
        self.train_data, self.eval_data = train_data, eval_data
        self.collator = collator if collator is not None else Collator.for_data(train_data)
        self.compute_metrics = compute_metrics
        if not getattr(rm, "hooked", True):
            raise ValueError("rm was remove()d: its interventions no longer run; wrap the model again to train")
        self.params = [p for p in rm.trainable_parameters()]
        if not self.params:
            raise ValueError("rm has no trainable parameters: nothing to train")
        half = [name for name, p in rm.named_parameters() if p.requires_grad and p.dtype == torch.float16]
        if self.config.precision == "fp16" and half:
            raise ValueError(
                f"precision='fp16' scales the loss with a GradScaler, which cannot unscale float16 gradients, but "
                f"{half[0]!r} is torch.float16: build the interventions with dtype=torch.float32 (the base model "
                "may stay float16), or train with precision='bf16'"
            )
        self.objective = make_objective(self.config.objective, self.config.beta)
        for name, data in (("train_data", train_data), ("eval_data", eval_data)):
            if data is not None:
                self.objective.check(rm, data, name)

        self.rank, self.world = _init_distributed(rm)
        self.device = _device_of(rm)
        for name, data in (("train_data", train_data), ("eval_data", eval_data)):
            if data is not None:
                _check_data(rm, data, name, self.world, self.config)
        if self.config.gradient_checkpointing:
            _enable_checkpointing(rm.model)
        sharded = _sharded(rm)  # a base sharded by fully_shard: no DDP; _step averages the replicated gradients
        self.ddp = _wrap_ddp(rm, self.device) if self.world > 1 and not sharded else None
        if self.world > 1 and sharded:
            for p in self.params:  # every process starts from rank 0's interventions, as DDP would make it
                dist.broadcast(p.detach(), src=0)
        self.optimizer = _optimizer(rm, self.config)
        self.total_steps = self.config.max_steps or max(1, math.ceil(self.config.epochs * self.steps_per_epoch))
        self.scheduler = _scheduler(self.optimizer, self.config, self.total_steps)
        fp16 = self.config.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=True) if fp16 else None
        self.history: list[dict] = []
        self._fitted = False
        self._lengths: list[int] | None = None  # example lengths, for group_by_length
        self._fingerprint: dict | None = None  # of train_data, recorded in checkpoints

    # ----------------------------------------------------------------- sizes
    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches each process runs per epoch (the sampler pads the data to a multiple of the world)."""
        per_rank = math.ceil(len(self.train_data) / self.world)
        return math.ceil(per_rank / self.config.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; the last one may hold fewer than grad_accum micro-batches."""
        return math.ceil(self.micro_batches_per_epoch / self.config.grad_accum)

    # ----------------------------------------------------------------- training
    def fit(self, resume_from: str | os.PathLike | None = None, allow_changes: Sequence[str] = ()) -> list[dict]:
        """Train for `max_steps` (or `epochs`); returns the history (the records also in log.jsonl).

        `resume_from`: a checkpoint folder, or `"latest"` (the newest `checkpoint-{step}` in
        output_dir, or a fresh start when there is none). Resuming restores the interventions, the
        optimizer, the schedule, the RNG states and the position in the data, so the run ends exactly
        where an uninterrupted one would. It is refused, before anything is restored, when this run's
        TrainConfig differs from the checkpoint's (every difference is named) or its train_data does;
        `allow_changes` names the fields that may differ on purpose (of lr, max_steps, epochs,
        warmup_ratio, schedule, weight_decay, max_grad_norm), e.g. `["lr", "max_steps"]`.
        Without `resume_from`, an output_dir that holds checkpoints of an earlier run is refused.

        Training stops with a FloatingPointError on a non-finite loss (nothing is saved after the last
        finite step), and with a ValueError when the first backward pass gives no trainable parameter a
        gradient (the loss does not depend on them).
        """
        cfg = self.config
        allow = check_allow_changes(allow_changes)
        if self._fitted and resume_from is None:
            raise RuntimeError(
                "fit() already ran on this Trainer (its optimizer and schedule are spent): build a new Trainer, "
                "or continue from a checkpoint with fit(resume_from=...)"
            )
        state = {"step": 0, "epoch": 0, "batches_done": 0, "history": []}
        checkpoint = self._checkpoint_to_resume(resume_from)
        if checkpoint is not None:
            state = self._load(checkpoint, allow)  # checks everything, then restores (the RNG states too)
        else:
            torch.manual_seed(cfg.seed)  # the dropout stream
        self._fitted = True
        self.history = list(state["history"])
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        if self.rank == 0 and cfg.output_dir is not None:
            _write_log(Path(cfg.output_dir) / LOG_NAME, self.history)  # drops records past the checkpoint

        model = self.ddp if self.ddp is not None else self.rm
        if cfg.compile:  # the loss and AdamW stay eager; pad batches to few lengths (Collator(pad_to_multiple_of=...))
            model = torch.compile(model, backend="inductor" if cfg.compile is True else cfg.compile)
        self._window = [torch.zeros((), device=self.device), torch.zeros((), device=self.device)]  # loss sum, count
        self._nonfinite = torch.full((), -1, dtype=torch.long, device=self.device)  # the first step whose loss was not
        self._grad_norm = None
        self._gradients_seen = False
        self._set_training(True)
        bar = _progress(self.total_steps, step, disable=self.rank != 0)
        started = self._started = time.perf_counter() - state.get("seconds", 0.0)  # a resumed run keeps counting
        try:
            while step < self.total_steps:
                batches = self._epoch_batches(epoch)
                while step < self.total_steps and batches_done < len(batches):
                    group = batches[batches_done : batches_done + cfg.grad_accum]
                    self._step(model, [self.collator([self.train_data[i] for i in idx]) for idx in group], step + 1)
                    step, batches_done = step + 1, batches_done + len(group)
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == self.total_steps:
                        record = self._log_record(step, epoch + batches_done / len(batches), started)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    last = step == self.total_steps
                    if self.eval_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                        self._record({"step": step, **self.evaluate()})
                    if cfg.save_every and (step % cfg.save_every == 0 or last):
                        self._save(step, epoch, batches_done)
                if batches_done >= len(batches):
                    epoch, batches_done = epoch + 1, 0
            self._check_finite(step)
        finally:
            bar.close()
            self._set_training(False)
        return self.history

    def _step(self, model: nn.Module, micro: list[dict[str, torch.Tensor]], step: int) -> None:
        """Optimizer step `step` (1-based) over `micro` (1..grad_accum batches); no host sync."""
        micro = [_to_device(b, self.device) for b in micro]
        counts = torch.stack([self.objective.count(b) for b in micro])  # [len(micro)]: tokens, examples or pairs
        total = counts.sum()
        if self.world > 1:
            dist.all_reduce(total)  # labelled tokens (or examples) of this step on every process
        scale = self.world / total.clamp(min=1)  # DDP averages gradients over processes: undo that
        for k, batch in enumerate(micro):
            sync = self.ddp is None or k == len(micro) - 1
            with (nullcontext() if sync else self.ddp.no_sync()):
                with self._autocast():
                    loss_sum = self.objective.loss_sum(model, self.rm, batch)
                loss = loss_sum.float() * scale
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            self._window[0] += loss_sum.detach().float()
            self._nonfinite.masked_fill_((self._nonfinite < 0) & ~torch.isfinite(loss_sum.detach()), step)
        self._window[1] += counts.sum()
        if self.world > 1 and self.ddp is None:
            _average_gradients(self.params, self.world)
        if not self._gradients_seen:
            self._check_gradients()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm is not None:
            self._grad_norm = nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._lr = self.scheduler.get_last_lr()[0]  # the lr this step used
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of example indices for `epoch`: a seeded shuffle, as
        `DistributedSampler(shuffle=True, seed)` orders them, so every process agrees without talking."""
        sampler = torch.utils.data.DistributedSampler(
            range(len(self.train_data)), num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.config.seed
        )
        sampler.set_epoch(epoch)
        order = list(sampler)
        b = self.config.batch_size
        if not self.config.group_by_length:
            return [order[i : i + b] for i in range(0, len(order), b)]
        # As transformers' LengthGroupedSampler: sort each window of 50 micro-batches (of the shuffled
        # order) longest first, cut it into micro-batches, then shuffle the micro-batches.
        if self._lengths is None:
            data = self.train_data
            self._lengths = data.lengths() if isinstance(data, TokenizedData) else [len(e["input_ids"]) for e in data]
        batches = []
        for start in range(0, len(order), 50 * b):
            window = sorted(order[start : start + 50 * b], key=lambda i: -self._lengths[i])
            batches += [window[i : i + b] for i in range(0, len(window), b)]
        shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        return [batches[i] for i in shuffle.tolist()]

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, data: Sequence[Any] | None = None) -> dict[str, float]:
        """Loss on `data` (default: eval_data), plus accuracy for classification (token accuracy for
        causal LM) and `compute_metrics`'s results, all prefixed `eval_`. Runs in eval mode.

        Under torchrun each process evaluates every world-th example and the sums are all-reduced, so
        every process returns the same numbers for the whole set.
        """
        data = data if data is not None else self.eval_data
        if data is None:
            raise ValueError("no eval_data: pass Trainer(..., eval_data=...) or evaluate(data)")
        if len(data) == 0:
            raise ValueError("eval data is empty")
        if self.objective.preference:
            return self._evaluate_preference(data)
        with eval_mode(self.rm):
            mine = list(range(self.rank, len(data), self.world))
            routed = isinstance(data[0], Mapping) and "adapter" in data[0]
            names = sorted({str(data[j].get("adapter")) for j in range(len(data))}) if routed else [""]
            sums = torch.zeros(len(names), 3, dtype=torch.float64, device=self.device)  # per adapter: loss, count, correct
            predictions, targets, kinds = [], [], set()
            for k, name in enumerate(names):  # batches of one adapter each, so each adapter is scored alone
                group = [j for j in mine if not routed or str(data[j].get("adapter")) == name]
                for i in range(0, len(group), self.config.batch_size):
                    batch = _to_device(self.collator([data[j] for j in group[i : i + self.config.batch_size]]), self.device)
                    with self._autocast():
                        logits = logits_of(self.rm, batch)
                    labels = batch["labels"]
                    kinds.add((labels.dim() == 2, labels.is_floating_point()))
                    sums[k, 0] += loss_from_logits(logits, labels).double()
                    sums[k, 1] += label_count(labels)
                    pred, target = _predictions(logits, labels)
                    if not target.is_floating_point():
                        sums[k, 2] += (pred == target).sum()
                    if self.compute_metrics is not None:
                        predictions.append(pred)
                        targets.append(target)
            if self.world > 1:
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
            if self.compute_metrics is not None:
                pred, target = (_gather(torch.cat(x)) if self.world > 1 else torch.cat(x) for x in (predictions, targets))
                result.update({f"eval_{k}": float(v) for k, v in self.compute_metrics(pred.cpu(), target.cpu()).items()})
            return result

    def _evaluate_preference(self, data: Sequence[Any]) -> dict[str, float]:
        """`eval_loss` (the objective's, per pair) and `eval_preference_accuracy` (the share of pairs
        whose chosen response is likelier than the rejected one under the edited model)."""
        with eval_mode(self.rm):
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, pairs, chosen likelier
            mine = list(range(self.rank, len(data), self.world))
            for i in range(0, len(mine), self.config.batch_size):
                batch = _to_device(self.collator([data[j] for j in mine[i : i + self.config.batch_size]]), self.device)
                with self._autocast():
                    loss_sum, correct = self.objective.evaluate_sums(self.rm, batch)
                sums += torch.stack([loss_sum.double(), self.objective.count(batch).double(), correct.double()])
            if self.world > 1:
                dist.all_reduce(sums)
            loss, count, correct = sums.tolist()
            return {"eval_loss": loss / max(count, 1), "eval_preference_accuracy": correct / max(count, 1)}

    # ----------------------------------------------------------------- logging and checkpoints
    def _check_gradients(self) -> None:
        """After the first backward pass: some trainable parameter must have received a gradient."""
        if all(p.grad is None for p in self.params):
            raise ValueError(
                f"no trainable parameter received a gradient in the first step (all {len(self.params)} have grad None): "
                f"the loss does not depend on the interventions. The base model ({type(self.rm.model).__name__}) may run "
                "layers that autograd cannot differentiate (e.g. quantized with torch.ao.quantization.quantize_dynamic: "
                "train on the float model), or the edited sites are not on the way to the loss"
            )
        self._gradients_seen = True

    def _check_finite(self, step: int, parameters: bool = False) -> None:
        """Stop on a non-finite loss since the last check (and, before a save, non-finite parameters)."""
        flag = self._nonfinite.clone()
        if parameters and self.params:
            finite = torch.stack([torch.isfinite(p.detach()).all() for p in self.params]).all()
            flag = torch.where((flag < 0) & ~finite, step, flag)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = int(flag)  # a host sync, at the log, save and end points only
        if bad < 0:
            return
        from .checkpoint import latest_checkpoint

        kept = latest_checkpoint(self.config.output_dir) if self.config.output_dir is not None else None
        raise FloatingPointError(
            f"the loss (or a parameter) at step {bad} is not finite (nan or inf): training stopped at step {step}, "
            f"saving nothing after it; the last checkpoint, from before, is {kept or 'none (no checkpoint was saved)'}. "
            f"Lower the learning rate (lr={self.config.lr:g}), train in fp32 or bf16 rather than fp16 "
            f"(precision={self.config.precision!r}), or look for extreme values in the data"
        )

    def _log_record(self, step: int, epoch: float, started: float) -> dict:
        self._check_finite(step)
        window = torch.stack(self._window)
        if self.world > 1:
            dist.all_reduce(window)
        loss_sum, count = window.tolist()  # the host sync, once per log_every steps
        record = {
            "step": step,
            "epoch": round(epoch, 4),
            "loss": loss_sum / max(count, 1),
            "lr": self._lr,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if self._grad_norm is not None:
            record["grad_norm"] = float(self._grad_norm)
        for t in self._window:
            t.zero_()
        self._record(record)
        return record

    def _record(self, record: dict) -> None:
        self.history.append(record)
        if self.rank == 0 and self.config.output_dir is not None:
            _append_line(Path(self.config.output_dir) / LOG_NAME, json.dumps(record) + "\n")

    def _save(self, step: int, epoch: int, batches_done: int) -> None:
        from .checkpoint import save_training_checkpoint

        self._check_finite(step, parameters=True)  # a checkpoint only of finite parameters
        # Every process's own RNG states (dropout at every token draws a batch-dependent amount, so
        # the processes' streams part ways); the checkpoint's own RNG record is rank 0's.
        process_rng = None
        if self.world > 1:
            process_rng = [None] * self.world
            dist.all_gather_object(process_rng, _process_rng())
        if self.rank == 0:
            state = {
                "process_rng": process_rng,
                "step": step,
                "epoch": epoch,
                "batches_done": batches_done,
                "history": self.history,
                "seconds": time.perf_counter() - self._started,
                "world_size": self.world,
                "config": {**asdict(self.config), "output_dir": str(self.config.output_dir)},
                "data": self._data_fingerprint(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            }
            save_training_checkpoint(Path(self.config.output_dir) / f"checkpoint-{step}", self.rm, self.optimizer, self.scheduler, state)
        if self.world > 1:
            dist.barrier()  # a resumed job then finds the checkpoint on every process

    def _checkpoint_to_resume(self, resume_from) -> str | None:
        from .checkpoint import checkpoints, latest_checkpoint

        output_dir = self.config.output_dir
        if resume_from is None:
            found = checkpoints(output_dir) if output_dir is not None else []
            if found:
                names = [Path(path).name for _, path in found]
                raise ValueError(
                    f"output_dir {str(output_dir)!r} holds checkpoints of an earlier run ({short(names)}): continue that "
                    "run with fit(resume_from='latest') (reft train --resume latest), or train into another output_dir"
                )
            return None
        if str(resume_from) == "latest":
            if output_dir is None:
                raise ValueError("resume_from='latest' looks in output_dir, but TrainConfig.output_dir is None")
            return latest_checkpoint(output_dir)
        if not Path(resume_from).is_dir():
            raise FileNotFoundError(f"resume_from={str(resume_from)!r}: no such checkpoint folder")
        return str(resume_from)

    def _load(self, path: str, allow: set[str]) -> dict:
        """Check that the checkpoint at `path` continues this run, then restore it; returns its state."""
        from .checkpoint import read_training_state, load_training_checkpoint

        state = read_training_state(path)
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}  # older checkpoints: none
        self._check_resume(path, state, saved, allow)
        process_rng = _checked_process_rng(state.get("process_rng"), self.rank, self.world, path)
        scaler = state.get("scaler")
        if self.scaler is not None and scaler is not None and not (
            isinstance(scaler, dict) and set(scaler) == set(self.scaler.state_dict())
        ):
            raise ValueError(f"{path}: malformed fp16 loss-scaler state {short(scaler)}")
        fresh_decay = [g["weight_decay"] for g in self.optimizer.param_groups]
        state = load_training_checkpoint(path, self.rm, self.optimizer, self.scheduler)  # checks, then restores
        self._apply_changes(saved, allow, fresh_decay)
        if self.scaler is not None and scaler:
            self.scaler.load_state_dict(scaler)
        if process_rng is not None:
            _set_process_rng(process_rng)
        return state

    def _check_resume(self, path: str, state: dict, saved: dict, allow: set[str]) -> None:
        """Errors, before anything is restored, for a checkpoint this run cannot continue."""
        mine = asdict(self.config)
        differ = [k for k in mine if k in saved and k not in _BOOKKEEPING and saved[k] != mine[k]]
        refused = [k for k in differ if k not in allow]
        if refused:
            listing = "; ".join(f"saved with {k}={short(saved[k])}, this run has {k}={short(mine[k])}" for k in refused)
            fixed = [k for k in refused if k not in _CHANGEABLE]
            hint = (
                f"resuming needs the same {', '.join(fixed)} (the data order and the numerics)"
                if fixed
                else f"to change them on purpose, pass fit(..., allow_changes={refused!r}) "
                f"(reft train ... {' '.join('--allow-change ' + k for k in refused)})"
            )
            raise ValueError(f"{path}: {listing}: {hint}")
        data = state.get("data")
        if isinstance(data, dict):
            mine_data = self._data_fingerprint()
            if data != mine_data:
                raise ValueError(
                    f"{path}: the checkpoint was trained on {short(data.get('examples'))} examples (sha256 "
                    f"{str(data.get('sha256'))[:12]}...), this run's train_data has {mine_data['examples']} (sha256 "
                    f"{mine_data['sha256'][:12]}...): a resumed run continues on the same data; train a new run, "
                    "in another output_dir, on other data"
                )
        if state.get("world_size") != self.world:
            raise ValueError(f"{path}: saved with {short(state.get('world_size'))} processes, this run has {self.world}")
        for key in ("step", "epoch", "batches_done"):
            if not (_is_int(state.get(key)) and state[key] >= 0):
                raise ValueError(f"{path}: malformed training state: {key} = {short(state.get(key))}, expected an int >= 0")
        if not isinstance(state.get("history"), list):
            raise ValueError(f"{path}: malformed training state: history = {short(state.get('history'))}, expected a list")
        if state["step"] >= self.total_steps:
            limit = f"max_steps={self.config.max_steps}" if self.config.max_steps else f"epochs={self.config.epochs:g}"
            raise ValueError(
                f"{path} is at step {state['step']}, and this run trains {self.total_steps} steps ({limit}): nothing is "
                "left to train. To train further, raise max_steps and allow it: fit(..., allow_changes=['max_steps']) "
                "(reft train ... --set train.max_steps=N --allow-change max_steps)"
            )

    def _apply_changes(self, saved: dict, allow: set[str], fresh_decay: list[float]) -> None:
        """Put the allowed changes of this run's config over the restored optimizer and schedule."""
        mine = asdict(self.config)
        changed = {k for k in allow if k in saved and saved[k] != mine[k]}
        groups = self.optimizer.param_groups
        if changed & {"lr", "max_steps", "epochs", "warmup_ratio", "schedule"}:  # the schedule from here on
            sched = self.scheduler
            sched.base_lrs = [self.config.lr] * len(groups)
            lrs = [base * factor(sched.last_epoch) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
            for group, lr in zip(groups, lrs):
                group["initial_lr"], group["lr"] = self.config.lr, lr
            sched._last_lr = lrs
        if "weight_decay" in changed:
            for group, decay in zip(groups, fresh_decay):
                group["weight_decay"] = decay

    def _data_fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.train_data)
        return self._fingerprint

    # ----------------------------------------------------------------- modes
    def _set_training(self, training: bool) -> None:
        """Interventions and head in train mode; the frozen base model in eval mode unless base_dropout."""
        self.rm.train(training)
        if training and not self.config.base_dropout:
            self.rm.model.eval()
            heads = {h for c in getattr(self.rm, "reft_config", {}).values() for h in c.head}
            for path in heads:
                self.rm.model.get_submodule(path).train()
            if self.config.gradient_checkpointing:  # the checkpointed layers alone: their dropout stays off
                for m in self.rm.model.modules():
                    if getattr(m, "gradient_checkpointing", False) is True:
                        m.training = True

    def _autocast(self):
        dtype = _PRECISIONS[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params)
        where = f"{self.world} processes" if self.world > 1 else str(self.device)
        return (
            f"Trainer({n:,} trainable params on {where}, {len(self.train_data)} examples, "
            f"{self.total_steps} steps x {self.config.batch_size * self.config.grad_accum * self.world} examples, "
            f"lr {self.config.lr:g} {self.config.schedule})"
        )


# =================================================================== evaluation
def _predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(predictions, targets)`: per example, or at every labelled token (flattened)."""
    if labels.dim() == 2:
        keep = labels[:, 1:] != IGNORE_INDEX
        return logits[:, :-1].argmax(-1)[keep], labels[:, 1:][keep]
    if labels.is_floating_point():
        return logits.reshape(labels.shape).float(), labels
    return logits.argmax(-1), labels


# =================================================================== setup
def _optimizer(rm: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices that are not R (orthonormal rows): decaying R stalls LoReFT."""
    orthonormal = {id(p) for m in rm.modules() if isinstance(m, OrthonormalRows) for p in m.parameters()}
    decay, no_decay = [], []
    for p in rm.trainable_parameters():
        (decay if p.dim() >= 2 and id(p) not in orthonormal else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # one fused kernel for every tensor: about 2 ms less a step with 30 LoReFT sites (bench/RESULTS.md)
        return torch.optim.AdamW(groups, lr=config.lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype that fused AdamW does not support
        return torch.optim.AdamW(groups, lr=config.lr)


def _scheduler(optimizer, config: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(config.warmup_ratio * total)
    schedule = config.schedule

    def factor(step: int) -> float:  # the lr of step `step` (0-based) as a fraction of config.lr
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _check_data(rm: nn.Module, data: Sequence[Any], name: str, world: int, config: TrainConfig) -> None:
    """Errors, before any training, for an empty dataset, examples past the model's context, bad labels."""
    if len(data) == 0:
        raise ValueError(f"{name} is empty: give at least one example")
    if not _has_labelled_token(data):
        raise ValueError(
            f"{name}: none of its {len(data)} examples has a labelled token (every label is {IGNORE_INDEX}): "
            "the loss would be 0 and nothing would be learned; check that the responses are not empty or masked out"
        )
    if not isinstance(data, TokenizedData):
        return
    model_config = getattr(rm.model, "config", None)
    context = _context_length(model_config)
    longest = max(data.lengths())
    if context is not None and longest > context:
        i = data.lengths().index(longest)
        raise ValueError(
            f"{name}: example {i} has {longest} tokens, but the model's context is {context}; rebuild the data "
            f"with max_length={context} (and on_too_long='skip' to drop the long ones)"
        )
    if data.task == "classification":
        num_labels = getattr(model_config, "num_labels", None)
        labels = torch.stack([e["labels"] for e in data.examples])
        if labels.is_floating_point():
            if num_labels not in (None, 1):
                raise ValueError(f"{name}: float (regression) labels, but the model's head has {num_labels} outputs (needs 1)")
        elif num_labels is not None:
            bad = (labels < 0) | (labels >= num_labels)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(
                    f"{name}: example {i} has label {int(labels[i])}, out of range for the model's head with "
                    f"{num_labels} classes (valid: 0..{num_labels - 1}); build the model with num_labels={int(labels.max()) + 1}"
                )


def _context_length(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device_of(rm: nn.Module) -> torch.device:
    """Where batches go: the base model's execution device (accelerate's, when it dispatched the model;
    its offloaded weights are on `meta`), else its first real parameter's."""
    from .model import execution_device

    return execution_device(rm.model, rm.model)


def _init_distributed(rm: nn.Module) -> tuple[int, int]:
    """`(rank, world size)`; under torchrun, joins the process group (nccl on CUDA, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return 0, 1
    if not dist.is_initialized():
        cuda = _device_of(rm).type == "cuda"
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            rm.to(f"cuda:{local}")
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _wrap_ddp(rm: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters only: the frozen base is loaded alike on every process and is
    neither broadcast nor synchronised."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in rm.named_parameters() if not p.requires_grad] + [n for n, _ in rm.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(rm, frozen)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(rm, device_ids=ids)


def _sharded(rm: nn.Module) -> bool:
    """Whether `rm`'s base model holds parameters sharded by FSDP2's `fully_shard` (DTensors).

    The trainable ones must not be: the Trainer keeps them replicated and averages their gradients.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return False
    sharded = [(name, p.requires_grad) for name, p in rm.named_parameters() if isinstance(p, DTensor)]
    trained = [name for name, requires_grad in sharded if requires_grad]
    if trained:
        raise ValueError(
            f"trainable parameter {trained[0]!r} is sharded by fully_shard: shard the base model (its layers, then "
            "the model itself) before wrapping it, never the IntervenableModel; keep a trained head out with "
            "fully_shard(model, ignored_params=set(head.parameters())) (docs/distributed.md)"
        )
    return bool(sharded)


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average the replicated parameters' gradients over the processes, as DDP would: one all-reduce
    per dtype. A parameter that no process gave a gradient keeps None (AdamW skips it, as in one
    process); one that only some did gets zeros from the others."""
    groups: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    for group in groups.values():
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
        has = torch.tensor([p.grad is not None for p in group], dtype=group[0].dtype, device=grads[0].device)
        flat = torch.cat([*grads, has])  # [sum of sizes + len(group)]: one message
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p, given in zip(group, (flat[-len(group):] > 0).tolist()):  # the step's one host sync here
            p.grad = flat[offset : offset + p.numel()].view_as(p) if given else None
            offset += p.numel()


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a CPU batch to `device`; pinned first on CUDA, so the copy does not stall the host."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _enable_checkpointing(model: nn.Module) -> None:
    """Turn on the base model's gradient checkpointing (non-reentrant), or say why it cannot be."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"TrainConfig.gradient_checkpointing = True: {type(model).__name__} does not support gradient checkpointing"
        )
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D tensors of different lengths from every process (for compute_metrics)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def check_allow_changes(allow_changes: Sequence[str]) -> set[str]:
    if isinstance(allow_changes, str):
        allow_changes = [allow_changes]
    bad = [k for k in allow_changes if k not in _CHANGEABLE]
    if bad:
        raise ValueError(
            f"allow_changes: {short(bad)} cannot change when a run resumes; the fields that can: {', '.join(_CHANGEABLE)} "
            "(batch_size, grad_accum, seed and group_by_length decide the data order; precision and base_dropout "
            "the numerics)"
        )
    return set(allow_changes)


def _has_labelled_token(data: Sequence[Any]) -> bool:
    """Whether some example carries a label that is not IGNORE_INDEX (for token labels `[n]`, past the
    first token, which nothing predicts). Usually decided by the first example."""
    for i in range(len(data)):
        example = data[i]
        labels = example.get("labels") if isinstance(example, AbcMapping) else None
        if labels is None:
            return True  # examples this loop cannot read: the collator's business
        labels = torch.as_tensor(labels)
        if labels.dim() == 1:
            labels = labels[1:]
        if bool((labels != IGNORE_INDEX).any()):
            return True
    return False


def _fingerprint(data: Sequence[Any]) -> dict:
    """`{"examples": n, "sha256": ...}` of a dataset: its examples' tensors, strings and numbers, in order
    (other values count by their type only)."""
    h = hashlib.sha256()
    for i in range(len(data)):
        _hash_into(h, data[i])
    return {"examples": len(data), "sha256": h.hexdigest()}


def _hash_into(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, AbcMapping):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(f"{key!s}:".encode())
            _hash_into(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _hash_into(h, item)
        h.update(b"]")
    elif isinstance(value, (str, int, float, bool)) or value is None:
        h.update(f"{type(value).__name__} {value!r};".encode())
    else:
        h.update(f"<{type(value).__qualname__}>;".encode())


def _process_rng() -> dict[str, str]:
    """This process's torch RNG states (CPU, and its current CUDA device's) as base64 text, for JSON."""
    encode = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    rng = {"cpu": encode(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = encode(torch.cuda.get_rng_state())
    return rng


def _checked_process_rng(value: Any, rank: int, world: int, path: str) -> dict[str, torch.Tensor] | None:
    """This process's saved RNG states (`state["process_rng"][rank]`), decoded and tried on scratch
    generators, or a ValueError: a bad state fails before anything is restored."""
    if value is None:
        return None
    try:
        if not (isinstance(value, list) and len(value) == world and isinstance(value[rank], dict)):
            raise ValueError(f"expected a list of {world} dicts, got {short(value)}")
        rng = {k: torch.frombuffer(bytearray(base64.b64decode(v, validate=True)), dtype=torch.uint8) for k, v in value[rank].items()}
        torch.Generator().set_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available() and rng["cuda"].shape != torch.cuda.get_rng_state().shape:
            raise ValueError(f"a CUDA state of {rng['cuda'].numel()} bytes")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # binascii.Error is a ValueError
        raise ValueError(f"{path}: process {rank}'s saved RNG state cannot be restored ({str(e)[:200]}); nothing was restored") from None
    return rng


def _set_process_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _progress(total: int, initial: int, disable: bool):
    from ._progress import progress_bar

    return progress_bar(total, initial=initial, disable=disable, desc="train")


def _write_log(path: Path, records: list[dict]) -> None:
    """Rewrite log.jsonl with `records` (atomically), e.g. after resuming from a checkpoint."""
    from ._files import write_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))


def _append_line(path: Path, line: str) -> None:
    """Append `line` to `path` whole or not at all: a write cut short (a full disk) is truncated away,
    and a line cut short before (a crash mid-write) is dropped first, so the file holds whole lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = line.encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        if end:
            size = min(end, 1 << 16)
            os.lseek(fd, end - size, os.SEEK_SET)
            tail = os.read(fd, size)
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                if cut >= 0 or size == end:
                    end = end - size + cut + 1
                    os.ftruncate(fd, end)
                else:
                    data = b"\n" + data  # a cut line longer than we look back: leave it on its own line
        os.lseek(fd, end, os.SEEK_SET)
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as e:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
            raise OSError(e.errno, f"{e.strerror}; the record was not logged, the log keeps its whole lines", str(path)) from None
    finally:
        os.close(fd)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    """An int or float that is not a bool nor NaN (comparisons with NaN are all False anyway)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
