"""Freivalds checks on the node's answers (common.lwe.verify), without any server: soundness and no selective failure.

The attacks are the ones an audit found accepted before: one entry off by 1, by 2^20·Δ, by q/2 (a
top-bit flip whose effect follows the plaintext's sign), several q/2 flips in one column (an even
number of them defeats any check with odd coefficients only), the answer for another batch, and the
product with another stage's matrix. Positive controls show the tests can see a miss: with one check
row, a q/2 error passes about half the time, exactly as the soundness argument says.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import NodeMisbehaved
from common.lwe import scheme
from common.lwe.params import COMPACT, EXACT, LweParams
from common.lwe.planner import plan_for_weights
from common.lwe.prg import DeterministicRandomness, expand_a, new_seed
from common.lwe.verify import VECTORS, ReplyRejected, Verifier

D_OUT, D_IN, T = 24, 16, 4
PUBLIC = np.random.default_rng(5)  # public test weights (not key material)
WEIGHTS = {name: PUBLIC.integers(-127, 128, size=(D_OUT, D_IN)).astype(np.int8) for name in ("w", "other")}


def setup(params: LweParams, vectors: int = VECTORS, seed: int = 0) -> tuple[Verifier, np.ndarray]:
    verifier = Verifier(WEIGHTS.__getitem__, params, rng=DeterministicRandomness(seed), vectors=vectors)
    return verifier, expand_a(new_seed(DeterministicRandomness(seed + 1)), D_IN, params)


def encrypt(params: LweParams, a: np.ndarray, x: np.ndarray, seed: int = 2) -> scheme.Encrypted:
    plan = plan_for_weights(params, WEIGHTS["w"])
    return scheme.encrypt(params, a, x, plan.delta_bits, rng=DeterministicRandomness(seed))


def plaintext(params: LweParams, seed: int) -> np.ndarray:
    plan = plan_for_weights(params, WEIGHTS["w"])
    return np.random.default_rng(seed).integers(-plan.act_max, plan.act_max + 1, size=(D_IN, T))


def product(params: LweParams, name: str, b: np.ndarray) -> np.ndarray:
    return scheme.multiply(params, WEIGHTS[name].astype(np.float64), b)


def add_at(params: LweParams, y: np.ndarray, rows: list[int], col: int, value: int) -> np.ndarray:
    out = y.copy()
    with np.errstate(over="ignore"):
        for r in rows:
            out[r, col] = out[r, col] + params.dtype(value % params.q)
    return out


@pytest.mark.parametrize("params", [EXACT, COMPACT], ids=["exact", "compact"])
def test_honest_answers_pass_and_decrypt_exactly(params: LweParams) -> None:
    verifier, a = setup(params)
    x = plaintext(params, 0)
    enc = encrypt(params, a, x)
    y = product(params, "w", enc.b)
    h = scheme.hint(params, WEIGHTS["w"].astype(np.float64), a)
    verifier.check_product("w", enc.b, y)
    verifier.check_hint("w", a, h)
    if params.exact:
        plan = plan_for_weights(params, WEIGHTS["w"])
        got = scheme.decrypt(params, y, h, enc.s, plan.delta_bits)
        np.testing.assert_array_equal(got, WEIGHTS["w"].astype(np.int64) @ x)


def attacks(params: LweParams, enc_b: np.ndarray, other_b: np.ndarray) -> dict[str, np.ndarray]:
    y = product(params, "w", enc_b)
    delta = 1 << plan_for_weights(params, WEIGHTS["w"]).delta_bits
    return {
        "y+1": add_at(params, y, [3], 1, 1),
        "+2^20·Δ at one entry": add_at(params, y, [5], 2, (1 << 20) * delta),
        "+q/2 at one entry": add_at(params, y, [0], 0, params.q // 2),
        "+q/2 at two entries of a column": add_at(params, y, [1, 7], 3, params.q // 2),
        "-1 at every entry": (y - params.dtype(1)).astype(params.dtype),
        "answer for another batch": product(params, "w", other_b),
        "another stage's matrix": product(params, "other", enc_b),
    }


@pytest.mark.parametrize("params", [EXACT, COMPACT], ids=["exact", "compact"])
def test_every_audited_attack_is_rejected(params: LweParams) -> None:
    verifier, a = setup(params)
    enc, other = encrypt(params, a, plaintext(params, 0)), encrypt(params, a, plaintext(params, 1), seed=3)
    for name, bad in attacks(params, enc.b, other.b).items():
        with pytest.raises(ReplyRejected, match="Freivalds"):
            verifier.check_product("w", enc.b, bad)
        assert isinstance(ReplyRejected("x"), NodeMisbehaved), name
    h = scheme.hint(params, WEIGHTS["w"].astype(np.float64), a)
    for bad_h in (add_at(params, h, [2], 9, 1), add_at(params, h, [4, 6], 0, params.q // 2),
                  scheme.hint(params, WEIGHTS["other"].astype(np.float64), a)):
        with pytest.raises(ReplyRejected, match="hint"):
            verifier.check_hint("w", a, bad_h)
    with pytest.raises(ReplyRejected, match="shape"):
        verifier.check_product("w", enc.b, product(params, "w", enc.b)[:-1])


def random_tamper(params: LweParams, y: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One wrong answer of a random kind; every kind changes at least one entry."""
    kind = rng.integers(0, 6)
    col = int(rng.integers(0, y.shape[1]))
    if kind == 0:  # a random error in one entry, of random 2-adic valuation (q/2 included)
        v = int(rng.integers(0, params.log_q))
        odd = int(rng.integers(0, 1 << 16)) * 2 + 1
        return add_at(params, y, [int(rng.integers(0, y.shape[0]))], col, odd << v)
    if kind == 1:  # the same high-bit flip in an even number of rows
        rows = rng.choice(y.shape[0], size=2 * int(rng.integers(1, y.shape[0] // 2 + 1)), replace=False)
        return add_at(params, y, [int(r) for r in rows], col, params.q // 2)
    if kind == 2:  # a random error vector in one column, all entries sharing a power of two
        v = int(rng.integers(0, params.log_q))
        out = y.copy()
        errs = rng.integers(0, 1 << 20, size=y.shape[0]).astype(np.uint64)
        errs[int(rng.integers(0, y.shape[0]))] |= 1  # at least one odd entry: the error's valuation is v
        with np.errstate(over="ignore"):
            out[:, col] = (out[:, col] + (errs << np.uint64(v)).astype(params.dtype)).astype(params.dtype)
        return out
    if kind == 3:  # another batch's answer in one column
        out = y.copy()
        out[:, col] = other[:, col]
        return out if not np.array_equal(out, y) else add_at(params, y, [0], col, 1)
    if kind == 4:  # uniformly random words in one column
        out = y.copy()
        out[:, col] = rng.integers(0, params.q, size=y.shape[0], dtype=np.uint64).astype(params.dtype)
        return out if not np.array_equal(out, y) else add_at(params, y, [0], col, 1)
    return add_at(params, y, [int(rng.integers(0, y.shape[0]))], col, params.q // 2)  # the top bit alone


@pytest.mark.parametrize("params", [EXACT, COMPACT], ids=["exact", "compact"])
def test_ten_thousand_random_tamperings_none_missed(params: LweParams) -> None:
    verifier, a = setup(params, seed=11)
    enc, other = encrypt(params, a, plaintext(params, 0)), encrypt(params, a, plaintext(params, 1), seed=3)
    y, y_other = product(params, "w", enc.b), product(params, "w", other.b)
    rng = np.random.default_rng(2024)
    missed = 0
    for _ in range(10_000):
        bad = random_tamper(params, y, y_other, rng)
        assert not np.array_equal(bad, y)
        try:
            verifier.check_product("w", enc.b, bad)
            missed += 1
        except ReplyRejected:
            pass
    assert missed == 0


def test_positive_control_one_row_misses_q_half_errors_half_the_time() -> None:
    """The statistical test has power: with a single check row the q/2 attack passes about half the time."""
    missed = 0
    trials = 400
    for trial in range(trials):
        verifier, a = setup(EXACT, vectors=1, seed=100 + trial)
        enc = encrypt(EXACT, a, plaintext(EXACT, 0))
        bad = add_at(EXACT, product(EXACT, "w", enc.b), [2, 9], 1, EXACT.q // 2)
        try:
            verifier.check_product("w", enc.b, bad)
            missed += 1
        except ReplyRejected:
            pass
    assert 0.4 * trials < missed < 0.6 * trials  # 2^-1 per row; 40 rows make it 2^-40


def test_acceptance_does_not_depend_on_the_plaintext() -> None:
    """Whether a tampered answer is accepted is a function of the secret rows and the error alone.

    The same errors added to the products of two very different plaintexts get the same verdicts,
    including errors built (with knowledge of R, which a real node never has) to pass: a positive
    control that the test would see a plaintext-dependent verdict.
    """
    verifier, a = setup(EXACT, vectors=4, seed=7)  # few rows, so that some errors pass
    x_small = np.zeros((D_IN, T), dtype=np.int64)
    x_big = np.full((D_IN, T), plan_for_weights(EXACT, WEIGHTS["w"]).act_max, dtype=np.int64)
    encs = [encrypt(EXACT, a, x, seed=s) for s, x in ((20, x_small), (21, x_big))]
    rng = np.random.default_rng(9)
    verdicts: list[list[bool]] = [[], []]
    r, _, _ = verifier._prepared("w")
    for trial in range(300):
        err = np.zeros((D_OUT, T), dtype=np.uint64)
        rows = rng.choice(D_OUT, size=2, replace=False)
        if trial % 2:  # in the kernel of R mod 2: passes whatever the data
            mask = (r[:, rows[0]] == r[:, rows[1]]).all()
            err[rows, trial % T] = np.uint64(EXACT.q // 2) if mask else np.uint64(0)
        else:
            err[rows, trial % T] = np.uint64(EXACT.q // 2)
        if not err.any():
            err[rows[0], 0] = np.uint64(EXACT.q // 2)
        for i, enc in enumerate(encs):
            with np.errstate(over="ignore"):
                bad = (product(EXACT, "w", enc.b) + err).astype(np.uint64)
            try:
                verifier.check_product("w", enc.b, bad)
                verdicts[i].append(True)
            except ReplyRejected:
                verdicts[i].append(False)
    assert verdicts[0] == verdicts[1]
    assert any(verdicts[0]) and not all(verdicts[0])  # both verdicts occur: the comparison means something


def test_close_zeroes_the_secret_rows() -> None:
    verifier, _ = setup(EXACT)
    r, rw, _ = verifier._prepared("w")
    assert r.any() and rw.any()
    verifier.close()
    assert not r.any() and not rw.any()
