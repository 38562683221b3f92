"""Pads made ahead (common.lwe.scheme offline/online, common.lwe.pads): exact, used once, zeroed, bounded."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.lwe import scheme
from common.lwe.pads import PadPool
from common.lwe.params import COMPACT, EXACT, LweParams
from common.lwe.planner import plan_for_weights
from common.lwe.prg import DeterministicRandomness, expand_a, new_seed

W = {k: np.random.default_rng(k).integers(-127, 128, size=(24, 16)).astype(np.int8) for k in range(3)}  # public


def setup(params: LweParams) -> tuple[np.ndarray, dict[int, np.ndarray], int]:
    a = expand_a(new_seed(DeterministicRandomness(1)), 16, params)
    hints = {k: scheme.hint(params, w.astype(np.float64), a) for k, w in W.items()}
    return a, hints, plan_for_weights(params, W[0]).delta_bits


def x_of(params: LweParams, t: int, seed: int = 0) -> np.ndarray:
    plan = plan_for_weights(params, W[0])
    return np.random.default_rng(seed).integers(-plan.act_max, plan.act_max + 1, size=(16, t))


@pytest.mark.parametrize("params", [EXACT, COMPACT], ids=["exact", "compact"])
def test_a_pad_gives_the_same_product_as_encrypt_and_decrypt(params: LweParams) -> None:
    a, hints, delta = setup(params)
    x = x_of(params, 5)
    pad = scheme.make_pad(params, a, hints[0], 5, DeterministicRandomness(2))
    y = scheme.multiply(params, W[0].astype(np.float64), scheme.seal(params, pad, x, delta))
    got = scheme.unseal(params, pad, y, delta)
    enc = scheme.encrypt(params, a, x, delta, DeterministicRandomness(2))
    want = scheme.decrypt(params, scheme.multiply(params, W[0].astype(np.float64), enc.b), hints[0], enc.s, delta)
    np.testing.assert_array_equal(got, want)  # same randomness, same secret: the very same result
    if params.exact:
        np.testing.assert_array_equal(got, W[0].astype(np.int64) @ x)


def test_a_pad_opens_one_product_and_is_zeroed() -> None:
    a, hints, delta = setup(EXACT)
    pad = scheme.make_pad(EXACT, a, hints[0], 6)
    head = pad.take(2)
    assert (head.tokens, pad.tokens) == (2, 4)
    b = scheme.seal(EXACT, head, x_of(EXACT, 2), delta)
    with pytest.raises(scheme.PadError, match="used already"):
        scheme.seal(EXACT, head, x_of(EXACT, 2), delta)
    scheme.unseal(EXACT, head, scheme.multiply(EXACT, W[0].astype(np.float64), b), delta)
    assert not head.masked.any() and not head.hs.any()
    with pytest.raises(scheme.PadError, match="does not fit"):
        scheme.seal(EXACT, pad, x_of(EXACT, 3), delta)
    # the rest of the pad is other columns: never the same mask twice
    assert not np.array_equal(pad.masked[:, :2], b)


def make_pool(params: LweParams, limit: int, chunk: int = 8) -> tuple[PadPool, list[int]]:
    a, hints, _ = setup(params)
    made: list[int] = []

    def make(key, tokens):  # type: ignore[no-untyped-def]
        made.append(tokens)
        return scheme.make_pad(params, a, hints[key], tokens)
    return PadPool(make, [0, 1, 2], limit_bytes=limit, chunk_tokens=chunk), made


def test_the_pool_makes_ahead_within_its_bound_and_serves_exact_products() -> None:
    pool, _ = make_pool(EXACT, limit=4000, chunk=8)
    try:
        assert pool.wait_full(10)
        one_chunk = (16 + 24) * 8 * 8  # masked + hs words of 8 columns
        assert 0 < pool.bytes <= 4000 + one_chunk and pool.peak_bytes <= 4000 + one_chunk
        _, _, delta = setup(EXACT)
        for key in (0, 1, 2, 0):
            for t in (3, 11):  # across chunk boundaries
                x = x_of(EXACT, t, seed=key + t)
                pad = pool.take(key, t)
                y = scheme.multiply(EXACT, W[key].astype(np.float64), scheme.seal(EXACT, pad, x, delta))
                np.testing.assert_array_equal(scheme.unseal(EXACT, pad, y, delta), W[key].astype(np.int64) @ x)
        assert pool.made_ahead > 0 and pool.taken == 4 * 14
    finally:
        pool.close()
    assert pool.bytes == 0


def test_without_a_budget_every_pad_is_made_on_demand() -> None:
    pool, made = make_pool(EXACT, limit=0)
    try:
        pad = pool.take(1, 5)
        assert pad.tokens == 5 and made == [5] and pool.made_on_demand == 5 and pool.made_ahead == 0
    finally:
        pool.close()


def test_reset_zeroes_every_pad() -> None:
    pool, _ = make_pool(EXACT, limit=100_000)
    try:
        assert pool.wait_full(10)
        held = [p for s in pool._stocks.values() for p in s.pads]
        assert held and all(p.masked.any() for p in held)
        pool.reset()
        assert pool.bytes == 0 and all(not p.masked.any() and not p.hs.any() for p in held)
    finally:
        pool.close()


def test_the_producer_survives_a_failing_maker() -> None:
    calls = {"n": 0}
    a, hints, _ = setup(EXACT)

    def flaky(key, tokens):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("node restarting")
        return scheme.make_pad(EXACT, a, hints[key], tokens)
    pool = PadPool(flaky, [0], limit_bytes=10_000, chunk_tokens=4)
    try:
        deadline = time.monotonic() + 15
        while pool.made_ahead == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.failures == 1 and "node restarting" in pool.last_failure and pool.made_ahead > 0
    finally:
        pool.close()
