"""One small training run, for the tests that need a separate process: torchrun parity, kill and resume.

    python tests/train_worker.py --out params.safetensors [--batch-size 8 --grad-accum 1 ...]
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train_worker.py --batch-size 4 ...

Builds the same tiny causal LM, LoReFT and varied-length data in every process (seeded), trains with
`reft.Trainer`, and writes the trainable parameters (rank 0) to `--out` as safetensors. `--kill-at N`
sends the process SIGKILL when the collator is asked for its N-th batch (a crash mid-training).
`--fsdp shard` shards the base model with FSDP2's `fully_shard` before wrapping it; `--fsdp meta` also
builds it on the meta device and loads its weights from rank 0, as docs/distributed.md does.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import reft  # noqa: E402
from reft.data import Collator, build_generation_data  # noqa: E402
from reft.train import Trainer, TrainConfig  # noqa: E402
from tests import tiny, tiny_text  # noqa: E402


def pairs(n: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (prompt, response) pairs of 2-7 and 1-6 words: varied token counts per example."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, r = torch.randint(2, 8, (1,), generator=g).item(), torch.randint(1, 7, (1,), generator=g).item()
        out.append((tiny_text.words(*torch.randint(0, 80, (p,), generator=g).tolist()),
                    tiny_text.words(*torch.randint(0, 80, (r,), generator=g).tolist())))
    return out


def build(dropout: float = 0.0, positions: str = "f1+l1", model: torch.nn.Module | None = None):
    tok = tiny_text.tokenizer()
    model = model if model is not None else tiny.causal_lm(initializer_range=0.2)
    torch.manual_seed(1)
    iv = {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4, dropout=dropout),
          "layers.0.mlp_output": reft.RED(tiny.HIDDEN)}
    rm = reft.IntervenableModel(model, iv, positions={"layers.1.block_output": positions, "layers.0.mlp_output": "all"})
    return rm, tok


def sharded_base(meta: bool) -> torch.nn.Module:
    """`build`'s base model, each layer and then the whole model sharded with FSDP2's `fully_shard`.

    `meta`: docs/distributed.md's recipe: the parameters built on the meta device (the buffers, RoPE's
    frequencies, real), sharded, given memory with `to_empty`, and loaded from rank 0's full state dict.
    """
    import torch.distributed as dist
    import transformers as tf
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if not meta:
        model = tiny.causal_lm(initializer_range=0.2)
    else:
        with init_empty_weights(include_buffers=False):
            model = tf.AutoModelForCausalLM.from_config(tiny.CONFIGS["llama"](initializer_range=0.2)).eval()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if meta:
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        model.to_empty(device="cpu")
        for name, b in buffers.items():
            model.get_buffer(name).copy_(b)
        full = tiny.causal_lm(initializer_range=0.2).state_dict() if dist.get_rank() == 0 else {}  # the "checkpoint"
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


class KillingCollator(Collator):
    def __init__(self, tok, kill_at: int | None):
        super().__init__(tok)
        self.calls, self.kill_at = 0, kill_at

    def __call__(self, examples):
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(examples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--positions", default="f1+l1", help="LoReFT's positions")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--save-every", type=int, default=None)
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--fsdp", choices=["shard", "meta"], default=None, help="shard the base model with fully_shard")
    args = ap.parse_args()
    torch.set_num_threads(1)

    base = sharded_base(args.fsdp == "meta") if args.fsdp else None
    rm, tok = build(args.dropout, args.positions, base)
    data = build_generation_data(tok, pairs(args.examples))
    config = TrainConfig(
        lr=1e-2, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
        epochs=args.epochs, warmup_ratio=0.1, log_every=2, output_dir=args.output_dir, save_every=args.save_every,
    )
    trainer = Trainer(rm, config, data, eval_data=data, collator=KillingCollator(tok, args.kill_at))
    history = trainer.fit(resume_from="latest" if args.resume else None)
    if trainer.rank == 0:
        save_file({n: p.detach().contiguous() for n, p in rm.named_parameters() if p.requires_grad}, args.out)
        print("steps", trainer.total_steps, "final loss", history[-2]["loss"] if len(history) > 1 else None)
    if args.fsdp:
        print("uses DDP:", trainer.ddp is not None)
        from torch.distributed.fsdp import fully_shard

        fully_shard(rm)  # the wrapper sharded too: its interventions would be sharded, which the Trainer refuses
        try:
            Trainer(rm, config, data)
        except ValueError as e:
            print("sharded wrapper:", e)


if __name__ == "__main__":
    main()
