"""The LWE core: parameter sets, seeded A, sampling, planner, exact/compact encryption, wire format."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.lwe import params as P
from common.lwe import scheme, wire
from common.lwe.planner import plan_for_bounds, plan_for_weights
from common.lwe.prg import DeterministicRandomness, expand_a, sample_gaussian
from common.lwe.quant import dequantize_product, quantize_rows, quantize_tokens

SEED = bytes(range(32))


def rand_int8(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.integers(-127, 128, size=shape, dtype=np.int64).astype(np.int8)


def roundtrip(params: P.LweParams, w: np.ndarray, x: np.ndarray, delta_bits: int, seed: int = 1):
    """Encrypt x (d_in, T), evaluate W on the node, decrypt; returns (raw, decoded, encrypted)."""
    a = expand_a(SEED, w.shape[1], params)
    enc = scheme.encrypt(params, a, x, delta_bits, rng=DeterministicRandomness(seed))
    y = scheme.multiply(params, w, enc.b)
    h = scheme.hint(params, w, a)
    raw = scheme.decrypt_raw(params, y, h, enc.s)
    return raw, scheme.round_shift(raw, delta_bits), enc


# ---------------------------------------------------------------- parameter sets


def test_named_sets_are_allowed_and_within_budget() -> None:
    assert P.by_name("exact") == P.EXACT and P.by_name("compact") == P.COMPACT
    assert (P.EXACT.log_q, P.EXACT.n, P.EXACT.sigma) == (64, 2048, 4096.0)
    assert (P.COMPACT.log_q, P.COMPACT.n, P.COMPACT.sigma) == (32, 1280, 3.19)
    for p in P.PARAM_SETS.values():
        assert p.security_margin_bits() >= 0


@pytest.mark.parametrize(
    "change",
    [{"n": 1024}, {"log_q": 32}, {"sigma": 3.19}, {"n": 4096}],
    ids=["smaller-n", "other-q", "small-sigma-big-q", "off-list"],
)
def test_parameters_outside_allow_list_are_refused(change: dict) -> None:
    bad = dataclasses.replace(P.EXACT, name="custom", **change)
    with pytest.raises(P.ParameterError, match="not on the allow-list"):
        P.check_allowed(bad)


def test_unknown_set_name_is_a_clear_error() -> None:
    with pytest.raises(P.ParameterError, match="unknown LWE parameter set 'turbo'"):
        P.by_name("turbo")


# ---------------------------------------------------------------- randomness


@pytest.mark.parametrize("params", [P.EXACT, P.COMPACT], ids=lambda p: p.name)
def test_public_matrix_is_seeded_uniform_and_shape_separated(params: P.LweParams) -> None:
    a = expand_a(SEED, 64, params)
    assert a.shape == (64, params.n) and a.dtype == params.dtype
    assert np.array_equal(a, expand_a(SEED, 64, params))
    assert not np.array_equal(a, expand_a(bytes(32), 64, params))
    # A distinct row count derives a distinct key: no shared prefix between shapes.
    assert not np.array_equal(a[:8], expand_a(SEED, 65, params)[:8])
    top = (a >> np.array(params.log_q - 1, dtype=a.dtype)).astype(np.float64)
    assert abs(top.mean() - 0.5) < 0.01
    low = (a & np.array(1, dtype=a.dtype)).astype(np.float64)
    assert abs(low.mean() - 0.5) < 0.01


def test_seed_must_be_32_bytes() -> None:
    with pytest.raises(P.ParameterError, match="32 bytes"):
        expand_a(b"short", 4, P.EXACT)


@pytest.mark.parametrize("params", [P.EXACT, P.COMPACT], ids=lambda p: p.name)
def test_gaussian_samples_have_sigma(params: P.LweParams) -> None:
    z = sample_gaussian((200_000,), params, DeterministicRandomness(7)).astype(np.float64)
    # Rounding adds variance 1/12: visible only for the compact σ.
    expected = np.sqrt(params.sigma**2 + 1 / 12)
    assert abs(z.std() / expected - 1) < 0.01
    assert abs(z.mean()) < 0.02 * params.sigma
    assert np.abs(z).max() <= params.tail_bound


def test_default_randomness_is_fresh() -> None:
    a = sample_gaussian((1000,), P.EXACT)
    b = sample_gaussian((1000,), P.EXACT)
    assert not np.array_equal(a, b)


# ---------------------------------------------------------------- planner


def test_planner_exact_int8_int16_up_to_2048_even_worst_case() -> None:
    for d_in in (576, 1536, 2048):
        w = np.full((4, d_in), 127, dtype=np.int8)
        plan = plan_for_weights(P.EXACT, w)
        assert plan.exact and plan.act_bits >= 16, (d_in, plan)
        assert plan.delta * plan.row_l1_max * plan.act_max + plan.noise_bound < P.EXACT.q // 2
    worst = plan_for_weights(P.EXACT, np.full((4, 4096), -127, dtype=np.int8))
    half_q = P.EXACT.q // 2
    assert worst.exact and worst.act_bits >= 15
    assert worst.delta * worst.row_l1_max * worst.act_max + worst.noise_bound < half_q
    # Maximal: one more activation bit would wrap mod q.
    assert worst.delta * worst.row_l1_max * (2 * worst.act_max + 1) + worst.noise_bound >= half_q


def test_planner_uses_real_norms_for_more_precision() -> None:
    rng = np.random.default_rng(0)
    typical = rng.normal(0, 25, size=(64, 576)).clip(-127, 127).round().astype(np.int8)
    assert plan_for_weights(P.EXACT, typical).act_bits > plan_for_weights(
        P.EXACT, np.full((64, 576), 127, dtype=np.int8)
    ).act_bits


def test_planner_refuses_impossible_products() -> None:
    with pytest.raises(P.ParameterError, match="cannot hold"):
        plan_for_bounds(P.COMPACT, d_out=1, d_in=1 << 25, row_l1_max=127 << 25,
                        row_l2_max=127 * 2.0**12.5)


# ---------------------------------------------------------------- exact set


def test_exact_set_decrypts_integer_product_on_every_entry() -> None:
    rng = np.random.default_rng(1)
    w = rand_int8(rng, (96, 576))
    plan = plan_for_weights(P.EXACT, w)
    x = rng.integers(-plan.act_max, plan.act_max + 1, size=(576, 24))
    _, got, _ = roundtrip(P.EXACT, w, x, plan.delta_bits)
    assert np.array_equal(got, w.astype(np.int64) @ x)


@pytest.mark.parametrize("d_in", [2048, 4096])
def test_exact_set_adversarial_weights_and_activations_at_the_bound(d_in: int) -> None:
    rows = [np.full(d_in, 127), np.full(d_in, -127), np.tile([127, -127], d_in // 2)]
    w = np.stack(rows * 3).astype(np.int8)  # (9, d_in)
    plan = plan_for_weights(P.EXACT, w)
    assert plan.exact
    xm = plan.act_max
    cols = [np.full(d_in, xm), np.full(d_in, -xm), np.tile([xm, -xm], d_in // 2), np.zeros(d_in)]
    x = np.stack(cols, axis=1).astype(np.int64)  # (d_in, 4)
    _, got, _ = roundtrip(P.EXACT, w, x, plan.delta_bits, seed=2)
    want = np.array([[sum(int(a) * int(b) for a, b in zip(w[r], x[:, c], strict=True))
                      for c in range(x.shape[1])] for r in range(w.shape[0])], dtype=object)
    assert (got.astype(object) == want).all()


def test_ciphertext_has_lwe_structure_and_is_fresh() -> None:
    rng = np.random.default_rng(3)
    w = rand_int8(rng, (16, 576))
    plan = plan_for_weights(P.EXACT, w)
    x = rng.integers(-plan.act_max, plan.act_max + 1, size=(576, 8))
    a = expand_a(SEED, 576, P.EXACT)
    e1 = scheme.encrypt(P.EXACT, a, x, plan.delta_bits)
    e2 = scheme.encrypt(P.EXACT, a, x, plan.delta_bits)
    assert not np.array_equal(e1.b, e2.b) and not np.array_equal(e1.s, e2.s)
    assert (e1.b != e2.b).mean() > 0.999
    # B − A·S − Δ·X is the error: small, with std σ (checked in Python integers).
    q = P.EXACT.q
    for r, c in [(0, 0), (5, 3), (575, 7)]:
        a_s = sum(int(a[r, k]) * int(e1.s[k, c]) for k in range(P.EXACT.n))
        err = (int(e1.b[r, c]) - a_s - (int(x[r, c]) << plan.delta_bits)) % q
        err = err - q if err >= q // 2 else err
        assert abs(err) <= P.EXACT.tail_bound


def test_wrong_secret_gives_uncorrelated_output() -> None:
    rng = np.random.default_rng(4)
    w = rand_int8(rng, (64, 576))
    plan = plan_for_weights(P.EXACT, w)
    x = rng.integers(-plan.act_max, plan.act_max + 1, size=(576, 64))
    a = expand_a(SEED, 576, P.EXACT)
    enc = scheme.encrypt(P.EXACT, a, x, plan.delta_bits, rng=DeterministicRandomness(5))
    other = scheme.encrypt(P.EXACT, a, x, plan.delta_bits, rng=DeterministicRandomness(6))
    y, h = scheme.multiply(P.EXACT, w, enc.b), scheme.hint(P.EXACT, w, a)
    truth = (w.astype(np.int64) @ x).ravel().astype(np.float64)
    right = scheme.decrypt(P.EXACT, y, h, enc.s, plan.delta_bits).ravel().astype(np.float64)
    wrong = scheme.decrypt(P.EXACT, y, h, other.s, plan.delta_bits).ravel().astype(np.float64)
    assert np.corrcoef(right, truth)[0, 1] == pytest.approx(1.0)
    assert abs(np.corrcoef(wrong, truth)[0, 1]) < 0.05


# ---------------------------------------------------------------- compact set


def test_compact_error_std_matches_prediction() -> None:
    rng = np.random.default_rng(8)
    w = rng.normal(0, 30, size=(48, 576)).clip(-127, 127).round().astype(np.int8)
    plan = plan_for_weights(P.COMPACT, w)
    assert not plan.exact
    x = rng.integers(-plan.act_max, plan.act_max + 1, size=(576, 256))
    raw, decoded, _ = roundtrip(P.COMPACT, w, x, plan.delta_bits, seed=9)
    truth = w.astype(np.int64) @ x
    err = raw.astype(np.float64) / plan.delta - truth
    row_l2 = np.sqrt((w.astype(np.float64) ** 2).sum(axis=1))
    predicted = plan.predicted_error_std(row_l2)
    normalized = err / predicted[:, None]
    assert abs(normalized.std() - 1) < 0.10
    assert abs(normalized.mean()) < 0.05
    # Decoding keeps the product: SNR in dB as reported in DESIGN (~63 dB at 16-bit scale).
    snr = 10 * np.log10((truth.astype(np.float64) ** 2).mean() / ((decoded - truth) ** 2).mean())
    assert snr > 45


# ---------------------------------------------------------------- quantization


def test_quantization_round_trips_within_half_a_step() -> None:
    rng = np.random.default_rng(10)
    wf = rng.normal(0, 0.05, size=(32, 64))
    w_int, sw = quantize_rows(wf)
    assert w_int.dtype == np.int8 and np.abs(w_int).max() == 127
    assert np.all(np.abs(w_int * sw[:, None] - wf) <= sw[:, None] / 2 + 1e-12)
    xf = rng.normal(0, 1, size=(8, 64)) * rng.uniform(0.1, 10, size=(8, 1))
    x_int, sx = quantize_tokens(xf, 16)
    assert np.all(np.abs(x_int * sx[:, None] - xf) <= sx[:, None] / 2 + 1e-12)
    y = dequantize_product(w_int.astype(np.int64) @ x_int.T, sw, sx)
    np.testing.assert_allclose(y, xf @ wf.T, rtol=0, atol=0.02 * np.abs(xf @ wf.T).max())


def test_zero_rows_and_tokens_quantize_to_zero() -> None:
    w_int, sw = quantize_rows(np.zeros((2, 4)))
    x_int, sx = quantize_tokens(np.zeros((3, 4)), 16)
    assert not w_int.any() and not x_int.any() and (sw > 0).all() and not sx.any()
    # a zero token stays exactly zero through a noisy (compact-set) product
    x = np.zeros((2, 4))
    x[0] = [1.0, -2.0, 0.5, 0.0]
    x_int, sx = quantize_tokens(x, 16)
    noisy = np.array([[17, -9500], [3, 8000]], dtype=np.int64)  # (d_out, T): noise on the zero token
    y = dequantize_product(noisy, np.ones(2, np.float32), sx)
    assert sx[1] == 0 and np.all(y[1] == 0) and np.all(y[0] != 0)


# ---------------------------------------------------------------- wire format


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_wire_round_trip(dtype: type) -> None:
    m = np.arange(12, dtype=dtype).reshape(3, 4) * dtype(0x0123456789ABCDEF & np.iinfo(dtype).max)
    data = wire.encode(wire.Kind.CIPHERTEXT, m)
    assert len(data) == wire.encoded_size(3, 4, np.dtype(dtype).itemsize * 8)
    assert data[:4] == b"FFLW" and data[4] == 1
    back = wire.decode(data, kind=wire.Kind.CIPHERTEXT, rows=3, cols=4)
    assert back.dtype == dtype and np.array_equal(back, m)


def test_wire_is_little_endian() -> None:
    data = wire.encode(wire.Kind.RESULT, np.array([[1]], dtype=np.uint64))
    assert data[16:] == b"\x01" + b"\x00" * 7


def test_wire_rejects_every_truncation_and_corruption() -> None:
    good = wire.encode(wire.Kind.HINT, np.ones((2, 3), dtype=np.uint32))
    for cut in range(len(good)):
        with pytest.raises(wire.WireFormatError):
            wire.decode(good[:cut])
    with pytest.raises(wire.WireFormatError, match="payload is"):
        wire.decode(good + b"\x00")
    for offset, value, msg in [(0, 0x46, "bad magic"), (4, 2, "version"), (5, 9, "kind"),
                               (6, 16, "word size"), (7, 1, "reserved")]:
        bad = bytearray(good)
        bad[offset] = value if bad[offset] != value else value + 1
        with pytest.raises(wire.WireFormatError, match=msg):
            wire.decode(bytes(bad))
    with pytest.raises(wire.WireFormatError, match="expected shape"):
        wire.decode(good, rows=3, cols=2)
    with pytest.raises(wire.WireFormatError, match="expected a ciphertext"):
        wire.decode(good, kind=wire.Kind.CIPHERTEXT)
    with pytest.raises(wire.WireFormatError, match="expected 64-bit"):
        wire.decode(good, log_q=64)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_wire_random_bytes_raise_only_wire_errors(data: bytes) -> None:
    try:
        wire.decode(data)
    except wire.WireFormatError:
        pass
