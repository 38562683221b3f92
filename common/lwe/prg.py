"""Cryptographic randomness for the LWE core: the seeded public matrix A and secret/error sampling.

A is expanded from a 32-byte public seed with AES-256-CTR under a key derived
by HKDF-SHA256 per (dimension, parameter set), so every party expands the same
A and distinct shapes never share keystream. Secrets and errors come from the
OS CSPRNG (`os.urandom`); tests inject a deterministic AES-CTR source instead.
numpy only reshapes and transforms those bytes; its RNG is never used.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.lwe.params import LweParams, ParameterError

SEED_BYTES = 32

# Randomness source: n -> n bytes. Defaults to the OS CSPRNG.
Randomness = Callable[[int], bytes]


def _aes_ctr_stream(key: bytes, nbytes: int) -> bytes:
    # A fresh key per stream, so the all-zero counter block is safe.
    enc = Cipher(algorithms.AES256(key), modes.CTR(b"\x00" * 16)).encryptor()
    buf = bytearray(nbytes + 15)
    n = enc.update_into(bytes(nbytes), buf)
    return bytes(memoryview(buf)[:n])


def new_seed(rng: Randomness = os.urandom) -> bytes:
    """A fresh public seed for a worker session's A."""
    return rng(SEED_BYTES)


def expand_a(seed: bytes, rows: int, params: LweParams) -> np.ndarray:
    """The public matrix A (rows × n) for this seed, uniform mod q (uint32/uint64)."""
    if len(seed) != SEED_BYTES:
        raise ParameterError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if rows <= 0:
        raise ParameterError(f"A needs a positive number of rows, got {rows}")
    info = b"fedfhe/v1/lwe/A" + struct.pack("<IIId", rows, params.n, params.log_q, params.sigma)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
    stream = _aes_ctr_stream(key, rows * params.n * params.word_bytes)
    le = "<u8" if params.log_q == 64 else "<u4"
    return np.frombuffer(stream, dtype=le).astype(params.dtype).reshape(rows, params.n)


class DeterministicRandomness:
    """AES-256-CTR keystream from a fixed key: reproducible randomness for tests and replayed comparison runs."""

    def __init__(self, seed: int | bytes) -> None:
        material = seed if isinstance(seed, bytes) else seed.to_bytes(32, "little", signed=False)
        self._key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedfhe/v1/test-randomness"
        ).derive(material)
        self._enc = Cipher(algorithms.AES256(self._key), modes.CTR(b"\x00" * 16)).encryptor()

    def __call__(self, n: int) -> bytes:
        return self._enc.update(bytes(n))


def sample_gaussian(shape: tuple[int, ...], params: LweParams, rng: Randomness = os.urandom) -> np.ndarray:
    """Rounded Gaussian samples with std σ, cut at ±params.tail_bound, as int32.

    Box–Muller on 53-bit uniforms drawn from `rng`. The cut at 12σ changes the
    distribution by less than 2^-100 per sample and gives the exact GEMM a hard
    bound on the secret's magnitude.
    """
    count = int(np.prod(shape)) if shape else 1
    pairs = (count + 1) // 2
    words = np.frombuffer(rng(16 * pairs), dtype="<u8").reshape(2, pairs)
    u = (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]: log never sees 0
    angle = (2.0 * np.pi) * u[1]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
    bound = params.tail_bound
    return np.clip(np.rint(z * params.sigma), -bound, bound).astype(np.int32).reshape(shape)
