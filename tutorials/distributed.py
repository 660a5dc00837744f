"""Distributed training with torchrun: the same script on one process, several CPU processes or GPUs.

Nothing in the script is distributed-specific except "save on rank 0". `reft.Trainer` notices
torchrun (its WORLD_SIZE), joins the process group (gloo on CPU, nccl on GPU), wraps the interventions
and the head in DistributedDataParallel (the frozen base model is loaded by every process and never
synchronised), gives each process its share of every batch with a distributed sampler, and logs on
rank 0 only. The global batch is batch_size x grad_accum x processes; here batch_size is divided by
the number of processes, so every run below takes the same optimizer steps on the same data and ends
with the same interventions (up to floating-point summation order).

    python tutorials/distributed.py                                  # one process
    torchrun --nproc_per_node=2 tutorials/distributed.py             # two CPU processes (gloo)
    torchrun --nproc_per_node=4 tutorials/distributed.py --device cuda   # four GPUs (nccl)
    torchrun --nproc_per_node=2 tutorials/distributed.py --tiny      # a few steps (CI)

A recipe runs the same way: `torchrun --nproc_per_node=2 -m reft.cli train configs/minilm_sentiment_loreft.yaml`.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

import torch
from torch import nn
import torch.distributed as dist

import reft
from reft.assets import load_minilm_classifier, rotten_tomatoes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="64 examples, 2 steps (CI)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (each process takes cuda:LOCAL_RANK)")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--output", default=None, help="where rank 0 saves the adapter (default: a temporary folder)")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the {world} processes")

    # Every process builds the same model and interventions (same seed) and reads the same data.
    torch.manual_seed(0)
    model, tokenizer = load_minilm_classifier(num_labels=2)
    model.bert.pooler.dense, model.bert.pooler.activation = nn.Identity(), nn.Identity()  # see sentiment.py
    if args.device == "cuda":
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    sites = {f"layers.{i}.block_output": reft.LoReFT(384, rank=4) for i in range(model.config.num_hidden_layers)}
    rm = reft.IntervenableModel(model, sites, positions="f1", head="classifier")

    rows = rotten_tomatoes()
    random.Random(0).shuffle(rows)
    train, test = rows[973:], rows[:973]
    train, test = (train[:64], test[:64]) if args.tiny else (train[:1600], test)
    train_data = reft.data.build_classification_data(tokenizer, *zip(*train), max_length=128, num_labels=2)
    test_data = reft.data.build_classification_data(tokenizer, *zip(*test), max_length=128, num_labels=2)

    config = reft.TrainConfig(
        lr=5e-3,
        epochs=1,
        max_steps=2 if args.tiny else None,
        batch_size=args.global_batch // world,  # per process
        log_every=10,
        seed=0,
    )
    trainer = reft.Trainer(rm, config, train_data)
    print(f"rank {rank} of {world}: {trainer}", flush=True)
    trainer.fit()
    metrics = trainer.evaluate(test_data)  # every process takes part; all get the totals

    if rank == 0:
        folder = args.output or tempfile.mkdtemp(prefix="reft-distributed-")
        rm.save_pretrained(folder)
        print(f"world size {world}: held-out accuracy {100 * metrics['eval_accuracy']:.1f}% "
              f"on {len(test_data)} snippets; adapter saved to {folder}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
