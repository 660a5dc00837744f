"""`TrainConfig` and `Trainer`: a thin training loop for interventions (and an optional task head).

The loop is ours, not a subclass of Hugging Face's `Trainer`: AdamW over `rm.trainable_parameters()`
only, a warm-up + decay schedule, gradient accumulation with exact token-count normalisation, autocast
precision, periodic logging / evaluation / checkpoints. The same script runs on one CPU, one GPU, or
many processes under `torchrun` (DDP over the trainable parameters, a distributed sampler, logs and
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
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .data import IGNORE_INDEX, Collator, TokenizedData
from .evaluate import _eval_mode
from .interventions.base import OrthonormalRows
from .objectives import OBJECTIVES, _label_count, _logits, _loss_from_logits, make_objective

_SCHEDULES = ("linear", "cosine", "constant")
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG_NAME = "log.jsonl"


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
    objective: str = "ce"  # "ce" (cross-entropy), or "dpo" / "reps" on preference pairs (reft.objectives)
    beta: float = 0.1  # DPO's weight on the log-probability margin

    def __post_init__(self):
        def bad(name: str, valid: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} = {getattr(self, name)!r}: must be {valid}")

        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise bad("lr", "a number in (0, 1), e.g. 4e-3")
        if self.max_steps is None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise bad("epochs", "a positive number (or set max_steps)")
        if self.max_steps is not None and not (_is_int(self.max_steps) and self.max_steps >= 1):
            raise bad("max_steps", "an int >= 1 or None")
        for name in ("batch_size", "grad_accum", "log_every"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an int >= 1")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) is not None and not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an int >= 1 or None")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise bad("warmup_ratio", "a number in [0, 1)")
        if self.schedule not in _SCHEDULES:
            raise bad("schedule", f"one of {', '.join(_SCHEDULES)}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise bad("weight_decay", "a number >= 0")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0):
            raise bad("max_grad_norm", "a number > 0 or None")
        if self.precision not in _PRECISIONS:
            raise bad("precision", f"one of {', '.join(_PRECISIONS)}")
        if not _is_int(self.seed):
            raise bad("seed", "an int")
        if self.objective not in OBJECTIVES:
            raise bad("objective", f"one of {', '.join(OBJECTIVES)}")
        if not (isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and self.beta > 0):
            raise bad("beta", "a number > 0, e.g. 0.1")
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
        self.params = [p for p in rm.trainable_parameters()]
        if not self.params:
            raise ValueError("rm has no trainable parameters: nothing to train")
        self.objective = make_objective(self.config.objective, self.config.beta)
        for name, data in (("train_data", train_data), ("eval_data", eval_data)):
            if data is not None:
                self.objective.check(rm, data, name)

        self.rank, self.world = _init_distributed(rm)
        self.device = _device_of(rm)
        for name, data in (("train_data", train_data), ("eval_data", eval_data)):
            if data is not None:
                _check_data(rm, data, name, self.world, self.config)
        self.ddp = _wrap_ddp(rm, self.device) if self.world > 1 else None
        self.optimizer = _optimizer(rm, self.config)
        self.total_steps = self.config.max_steps or max(1, math.ceil(self.config.epochs * self.steps_per_epoch))
        self.scheduler = _scheduler(self.optimizer, self.config, self.total_steps)
        fp16 = self.config.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=True) if fp16 else None
        self.history: list[dict] = []
        self._fitted = False
        self._lengths: list[int] | None = None  # example lengths, for group_by_length

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
    def fit(self, resume_from: str | os.PathLike | None = None) -> list[dict]:
        """Train for `max_steps` (or `epochs`); returns the history (the records also in log.jsonl).

        `resume_from`: a checkpoint folder, or `"latest"` (the newest `checkpoint-{step}` in
        output_dir, or a fresh start when there is none). Resuming restores the interventions, the
        optimizer, the schedule, the RNG states and the position in the data, so the run ends exactly
        where an uninterrupted one would.
        """
        cfg = self.config
        if self._fitted and resume_from is None:
            raise RuntimeError(
                "fit() already ran on this Trainer (its optimizer and schedule are spent): build a new Trainer, "
                "or continue from a checkpoint with fit(resume_from=...)"
            )
        self._fitted = True
        torch.manual_seed(cfg.seed)  # the dropout stream; a resumed run restores its own below
        state = {"step": 0, "epoch": 0, "batches_done": 0, "history": []}
        checkpoint = self._checkpoint_to_resume(resume_from)
        if checkpoint is not None:
            state = self._load(checkpoint)
        self.history = list(state["history"])
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        if self.rank == 0 and cfg.output_dir is not None:
            _write_log(Path(cfg.output_dir) / LOG_NAME, self.history)  # drops records past the checkpoint

        model = self.ddp if self.ddp is not None else self.rm
        self._window = [torch.zeros((), device=self.device), torch.zeros((), device=self.device)]  # loss sum, count
        self._grad_norm = None
        self._set_training(True)
        bar = _progress(self.total_steps, step, disable=self.rank != 0)
        started = self._started = time.perf_counter() - state.get("seconds", 0.0)  # a resumed run keeps counting
        try:
            while step < self.total_steps:
                batches = self._epoch_batches(epoch)
                while step < self.total_steps and batches_done < len(batches):
                    group = batches[batches_done : batches_done + cfg.grad_accum]
                    self._step(model, [self.collator([self.train_data[i] for i in idx]) for idx in group])
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
        finally:
            bar.close()
            self._set_training(False)
        return self.history

    def _step(self, model: nn.Module, micro: list[dict[str, torch.Tensor]]) -> None:
        """One optimizer step over `micro` (1..grad_accum batches); no host sync."""
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
        self._window[1] += counts.sum()
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
        with _eval_mode(self.rm):
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, count, correct
            predictions, targets, token_level, regression = [], [], False, False
            mine = list(range(self.rank, len(data), self.world))
            b = self.config.batch_size
            for i in range(0, len(mine), b):
                batch = self.collator([data[j] for j in mine[i : i + b]])
                batch = _to_device(batch, self.device)
                with self._autocast():
                    logits = _logits(self.rm, batch)
                labels = batch["labels"]
                token_level, regression = labels.dim() == 2, labels.is_floating_point()
                sums[0] += _loss_from_logits(logits, labels).double()
                sums[1] += _label_count(labels)
                pred, target = _predictions(logits, labels)
                if not target.is_floating_point():
                    sums[2] += (pred == target).sum()
                if self.compute_metrics is not None:
                    predictions.append(pred)
                    targets.append(target)
            if self.world > 1:
                dist.all_reduce(sums)
            loss, count, correct = sums.tolist()
            result = {"eval_loss": loss / max(count, 1)}
            if not regression:
                result["eval_token_accuracy" if token_level else "eval_accuracy"] = correct / max(count, 1)
            if self.compute_metrics is not None:
                pred, target = (_gather(torch.cat(x)) if self.world > 1 else torch.cat(x) for x in (predictions, targets))
                result.update({f"eval_{k}": float(v) for k, v in self.compute_metrics(pred.cpu(), target.cpu()).items()})
            return result

    def _evaluate_preference(self, data: Sequence[Any]) -> dict[str, float]:
        """`eval_loss` (the objective's, per pair) and `eval_preference_accuracy` (the share of pairs
        whose chosen response is likelier than the rejected one under the edited model)."""
        with _eval_mode(self.rm):
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
    def _log_record(self, step: int, epoch: float, started: float) -> dict:
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
            path = Path(self.config.output_dir) / LOG_NAME
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _save(self, step: int, epoch: int, batches_done: int) -> None:
        from .checkpoint import save_training_checkpoint

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
                "config": asdict(self.config),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            }
            save_training_checkpoint(Path(self.config.output_dir) / f"checkpoint-{step}", self.rm, self.optimizer, self.scheduler, state)
        if self.world > 1:
            dist.barrier()  # a resumed job then finds the checkpoint on every process

    def _checkpoint_to_resume(self, resume_from) -> str | None:
        from .checkpoint import latest_checkpoint

        if resume_from is None:
            return None
        if str(resume_from) == "latest":
            if self.config.output_dir is None:
                raise ValueError("resume_from='latest' looks in output_dir, but TrainConfig.output_dir is None")
            return latest_checkpoint(self.config.output_dir)
        if not Path(resume_from).is_dir():
            raise FileNotFoundError(f"resume_from={str(resume_from)!r}: no such checkpoint folder")
        return str(resume_from)

    def _load(self, path: str) -> dict:
        from .checkpoint import load_training_checkpoint

        state = load_training_checkpoint(path, self.rm, self.optimizer, self.scheduler)
        saved = state.get("config", {})
        for key in ("batch_size", "grad_accum", "seed"):
            if saved.get(key) != getattr(self.config, key):
                raise ValueError(
                    f"{path}: saved with {key}={saved.get(key)!r}, this run has {key}={getattr(self.config, key)!r}; "
                    "resuming needs the same data order: use the same batch_size, grad_accum and seed"
                )
        if state.get("world_size") != self.world:
            raise ValueError(f"{path}: saved with {state.get('world_size')} processes, this run has {self.world}")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("process_rng"):
            _set_process_rng(state["process_rng"][self.rank])
        return state

    # ----------------------------------------------------------------- modes
    def _set_training(self, training: bool) -> None:
        """Interventions and head in train mode; the frozen base model in eval mode unless base_dropout."""
        self.rm.train(training)
        if training and not self.config.base_dropout:
            self.rm.model.eval()
            for path in getattr(self.rm, "head", []):
                self.rm.model.get_submodule(path).train()

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
    return next(rm.model.parameters()).device


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


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a CPU batch to `device`; pinned first on CUDA, so the copy does not stall the host."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


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


def _process_rng() -> dict[str, str]:
    """This process's torch RNG states (CPU, and its current CUDA device's) as base64 text, for JSON."""
    encode = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    rng = {"cpu": encode(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = encode(torch.cuda.get_rng_state())
    return rng


def _set_process_rng(rng: dict[str, str]) -> None:
    decode = lambda text: torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(decode(rng["cpu"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(rng["cuda"]))


def _progress(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc="train", dynamic_ncols=True)


def _write_log(path: Path, records: list[dict]) -> None:
    """Rewrite log.jsonl with `records` (atomically), e.g. after resuming from a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
