"""Matrix LWE with a seeded public matrix (SimplePIR-style): encrypt, multiply, hint, decrypt.

Per batch of T tokens (DESIGN.md):

    B = A·S + E + Δ·X   (mod q)     worker; S (n×T) and E (d_in×T) fresh
    Y = W·B             (mod q)     node
    H = W·A             (mod q)     node, once per (W, seed): the hint
    W·X = round((Y − H·S) / Δ)      worker; exact when the planner says so

Columns of S are never reused: with (A, S) reused, B1 − B2 reveals X1 − X2.
`encrypt` therefore draws S itself; there is no API that takes one.

Offline/online. Everything but Δ·X is independent of the data: a `Pad` holds
A·S + E and H·S for T fresh columns of S, made ahead (`make_pad`; S itself is
zeroed at once, nothing later needs it). Online, `seal` adds Δ·X and `unseal`
subtracts H·S and rounds, O(d·T) work. A pad opens exactly one product: `seal`
refuses a pad already used, and `unseal` zeroes it. Columns are independent, so
a pad of T columns can be cut into pads of fewer (`Pad.take`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from common.lwe.gemm import matmul_mod
from common.lwe.params import LweParams, ParameterError
from common.lwe.prg import Randomness, sample_gaussian


@dataclass(frozen=True)
class Encrypted:
    """A ciphertext batch and the secret that opens it (the secret never leaves the worker)."""

    b: np.ndarray  # (d_in, T) uniform-looking residues mod q
    s: np.ndarray  # (n, T) int32, fresh for this batch


def _as_residues(v: np.ndarray, params: LweParams) -> np.ndarray:
    # Two's-complement cast: a negative integer becomes its residue mod 2^64,
    # and truncation to 32 bits keeps it mod 2^32.
    return np.asarray(v, dtype=np.int64).astype(np.uint64).astype(params.dtype)


def encrypt(
    params: LweParams, a: np.ndarray, x_int: np.ndarray, delta_bits: int,
    rng: Randomness = os.urandom,
) -> Encrypted:
    """Encrypt integer columns x_int (d_in, T) under A (d_in, n) with a fresh secret."""
    if a.shape[1] != params.n or a.dtype != params.dtype:
        want = f"(d, {params.n}) {np.dtype(params.dtype).name}"
        raise ParameterError(f"A must be {want}, got {a.shape} {a.dtype}")
    if x_int.ndim != 2 or x_int.shape[0] != a.shape[0]:
        raise ParameterError(f"plaintext must be ({a.shape[0]}, T), got {x_int.shape}")
    d_in, t = x_int.shape
    s = sample_gaussian((params.n, t), params, rng)
    e = sample_gaussian((d_in, t), params, rng)
    a_s = matmul_mod(a, s, log_q=params.log_q, small="right", small_bound=params.tail_bound)
    with np.errstate(over="ignore"):
        scaled = _as_residues(x_int, params) * params.dtype(1 << delta_bits)
        b = a_s + _as_residues(e, params) + scaled
    return Encrypted(b=np.ascontiguousarray(b, dtype=params.dtype), s=s)


def multiply(params: LweParams, w_int: np.ndarray, b: np.ndarray, weight_bound: int = 127) -> np.ndarray:
    """Node side: W·B mod q for small integer weights W (d_out, d_in) and ciphertexts B (d_in, T)."""
    return matmul_mod(w_int, b, log_q=params.log_q, small="left", small_bound=weight_bound)


def hint(params: LweParams, w_int: np.ndarray, a: np.ndarray, weight_bound: int = 127) -> np.ndarray:
    """Node side: the hint H = W·A mod q (d_out, n), computed once per (W, seed)."""
    return matmul_mod(w_int, a, log_q=params.log_q, small="left", small_bound=weight_bound)


def decrypt_raw(params: LweParams, y: np.ndarray, h: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Y − H·S mod q, centered into (−q/2, q/2] as int64: Δ·W·X + W·E."""
    if h.shape[0] != y.shape[0] or h.shape[1] != s.shape[0] or y.shape[1] != s.shape[1]:
        raise ParameterError(f"shapes do not match: Y {y.shape}, H {h.shape}, S {s.shape}")
    h_s = matmul_mod(h, s, log_q=params.log_q, small="right", small_bound=params.tail_bound)
    with np.errstate(over="ignore"):
        diff = (y.astype(params.dtype) - h_s).astype(params.dtype)
    signed = diff.view(np.int64) if params.log_q == 64 else diff.view(np.int32)
    return signed.astype(np.int64)


