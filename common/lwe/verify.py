"""Freivalds checks on the node's answers: a wrong product Y = W·B or hint H = W·A is caught before decryption.

The node's answers are linear in public data, so the worker can check them
without redoing them. For each weight matrix W (d_out × d_in, public) the
worker draws a secret R (m × d_out) with independent uniform bits and computes
R·W once, from the public weights. A reply Y to the ciphertexts B is accepted
iff, for every token column j,

    R·Y_j ≡ (R·W)·B_j   (mod q)

and a hint H iff R·H ≡ (R·W)·A (mod q), column by column. Honest answers
always pass.

Soundness over Z_{2^k} (k = log2 q). Let E = Y − W·B be the node's error and
E_j ≠ 0 a wrong column. Write E_j = 2^v·e with v < k and some entry e_i odd.
A check row r fails to see E_j iff r·E_j ≡ 0 (mod 2^k), i.e. r·e ≡ 0 (mod
2^(k−v)). Fix every bit of r but r_i: the two choices r_i ∈ {0, 1} give r·e
values that differ by e_i, which is odd and so non-zero mod 2^(k−v); at most
one of them is ≡ 0. So a row misses E_j with probability at most 1/2, and m
independent rows miss it with probability at most 2^−m, whatever v is. The
bound is tight for v = k − 1 (an error of q/2, which flips a plaintext's top
bit): there r·E_j ≡ 2^(k−1)·(r·e mod 2), a single bit per row, and that is why
uniform r over Z_q would not help (a uniform residue has a uniform low bit,
and only that bit matters). With m = VECTORS = 40 rows a wrong reply passes
with probability at most 2^−40, for both parameter sets (k = 64 and k = 32).

Binary R also keeps the check cheap: R·Y and (R·W)·B are small-operand
products (|R·W| ≤ 127·d_out), about m/n of the worker's own encryption work.

Acceptance depends only on R (secret, independent of the data) and on the
node's error E; never on the plaintext X or the LWE secret S. So a node that
tampers learns from acceptance or rejection nothing about X (no selective
failure), and a rejected reply is never decrypted.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable

import numpy as np

from common.errors import NodeMisbehaved
from common.lwe.gemm import matmul_mod
from common.lwe.params import LweParams
from common.lwe.prg import Randomness

VECTORS = 40  # check rows per matrix: a wrong reply passes with probability ≤ 2^-VECTORS


class ReplyRejected(NodeMisbehaved):
    """A product or hint from the node fails its Freivalds check (or has the wrong shape)."""


class Verifier:
    """One seed epoch's secret check rows, per weight matrix, and what the public weights give for them.

    `matrix(key)` returns the public integer matrix the node applies for `key`
    (int8, d_out × d_in). R is drawn lazily per key from `rng` and zeroed by `close`.
    """

    def __init__(self, matrix: Callable[[Hashable], np.ndarray], params: LweParams, *,
                 rng: Randomness = os.urandom, vectors: int = VECTORS) -> None:
        if vectors < 1:
            raise ValueError("a Freivalds check needs at least one row")
        self._matrix, self.params, self._rng, self.vectors = matrix, params, rng, vectors
        self._rows: dict[Hashable, tuple[np.ndarray, np.ndarray, int]] = {}
        self._lock = threading.Lock()

    def _prepared(self, key: Hashable) -> tuple[np.ndarray, np.ndarray, int]:
        """(R (m × d_out) int8 in {0, 1}, R·W (m × d_in) int64, max |R·W|) for this key."""
        with self._lock:  # the worker's threads (pads, overlapped checks) may ask at once
            return self._prepare(key)

    def _prepare(self, key: Hashable) -> tuple[np.ndarray, np.ndarray, int]:
        if key not in self._rows:
            w = self._matrix(key)
            d_out = w.shape[0]
            bits = np.unpackbits(np.frombuffer(self._rng(-(-self.vectors * d_out // 8)), dtype=np.uint8))
            r = bits[:self.vectors * d_out].reshape(self.vectors, d_out).astype(np.int8)
            # Exact in float64: every sum is at most 127·d_out.
            rw = np.rint(r.astype(np.float64) @ w.astype(np.float64)).astype(np.int64)
            self._rows[key] = (r, rw, int(np.abs(rw).max(initial=0)))
        return self._rows[key]

    def expected(self, key: Hashable, uniform: np.ndarray) -> np.ndarray:
        """(R·W)·uniform (mod q): what R times a correct answer must be. It depends only on what this worker
        sends, so it can be computed while the node works (FheEngine does)."""
        _, rw, bound = self._prepared(key)
        if uniform.ndim != 2 or uniform.shape[0] != rw.shape[1]:
            raise ReplyRejected(f"{key}: {uniform.shape} does not fit a matrix with {rw.shape[1]} columns")
        return matmul_mod(rw, uniform, log_q=self.params.log_q, small="left", small_bound=bound)

    def compare(self, key: Hashable, answer: np.ndarray, expected: np.ndarray, what: str = "product") -> None:
        """Accept `answer` iff R·answer == expected in every column, else raise ReplyRejected."""
        r, _, _ = self._prepared(key)
        d_out = r.shape[1]
        if answer.shape != (d_out, expected.shape[1]):
            raise ReplyRejected(f"{what} for {key}: shape {answer.shape}, expected {(d_out, expected.shape[1])}")
        if answer.dtype != self.params.dtype:
            raise ReplyRejected(f"{what} for {key}: words of {answer.dtype}, expected {np.dtype(self.params.dtype)}")
        lhs = matmul_mod(r, answer, log_q=self.params.log_q, small="left", small_bound=1)
        wrong = np.flatnonzero((lhs != expected).any(axis=0))
        if wrong.size:
            raise ReplyRejected(f"{what} for {key} fails its Freivalds check in {wrong.size} of "
                                f"{answer.shape[1]} columns (first: {int(wrong[0])}); nothing was decrypted")

    def check_product(self, key: Hashable, b: np.ndarray, y: np.ndarray) -> None:
        """Y = W·B (mod q) for the ciphertexts B (d_in × T) this worker sent, checked per token column."""
        self.compare(key, y, self.expected(key, b), "product")

    def check_hint(self, key: Hashable, a: np.ndarray, h: np.ndarray) -> None:
        """H = W·A (mod q) for this seed's public A (d_in × n), checked per column."""
        self.compare(key, h, self.expected(key, a), "hint")

    def close(self) -> None:
        """Zero the secret rows (and what was derived from them)."""
        for r, rw, _ in self._rows.values():
            r.fill(0)
            rw.fill(0)
        self._rows.clear()
