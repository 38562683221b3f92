"""Encrypted updates: exact FedAvg through the ciphertext sum, uniform stored bytes, tamper and key errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from common.updates import (
    FRAC_BITS,
    TAG_PRIMES,
    TAG_WORDS,
    ConsortiumKey,
    Contribution,
    KeyFileError,
    TamperedAggregate,
    TensorLayout,
    UpdateFormatError,
    WrongConsortiumKey,
    add_payload,
    decrypt_aggregate,
    encrypt_update,
    load_key_file,
    write_key_file,
)

FED = "fed-test"


def adapters(seed: int, scale: float = 1e-2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # test data, not key material
    return {"blocks.0.lora.q.lora_b.weight": rng.normal(0, scale, (64, 4)).astype(np.float32),
            "blocks.1.lora.v.lora_b.weight": rng.normal(0, scale, (32, 4)).astype(np.float32)}


def aggregate(key: ConsortiumKey, round_: int, updates: dict[str, tuple[dict[str, np.ndarray], int]]):
    """Encrypt each worker's adapter, add the payloads as the coordinator does; return what a worker gets."""
    encrypted = {w: encrypt_update(key, FED, round_, w, t, n) for w, (t, n) in updates.items()}
    layout = next(iter(encrypted.values())).layout
    acc = np.zeros(layout.words, dtype=np.uint64)
    for e in encrypted.values():
        add_payload(acc, e.payload)
    parts = [Contribution(w, n, encrypted[w].nonce) for w, (_, n) in updates.items()]
    return layout, acc.astype("<u8").tobytes(), parts


