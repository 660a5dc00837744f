"""`Trainer`: a thin training loop for interventions (and an optional task head).

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

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._batches import check_data, epoch_batches, example_lengths, to_device
from ._distributed import average_gradients, device_of, init_distributed, sharded, wrap_ddp
from ._errors import short
from ._evaluation import evaluate, evaluate_preference
from ._files import append_line, write_file
from ._optim import make_optimizer, make_scheduler
from ._precision import autocast
from ._resume import apply_changes, check_allow_changes, check_resume, checked_process_rng, checkpoint_to_resume
from ._resume import data_fingerprint, process_rng_state, set_process_rng
from .checkpoint import latest_checkpoint, load_training_checkpoint, read_training_state, save_training_checkpoint
from .data import Collator, TokenizedData
from .objectives import make_objective
from .train_config import TrainConfig

LOG_NAME = "log.jsonl"


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

        self.rank, self.world = init_distributed(rm)
        self.device = device_of(rm)
        for name, data in (("train_data", train_data), ("eval_data", eval_data)):
            if data is not None:
                check_data(rm, data, name)
        if self.config.gradient_checkpointing:
            _enable_checkpointing(rm.model)
        is_sharded = sharded(rm)  # a base sharded by fully_shard: no DDP; _step averages the replicated gradients
        self.ddp = wrap_ddp(rm, self.device) if self.world > 1 and not is_sharded else None
        if self.world > 1 and is_sharded:
            for p in self.params:  # every process starts from rank 0's interventions, as DDP would make it
                dist.broadcast(p.detach(), src=0)
        self.optimizer = make_optimizer(rm, self.config)
        self.total_steps = self.config.max_steps or max(1, math.ceil(self.config.epochs * self.steps_per_epoch))
        self.scheduler = make_scheduler(self.optimizer, self.config, self.total_steps)
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
        checkpoint = checkpoint_to_resume(resume_from, self.config.output_dir)
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
        micro = [to_device(b, self.device) for b in micro]
        # Routing by index over all adapters: to a compiled model a list of names is a guard (a new graph per
        # list), a tensor is data; and compiled or not, every adapter gets a gradient (zero where no row uses it).
        micro = [{**b, "adapter_names": self.rm.adapter_index(b["adapter_names"]).to(self.device)}
                 if isinstance(b.get("adapter_names"), list) else b for b in micro]
        counts = torch.stack([self.objective.count(b) for b in micro])  # [len(micro)]: tokens, examples or pairs
        total = counts.sum()
        if self.world > 1:
            dist.all_reduce(total)  # labelled tokens (or examples) of this step on every process
        scale = self.world / total.clamp(min=1)  # DDP averages gradients over processes: undo that
        for k, batch in enumerate(micro):
            sync = self.ddp is None or k == len(micro) - 1
            with (nullcontext() if sync else self.ddp.no_sync()):
                with autocast(self.device, self.config.precision):
                    loss_sum = self.objective.loss_sum(model, self.rm, batch)
                loss = loss_sum.float() * scale
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            self._window[0] += loss_sum.detach().float()
            self._nonfinite.masked_fill_((self._nonfinite < 0) & ~torch.isfinite(loss_sum.detach()), step)
        self._window[1] += counts.sum()
        if self.world > 1 and self.ddp is None:
            average_gradients(self.params, self.world)
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
        """This process's micro-batches of example indices for `epoch` (`reft._batches.epoch_batches`)."""
        if self.config.group_by_length and self._lengths is None:
            self._lengths = example_lengths(self.train_data)
        cfg = self.config
        return epoch_batches(len(self.train_data), epoch, world=self.world, rank=self.rank, batch_size=cfg.batch_size,
                             seed=cfg.seed, lengths=self._lengths if cfg.group_by_length else None)

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
        where = dict(batch_size=self.config.batch_size, device=self.device, precision=self.config.precision, rank=self.rank, world=self.world)
        if self.objective.preference:
            return evaluate_preference(self.rm, data, self.collator, self.objective, **where)
        return evaluate(self.rm, data, self.collator, compute_metrics=self.compute_metrics, **where)

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
            append_line(Path(self.config.output_dir) / LOG_NAME, json.dumps(record) + "\n")

    def _save(self, step: int, epoch: int, batches_done: int) -> None:
        self._check_finite(step, parameters=True)  # a checkpoint only of finite parameters
        # Every process's own RNG states (dropout at every token draws a batch-dependent amount, so
        # the processes' streams part ways); the checkpoint's own RNG record is rank 0's.
        process_rng = None
        if self.world > 1:
            process_rng = [None] * self.world
            dist.all_gather_object(process_rng, process_rng_state())
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

    def _load(self, path: str, allow: set[str]) -> dict:
        """Check that the checkpoint at `path` continues this run, then restore it; returns its state."""
        state = read_training_state(path)
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}  # older checkpoints: none
        check_resume(path, state, saved, allow, self.config, world=self.world, total_steps=self.total_steps,
                     fingerprint=self._data_fingerprint)
        process_rng = checked_process_rng(state.get("process_rng"), self.rank, self.world, path)
        scaler = state.get("scaler")
        if self.scaler is not None and scaler is not None and not (
            isinstance(scaler, dict) and set(scaler) == set(self.scaler.state_dict())
        ):
            raise ValueError(f"{path}: malformed fp16 loss-scaler state {short(scaler)}")
        fresh_decay = [g["weight_decay"] for g in self.optimizer.param_groups]
        state = load_training_checkpoint(path, self.rm, self.optimizer, self.scheduler)  # checks, then restores
        apply_changes(self.optimizer, self.scheduler, self.config, saved, allow, fresh_decay)
        if self.scaler is not None and scaler:
            self.scaler.load_state_dict(scaler)
        if process_rng is not None:
            set_process_rng(process_rng)
        return state

    def _data_fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.train_data)
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

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params)
        where = f"{self.world} processes" if self.world > 1 else str(self.device)
        return (
            f"Trainer({n:,} trainable params on {where}, {len(self.train_data)} examples, "
            f"{self.total_steps} steps x {self.config.batch_size * self.config.grad_accum * self.world} examples, "
            f"lr {self.config.lr:g} {self.config.schedule})"
        )


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


def _progress(total: int, initial: int, disable: bool):
    from ._progress import progress_bar

    return progress_bar(total, initial=initial, disable=disable, desc="train")


def _write_log(path: Path, records: list[dict]) -> None:
    """Rewrite log.jsonl with `records` (atomically), e.g. after resuming from a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
