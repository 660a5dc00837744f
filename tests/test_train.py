import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import reft
from reft.data import Collator, build_classification_data, build_generation_data
from reft.train import Trainer, TrainConfig

from . import disk, tiny, tiny_text
from .train_worker import build, pairs

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_worker.py"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread, above all on a shared machine."""


def trainable(rm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in rm.named_parameters() if p.requires_grad}


def greedy(rm, ids: list[int], steps: int) -> list[int]:
    """Plain greedy decoding: one full forward per new token (the prompt mask keeps 'l1' on the prompt)."""
    x = torch.tensor([ids])
    prompt = torch.ones_like(x)
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.ones_like(x)
            prompt_mask = torch.cat([prompt, torch.zeros(1, x.shape[1] - prompt.shape[1], dtype=torch.long)], 1)
            logits = rm(input_ids=x, attention_mask=mask, prompt_mask=prompt_mask).logits
            x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(ids):].tolist()


# ------------------------------------------------------------------ learning
def test_default_settings_memorize_a_fixed_response_and_leave_the_base_untouched():
    tok = tiny_text.tokenizer()
    model = tiny.causal_lm(initializer_range=0.2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    rm = reft.IntervenableModel(model, {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, rank=8)}, positions="all")
    prompt, response = tiny_text.words(10, 11, 12, 13), tiny_text.words(*range(40, 48))  # an 8-token response
    data = build_generation_data(tok, [(prompt, response)] * 2048)
    trainer = Trainer(rm, TrainConfig(), data)
    before = trainer.evaluate(data[:8])["eval_loss"]
    trainer.fit()
    after = trainer.evaluate(data[:8])["eval_loss"]
    assert after <= 0.05 * before, (before, after)
    example = data[0]
    prompt_ids = example["input_ids"][: int(example["prompt_length"])].tolist()
    assert greedy(rm, prompt_ids, 9) == example["input_ids"][len(prompt_ids):].tolist()  # 8 tokens and EOS
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())


def test_classifier_with_trainable_head_learns_a_separable_task():
    g = torch.Generator().manual_seed(0)

    def text(label: int) -> str:  # five random filler words and, somewhere, the keyword w80 or w81
        fillers = torch.randint(0, 80, (5,), generator=g).tolist()
        fillers.insert(int(torch.randint(0, 6, (1,), generator=g)), 80 + label)
        return tiny_text.words(*fillers)

    labels = torch.randint(0, 2, (320,), generator=g).tolist()
    tok = tiny_text.tokenizer()
    train = build_classification_data(tok, [text(y) for y in labels[:256]], labels[:256])
    held_out = build_classification_data(tok, [text(y) for y in labels[256:]], labels[256:])
    model = tiny.classifier("bert", initializer_range=0.2)  # at 0.02 the frozen random pooler hides the input
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    head = model.classifier.weight.detach().clone()
    torch.manual_seed(0)
    sites = {"layers.0.block_output": "all", "layers.1.block_output": "f1"}  # f1: the first token, which the pooler reads
    rm = reft.IntervenableModel(model, {s: reft.LoReFT(tiny.HIDDEN, 4) for s in sites}, positions=sites, head="classifier")
    history = Trainer(rm, TrainConfig(lr=2e-2, epochs=6), train, eval_data=held_out).fit()
    assert history[-1]["eval_accuracy"] >= 0.95
    assert not torch.equal(model.classifier.weight, head)  # the head trained with the interventions
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items() if not k.startswith("classifier."))


# ------------------------------------------------------------------ exactness
def run(batch_size: int, grad_accum: int, steps: int = 4) -> dict[str, torch.Tensor]:
    rm, tok = build()
    config = TrainConfig(lr=1e-2, batch_size=batch_size, grad_accum=grad_accum, max_steps=steps, warmup_ratio=0.25)
    Trainer(rm, config, build_generation_data(tok, pairs(40))).fit()
    return trainable(rm)


