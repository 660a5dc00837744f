import logging

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.data import IGNORE_INDEX, Collator, build_classification_data, build_generation_data, build_preference_data
from reft.positions import PositionSpec, resolve

from . import tiny_text
from .tiny_text import words

EOS, BOS, PAD = 2, 1, 0


def ids_of(*word_ids: int) -> list[int]:
    return [4 + i for i in word_ids]


# ------------------------------------------------------------------ generation examples
def test_generation_example_masks_the_prompt_and_appends_eos():
    data = build_generation_data(tiny_text.tokenizer(), [(words(1, 2, 3), words(7, 8))])
    e = data[0]
    assert e["input_ids"].tolist() == [BOS, *ids_of(1, 2, 3), *ids_of(7, 8), EOS]
    assert e["labels"].tolist() == [IGNORE_INDEX] * 4 + [*ids_of(7, 8), EOS]
    assert int(e["prompt_length"]) == 4
    assert data.task == "generation" and data.pad_token_id == PAD


def test_chat_template_wraps_the_prompt_and_keeps_the_response_exact():
    tok = tiny_text.tokenizer(chat=True)
    data = build_generation_data(tok, [(words(1, 2), words(7))], system_prompt=words(5))
    # template: "w90 <system> w91 <user> w89 " (system turn, user turn, generation prompt); no BOS
    prompt = ids_of(90, 5, 91, 1, 2, 89)
    assert data[0]["input_ids"].tolist() == [*prompt, *ids_of(7), EOS]
    assert data[0]["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + [*ids_of(7), EOS]
    plain = build_generation_data(tok, [(words(1, 2), words(7))], chat_template=False)
    assert plain[0]["input_ids"].tolist() == [BOS, *ids_of(1, 2, 7), EOS]


def test_lists_dicts_and_datasets_give_the_same_examples():
    tok = tiny_text.tokenizer()
    pairs = [(words(1, 2), words(3)), (words(4), words(5, 6, 7))]
    from_pairs = build_generation_data(tok, pairs)
    from_dicts = build_generation_data(tok, [{"prompt": p, "response": r} for p, r in pairs])
    table = datasets.Dataset.from_dict({"q": [p for p, _ in pairs], "a": [r for _, r in pairs]})
    from_dataset = build_generation_data(tok, table, prompt_key="q", response_key="a")
    for other in (from_dicts, from_dataset):
        for a, b in zip(from_pairs, other):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_classification_examples_cover_the_whole_text():
    data = build_classification_data(tiny_text.tokenizer(), [words(1, 2), words(3)], [1, 0])
    assert data[0]["input_ids"].tolist() == [BOS, *ids_of(1, 2)]
    assert int(data[0]["labels"]) == 1 and int(data[0]["prompt_length"]) == 3
    assert data.num_labels == 2 and data.task == "classification"
    rows = datasets.Dataset.from_dict({"text": [words(1, 2), words(3)], "label": [1, 0]})
    again = build_classification_data(tiny_text.tokenizer(), rows)
    assert torch.equal(again[1]["input_ids"], data[1]["input_ids"]) and int(again[1]["labels"]) == 0


def test_repr_says_what_is_inside():
    data = build_generation_data(tiny_text.tokenizer(), [(words(1), words(2, 3))] * 3)
    assert repr(data) == "TokenizedData(generation: 3 examples, 5-5 tokens (mean 5.0))"


# ------------------------------------------------------------------ collator
@settings(max_examples=40, deadline=None)
@given(
    side=st.sampled_from(["left", "right"]),
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 5)), min_size=1, max_size=5),  # (prompt, response) words
    multiple=st.sampled_from([None, 4]),
)
def test_collator_pads_on_the_tokenizer_side_and_masks_the_prompt(side, shapes, multiple):
    tok = tiny_text.tokenizer(padding_side=side)
    pairs = [(words(*range(p)), words(*range(50, 50 + r))) for p, r in shapes]
    data = build_generation_data(tok, pairs)
    batch = Collator(tok, pad_to_multiple_of=multiple)(list(data))
    B, T = batch["input_ids"].shape
    assert T == max(data.lengths()) if multiple is None else T % multiple == 0
    for b, e in enumerate(data):
        n, p = len(e["input_ids"]), int(e["prompt_length"])
        real = torch.arange(T - n, T) if side == "left" else torch.arange(n)
        assert torch.equal(batch["input_ids"][b, real], e["input_ids"])
        assert torch.equal(batch["labels"][b, real], e["labels"])
        assert batch["attention_mask"][b].sum() == n and batch["attention_mask"][b, real].all()
        assert (batch["input_ids"][b][batch["attention_mask"][b] == 0] == PAD).all()
        assert (batch["labels"][b][batch["attention_mask"][b] == 0] == IGNORE_INDEX).all()
        assert torch.equal(batch["prompt_mask"][b].nonzero().flatten(), real[:p])
    # the core's "l1" under the prompt mask is the last prompt token, whatever the padding
    _, last = resolve(PositionSpec.parse("l1"), batch["prompt_mask"])
    for b, e in enumerate(data):
        assert batch["input_ids"][b, last[b, 0]] == e["input_ids"][int(e["prompt_length"]) - 1]