def round_shift(v: np.ndarray, bits: int) -> np.ndarray:
    """round(v / 2^bits), ties up, with arithmetic shifts (no overflow anywhere in int64)."""
    if bits == 0:
        return v.copy()
    return (v >> bits) + ((v >> (bits - 1)) & 1)


def decrypt(params: LweParams, y: np.ndarray, h: np.ndarray, s: np.ndarray, delta_bits: int) -> np.ndarray:
    """Worker side: the integer product W·X (d_out, T) from Y = W·B, the hint and the batch secret."""
    return round_shift(decrypt_raw(params, y, h, s), delta_bits)


# --------------------------------------------------------------------------------------------------
# Offline / online
# --------------------------------------------------------------------------------------------------


class PadError(ParameterError):
    """A pad used twice, or one whose shape does not fit the product."""


class Pad:
    """The data-independent part of T encryptions under one (A, H): A·S + E and H·S, S already gone."""

    def __init__(self, masked: np.ndarray, hs: np.ndarray) -> None:
        if masked.shape[1] != hs.shape[1]:
            raise PadError(f"pad halves disagree on the token count: {masked.shape} vs {hs.shape}")
        self.masked, self.hs = masked, hs  # (d_in, T), (d_out, T) residues mod q
        self.sealed = False

    @property
    def tokens(self) -> int:
        return self.masked.shape[1]

    @property
    def nbytes(self) -> int:
        return self.masked.nbytes + self.hs.nbytes

    def take(self, tokens: int) -> Pad:
        """The first `tokens` columns as a pad of their own; this pad keeps the rest (never the same column twice)."""
        if self.sealed or not 0 < tokens <= self.tokens:
            raise PadError(f"cannot take {tokens} of a pad's {self.tokens} column(s) (sealed: {self.sealed})")
        head = Pad(self.masked[:, :tokens].copy(), self.hs[:, :tokens].copy())
        rest_m, rest_h = self.masked[:, tokens:].copy(), self.hs[:, tokens:].copy()
        self.zeroize()
        self.masked, self.hs, self.sealed = rest_m, rest_h, False
        return head

    def zeroize(self) -> None:
        self.masked.fill(0)
        self.hs.fill(0)
        self.sealed = True


def make_pad(params: LweParams, a: np.ndarray, h: np.ndarray, tokens: int, rng: Randomness = os.urandom) -> Pad:
    """T columns of fresh secret, error and their products with A and H (the offline work of T encryptions)."""
    if a.shape[1] != params.n or h.shape[1] != params.n:
        raise ParameterError(f"A and H must have n={params.n} columns, got {a.shape} and {h.shape}")
    s = sample_gaussian((params.n, tokens), params, rng)
    e = sample_gaussian((a.shape[0], tokens), params, rng)
    try:
        a_s = matmul_mod(a, s, log_q=params.log_q, small="right", small_bound=params.tail_bound)
        hs = matmul_mod(h, s, log_q=params.log_q, small="right", small_bound=params.tail_bound)
        with np.errstate(over="ignore"):
            masked = (a_s + _as_residues(e, params)).astype(params.dtype)
    finally:
        s.fill(0)  # nothing after this point needs the secret
        e.fill(0)
    return Pad(np.ascontiguousarray(masked), np.ascontiguousarray(hs))


def seal(params: LweParams, pad: Pad, x_int: np.ndarray, delta_bits: int) -> np.ndarray:
    """Online encryption: B = (A·S + E) + Δ·X for integer columns x_int (d_in, T), under this pad alone."""
    if pad.sealed:
        raise PadError("this pad was used already: a pad opens exactly one product")
    if x_int.shape != pad.masked.shape:
        raise PadError(f"plaintext {x_int.shape} does not fit the pad {pad.masked.shape}")
    pad.sealed = True
    with np.errstate(over="ignore"):
        b = pad.masked + _as_residues(x_int, params) * params.dtype(1 << delta_bits)
    return np.ascontiguousarray(b, dtype=params.dtype)


def unseal(params: LweParams, pad: Pad, y: np.ndarray, delta_bits: int) -> np.ndarray:
    """Online decryption: round((Y − H·S) / Δ) = W·X; the pad is zeroed (it has served its one product)."""
    if y.shape != pad.hs.shape:
        raise PadError(f"result {y.shape} does not fit the pad {pad.hs.shape}")
    with np.errstate(over="ignore"):
        diff = (y.astype(params.dtype) - pad.hs).astype(params.dtype)
    pad.zeroize()
    signed = diff.view(np.int64) if params.log_q == 64 else diff.view(np.int32)
    return round_shift(signed.astype(np.int64), delta_bits)