def test_gradient_accumulation_equals_the_big_batch():
    big = run(8, 1)
    for batch_size, grad_accum in [(4, 2), (2, 4)]:
        small = run(batch_size, grad_accum)
        assert max((big[k] - small[k]).abs().max().item() for k in big) <= 1e-6
    # the examples have different token counts, so a mean per micro-batch would not be exact:
    rm, tok = build()
    data = build_generation_data(tok, pairs(8))
    batch = Collator(tok)(list(data))
    logits = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    counts = (batch["labels"][:, 1:] != -100).sum(1)
    mean_of_means = (ce[:4].sum() / counts[:4].sum() + ce[4:].sum() / counts[4:].sum()) / 2
    assert abs(mean_of_means - ce.sum() / counts.sum()) > 1e-3


def test_group_by_length_covers_every_example_once_per_epoch_with_less_padding():
    rm, tok = build()
    data = build_generation_data(tok, pairs(400))
    lengths = [len(x["input_ids"]) for x in data]

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = Trainer(rm, TrainConfig(batch_size=4), data)
    grouped = Trainer(rm, TrainConfig(batch_size=4, group_by_length=True), data)
    for epoch in range(2):
        batches = grouped._epoch_batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(data)))
        assert [len(b) for b in batches] == [4] * 100
        assert padded_tokens(batches) < 0.9 * padded_tokens(plain._epoch_batches(epoch))
        assert batches == Trainer(rm, TrainConfig(batch_size=4, group_by_length=True), data)._epoch_batches(epoch)
    assert grouped._epoch_batches(0) != grouped._epoch_batches(1)  # a new order every epoch
    before = trainable(rm)
    Trainer(rm, TrainConfig(batch_size=4, group_by_length=True, max_steps=3), data).fit()
    assert any(not torch.equal(before[k], v) for k, v in trainable(rm).items())


def test_torchrun_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "--batch-size", "4", "--out", str(tmp_path / "two.safetensors"), "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = load_file(tmp_path / "two.safetensors")
    rm, tok = build()  # the same run in this process, with the whole global batch of 8
    config = TrainConfig(lr=1e-2, batch_size=8, epochs=2, warmup_ratio=0.1, log_every=2)
    Trainer(rm, config, build_generation_data(tok, pairs(40))).fit()
    one = trainable(rm)
    assert set(one) == set(two)
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 10]  # rank 0 only: no record twice
    assert "eval_loss" in records[-1]


