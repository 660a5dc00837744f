import math

import pytest
import torch

import reft
from reft.data import Collator, build_generation_data, build_preference_data
from reft.objectives import DPO, RePS, dpo_loss, make_objective, reps_loss, response_lengths, sequence_logprobs
from reft.train import Trainer, TrainConfig

from . import tiny, tiny_text
from .tiny_text import words


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread, above all on a shared machine."""


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def triples(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """Prompts of 2-5 random words; chosen responses from words 40-49, rejected ones of the same length
    from words 60-69."""
    g = torch.Generator().manual_seed(seed)

    def pick(lo, n_words):
        return words(*(lo + torch.randint(0, 10, (n_words,), generator=g)).tolist())

    out = []
    for _ in range(n):
        prompt = words(*torch.randint(0, 30, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist())
        n_words = int(torch.randint(1, 4, (1,), generator=g))
        out.append((prompt, pick(40, n_words), pick(60, n_words)))
    return out


def response_logprob(model, ids: list[int], prompt_length: int) -> float:
    """Plain Python: Σ log p(token | before) over the response tokens of one unpadded example."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    total = 0.0
    for t in range(prompt_length, len(ids)):
        row = logits[t - 1].double().tolist()
        top = max(row)
        total += row[ids[t]] - (top + math.log(sum(math.exp(v - top) for v in row)))
    return total


# ------------------------------------------------------------------ the formulas
def test_sequence_logprobs_sums_the_labelled_tokens_log_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 1, 6], [-100, 2, 5, -100, -100]])
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(1, 5):
            if labels[b, t] != -100:
                row = logits[b, t - 1].tolist()
                total += row[labels[b, t]] - math.log(sum(math.exp(v) for v in row))
        expected.append(total)
    torch.testing.assert_close(sequence_logprobs(logits, labels), torch.tensor(expected))
    assert response_lengths(labels).tolist() == [3, 2]


def test_dpo_loss_is_the_papers_formula_on_hand_computed_log_probs():
    # margin = (−2 − (−3)) − (−5 − (−4)) = 1 + 1 = 2; with β = 0.5: −log σ(1)
    loss = dpo_loss(torch.tensor([-2.0, -7.0]), torch.tensor([-5.0, -1.0]), torch.tensor([-3.0, -6.0]), torch.tensor([-4.0, -2.0]), beta=0.5)
    # second pair: (−7 + 6) − (−1 + 2) = −1 − 1 = −2 -> −log σ(−1)
    torch.testing.assert_close(loss, torch.tensor([-log_sigmoid(1.0), -log_sigmoid(-1.0)]))


def test_reps_loss_is_the_papers_formula_on_hand_computed_log_probs():
    plus_c, plus_r, minus_c, minus_r = -6.0, -4.0, -9.0, -3.0
    ref_c, ref_r = -12.0, -5.0  # the base model prefers the original (rejected) response by 7 nats
    len_c, len_r = 3, 2
    beta_plus = max(ref_r - ref_c, 1.0)  # 7
    beta_minus = max(ref_c - ref_r, 1.0)  # 1
    d_plus = beta_plus * plus_c / len_c - plus_r / len_r  # 7 * −2 + 2 = −12
    d_minus = beta_minus * minus_r / len_r - minus_c / len_c  # −1.5 + 3 = 1.5
    expected = -log_sigmoid(d_plus) - log_sigmoid(d_minus)
    t = lambda v: torch.tensor([v])  # noqa: E731
    loss = reps_loss(t(plus_c), t(plus_r), t(minus_c), t(minus_r), t(ref_c), t(ref_r), t(len_c), t(len_r))
    torch.testing.assert_close(loss, torch.tensor([expected]))


# ------------------------------------------------------------------ the objectives on a model
def wrapped(arch: str = "llama", site: str = "layers.1.block_output", positions: str = "all"):
    model = tiny.causal_lm(arch, initializer_range=0.2)
    torch.manual_seed(1)
    rm = reft.IntervenableModel(model, {site: reft.LoReFT(tiny.HIDDEN, 4)}, positions=positions)
    return model, rm


