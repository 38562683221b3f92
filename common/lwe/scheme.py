"""Matrix LWE with a seeded public matrix (SimplePIR-style): encrypt, multiply, hint, decrypt.

Per batch of T tokens (DESIGN.md):

    B = A·S + E + Δ·X   (mod q)     worker; S (n×T) and E (d_in×T) fresh
    Y = W·B             (mod q)     node
    H = W·A             (mod q)     node, once per (W, seed): the hint
    W·X = round((Y − H·S) / Δ)      worker; exact when the planner says so

Columns of S are never reused: with (A, S) reused, B1 − B2 reveals X1 − X2.
`encrypt` therefore draws S itself; there is no API that takes one.
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