def test_torchrun_with_the_base_sharded_by_fully_shard_matches_one_process(tmp_path):
    """docs/distributed.md's FSDP2 recipe (the base built on meta, each layer and the model sharded,
    the weights broadcast from rank 0), grad_accum 2: no DDP, the replicated interventions' gradients
    averaged by the Trainer; the same parameters as one process with the global batch, to 1e-6."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "--fsdp", "meta", "--batch-size", "2", "--grad-accum", "2", "--out", str(tmp_path / "two.safetensors")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("uses DDP: False") == 2
    # sharding the wrapper too (its interventions) is refused with the way out
    assert done.stdout.count("sharded wrapper: trainable parameter 'adapters.default.") == 2
    assert "shard the base model (its layers, then the model itself) before wrapping it" in done.stdout
    two = load_file(tmp_path / "two.safetensors")
    rm, tok = build()
    config = TrainConfig(lr=1e-2, batch_size=8, epochs=2, warmup_ratio=0.1, log_every=2)
    Trainer(rm, config, build_generation_data(tok, pairs(40))).fit()
    one = trainable(rm)
    assert set(one) == set(two)
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6


# ------------------------------------------------------------------ modes
def test_intervention_dropout_is_on_while_training_and_off_while_evaluating():
    rm, tok = build(dropout=0.5)
    loreft = rm["layers.1.block_output"]
    seen = []
    loreft.register_forward_hook(lambda m, i, o: seen.append((m.training, m.dropout.training, rm.model.training)))
    data = build_generation_data(tok, pairs(8))
    config = TrainConfig(batch_size=4, max_steps=4, eval_every=2)
    Trainer(rm, config, data, eval_data=data).fit()
    # steps 1-2 train (2 calls), eval (2 batches), steps 3-4 train, eval at 4 (2 batches)
    assert seen == [(True, True, False)] * 2 + [(False, False, False)] * 2 + [(True, True, False)] * 2 + [(False, False, False)] * 2
    assert not rm.training  # fit leaves everything in eval mode
    # and dropout really acts in train mode: the same input twice gives two different edits
    h = torch.randn(3, tiny.HIDDEN)
    loreft.train()
    assert not torch.equal(loreft(h), loreft(h))
    loreft.eval()
    assert torch.equal(loreft(h), loreft(h))


def test_base_dropout_puts_the_base_model_in_train_mode_while_training():
    rm, tok = build()
    seen = []
    rm.model.register_forward_hook(lambda m, i, o: seen.append(m.training))
    data = build_generation_data(tok, pairs(4))
    Trainer(rm, TrainConfig(batch_size=4, max_steps=1, base_dropout=True), data).fit()
    assert seen == [True]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_train_like_fp32_and_keep_fp32_parameters(precision):
    def losses(precision):
        rm, tok = build()
        config = TrainConfig(precision=precision, batch_size=4, max_steps=6, log_every=2)
        history = Trainer(rm, config, build_generation_data(tok, pairs(16))).fit()
        assert all(p.dtype == torch.float32 for p in rm.trainable_parameters())
        return [r["loss"] for r in history]

    assert losses(precision) == pytest.approx(losses("fp32"), rel=2e-2)


# ------------------------------------------------------------------ optimizer, schedule, log
def test_weight_decay_never_touches_r_nor_vectors():
    rm, tok = build()
    trainer = Trainer(rm, TrainConfig(weight_decay=0.1), build_generation_data(tok, pairs(4)))
    names = {id(p): n for n, p in rm.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in trainer.optimizer.param_groups}
    assert groups[0.1] == ["adapters.default.layers-1-block_output.0.W.weight"]
    assert "adapters.default.layers-1-block_output.0.R.weight" in groups[0.0]
    assert "adapters.default.layers-1-block_output.0.W.bias" in groups[0.0]
    assert "adapters.default.layers-0-mlp_output.0.scale" in groups[0.0]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_learning_rate_warms_up_then_follows_the_schedule(schedule):
    rm, tok = build()
    config = TrainConfig(lr=0.01, batch_size=4, max_steps=8, warmup_ratio=0.25, schedule=schedule, log_every=1)
    history = Trainer(rm, config, build_generation_data(tok, pairs(8))).fit()
    progress = [(s - 2) / 6 for s in range(2, 8)]
    decay = {
        "linear": [1 - p for p in progress],
        "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in progress],
        "constant": [1.0] * 6,
    }[schedule]
    assert [r["lr"] for r in history] == pytest.approx([0.01 * f for f in [0.5, 1.0, *decay]], abs=1e-12)


def test_jsonl_log_holds_the_history(tmp_path):
    rm, tok = build()
    data = build_generation_data(tok, pairs(16))
    config = TrainConfig(batch_size=4, epochs=2, log_every=3, eval_every=4, output_dir=str(tmp_path))
    history = Trainer(rm, config, data, eval_data=data[:4]).fit()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == history
    assert [r["step"] for r in history if "loss" in r] == [3, 6, 8]
    assert [r["step"] for r in history if "eval_loss" in r] == [4, 8]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in history if "loss" in r)


def test_compute_metrics_gets_aligned_predictions_and_labels():
    rm, tok = build()
    data = build_generation_data(tok, pairs(6))
    got = {}

    def metrics(pred, labels):
        got["shapes"] = (pred.shape, labels.shape)
        return {"agree": (pred == labels).float().mean()}

    result = Trainer(rm, TrainConfig(batch_size=4), data, compute_metrics=metrics).evaluate(data)
    n = sum(int((e["labels"] != -100).sum()) for e in data)
    assert got["shapes"] == ((n,), (n,))
    assert result["eval_agree"] == pytest.approx(result["eval_token_accuracy"])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0), r"TrainConfig.lr = 0: must be a number in \(0, 1\)"),
        (dict(epochs=0), "TrainConfig.epochs = 0: must be a positive finite number"),
        (dict(max_steps=0), "TrainConfig.max_steps = 0: must be an int >= 1 or None"),
        (dict(batch_size=2.5), "TrainConfig.batch_size = 2.5: must be an int >= 1"),
        (dict(grad_accum=0), "TrainConfig.grad_accum = 0: must be an int >= 1"),
        (dict(warmup_ratio=1.0), r"TrainConfig.warmup_ratio = 1.0: must be a number in \[0, 1\)"),
        (dict(schedule="step"), "TrainConfig.schedule = 'step': must be one of linear, cosine, constant"),
        (dict(weight_decay=-1), "TrainConfig.weight_decay = -1: must be a finite number >= 0"),
        (dict(max_grad_norm=0), "TrainConfig.max_grad_norm = 0: must be a finite number > 0 or None"),
        (dict(precision="fp8"), "TrainConfig.precision = 'fp8': must be one of fp32, bf16, fp16"),
        (dict(eval_every=0), "TrainConfig.eval_every = 0: must be an int >= 1 or None"),
        (dict(save_every=5), "save_every = 5: checkpoints need an output_dir"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_bad_data_fails_before_training(tmp_path):
    tok = tiny_text.tokenizer()
    model = tiny.classifier("bert", num_labels=2)
    rm = reft.IntervenableModel(model, {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4)}, positions="f1", head="classifier")
    three = build_classification_data(tok, [tiny_text.words(1), tiny_text.words(2)], [0, 2])
    with pytest.raises(ValueError, match=r"train_data: example 1 has label 2, out of range for the model's head with 2 classes \(valid: 0..1\)"):
        Trainer(rm, TrainConfig(), three)

    lm, tok = build()
    long_tok = tiny_text.tokenizer(model_max_length=1000)
    too_long = build_generation_data(long_tok, [(tiny_text.words(*range(80), *range(80)), tiny_text.words(1))])  # 163 tokens
    with pytest.raises(ValueError, match="train_data: example 0 has 163 tokens, but the model's context is 128"):
        Trainer(lm, TrainConfig(), too_long)
    data = build_generation_data(tok, pairs(4))
    with pytest.raises(ValueError, match="eval_data is empty"):
        Trainer(lm, TrainConfig(), data, eval_data=[])
    with pytest.raises(ValueError, match="train_data is a list, not reft.data.TokenizedData: pass a collator="):
        Trainer(lm, TrainConfig(), list(data))
    with pytest.raises(ValueError, match="resume_from='latest' looks in output_dir"):
        Trainer(lm, TrainConfig(), data).fit(resume_from="latest")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        Trainer(lm, TrainConfig(), data).fit(resume_from=tmp_path / "nope")
    trainer = Trainer(lm, TrainConfig(max_steps=1), data)
    trainer.fit()
    with pytest.raises(RuntimeError, match=r"fit\(\) already ran on this Trainer"):
        trainer.fit()


def test_resume_with_another_batch_size_is_refused(tmp_path):
    rm, tok = build()
    data = build_generation_data(tok, pairs(8))
    Trainer(rm, TrainConfig(batch_size=4, max_steps=2, save_every=1, output_dir=str(tmp_path)), data).fit()
    rm, _ = build()
    with pytest.raises(ValueError, match="saved with batch_size=4, this run has batch_size=2"):
        Trainer(rm, TrainConfig(batch_size=2, max_steps=4, output_dir=str(tmp_path)), data).fit(resume_from="latest")


# ------------------------------------------------------------------ the real model
@pytest.mark.integration
def test_smollm2_learns_a_behaviour_at_the_last_prompt_token(tmp_path, monkeypatch):
    """The example of docs/training.md: LoReFT at the last prompt token of the real SmolLM2."""
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "training.md").read_text(), re.S)[1]
    monkeypatch.chdir(tmp_path)  # it writes out/pirate/
    out, namespace = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/training.md", "exec"), namespace)
    printed = out.getvalue().splitlines()
    history = namespace["history"]
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]
    assert printed[-2].startswith("Arr matey"), printed  # the held-out question
    assert not printed[-1].startswith("Arr matey"), printed  # the base model, interventions disabled
    assert (tmp_path / "out" / "pirate" / "adapter" / "adapter_config.json").is_file()
    assert len((tmp_path / "out" / "pirate" / "log.jsonl").read_text().splitlines()) == 3


# ------------------------------------------------------------------ integrity
def test_data_without_a_labelled_token_fails_before_any_step(tmp_path):
    rm, tok = build()
    data = build_generation_data(tok, pairs(6))
    for e in data.examples:
        e["labels"] = torch.full_like(e["labels"], -100)  # e.g. every response masked out
    before = trainable(rm)
    with pytest.raises(ValueError, match=r"train_data: none of its 6 examples has a labelled token \(every label is -100\)"):
        Trainer(rm, TrainConfig(max_steps=2, output_dir=str(tmp_path)), data).fit()
    assert all(torch.equal(before[k], v) for k, v in trainable(rm).items())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("log_every, save_every", [(1, 1), (10, 2)])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, log_every, save_every):
    """The loss of step 3 is NaN: training stops at the next check (the step-3 log, or the step-4 save)
    and no checkpoint holds a parameter the NaN step touched."""
    from reft.objectives import CrossEntropy

    calls = {"n": 0}
    loss_sum = CrossEntropy.loss_sum

    def nan_at_step_3(self, model, rm, batch):  # one micro-batch per step here
        calls["n"] += 1
        loss = loss_sum(self, model, rm, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(CrossEntropy, "loss_sum", nan_at_step_3)
    rm, tok = build()
    config = TrainConfig(batch_size=4, max_steps=6, log_every=log_every, save_every=save_every, output_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"the loss \(or a parameter\) at step 3 is not finite .* the last checkpoint, from before, is .*checkpoint-2"):
        Trainer(rm, config, build_generation_data(tok, pairs(24))).fit()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == (
        ["checkpoint-1", "checkpoint-2"] if save_every == 1 else ["checkpoint-2"]
    )
    saved = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == ([1, 2] if log_every == 1 else [])


def test_no_gradient_after_the_first_backward_is_an_error():
    """A base model whose layers autograd cannot differentiate (dynamic int8 quantization): before,
    every gradient was None and the log showed grad_norm 0.0 without a word."""
    tok = tiny_text.tokenizer()
    model = torch.ao.quantization.quantize_dynamic(tiny.causal_lm(), {torch.nn.Linear}, dtype=torch.qint8)
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.LoReFT(tiny.HIDDEN, 4)}, positions="l1")
    before = trainable(rm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that quantized ops have no autograd kernel, and goes on
        with pytest.raises(ValueError, match="no trainable parameter received a gradient in the first step .*quantize_dynamic"):
            Trainer(rm, TrainConfig(max_steps=3), build_generation_data(tok, pairs(8))).fit()
    assert all(torch.equal(before[k], v) for k, v in trainable(rm).items())  # no optimizer step was taken


def _first_run(tmp_path, data, **config) -> TrainConfig:
    rm, _ = build()
    base = dict(lr=1e-2, batch_size=4, max_steps=4, save_every=1, log_every=1, output_dir=str(tmp_path))
    Trainer(rm, TrainConfig(**{**base, **config}), data).fit()
    for step in (3, 4):  # as if killed after checkpoint-2
        for p in (tmp_path / f"checkpoint-{step}").iterdir():
            p.unlink()
        (tmp_path / f"checkpoint-{step}").rmdir()
    return TrainConfig(**{**base, **config})


def test_a_resume_that_differs_says_what_differs_and_restores_nothing(tmp_path):
    rm, tok = build()
    data = build_generation_data(tok, pairs(16))
    config = _first_run(tmp_path, data)
    before, rng = trainable(rm), torch.get_rng_state()
    changed = TrainConfig(**{**config.__dict__, "lr": 2e-2, "max_steps": 6})
    with pytest.raises(ValueError, match=r"saved with lr=0.01, this run has lr=0.02; saved with max_steps=4, this run has "
                       r"max_steps=6: to change them on purpose, pass fit\(\.\.\., allow_changes=\['lr', 'max_steps'\]\)"):
        Trainer(rm, changed, data).fit(resume_from="latest")
    assert all(torch.equal(before[k], v) for k, v in trainable(rm).items()) and torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match=r"saved with seed=42, this run has seed=7: resuming needs the same seed"):
        Trainer(rm, TrainConfig(**{**config.__dict__, "seed": 7}), data).fit(resume_from="latest", allow_changes=["lr"])
    with pytest.raises(ValueError, match=r"allow_changes: \['seed'\] cannot change when a run resumes"):
        Trainer(rm, config, data).fit(resume_from="latest", allow_changes=["seed"])

    history = Trainer(rm, changed, data).fit(resume_from="latest", allow_changes=["lr", "max_steps"])
    lrs = {r["step"]: r["lr"] for r in history if "lr" in r}
    assert lrs[1] == pytest.approx(1e-2) and lrs[2] == pytest.approx(1e-2 * (1 - 1 / 4))  # the first run's schedule
    # from step 3 on, linear decay of the new lr over the new 6 steps: lr * (1 - (step - 1) / 6)
    assert [lrs[s] for s in (3, 4, 5, 6)] == pytest.approx([2e-2 * (1 - s / 6) for s in (2, 3, 4, 5)])


def test_a_resume_onto_other_data_is_refused(tmp_path):
    rm, tok = build()
    config = _first_run(tmp_path, build_generation_data(tok, pairs(16)))
    other = build_generation_data(tok, pairs(16, seed=1))
    with pytest.raises(ValueError, match=r"trained on 16 examples \(sha256 [0-9a-f]{12}\.\.\.\), this run's train_data has 16 "
                       r"\(sha256 [0-9a-f]{12}\.\.\.\): a resumed run continues on the same data"):
        Trainer(rm, config, other).fit(resume_from="latest")


def test_a_fresh_run_refuses_an_output_dir_with_another_runs_checkpoints(tmp_path):
    rm, tok = build()
    data = build_generation_data(tok, pairs(16))
    config = _first_run(tmp_path, data)
    before = disk.snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(\['checkpoint-1', 'checkpoint-2'\]\): continue "
                       r"that run with fit\(resume_from='latest'\)"):
        Trainer(rm, config, data).fit()
    assert disk.snapshot(tmp_path) == before


def test_a_resume_past_max_steps_is_an_error_naming_the_step(tmp_path):
    rm, tok = build()
    data = build_generation_data(tok, pairs(8))
    config = TrainConfig(batch_size=4, max_steps=2, save_every=1, output_dir=tmp_path)  # a Path works as well as a str
    Trainer(rm, config, data).fit()
    with pytest.raises(ValueError, match=r"checkpoint-2 is at step 2, and this run trains 2 steps \(max_steps=2\): nothing is left"):
        Trainer(rm, config, data).fit(resume_from="latest")
    more = TrainConfig(**{**config.__dict__, "max_steps": 3})
    history = Trainer(rm, more, data).fit(resume_from="latest", allow_changes=["max_steps"])
    assert history[-1]["step"] == 3


def test_a_log_line_cut_by_a_full_disk_leaves_the_log_readable(tmp_path, monkeypatch):
    import errno

    import reft._files as fs

    log = tmp_path / "log.jsonl"
    fs.append_line(log, '{"step": 1}\n')
    real_write = os.write

    def full_disk(fd, data):  # half the line goes out, then the disk is full
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs.os, "write", full_disk)
    with pytest.raises(OSError, match="No space left on device; the record was not logged, the log keeps its whole lines"):
        fs.append_line(log, '{"step": 2, "loss": 1.5}\n')
    monkeypatch.setattr(fs.os, "write", real_write)
    assert log.read_text() == '{"step": 1}\n'
    log.write_text('{"step": 1}\n{"step": 2, "lo')  # a line cut by a crash: dropped before the next one
    fs.append_line(log, '{"step": 3}\n')
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"step": 1}, {"step": 3}]
