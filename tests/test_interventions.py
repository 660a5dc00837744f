import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reft
from reft.interventions.base import OrthonormalRows

RANKED = [reft.LoReFT, reft.DiReFT, reft.NoReFT, reft.ConsReFT, reft.LoBiReFT, reft.OrthDiReFT]
ALL = [reft.RED, *RANKED]


def build(cls, d=16, rank=3, **kw):
    return cls(d, **kw) if cls is reft.RED else cls(d, rank, **kw)


def test_red_is_identity_at_init():
    h = torch.randn(2, 5, 16)
    assert torch.equal(reft.RED(16)(h), h)


def test_red_is_scale_and_bias():
    red = reft.RED(4)
    with torch.no_grad():
        red.scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        red.bias.fill_(0.5)
    h = torch.ones(3, 4)
    torch.testing.assert_close(red(h), torch.tensor([1.5, 2.5, 3.5, 4.5]).expand(3, 4))


def test_loreft_matches_reference_equation():
    iv = reft.LoReFT(8, 2)
    h = torch.randn(5, 8, dtype=torch.float64)
    R = iv.R().double()
    W, b = iv.W.weight.double(), iv.W.bias.double()
    expected = h + (h @ W.T + b - h @ R.T) @ R  # h + Rᵀ(Wh + b − Rh), row-vector form
    torch.testing.assert_close(iv(h), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [reft.LoReFT, reft.ConsReFT, reft.LoBiReFT, reft.OrthDiReFT])
def test_rows_stay_orthonormal_after_training(cls):
    torch.manual_seed(0)
    iv = build(cls, d=32, rank=4)
    opt = torch.optim.AdamW(iv.parameters(), lr=0.05, weight_decay=0.0)
    target = torch.randn(8, 32)
    for _ in range(20):
        loss = (iv(torch.randn(8, 32)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    R = iv.R()
    torch.testing.assert_close(R @ R.T, torch.eye(4), atol=1e-5, rtol=0)


def test_orthonormal_rows_preserve_an_orthonormal_init():
    rows = OrthonormalRows(4, 16)
    torch.testing.assert_close(rows(), rows.weight, atol=1e-6, rtol=0)


def test_loreft_stores_only_rank_by_hidden_parameters():
    iv = reft.LoReFT(576, 4)
    sizes = {k: tuple(v.shape) for k, v in iv.state_dict().items()}
    assert sizes == {"R.weight": (4, 576), "W.weight": (4, 576), "W.bias": (4,)}
    assert iv.num_parameters() == 2 * 4 * 576 + 4


def test_orthogonalizes_once_per_forward_call(monkeypatch):
    iv = reft.LoReFT(16, 2)
    calls = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: calls.append(1) or qr(*a, **k))
    iv(torch.randn(4, 7, 16))  # 28 positions, one call
    assert len(calls) == 1


@settings(max_examples=25, deadline=None)
@given(cls=st.sampled_from(RANKED), d=st.integers(4, 24), rank=st.integers(1, 4), seed=st.integers(0, 999))
def test_affine_with_low_rank_edit(cls, d, rank, seed):
    torch.manual_seed(seed)
    iv = build(cls, d=d, rank=min(rank, d), dtype=torch.float64)
    x, y = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    a = 0.3
    torch.testing.assert_close(iv(a * x + (1 - a) * y), a * iv(x) + (1 - a) * iv(y))
    h = torch.randn(64, d, dtype=torch.float64)
    delta = iv(h) - h
    assert torch.linalg.matrix_rank(delta - delta.mean(0), atol=1e-8) <= min(rank, d)
    assert torch.linalg.matrix_rank(delta, atol=1e-8) <= min(rank, d) + 1  # affine: plus a constant


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    "param_dtype,h_dtype",
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32)],
)
def test_mixed_dtypes_return_the_input_dtype(cls, param_dtype, h_dtype):
    iv = build(cls, dtype=param_dtype)
    h = torch.randn(2, 3, 16).to(h_dtype)
    out = iv(h)
    assert out.dtype == h_dtype and out.shape == h.shape
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("cls", ALL)
def test_repr_names_sizes_and_parameter_count(cls):
    iv = build(cls)
    text = repr(iv)
    assert text.startswith(cls.__name__ + "(") and "hidden_size=16" in text
    assert f"params={iv.num_parameters():,}" in text
    if cls is not reft.RED:
        assert "rank=3" in text