@settings(max_examples=30, deadline=None)
@given(side=st.sampled_from(["left", "right"]), lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_collator_keeps_explicit_positions_on_the_same_tokens(side, lengths, data):
    tok = tiny_text.tokenizer(padding_side=side)
    rows = []
    for i, n in enumerate(lengths):
        total = 1 + n + 2  # BOS, n prompt words, 1 response word, EOS
        positions = data.draw(st.lists(st.integers(-1, total - 1), min_size=1, max_size=3))
        rows.append((words(*range(10 + i, 10 + i + n)), words(60), positions))
    examples = build_generation_data(tok, rows)
    batch = Collator(tok)(list(examples))
    assert batch["positions"].shape[1] == max(len(r[2]) for r in rows)
    for b, (e, row) in enumerate(zip(examples, rows)):
        for k, pos in enumerate(row[2]):
            got = batch["positions"][b, k]
            if pos < 0:
                assert got == -1
            else:
                assert batch["input_ids"][b, got] == e["input_ids"][pos]
        assert (batch["positions"][b, len(row[2]):] == -1).all()


def test_classification_batch_has_one_label_per_example_and_prompt_mask_is_the_text():
    tok = tiny_text.tokenizer(padding_side="left")
    data = build_classification_data(tok, [words(1, 2, 3), words(4)], [0, 1])
    batch = Collator.for_data(data)(list(data))
    assert batch["labels"].tolist() == [0, 1]
    assert torch.equal(batch["prompt_mask"], batch["attention_mask"])
    assert batch["input_ids"][1].tolist() == [PAD, PAD, BOS, 4 + 4]


def test_collator_pads_with_eos_when_there_is_no_pad_token():
    tok = tiny_text.tokenizer()
    tok.pad_token = None
    assert Collator(tok).pad_token_id == EOS
    assert repr(Collator(tok)) == "Collator(padding_side='right', pad_token_id=2)"


# ------------------------------------------------------------------ errors
def test_bad_inputs_get_clear_errors():
    tok = tiny_text.tokenizer()
    with pytest.raises(ValueError, match="dataset is empty"):
        build_generation_data(tok, [])
    with pytest.raises(ValueError, match=r"example 1: response '' tokenizes to no tokens"):
        build_generation_data(tok, [(words(1), words(2)), (words(1), "")])
    with pytest.raises(ValueError, match=r"example 0: the response must be a str, got int"):
        build_generation_data(tok, [(words(1), 5)])
    with pytest.raises(ValueError, match="expected a \\(prompt, response\\) pair"):
        build_generation_data(tok, [words(1)])
    with pytest.raises(ValueError, match=r"example 0: no key\(s\) \['response'\]"):
        build_generation_data(tok, [{"prompt": words(1), "answer": words(2)}])
    with pytest.raises(ValueError, match=r"example 0: position 9 is out of range for its 4 tokens \(valid: 0..3, or -1\)"):
        build_generation_data(tok, [(words(1), words(2), [9])])
    with pytest.raises(ValueError, match="on_too_long must be one of 'error', 'skip'; got 'truncate'"):
        build_generation_data(tok, [(words(1), words(2))], on_too_long="truncate")
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        build_generation_data(tok, [(words(1), words(2))], chat_template=True)
    with pytest.raises(ValueError, match="dataset is empty"):
        build_classification_data(tok, [], [])
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        build_classification_data(tok, [words(1), words(2)], [0])
    with pytest.raises(ValueError, match=r"example 1: label 3 is out of range for 3 classes \(valid: 0..2\)"):
        build_classification_data(tok, [words(1), words(2)], [0, 3], num_labels=3)
    with pytest.raises(ValueError, match=r"example 0: label -1 is out of range"):
        build_classification_data(tok, [words(1)], [-1])
    with pytest.raises(ValueError, match="label must be an int class index, got 'pos'"):
        build_classification_data(tok, [words(1)], ["pos"])
    mixed = build_generation_data(tok, [(words(1), words(2), [0]), (words(1), words(2))])
    with pytest.raises(ValueError, match="1 of 2 examples carry explicit positions"):
        Collator(tok)(list(mixed))


def test_too_long_examples_error_or_are_skipped_counted_and_logged(caplog):
    tok = tiny_text.tokenizer(model_max_length=6)
    pairs = [(words(1), words(2)), (words(*range(5)), words(9)), (words(1, 2), words(3))]  # 4, 8, 5 tokens
    with pytest.raises(ValueError, match="example 1 has 8 tokens, longer than max_length 6"):
        build_generation_data(tok, pairs)
    with caplog.at_level(logging.WARNING, logger="reft.data"):
        data = build_generation_data(tok, pairs, on_too_long="skip")
    assert len(data) == 2 and data.skipped == 1
    assert "skipped 1 of 3 examples longer than max_length 6" in caplog.text
    assert repr(data).endswith("1 skipped as longer than 6)")
    assert len(build_generation_data(tok, pairs, max_length=8)) == 3  # an explicit limit wins
    with pytest.raises(ValueError, match="no examples left: all 1 are longer than max_length 6"):
        build_generation_data(tok, pairs[1:2], on_too_long="skip")
    with pytest.raises(ValueError, match="example 0 has 7 tokens, longer than max_length 6"):
        build_classification_data(tok, [words(*range(6))], [0])


# ------------------------------------------------------------------ preference pairs
def test_preference_example_shares_the_prompt_and_labels_each_response():
    tok = tiny_text.tokenizer(chat=True)
    data = build_preference_data(tok, [(words(1, 2), words(7, 8, 9), words(6))])
    prompt = ids_of(91, 1, 2, 89)  # the chat template's user turn and generation prompt, as for generation data
    e = data[0]
    assert e["chosen_input_ids"].tolist() == [*prompt, *ids_of(7, 8, 9), EOS]
    assert e["chosen_labels"].tolist() == [IGNORE_INDEX] * 4 + [*ids_of(7, 8, 9), EOS]
    assert e["rejected_input_ids"].tolist() == [*prompt, *ids_of(6), EOS]
    assert e["rejected_labels"].tolist() == [IGNORE_INDEX] * 4 + [*ids_of(6), EOS]
    assert int(e["prompt_length"]) == 4 and data.task == "preference" and data.lengths() == [8]
    generation = build_generation_data(tok, [(words(1, 2), words(7, 8, 9))])
    assert torch.equal(generation[0]["input_ids"], e["chosen_input_ids"])
    as_dicts = build_preference_data(tok, [{"q": words(1, 2), "good": words(7, 8, 9), "bad": words(6)}],
                                     prompt_key="q", chosen_key="good", rejected_key="bad")
    assert all(torch.equal(as_dicts[0][k], e[k]) for k in e)


@settings(max_examples=30, deadline=None)
@given(
    side=st.sampled_from(["left", "right"]),
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4),
)
def test_preference_batch_is_the_chosen_rows_then_the_rejected_rows(side, shapes):
    tok = tiny_text.tokenizer(padding_side=side)
    triples = [(words(*range(p)), words(*range(40, 40 + c)), words(*range(60, 60 + r))) for p, c, r in shapes]
    data = build_preference_data(tok, triples)
    batch = Collator.for_data(data)(list(data))
    B = len(triples)
    assert batch["input_ids"].shape[0] == 2 * B
    rows = [(e["chosen_input_ids"], e["chosen_labels"], e) for e in data] + [(e["rejected_input_ids"], e["rejected_labels"], e) for e in data]
    T = batch["input_ids"].shape[1]
    for b, (ids, labels, e) in enumerate(rows):
        n, p = len(ids), int(e["prompt_length"])
        real = torch.arange(T - n, T) if side == "left" else torch.arange(n)
        assert torch.equal(batch["input_ids"][b, real], ids) and torch.equal(batch["labels"][b, real], labels)
        assert batch["attention_mask"][b].sum() == n
        assert torch.equal(batch["prompt_mask"][b].nonzero().flatten(), real[:p])


