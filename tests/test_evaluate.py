"""`answer_accuracy`: the extraction rules, prompts formatted as in training, batching, a trained
adapter against the base model (checked with plain forward passes), and errors for bad input.
`preference_accuracy` and `auroc` against plain-Python references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reft
from reft.data import build_generation_data, build_preference_data
from reft.evaluate import answer_accuracy, auroc, extract_answer, preference_accuracy, same_answer
from reft.train import Trainer, TrainConfig

from . import tiny, tiny_text
from .test_generation import wrapped  # a tiny LM with a random LoReFT strong enough to change the greedy tokens


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread, above all on a shared machine."""


def keyword_prompts(n, seed=0):
    """Prompts of 2-5 random words, one of them the keyword w80 or w81; the answer is w70 or w71."""
    g = torch.Generator().manual_seed(seed)
    prompts, answers = [], []
    for label in torch.randint(0, 2, (n,), generator=g).tolist():
        words = torch.randint(4, 60, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        words.insert(int(torch.randint(0, len(words) + 1, (1,), generator=g)), 80 + label)
        prompts.append(tiny_text.words(*words))
        answers.append(f"w{70 + label}")
    return prompts, answers


# ------------------------------------------------------------------ extraction rules
@pytest.mark.parametrize(
    "text, pattern, match, expected",
    [
        ("the correct answer is solution2, not solution1", r"solution1|solution2", "first", "solution2"),
        ("the correct answer is solution2, not solution1", r"solution1|solution2", "last", "solution1"),
        ("5 apples and 7 pears make 12", r"-?\d+(?:,\d{3})*(?:\.\d+)?", "last", "12"),
        ("he paid 1,250.5 dollars", r"-?\d+(?:,\d{3})*(?:\.\d+)?", "last", "1,250.5"),
        ("So the answer is B. (A was wrong)", r"answer is \(?([A-E])", "first", "B"),  # a group: its text
        ("  no answer words here \n", r"true|false", "first", None),
        ("  Paris \n", None, "first", "Paris"),  # no pattern: the whole stripped text
    ],
)
def test_extract_answer(text, pattern, match, expected):
    assert extract_answer(text, pattern, match) == expected


@pytest.mark.parametrize(
    "predicted, gold, equal",
    [
        ("1,000", "1000.0", True),
        ("-3", "-3.0", True),
        ("0.3335", "0.333", True),  # within 0.001, pyreft's tolerance
        ("0.335", "0.333", False),
        ("12", "13", False),
        (" True ", "true", True),
        ("answer1", "answer2", False),
        ("1,000 apples", "1000", False),  # not a number: compared as text
    ],
)
def test_same_answer(predicted, gold, equal):
    assert same_answer(predicted, gold) is equal


# ------------------------------------------------------------------ generation
def test_prompts_are_formatted_as_in_training_and_batching_changes_nothing(monkeypatch):
    """The prompt ids generated from are build_generation_data's prompt ids (chat template here),
    left-padded; a batch of 3 + 3 + 1 gives the same answers as one prompt at a time."""
    rm = wrapped()
    tok = tiny_text.tokenizer(chat=True)
    prompts = [tiny_text.words(*range(5, 5 + n)) for n in (1, 6, 3, 2, 5, 4, 7)]
    answers = ["w9"] * len(prompts)
    seen = []
    generate = rm.generate

    def spy(**kwargs):
        seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))
        return generate(**kwargs)

    monkeypatch.setattr(rm, "generate", spy)
    modes = [m.training for m in rm.modules()]
    batched = answer_accuracy(rm, tok, prompts, answers, max_new_tokens=6, batch_size=3)
    assert [ids.shape[0] for ids, _ in seen] == [3, 3, 1]
    training = build_generation_data(tok, [(p, "w9") for p in prompts])
    rows = [ids[mask.bool()].tolist() for ids_, mask_ in seen for ids, mask in zip(ids_, mask_)]
    assert rows == [e["input_ids"][: int(e["prompt_length"])].tolist() for e in training]
    for ids, mask in seen:  # left padding: every row ends with its last real token
        assert mask[:, -1].all()

    one_by_one = answer_accuracy(rm, tok, prompts, answers, max_new_tokens=6, batch_size=1)
    assert [p["generation"] for p in batched["predictions"]] == [p["generation"] for p in one_by_one["predictions"]]
    with rm.disabled():
        base = answer_accuracy(rm, tok, prompts, answers, max_new_tokens=6, batch_size=3)
    assert [p["generation"] for p in base["predictions"]] != [p["generation"] for p in batched["predictions"]]
    assert [m.training for m in rm.modules()] == modes  # run in eval mode, each module's mode given back