@pytest.mark.parametrize("cls", ALL)
def test_registry_rebuilds_from_name_and_config(cls):
    iv = build(cls)
    again = reft.make_intervention(iv.name, **iv.config)
    assert type(again) is cls and again.config == iv.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in iv.state_dict().items()}


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="unknown intervention 'lorft'.*loreft.*red"):
        reft.make_intervention("lorft", hidden_size=8)


def test_register_a_custom_intervention():
    @reft.register_intervention("test_registry_shift")
    class Shift(reft.Intervention):
        def __init__(self, hidden_size: int, amount: float = 1.0):
            super().__init__(hidden_size=hidden_size, amount=amount)
            self.amount = amount

        def forward(self, h):
            return h + self.amount

    iv = reft.make_intervention("test_registry_shift", hidden_size=4, amount=2.0)
    assert torch.equal(iv(torch.zeros(4)), torch.full((4,), 2.0))
    assert "test_registry_shift" in reft.registered_interventions()
    with pytest.raises(ValueError, match="already registered"):
        reft.register_intervention("test_registry_shift")(type("Other", (reft.Intervention,), {}))
    with pytest.raises(TypeError, match="subclass of reft.Intervention"):
        reft.register_intervention("not_a_module")(object)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(hidden_size=8, rank=0), r"rank must be an int in 1\.\.8"),
        (dict(hidden_size=8, rank=9), r"rank must be an int in 1\.\.8"),
        (dict(hidden_size=0, rank=1), "hidden_size must be a positive int"),
        (dict(hidden_size=8, rank=2, act="swish"), "unknown activation 'swish'; valid: None, linear, relu"),
        (dict(hidden_size=8, rank=2, dtype="int8"), "unsupported intervention dtype"),
    ],
)
def test_bad_arguments_name_the_value_and_the_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reft.LoReFT(**kwargs)


@pytest.mark.parametrize("cls", [reft.LoReFT, reft.DiReFT, reft.NoReFT, reft.OrthDiReFT])
def test_dropout_acts_in_train_mode_only(cls):
    iv = build(cls, dropout=0.5)
    h = torch.randn(64, 16)
    iv.eval()
    assert torch.equal(iv(h), iv(h))
    iv.train()
    assert not torch.equal(iv(h), iv(h))


# ------------------------------------------------------------------ LoReFT options
def test_loreft_identity_init_leaves_a_wrapped_models_logits_unchanged():
    from . import tiny

    model = tiny.causal_lm(initializer_range=0.2)
    ids, mask = tiny.padded_batch([6, 3, 5], side="right")
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(0)
    sites = {f"layers.{i}.block_output": reft.LoReFT(tiny.HIDDEN, 4, init="identity") for i in range(2)}
    rm = reft.IntervenableModel(model, sites, positions="all")
    with torch.no_grad():
        assert torch.equal(rm(input_ids=ids, attention_mask=mask).logits, base)
    iv = rm["layers.0.block_output"]
    torch.testing.assert_close(iv.W.weight, iv.R(), atol=0, rtol=0)  # W = R, b = 0
    assert not iv.W.bias.any()


def test_loreft_default_init_is_pyrefts_and_not_the_identity():
    torch.manual_seed(0)
    iv = reft.LoReFT(16, 4)
    assert iv.config["init"] == "pyreft" and iv.config["dropout_at"] == "output"
    h = torch.randn(5, 16)
    assert not torch.allclose(iv(h), h)


def test_loreft_dropout_on_the_edit_keeps_the_residual_stream():
    torch.manual_seed(0)
    h = torch.randn(256, 16, dtype=torch.float64)
    edit_only = reft.LoReFT(16, 4, dropout=0.5, dropout_at="edit", init="identity", dtype=torch.float64).train()
    assert torch.equal(edit_only(h), h)  # a zero edit: dropout has nothing to drop
    output = reft.LoReFT(16, 4, dropout=0.5, dropout_at="output", init="identity", dtype=torch.float64).train()
    assert (output(h) == 0).float().mean() > 0.3  # pyreft's: features of h itself are dropped
    iv = reft.LoReFT(16, 4, dropout=0.5, dropout_at="edit", dtype=torch.float64).train()
    R, W, b = iv.R(), iv.W.weight, iv.W.bias
    edit = (h @ W.T + b - h @ R.T) @ R  # Rᵀ(Wh + b − Rh), row-vector form
    out = iv(h)
    kept = out != h  # where dropout kept the edit (scaled by 2), h is exact elsewhere
    torch.testing.assert_close(out[kept], (h + 2 * edit)[kept])
    assert 0.3 < kept.double().mean() < 0.7


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(init="zeros"), "LoReFT init must be one of 'pyreft', 'identity'; got 'zeros'"),
        (dict(dropout_at="input"), "LoReFT dropout_at must be one of 'output', 'edit'; got 'input'"),
        (dict(init="identity", act="relu"), "identity only with act=None"),
    ],
)
def test_loreft_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reft.LoReFT(8, 2, **kwargs)