def test_dpo_objective_matches_the_formula_with_the_base_model_as_reference():
    _, rm = wrapped()
    base = tiny.causal_lm(initializer_range=0.2)  # the same weights, never wrapped: an independent reference
    data = build_preference_data(tiny_text.tokenizer(), triples(3))
    batch = Collator.for_data(data)(list(data))
    loss = make_objective("dpo", beta=0.3).loss_sum(rm, rm, batch)
    expected = 0.0
    for e in data:
        p, ids_c, ids_r = int(e["prompt_length"]), e["chosen_input_ids"].tolist(), e["rejected_input_ids"].tolist()
        policy = response_logprob(rm, ids_c, p) - response_logprob(rm, ids_r, p)
        reference = response_logprob(base, ids_c, p) - response_logprob(base, ids_r, p)
        expected += -log_sigmoid(0.3 * (policy - reference))
    assert loss.requires_grad
    torch.testing.assert_close(loss.detach(), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    assert int(make_objective("dpo").count(batch)) == 3


def red(scale: torch.Tensor, bias: torch.Tensor) -> reft.RED:
    iv = reft.RED(tiny.HIDDEN)
    with torch.no_grad():
        iv.scale.copy_(scale)
        iv.bias.copy_(bias)
    return iv


@pytest.mark.parametrize("arch", ["llama", "opt"])  # OPT's FFN sees its tokens flattened to [B * T, d]
def test_reps_objective_matches_the_formula_with_the_negated_edit(arch):
    torch.manual_seed(3)
    scale, bias = 1 + 0.5 * torch.randn(tiny.HIDDEN), 0.5 * torch.randn(tiny.HIDDEN)
    site = "layers.0.mlp_output"
    plus = reft.IntervenableModel(tiny.causal_lm(arch, initializer_range=0.2), {site: red(scale, bias)})
    # RED's edit is (s − 1)h + b; negated: h − ((s − 1)h + b) = (2 − s)h − b, another RED
    minus = reft.IntervenableModel(tiny.causal_lm(arch, initializer_range=0.2), {site: red(2 - scale, -bias)})
    base = tiny.causal_lm(arch, initializer_range=0.2)
    different_lengths = [(words(1, 2), words(40, 41, 42), words(60)), (words(3), words(43), words(61, 62)), (words(4), words(44, 45), words(63))]
    data = build_preference_data(tiny_text.tokenizer(), different_lengths)
    loss = make_objective("reps").loss_sum(plus, plus, Collator.for_data(data)(list(data)))
    expected = 0.0
    for e in data:
        p, ids_c, ids_r = int(e["prompt_length"]), e["chosen_input_ids"].tolist(), e["rejected_input_ids"].tolist()
        len_c, len_r = len(ids_c) - p, len(ids_r) - p
        ref_c, ref_r = response_logprob(base, ids_c, p), response_logprob(base, ids_r, p)
        d_plus = max(ref_r - ref_c, 1) * response_logprob(plus, ids_c, p) / len_c - response_logprob(plus, ids_r, p) / len_r
        d_minus = max(ref_c - ref_r, 1) * response_logprob(minus, ids_r, p) / len_r - response_logprob(minus, ids_c, p) / len_c
        expected += -log_sigmoid(d_plus) - log_sigmoid(d_minus)
    torch.testing.assert_close(loss.detach(), torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-4)
    assert not plus["layers.0.mlp_output"]._forward_hooks  # the sign hooks are gone


def test_cross_entropy_adds_the_reft_r1_l1_penalty():
    tok = tiny_text.tokenizer()
    data = build_generation_data(tok, [(words(1, 2, 3), words(7, 8)), (words(4, 5), words(9, 10, 11))])
    batch = Collator(tok)(list(data))
    model = tiny.causal_lm(initializer_range=0.2)
    torch.manual_seed(0)
    iv = reft.ReFTr1(tiny.HIDDEN, k=2, l1=0.25)
    rm = reft.IntervenableModel(model, {"layers.1.block_output": iv}, positions="all").train()
    ce = make_objective("ce")
    total = ce.loss_sum(rm, rm, batch)
    iv.l1 = 0.0
    plain = ce.loss_sum(rm, rm, batch)
    captured = {}  # the hidden states the intervention sees
    handle = iv.register_forward_hook(lambda m, args, out: captured.setdefault("h", args[0].detach()))
    rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    z = iv.latent(captured["h"][:, 1:]).detach()  # [B, T - 1]: every position but the first, padding included
    expected = 0.25 * sum(sum(sorted(row, reverse=True)[2:]) for row in z.tolist())
    torch.testing.assert_close((total - plain).detach(), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert iv.penalty is None  # taken by the objective


# ------------------------------------------------------------------ training
def preference_run(objective: str, batch_size: int, grad_accum: int, steps: int):
    _, rm = wrapped()
    data = build_preference_data(tiny_text.tokenizer(), triples(24))
    config = TrainConfig(lr=1e-2, batch_size=batch_size, grad_accum=grad_accum, max_steps=steps, objective=objective, beta=0.5)
    Trainer(rm, config, data).fit()
    return {n: p.detach().clone() for n, p in rm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("objective", ["dpo", "reps"])
def test_preference_gradient_accumulation_equals_the_big_batch(objective):
    big = preference_run(objective, 8, 1, 3)
    small = preference_run(objective, 4, 2, 3)
    assert max((big[k] - small[k]).abs().max().item() for k in big) <= 1e-6


@pytest.mark.parametrize("objective", ["dpo", "reps"])
def test_preference_training_makes_held_out_chosen_responses_likelier(objective):
    tok = tiny_text.tokenizer()
    train, held_out = build_preference_data(tok, triples(64, seed=0)), build_preference_data(tok, triples(32, seed=1))
    _, rm = wrapped()
    before = reft.evaluate.preference_accuracy(rm, held_out)["preference_accuracy"]
    config = TrainConfig(lr=2e-2, epochs=6, batch_size=8, objective=objective)
    trainer = Trainer(rm, config, train, eval_data=held_out)
    history = trainer.fit()
    after = reft.evaluate.preference_accuracy(rm, held_out)
    assert before < 0.7 and after["preference_accuracy"] >= 0.9, (before, after["preference_accuracy"])
    assert history[-1]["eval_preference_accuracy"] == pytest.approx(after["preference_accuracy"])
    assert history[0]["loss"] > history[-2]["loss"]  # the last record is the evaluation's


def test_preference_objectives_need_preference_data_and_a_wrapped_model():
    tok = tiny_text.tokenizer()
    _, rm = wrapped()
    generation = build_generation_data(tok, [(words(1), words(2))])
    preference = build_preference_data(tok, [(words(1), words(2), words(3))])
    with pytest.raises(ValueError, match="objective 'dpo' trains on preference pairs, but train_data is generation data"):
        Trainer(rm, TrainConfig(objective="dpo"), generation)
    with pytest.raises(ValueError, match="train_data holds preference pairs: train it with TrainConfig\\(objective='dpo'\\)"):
        Trainer(rm, TrainConfig(), preference)
    with pytest.raises(ValueError, match="objective 'reps' trains on preference pairs, but eval_data is generation data"):
        Trainer(rm, TrainConfig(objective="reps"), preference, eval_data=generation)
    with pytest.raises(ValueError, match="TrainConfig.objective = 'ppo': must be one of ce, dpo, reps"):
        TrainConfig(objective="ppo")
    with pytest.raises(ValueError, match="TrainConfig.beta = 0: must be a number > 0"):
        TrainConfig(objective="dpo", beta=0)
    with pytest.raises(ValueError, match="unknown objective 'kto'; valid: 'ce', 'dpo', 'reps'"):
        make_objective("kto")

    class Plain(torch.nn.Module):  # a model with trainable parameters but no rm.disabled()
        def __init__(self):
            super().__init__()
            self.model = tiny.causal_lm()

        def trainable_parameters(self):
            return list(self.model.parameters())

    with pytest.raises(ValueError, match="objective 'dpo' needs an IntervenableModel"):
        Trainer(Plain(), TrainConfig(objective="dpo"), preference)
    assert isinstance(make_objective("dpo", 0.2), DPO) and make_objective("dpo", 0.2).beta == 0.2
    assert isinstance(make_objective("reps"), RePS)


@pytest.mark.parametrize("objective,why", [(DPO(), "takes no routed batches"), (RePS(), "signs every intervention's edit per row")])
def test_preference_objectives_refuse_routed_batches_naming_themselves(objective, why):
    batch = {"labels": torch.zeros(4, 3, dtype=torch.long), "adapter_names": ["a", "b", "a", "b"]}
    with pytest.raises(ValueError, match=f"objective '{objective.name}' {why}: train one adapter at a time"):
        objective.loss_sum(None, None, batch)
