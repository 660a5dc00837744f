import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.positions import PositionSpec, rank_to_position, resolve


def reference(spec: PositionSpec, mask: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Plain-Python statement of the rule: suffix takes the last min(m, n) tokens, prefix what precedes;
    each side is as wide as its count, capped at the sequence length T."""
    prefixes, suffixes = [], []
    for row in mask:
        real = [t for t, bit in enumerate(row) if bit]
        take_last = min(spec.last, len(real))
        suffix = real[len(real) - take_last :]
        prefix = real[: min(spec.first, len(real) - take_last)]
        prefixes.append(prefix + [-1] * (min(spec.first, len(row)) - len(prefix)))
        suffixes.append([-1] * (min(spec.last, len(row)) - len(suffix)) + suffix)
    return prefixes, suffixes


@st.composite
def masks(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 12))
    side = draw(st.sampled_from(["left", "right", "gaps"]))
    rows = []
    for _ in range(B):
        if side == "gaps":  # a prompt mask need not be contiguous in principle
            rows.append(draw(st.lists(st.integers(0, 1), min_size=T, max_size=T)))
            continue
        n = draw(st.integers(0, T))
        rows.append([1] * n + [0] * (T - n) if side == "right" else [0] * (T - n) + [1] * n)
    return rows


specs = st.builds(PositionSpec, first=st.integers(0, 8), last=st.integers(0, 8)).filter(lambda s: s.first + s.last)


@settings(max_examples=200, deadline=None)
@given(spec=specs, mask=masks())
def test_resolve_matches_reference(spec, mask):
    prefix, suffix = resolve(spec, torch.tensor(mask))
    want_prefix, want_suffix = reference(spec, mask)
    assert prefix.tolist() == want_prefix
    assert suffix.tolist() == want_suffix


@settings(max_examples=200, deadline=None)
@given(spec=specs, mask=masks())
def test_each_token_edited_at_most_once_and_only_real_tokens(spec, mask):
    prefix, suffix = resolve(spec, torch.tensor(mask))
    for b, row in enumerate(torch.cat([prefix, suffix], 1).tolist()):
        picked = [p for p in row if p >= 0]
        assert len(picked) == len(set(picked))
        assert all(mask[b][p] == 1 for p in picked)
        assert len(picked) == min(spec.first + spec.last, sum(mask[b]))


@settings(max_examples=100, deadline=None)
@given(mask=masks())
def test_rank_to_position(mask):
    table = rank_to_position(torch.tensor(mask)).tolist()
    for row, bits in zip(table, mask):
        real = [t for t, bit in enumerate(bits) if bit]
        assert row == real + [-1] * (len(bits) - len(real))


@pytest.mark.parametrize(
    "text,first,last,all_",
    [("all", 0, 0, True), ("f7", 7, 0, False), ("l1", 0, 1, False), ("f7+l7", 7, 7, False), (" F5+L5 ", 5, 5, False)],
)
def test_parse(text, first, last, all_):
    spec = PositionSpec.parse(text)
    assert (spec.first, spec.last, spec.all) == (first, last, all_)
    assert PositionSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["", "x", "f", "l-1", "f0", "f0+l0", "l7+f7", "f3l2", "first", 3, None])
def test_malformed_specs_say_what_is_valid(bad):
    with pytest.raises(ValueError, match=r"malformed position spec .*valid: 'all', 'f<n>', 'l<n>' or 'f<n>\+l<m>'"):
        PositionSpec.parse(bad)


def test_resolution_stays_on_the_mask_device_and_is_long():
    prefix, suffix = resolve(PositionSpec(2, 2), torch.ones(2, 6, dtype=torch.bool))
    assert prefix.dtype == suffix.dtype == torch.long
    assert prefix.tolist() == [[0, 1]] * 2 and suffix.tolist() == [[4, 5]] * 2