# ------------------------------------------------------------------ ReFT-r1
def reft_r1_reference(h: list[list[float]], v: list[float], k: int) -> tuple[list[float], list[list[float]]]:
    """Plain Python: latents ReLU(h_i · v) of one sequence and its edit h_i + mean(top-k latents) v."""
    latents = [max(0.0, sum(a * b for a, b in zip(row, v))) for row in h]
    top = sorted(latents, reverse=True)[: min(k, len(latents))]
    magnitude = sum(top) / len(top)
    return latents, [[a + magnitude * b for a, b in zip(row, v)] for row in h]


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 9), k=st.integers(1, 5), exclude_first=st.booleans(), seed=st.integers(0, 999))
def test_reft_r1_latent_and_edit_match_the_paper(T, k, exclude_first, seed):
    torch.manual_seed(seed)
    iv = reft.ReFTr1(6, k=k, exclude_first=exclude_first, dtype=torch.float64)
    h = torch.randn(3, T, 6, dtype=torch.float64)
    v = (iv.w / iv.w.norm()).tolist()
    out, latents = iv(h), iv.latent(h)
    skip = 1 if exclude_first and T > 1 else 0  # AxBench leaves the first token (BOS) out; one token is kept
    for b in range(3):
        rows = h[b].tolist()
        z, _ = reft_r1_reference(rows, v, k)
        torch.testing.assert_close(latents[b], torch.tensor(z, dtype=torch.float64))
        _, edited = reft_r1_reference(rows[skip:], v, k)
        torch.testing.assert_close(out[b], torch.tensor(rows[:skip] + edited, dtype=torch.float64))


def test_reft_r1_direction_has_unit_norm_whatever_w_is():
    iv = reft.ReFTr1(8)
    with torch.no_grad():
        iv.w.mul_(37.0)
    torch.testing.assert_close(iv.direction().norm(), torch.tensor(1.0))
    h = torch.zeros(1, 3, 8)
    h[0, 1] = 2 * iv.direction().detach()  # latent 2 at token 1, 0 elsewhere
    torch.testing.assert_close(iv.latent(h), torch.tensor([[0.0, 2.0, 0.0]]))


def test_reft_r1_penalty_is_l1_of_the_latents_outside_the_top_k_in_training_only():
    torch.manual_seed(0)
    iv = reft.ReFTr1(8, k=2, l1=0.5)
    h = torch.randn(2, 6, 8)
    iv.eval()
    iv(h)
    assert iv.penalty is None
    iv.train()
    iv(h)
    z = iv.latent(h[:, 1:]).detach()  # the first token is left out
    expected = 0.5 * sum(sum(sorted(row, reverse=True)[2:]) for row in z.tolist())  # each sequence's top 2 are free
    torch.testing.assert_close(iv.penalty.detach(), torch.tensor(expected))
    no_l1 = reft.ReFTr1(8, k=2).train()
    no_l1(h)
    assert no_l1.penalty is None


def test_reft_r1_has_hidden_size_parameters_rebuilds_by_name_and_keeps_dtype():
    iv = reft.ReFTr1(576, k=4)
    assert iv.num_parameters() == 576 and "k=4" in repr(iv)
    again = reft.make_intervention("reft_r1", **iv.config)
    assert type(again) is reft.ReFTr1 and again.config == iv.config
    h = torch.randn(2, 3, 576, dtype=torch.bfloat16)
    assert iv(h).dtype == torch.bfloat16 and iv(h).shape == h.shape


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(k=0), "k .* must be an int >= 1, got 0"),
        (dict(l1=-1.0), "l1 .* must be a number >= 0, got -1.0"),
        (dict(exclude_first=1), "exclude_first must be a bool, got 1"),
    ],
)
def test_reft_r1_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reft.ReFTr1(8, **kwargs)