def test_a_trained_adapter_answers_and_the_base_model_does_not():
    """Train LoReFT (l1) to answer w70/w71 for the keyword w80/w81; on held-out prompts its answer
    accuracy is high, the base model's is 0, and one-token answers agree with plain forward passes."""
    tok = tiny_text.tokenizer()
    torch.manual_seed(0)
    rm = reft.IntervenableModel(
        tiny.causal_lm(initializer_range=0.2),
        {f"layers.{i}.block_output": reft.LoReFT(tiny.HIDDEN, rank=4) for i in range(2)},
        positions="l1",
    )
    prompts, answers = keyword_prompts(160)
    train, (held_prompts, held_answers) = list(zip(prompts[:128], answers[:128])), (prompts[128:], answers[128:])
    Trainer(rm, TrainConfig(lr=2e-2, epochs=10, batch_size=16), build_generation_data(tok, train)).fit()

    result = answer_accuracy(rm, tok, held_prompts, held_answers, pattern=r"w7[01]", match="first", max_new_tokens=3)
    with rm.disabled():
        base = answer_accuracy(rm, tok, held_prompts, held_answers, pattern=r"w7[01]", match="first", max_new_tokens=3)
    assert result["n"] == base["n"] == 32
    assert result["answer_accuracy"] >= 0.85, result["answer_accuracy"]
    assert base["answer_accuracy"] == 0.0
    assert any(p["extracted"] is None for p in base["predictions"])  # no match: incorrect
    assert all(not p["correct"] for p in base["predictions"] if p["extracted"] is None)
    assert result["answer_accuracy"] == sum(p["correct"] for p in result["predictions"]) / 32

    # the reference: the argmax after each lone prompt, from a plain forward pass with the edits
    one_token = answer_accuracy(rm, tok, held_prompts, held_answers, max_new_tokens=1)
    expected = []
    with torch.no_grad():
        for prompt, answer in zip(held_prompts, held_answers):
            ids = torch.tensor([tok(prompt)["input_ids"]])
            token = rm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax().item()
            expected.append(tok.convert_ids_to_tokens(token) == answer)
    assert [p["correct"] for p in one_token["predictions"]] == expected


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "change, message",
    [
        ({"answers": ["w1"]}, "2 prompts but 1 answers"),
        ({"prompts": [], "answers": []}, "prompts is empty"),
        ({"prompts": ["w1", 7]}, "prompt 1 must be a str, got 7"),
        ({"answers": ["w1", None]}, "answer 1 must be a str or a number, got None"),
        ({"match": "middle"}, "match must be one of 'first', 'last'; got 'middle'"),
        ({"pattern": "answer(1|2"}, "pattern 'answer(1|2' is not a valid regular expression"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
        ({"batch_size": -2}, "batch_size must be an int >= 1, got -2"),
        ({"mode": "decode"}, "mode must be one of 'prompt', 'every_token'; got 'decode'"),
    ],
)
def test_bad_input_names_the_value(change, message):
    rm, tok = wrapped(), tiny_text.tokenizer()
    args = {"prompts": ["w1 w2", "w3"], "answers": ["w1", "w2"], **change}
    with pytest.raises(ValueError) as e:
        answer_accuracy(rm, tok, **args)
    assert message in str(e.value)


# ------------------------------------------------------------------ AUROC and preference accuracy
def pairwise_auroc(scores, labels) -> float:
    """Plain Python: the share of (positive, negative) pairs the scores order right, ties counting 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=30).filter(
        lambda rows: 0 < sum(y for _, y in rows) < len(rows)
    )
)
def test_auroc_matches_the_pairwise_count_with_ties(rows):
    scores, labels = [s / 2 for s, _ in rows], [int(y) for _, y in rows]  # few distinct values: many ties
    assert auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)
    assert auroc(torch.tensor(scores), torch.tensor(labels, dtype=torch.bool)) == pytest.approx(pairwise_auroc(scores, labels))


def test_auroc_of_perfect_reversed_and_constant_scores():
    assert auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert auroc([5, 5, 5], [1, 0, 1]) == 0.5


@pytest.mark.parametrize(
    "scores,labels,message",
    [
        ([0.1, 0.2], [1], "2 scores but 1 labels"),
        ([0.1, 0.2], [1, 1], "needs positive and negative examples; got 2 positive and 0 negative"),
        ([0.1, 0.2], [1, 2], "labels must be 0 or 1 \\(or bools\\), got 2"),
        ([0.1, float("nan")], [1, 0], "score 1 is NaN"),
    ],
)
def test_auroc_bad_input_names_the_value(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        auroc(scores, labels)


def test_preference_accuracy_compares_plain_response_log_probabilities():
    rm = wrapped()
    tok = tiny_text.tokenizer()
    triples = [(tiny_text.words(1, 2), tiny_text.words(40, 41), tiny_text.words(60)), (tiny_text.words(3), tiny_text.words(42), tiny_text.words(61, 62, 63)),
               (tiny_text.words(5, 6, 7), tiny_text.words(43), tiny_text.words(64))]
    data = build_preference_data(tok, triples)
    result = preference_accuracy(rm, data, batch_size=2)
    expected = []
    for e in data:
        p = int(e["prompt_length"])
        logprob = []
        for ids in (e["chosen_input_ids"].tolist(), e["rejected_input_ids"].tolist()):
            prompt_mask = torch.tensor([[1] * p + [0] * (len(ids) - p)])  # "l1" is the last prompt token
            with torch.no_grad():
                logits = rm(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), prompt_mask=prompt_mask).logits[0]
            logprob.append(sum(logits[t - 1].log_softmax(-1)[ids[t]].item() for t in range(p, len(ids))))
        expected.append(logprob[0] - logprob[1])
    assert result["n"] == 3 and result["margins"] == pytest.approx(expected, abs=1e-4)
    assert result["preference_accuracy"] == sum(m > 0 for m in expected) / 3
    with pytest.raises(ValueError, match="data must be reft.data.build_preference_data"):
        preference_accuracy(rm, build_generation_data(tok, [(tiny_text.words(1), tiny_text.words(2))]))
