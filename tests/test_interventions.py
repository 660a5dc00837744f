import inspect
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reft
from reft.interventions.base import OrthonormalRows, as_dtype

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


# ---------------------------------------------------------------- equations against a reference
# Each intervention's forward against its docstring's equation, computed here with plain float64
# torch ops from the module's raw parameters. R's parameter is a random (not orthonormal) matrix and
# the reference orthonormalizes it by Gram-Schmidt, so the map from `R.weight` to R is checked too.
# Tolerance 1e-5: `OrthonormalRows` runs its QR in float32 whatever the parameters' dtype.
# Row-vector form: `h @ M.T` is `Mh`, `z @ R` is `Rᵀz`.


def gram_schmidt(w: torch.Tensor) -> torch.Tensor:
    """The rows of `w` `[r, d]` made orthonormal one by one (classical Gram-Schmidt), in order."""
    rows = []
    for v in w:
        for u in rows:
            v = v - (v @ u) * u
        rows.append(v / v.norm())
    return torch.stack(rows)


ACTS = {None: lambda x: x, "tanh": torch.tanh}


def reference(cls, p: dict[str, torch.Tensor], h: torch.Tensor, act) -> torch.Tensor:
    """`h'` by the docstring equation of `cls`, from its raw parameters `p` (name -> tensor)."""
    R = gram_schmidt(p["R.weight"]) if "R.weight" in p else None
    if cls is reft.RED:  # h' = s ⊙ h + b
        return p["scale"] * h + p["bias"]
    if cls is reft.LoReFT:  # h' = h + Rᵀ(act(Wh + b) − Rh)
        return h + (act(h @ p["W.weight"].T + p["W.bias"]) - h @ R.T) @ R
    if cls is reft.DiReFT:  # h' = h + W₂ᵀ act(W₁h + b)
        return h + act(h @ p["W1.weight"].T + p["W1.bias"]) @ p["W2"]
    if cls is reft.NoReFT:  # h' = h + W₂ᵀ(act(W₁h + b) − W₂h)
        return h + (act(h @ p["W1.weight"].T + p["W1.bias"]) - h @ p["W2"].T) @ p["W2"]
    if cls is reft.ConsReFT:  # h' = h + Rᵀ(b − Rh)
        return h + (p["b"] - h @ R.T) @ R
    if cls is reft.LoBiReFT:  # h' = h + Rᵀb
        return h + p["b"] @ R
    if cls is reft.OrthDiReFT:  # h' = h + Rᵀ act(Wh + b)
        return h + act(h @ p["W.weight"].T + p["W.bias"]) @ R
    raise AssertionError(f"no reference for {cls.__name__}")


TAKES_ACT = [reft.LoReFT, reft.DiReFT, reft.NoReFT, reft.OrthDiReFT]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def randomized(cls, d=12, rank=3, seed=0, **kw):
    """`cls` in float64 with every parameter redrawn from N(0, 1): no init value hides a term."""
    torch.manual_seed(seed)
    iv = build(cls, d=d, rank=rank, dtype="float64", **kw).eval()
    with torch.no_grad():
        for param in iv.parameters():
            param.copy_(torch.randn_like(param))
    return iv


def params(iv) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in iv.named_parameters()}


@pytest.mark.parametrize("cls,act", [(cls, None) for cls in ALL] + [(cls, "tanh") for cls in TAKES_ACT])
def test_forward_matches_the_equation(cls, act):
    iv = randomized(cls, **({"act": act} if cls in TAKES_ACT else {}))
    h = torch.randn(2, 5, 12, dtype=torch.float64)
    expected = reference(cls, params(iv), h, ACTS[act])
    close(iv(h), expected)