def test_bad_preference_inputs_get_clear_errors():
    tok = tiny_text.tokenizer(model_max_length=6)
    with pytest.raises(ValueError, match="dataset is empty: give at least one \\(prompt, chosen, rejected\\) triple"):
        build_preference_data(tok, [])
    with pytest.raises(ValueError, match="example 0: expected a \\(prompt, chosen, rejected\\) triple"):
        build_preference_data(tok, [(words(1), words(2))])
    with pytest.raises(ValueError, match=r"example 0: no key\(s\) \['rejected'\]"):
        build_preference_data(tok, [{"prompt": words(1), "chosen": words(2)}])
    with pytest.raises(ValueError, match="example 0: the rejected must be a str, got int"):
        build_preference_data(tok, [(words(1), words(2), 3)])
    with pytest.raises(ValueError, match="example 1: rejected response '' tokenizes to no tokens"):
        build_preference_data(tok, [(words(1), words(2), words(3)), (words(1), words(2), "")])
    with pytest.raises(ValueError, match="example 0 has 8 tokens, longer than max_length 6"):
        build_preference_data(tok, [(words(1), words(2), words(*range(5)))])  # BOS, 1, 5 words, EOS
    kept = build_preference_data(tok, [(words(1), words(2), words(*range(5))), (words(1), words(2), words(3))], on_too_long="skip")
    assert len(kept) == 1 and kept.skipped == 1