def fedavg(updates: dict[str, tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in updates.values())
    names = next(iter(updates.values()))[0]
    return {k: sum(n * t[k].astype(np.float64) for t, n in updates.values()) / total for k in names}


def rel_err(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    num = sum(float(np.sum((got[k].astype(np.float64) - want[k]) ** 2)) for k in want)
    den = sum(float(np.sum(want[k] ** 2)) for k in want)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def key() -> ConsortiumKey:
    return ConsortiumKey.generate()


def test_decrypted_aggregate_is_the_sample_weighted_fedavg(key: ConsortiumKey) -> None:
    updates = {"hospital-1": (adapters(1), 120), "hospital-2": (adapters(2), 70), "hospital-3": (adapters(3), 33)}
    layout, payload, parts = aggregate(key, 4, updates)
    got = decrypt_aggregate(key, FED, 4, parts, 223, layout, payload, key.check_value())
    want = fedavg(updates)
    assert set(got) == set(want)
    err = rel_err(got, want)
    assert err <= 2.0 ** -20, err
    assert err > 0 or all(np.array_equal(got[k], want[k]) for k in want)
    # the all-zero answer would fail: the mean is far from zero
    assert rel_err({k: np.zeros_like(v) for k, v in got.items()}, want) == 1.0


def test_fedavg_of_deltas_from_a_shared_global_adapter(key: ConsortiumKey) -> None:
    """Workers submit n_k·(G + δ_k); the decrypted mean minus G is the FedAvg of the deltas."""
    g = adapters(10, scale=0.2)
    deltas = {w: adapters(20 + i, scale=1e-3) for i, w in enumerate(["a", "b", "c"])}
    counts = {"a": 500, "b": 20, "c": 81}
    updates = {w: ({k: g[k] + d[k] for k in g}, counts[w]) for w, d in deltas.items()}
    layout, payload, parts = aggregate(key, 1, updates)
    got = decrypt_aggregate(key, FED, 1, parts, sum(counts.values()), layout, payload, key.check_value())
    avg_delta = fedavg({w: (d, counts[w]) for w, d in deltas.items()})
    got_delta = {k: got[k].astype(np.float64) - g[k].astype(np.float64) for k in g}
    # float32 output of G + δ bounds this; the fixed point itself is exact to 2^-33 per entry
    assert rel_err({k: v.astype(np.float32) for k, v in got_delta.items()}, avg_delta) <= 2.0 ** -12


def test_fixed_point_mean_is_within_resolution(key: ConsortiumKey) -> None:
    updates = {"a": (adapters(5, 1e-3), 1), "b": (adapters(6, 1e-3), 3)}
    layout, payload, parts = aggregate(key, 2, updates)
    got = decrypt_aggregate(key, FED, 2, parts, 4, layout, payload, key.check_value())
    want = fedavg(updates)
    for k in want:
        assert np.max(np.abs(got[k].astype(np.float64) - want[k])) <= 2.0 ** -FRAC_BITS + 1e-9 * np.abs(want[k]).max()


def test_dropouts_cost_nothing(key: ConsortiumKey) -> None:
    updates = {"a": (adapters(1), 10), "b": (adapters(2), 20)}
    layout, payload, parts = aggregate(key, 3, updates)  # "c" never submitted
    got = decrypt_aggregate(key, FED, 3, parts, 30, layout, payload, key.check_value())
    assert rel_err(got, fedavg(updates)) <= 2.0 ** -20


def test_stored_aggregate_bytes_are_uniform_and_uncorrelated(key: ConsortiumKey) -> None:
    rng = np.random.default_rng(0)
    big = {"w": rng.normal(0, 0.05, (256, 256)).astype(np.float32)}
    zeros = {"w": np.zeros((256, 256), np.float32)}
    _, payload, _ = aggregate(key, 7, {"a": (big, 5), "b": (zeros, 9)})
    counts = np.bincount(np.frombuffer(payload, np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3
    words = np.frombuffer(payload, "<u8")[: 256 * 256].astype(np.float64)
    for plain in (big["w"].ravel(), np.abs(big["w"].ravel())):
        r = np.corrcoef(words, plain)[0, 1]
        assert abs(r) < 5 / np.sqrt(words.size), r
    # and the bytes of an all-zero update look the same
    _, payload0, _ = aggregate(key, 8, {"b": (zeros, 9)})
    assert stats.chisquare(np.bincount(np.frombuffer(payload0, np.uint8), minlength=256)).pvalue > 1e-3


def test_two_encryptions_of_one_update_differ(key: ConsortiumKey) -> None:
    a = encrypt_update(key, FED, 1, "a", adapters(1), 3)
    b = encrypt_update(key, FED, 1, "a", adapters(1), 3)
    assert a.nonce != b.nonce and a.payload != b.payload


def test_wrong_key_is_a_clear_error(key: ConsortiumKey) -> None:
    layout, payload, parts = aggregate(key, 1, {"a": (adapters(1), 4), "b": (adapters(2), 4)})
    other = ConsortiumKey.generate()
    with pytest.raises(WrongConsortiumKey, match="wrong consortium key"):
        decrypt_aggregate(other, FED, 1, parts, 8, layout, payload, key.check_value())
    # a forged check value does not help: the tags fail
    with pytest.raises(TamperedAggregate):
        decrypt_aggregate(other, FED, 1, parts, 8, layout, payload, other.check_value())


def test_every_tampering_is_detected(key: ConsortiumKey) -> None:
    layout, payload, parts = aggregate(key, 5, {"a": (adapters(1), 4), "b": (adapters(2), 6)})
    kcv = key.check_value()

    def fails(p: bytes = payload, ps=parts, total: int = 10, round_: int = 5) -> None:
        with pytest.raises(TamperedAggregate):
            decrypt_aggregate(key, FED, round_, ps, total, layout, p, kcv)

    nbits = len(payload) * 8
    rng = np.random.default_rng(1)
    tag_bits = range(nbits - TAG_WORDS * 64, nbits)
    for bit in [*rng.choice(nbits - TAG_WORDS * 64, 300, replace=False), *tag_bits[::7], 0, nbits - 1]:
        flipped = bytearray(payload)
        flipped[bit // 8] ^= 1 << (bit % 8)
        fails(bytes(flipped))
    words = np.frombuffer(payload, "<u8").copy()
    for delta in (TAG_PRIMES[0], TAG_PRIMES[0] * TAG_PRIMES[1], TAG_PRIMES[1] * TAG_PRIMES[2], 1 << 63):
        w = words.copy()
        with np.errstate(over="ignore"):
            w[3] += np.uint64(delta)  # multiples of the tag primes are caught by the other primes
        fails(w.astype("<u8").tobytes())
    fails(total=11)
    fails(ps=[parts[0], Contribution("b", 5, parts[1].nonce)], total=9)
    fails(ps=[parts[0], Contribution("c", 6, parts[1].nonce)])
    fails(ps=[parts[0], Contribution("b", 6, os.urandom(16))])
    fails(ps=[parts[1], Contribution("a", 4, parts[0].nonce)] * 1 + [parts[0]], total=14)
    fails(ps=[parts[0]], total=4)
    fails(round_=6)
    # a header that reshapes or renames a tensor (same payload length) fails too
    reshaped = TensorLayout.checked([(n, tuple(reversed(sh)) if len(sh) == 2 else sh) for n, sh in layout.specs])
    assert reshaped != layout
    with pytest.raises(TamperedAggregate):
        decrypt_aggregate(key, FED, 5, parts, 10, reshaped, payload, kcv)
    renamed = TensorLayout.checked([("z" + n if i == 0 else n, sh) for i, (n, sh) in enumerate(layout.specs)])
    with pytest.raises(TamperedAggregate):
        decrypt_aggregate(key, FED, 5, parts, 10, renamed, payload, kcv)
    # one hospital's own contribution served alone is refused by a reader with a floor of two
    single = encrypt_update(key, FED, 5, "a", adapters(1), 4)
    with pytest.raises(TamperedAggregate, match="at least 2"):
        decrypt_aggregate(key, FED, 5, [Contribution("a", 4, single.nonce)], 4, single.layout, single.payload,
                          kcv, min_participants=2)
    # ... and cannot be passed off as a restored aggregate (restores are keyed apart)
    with pytest.raises(TamperedAggregate):
        decrypt_aggregate(key, FED, 5, [Contribution("a", 1, single.nonce)], 1, single.layout, single.payload,
                          kcv, kind="restore")
    restore = encrypt_update(key, FED, 5, "a", adapters(1), 1, kind="restore")
    got = decrypt_aggregate(key, FED, 5, [Contribution("a", 1, restore.nonce)], 1, restore.layout,
                            restore.payload, kcv, kind="restore", min_participants=2)
    assert rel_err(got, fedavg({"a": (adapters(1), 1)})) <= 2.0 ** -20
    # untampered, it decrypts
    decrypt_aggregate(key, FED, 5, parts, 10, layout, payload, kcv)


def test_format_errors() -> None:
    key = ConsortiumKey.generate()
    with pytest.raises(UpdateFormatError, match="NaN"):
        encrypt_update(key, FED, 1, "a", {"w": np.array([np.nan])}, 1)
    with pytest.raises(UpdateFormatError, match="fixed-point range"):
        encrypt_update(key, FED, 1, "a", {"w": np.array([1e3])}, 10_000)
    with pytest.raises(UpdateFormatError, match="reserved"):
        encrypt_update(key, FED, 1, "a", {"fedfhe.tag": np.zeros(6)}, 1)
    with pytest.raises(UpdateFormatError, match="at least one sample"):
        encrypt_update(key, FED, 1, "a", {"w": np.zeros(2)}, 0)
    with pytest.raises(UpdateFormatError, match="tag block"):
        TensorLayout.checked([("w", (2,))])
    with pytest.raises(UpdateFormatError, match=r"each in \[1, 2\^31\)"):
        TensorLayout.checked([("w", (2, 0)), ("fedfhe.tag", (6,))])
    with pytest.raises(UpdateFormatError, match="repeated"):
        TensorLayout.checked([("w", (2,)), ("w", (2,)), ("fedfhe.tag", (6,))])
    with pytest.raises(UpdateFormatError, match="exceeds"):
        TensorLayout.checked([("w", (1 << 20, 1 << 10)), ("fedfhe.tag", (6,))])
    up = encrypt_update(key, FED, 1, "a", {"w": np.ones(3)}, 1)
    with pytest.raises(UpdateFormatError, match="bytes"):
        decrypt_aggregate(key, FED, 1, [Contribution("a", 1, up.nonce)], 1, up.layout, up.payload[:-8],
                          key.check_value())
    with pytest.raises(UpdateFormatError, match="words"):
        add_payload(np.zeros(3, np.uint64), up.payload)


def test_key_file_is_private_and_checked(tmp_path: Path) -> None:
    key = ConsortiumKey.generate()
    path = tmp_path / "consortium.key"
    write_key_file(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path).check_value() == key.check_value()
    assert key.raw_bytes().hex() not in repr(key)
    with pytest.raises(KeyFileError, match="refusing to replace"):
        write_key_file(path, ConsortiumKey.generate())
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key_file(path)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a fedfhe consortium key"):
        load_key_file(bad)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_key_file(tmp_path / "missing.key")