def test_gram_schmidt_reference_is_orthonormal():  # the reference itself, on a known case
    w = torch.tensor([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    second = torch.tensor([0.16, -0.12, 1.0], dtype=torch.float64) / 1.04**0.5  # [1, 1, 1] − 1.4 · first, normalized
    torch.testing.assert_close(gram_schmidt(w), torch.stack([torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64), second]))


# ---------------------------------------------------------------- known values the papers define


def test_loreft_sets_the_projection_on_r_to_wh_plus_b_and_keeps_the_rest():
    """LoReFT's edit (paper, eq. 2): `R h' = Wh + b`; the part of h orthogonal to R's rows is untouched."""
    iv = randomized(reft.LoReFT)
    p, h = params(iv), torch.randn(7, 12, dtype=torch.float64)
    R = gram_schmidt(p["R.weight"])
    out = iv(h)
    close(out @ R.T, h @ p["W.weight"].T + p["W.bias"])
    complement = torch.eye(12, dtype=torch.float64) - R.T @ R
    close(out @ complement, h @ complement)


def test_loreft_with_w_equal_to_r_and_no_bias_is_the_identity():
    iv = randomized(reft.LoReFT)
    with torch.no_grad():
        iv.R.weight.copy_(gram_schmidt(iv.R.weight.detach()))  # already orthonormal: R = weight
        iv.W.weight.copy_(iv.R.weight)
        iv.W.bias.zero_()
    h = torch.randn(7, 12, dtype=torch.float64)
    close(iv(h), h)


def test_noreft_with_w1_equal_to_w2_and_no_bias_is_the_identity():
    iv = randomized(reft.NoReFT)
    with torch.no_grad():
        iv.W1.weight.copy_(iv.W2)
        iv.W1.bias.zero_()
    h = torch.randn(7, 12, dtype=torch.float64)
    close(iv(h), h)


@pytest.mark.parametrize("cls,weight,bias", [(reft.DiReFT, "W1", "W1"), (reft.OrthDiReFT, "W", "W")])
def test_direft_with_zero_w_and_b_is_the_identity(cls, weight, bias):
    iv = randomized(cls, act="tanh")
    with torch.no_grad():
        getattr(iv, weight).weight.zero_()
        getattr(iv, bias).bias.zero_()
    h = torch.randn(7, 12, dtype=torch.float64)
    close(iv(h), h)


def test_consreft_sets_the_projection_on_r_to_b():
    """ConsReFT: `R h' = b` for every h; the part orthogonal to R's rows is untouched."""
    iv = randomized(reft.ConsReFT)
    p, h = params(iv), torch.randn(7, 12, dtype=torch.float64)
    R = gram_schmidt(p["R.weight"])
    out = iv(h)
    close(out @ R.T, p["b"].expand(7, 3))
    complement = torch.eye(12, dtype=torch.float64) - R.T @ R
    close(out @ complement, h @ complement)


def test_lobireft_moves_every_h_by_b_along_r_and_is_the_identity_at_b_zero():
    iv = randomized(reft.LoBiReFT)
    p, h = params(iv), torch.randn(7, 12, dtype=torch.float64)
    R = gram_schmidt(p["R.weight"])
    close((iv(h) - h) @ R.T, p["b"].expand(7, 3))
    with torch.no_grad():
        iv.b.zero_()
    close(iv(h), h)


def test_orth_direft_keeps_the_part_orthogonal_to_r():
    iv = randomized(reft.OrthDiReFT, act="tanh")
    p, h = params(iv), torch.randn(7, 12, dtype=torch.float64)
    R = gram_schmidt(p["R.weight"])
    complement = torch.eye(12, dtype=torch.float64) - R.T @ R
    close(iv(h) @ complement, h @ complement)


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


@pytest.fixture
def registry(monkeypatch):
    """A scratch registry: the classes a test registers are gone after it."""
    from reft.interventions import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def test_config_records_arguments_left_out_of_super_init(registry):
    @reft.register_intervention("test_config_scaled")
    class Scaled(reft.Intervention):
        def __init__(self, hidden_size: int, factor: float = 1.0, dtype: torch.dtype | str = torch.float32):
            super().__init__(hidden_size)  # factor and dtype left out: still recorded
            self.factor = factor
            self.v = nn.Parameter(torch.ones(hidden_size, dtype=as_dtype(dtype)))

        def forward(self, h):
            return (h.to(self.v.dtype) * self.v * self.factor).to(h.dtype)

    iv = Scaled(4, 3.0, dtype=torch.float64)  # positional arguments are recorded by name
    assert iv.config == {"hidden_size": 4, "factor": 3.0, "dtype": "float64"}
    again = reft.make_intervention(iv.name, **json.loads(json.dumps(iv.config)))  # as an adapter stores it
    assert again.factor == 3.0 and again.v.dtype == torch.float64
    h = torch.randn(2, 4)
    assert torch.equal(again(h), iv(h)) and torch.equal(iv(h), h * 3.0)
    assert list(inspect.signature(Scaled).parameters) == ["hidden_size", "factor", "dtype"]  # recipes check it


def test_config_of_a_subclass_of_a_subclass_and_of_keyword_arguments(registry):
    @reft.register_intervention("test_config_wide_red")
    class WideRED(reft.RED):
        def __init__(self, hidden_size: int, init_scale: float = 2.0, **extra):
            super().__init__(hidden_size, dtype="float64")
            with torch.no_grad():
                self.scale.fill_(init_scale)
            self.extra = extra

    iv = WideRED(4, tag="x")
    assert iv.config == {"hidden_size": 4, "init_scale": 2.0, "tag": "x"}  # WideRED's arguments, not RED's
    again = reft.make_intervention("test_config_wide_red", **iv.config)
    assert again.extra == {"tag": "x"} and torch.equal(again.scale, torch.full((4,), 2.0, dtype=torch.float64))


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
