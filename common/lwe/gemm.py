"""Exact matrix products mod 2^32 / 2^64 of a small signed operand and a uniform residue operand.

Every LWE product has this shape: W·B and W·A on the node (W int8), A·S and
H·S on the worker (S from the error distribution, |s| ≤ 12σ). The uniform
operand is split into signed limbs small enough that no partial sum can
overflow the arithmetic that multiplies them, so every backend is bit-exact:

- "cpu": float64 limbs of w bits with k·bound·2^(w−1) ≤ 2^53, so every partial
  sum is an exactly representable integer; BLAS dgemm speed.
- "cuda": signed byte limbs on int8 tensor cores (`torch._int_mm`, int32
  accumulation, exact while k·127·128 < 2^31), TF32 off.
- "reference": Python integers, for tests.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

Side = Literal["left", "right"]
_F64_EXACT = 1 << 53
_INT_MM_K = (1 << 31) // (128 * 128) - 8  # exact int32 accumulation of int8·int8 over k terms


@functools.cache
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def _check(
    x: np.ndarray, y: np.ndarray, log_q: int, small: Side, small_bound: int
) -> tuple[np.ndarray, np.ndarray]:
    if log_q not in (32, 64):
        raise ValueError(f"log_q must be 32 or 64, got {log_q}")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[0]:
        raise ValueError(f"cannot multiply shapes {x.shape} and {y.shape}")
    if small not in ("left", "right"):
        raise ValueError(f"small must be 'left' or 'right', got {small!r}")
    s, u = (x, y) if small == "left" else (y, x)
    udtype = np.uint64 if log_q == 64 else np.uint32
    if u.dtype != udtype:
        raise ValueError(f"uniform operand must be {np.dtype(udtype).name} for log_q={log_q}, got {u.dtype}")
    if s.dtype.kind != "i" and s.dtype != np.float64:
        raise ValueError(f"small operand must be a signed integer array, got {s.dtype}")
    if small_bound < 0 or small_bound >= 1 << 31:
        raise ValueError(f"small_bound must be in [0, 2^31), got {small_bound}")
    # A float64 small operand is a cached, already-validated integer matrix (node weights):
    # scanning its 4M entries on every call would cost a third of the product.
    if s.dtype != np.float64 and s.size and (s.max() > small_bound or s.min() < -small_bound):
        raise ValueError(f"small operand exceeds its stated bound {small_bound}")
    return s, u


def matmul_mod(
    x: np.ndarray, y: np.ndarray, *, log_q: int, small: Side, small_bound: int,
    backend: str | None = None,
) -> np.ndarray:
    """(x @ y) mod 2^log_q, exactly; one operand small signed (|v| ≤ small_bound), the other uniform.

    The small operand may be int8..int64, or float64 holding integers (the node
    caches its weights that way to skip a conversion per call). The uniform one
    is uint64 for log_q = 64, uint32 for log_q = 32. Returns that dtype.
    """
    s, u = _check(x, y, log_q, small, small_bound)
    backend = backend or ("cuda" if cuda_available() else "cpu")
    if backend == "cpu":
        return _matmul_cpu(s, u, log_q, small, small_bound)
    if backend == "cuda":
        return _matmul_cuda(s, u, log_q, small, small_bound)
    if backend == "reference":
        return matmul_mod_reference(x, y, log_q=log_q)
    raise ValueError(f"unknown GEMM backend {backend!r}; use cpu, cuda or reference")


def matmul_mod_reference(x: np.ndarray, y: np.ndarray, *, log_q: int) -> np.ndarray:
    """Python-integer reference: slow, obviously right."""
    q = 1 << log_q
    xs = [[int(v) for v in row] for row in x]
    ys = [[int(v) for v in col] for col in y.T]
    out = np.zeros((x.shape[0], y.shape[1]), dtype=np.uint64 if log_q == 64 else np.uint32)
    for i, row in enumerate(xs):
        for j, col in enumerate(ys):
            out[i, j] = sum(a * b for a, b in zip(row, col, strict=True)) % q
    return out


# ------------------------------------------------------------------ limb algebra


def limb_width(k: int, small_bound: int, budget: int = _F64_EXACT) -> int:
    """Largest signed-limb width w with k·bound·2^(w−1) ≤ budget (exact partial sums)."""
    reach = max(1, k) * max(1, small_bound)
    if reach > budget:
        raise ValueError(f"inner dimension {k} × bound {small_bound} is too large for exact limbs")
    return 1 + math.floor(math.log2(budget / reach))


def split_limbs(u: np.ndarray, width: int, count: int) -> list[np.ndarray]:
    """Signed digits d_i ∈ [−2^(w−1), 2^(w−1)) with Σ d_i·2^(w·i) ≡ u (mod 2^64), as int64 arrays.

    Branch-free: with y = x + 2^(w−1), the digit is (y mod 2^w) − 2^(w−1) and the
    rest is ⌊y / 2^w⌋. A wrap of y past 2^64 only drops multiples of 2^64.
    """
    x = u.astype(np.uint64, copy=False)
    mask, half, w64 = np.uint64((1 << width) - 1), np.uint64(1 << (width - 1)), np.uint64(width)
    limbs = []
    with np.errstate(over="ignore"):
        for _ in range(count):
            y = x + half
            limbs.append((y & mask).view(np.int64) - np.int64(1 << (width - 1)))
            x = y >> w64
    return limbs


def _limbs_32(u: np.ndarray, log_q: int) -> list[np.ndarray]:
    """Fast split into centered 32-bit limbs by reinterpreting the words as int32 (little-endian)."""
    if log_q == 32:
        return [u.view(np.int32)]
    v = u.view(np.int32).reshape(*u.shape, 2)
    low = v[..., 0]
    # The low limb is centered by the int32 view; a negative one borrows 1 from the high limb.
    # int32 wrap-around of the high limb is harmless: it is the top limb, taken mod 2^32.
    with np.errstate(over="ignore"):
        high = v[..., 1] + (low < 0).astype(np.int32)
    return [low, high]


def split_signed_digits(s: np.ndarray, bits: int, count: int) -> list[np.ndarray]:
    """Centered base-2^bits digits of signed integers: Σ d_j·2^(bits·j) = s exactly, |d_j| ≤ 2^(bits−1)."""
    x = s.astype(np.int64)
    half, mask = 1 << (bits - 1), (1 << bits) - 1
    digits = []
    for _ in range(count):
        y = x + half
        digits.append((y & mask) - half)
        x = y >> bits  # arithmetic shift: floor division, exact for negatives
    return digits


def _block_product(s_parts: list[np.ndarray], u_parts: list[np.ndarray], small: Side) -> list[list[np.ndarray]]:
    """All products of small parts × uniform parts in one float64 GEMM; blocks[j][i] = s_j · u_i (exact ints)."""
    m_axis = 0 if small == "left" else 1  # the free axis of the small operand
    u_axis = 1 if small == "left" else 0
    sf = np.concatenate(s_parts, axis=m_axis, dtype=np.float64) if len(s_parts) > 1 else (
        s_parts[0] if s_parts[0].dtype == np.float64 else s_parts[0].astype(np.float64))
    uf = np.concatenate(u_parts, axis=u_axis, dtype=np.float64)
    prod = (sf @ uf if small == "left" else uf @ sf).astype(np.int64)
    if small == "left":  # rows follow the small digits, columns the uniform limbs
        return [np.split(rows, len(u_parts), axis=1) for rows in np.split(prod, len(s_parts), axis=0)]
    return [list(cols) for cols in zip(*[np.split(rows, len(s_parts), axis=1)
                                          for rows in np.split(prod, len(u_parts), axis=0)], strict=True)]


def _matmul_cpu(s: np.ndarray, u: np.ndarray, log_q: int, small: Side, bound: int) -> np.ndarray:
    k = s.shape[1] if small == "left" else s.shape[0]
    out_shape = (s.shape[0], u.shape[1]) if small == "left" else (u.shape[0], s.shape[1])
    if 0 in out_shape or k == 0:
        return np.zeros(out_shape, dtype=np.uint64 if log_q == 64 else np.uint32)
    shifts_s, s_parts = [0], [s]
    fast = sys.byteorder == "little"
    if fast and limb_width(k, bound) >= 32:
        u_width, u_parts = 32, _limbs_32(u, log_q)
    elif fast and s.size * 4 < u.size and limb_width(k, 1 << 31) >= 2:
        # Worker side H·S / A·S: the uniform operand is far larger than the secret, so split the
        # secret into small digits and let the uniform words be free int32-view limbs.
        bits = limb_width(k, 1 << 31)
        count = -(-(bound.bit_length() + 1) // bits)
        s_parts = split_signed_digits(s, bits, count)
        shifts_s = [bits * j for j in range(count)]
        u_width, u_parts = 32, _limbs_32(u, log_q)
    else:
        count = -(-log_q // min(limb_width(k, bound), log_q))
        u_width = -(-log_q // count)  # equal limbs: the widest product stays furthest from 2^53
        u_parts = split_limbs(u, u_width, count)
    blocks = _block_product(s_parts, u_parts, small)
    acc = np.zeros(out_shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j, row in enumerate(blocks):
            for i, p in enumerate(row):
                shift = shifts_s[j] + u_width * i
                if shift < 64:
                    acc += p.view(np.uint64) << np.uint64(shift)
    return np.ascontiguousarray(acc if log_q == 64 else acc.astype(np.uint32))


# ------------------------------------------------------------------ CUDA: int8 tensor cores


def byte_limb_matmul(
    s: Any, u: Any, log_q: int, small: Side, bound: int, int_mm: Callable[[Any, Any], Any]
) -> Any:
    """Byte-limb product on torch tensors; `int_mm(int8 (m,k), int8 (k,n)) -> int32` does the work.

    s: int64 tensor (small), u: int64 tensor holding the residues' bit patterns.
    Returns an int64 tensor whose bit pattern is the result mod 2^64 (mask for 2^32).
    """
    import torch

    def digits(x: torch.Tensor, count: int) -> list[torch.Tensor]:
        out = []
        for _ in range(count):
            d = ((x + 128) & 255) - 128  # centered byte; arithmetic on int64 wraps
            out.append(d.to(torch.int8))
            x = (x - d) >> 8
        return out

    u_digits = digits(u, log_q // 8)
    # c centered byte digits reach 127·(256^c − 1)/255: take the smallest c that covers the bound.
    s_bytes = 1
    while bound > 127 * (256**s_bytes - 1) // 255:
        s_bytes += 1
    s_digits = digits(s, s_bytes) if bound > 127 else [s.to(torch.int8)]
    k = s.shape[1] if small == "left" else s.shape[0]
    out_rows = s.shape[0] if small == "left" else u.shape[0]
    out_cols = u.shape[1] if small == "left" else s.shape[1]
    acc = torch.zeros((out_rows, out_cols), dtype=torch.int64, device=s.device)
    for i, ud in enumerate(u_digits):
        for j, sd in enumerate(s_digits):
            shift = 8 * (i + j)
            if shift >= log_q:
                continue
            part = torch.zeros_like(acc)
            for k0 in range(0, k, _INT_MM_K):  # split k so int32 accumulation stays exact
                k1 = min(k, k0 + _INT_MM_K)
                if small == "left":
                    prod = int_mm(sd[:, k0:k1].contiguous(), ud[k0:k1, :].contiguous())
                else:
                    prod = int_mm(ud[:, k0:k1].contiguous(), sd[k0:k1, :].contiguous())
                part += prod.to(torch.int64)
            acc += part * (1 << shift) if shift < 63 else part << shift
    if log_q == 32:
        acc = acc & 0xFFFFFFFF
    return acc


def _padded_int_mm(a: Any, b: Any) -> Any:
    """torch._int_mm with the padding its kernels need (m > 16, k and n multiples of 8)."""
    import torch
    import torch.nn.functional as F

    m, k = a.shape
    n = b.shape[1]
    mp, kp, np_ = max(17, m), -(-k // 8) * 8, -(-n // 8) * 8
    a = F.pad(a, (0, kp - k, 0, mp - m))
    b = F.pad(b, (0, np_ - n, 0, kp - k))
    return torch._int_mm(a, b)[:m, :n]


def _matmul_cuda(s: np.ndarray, u: np.ndarray, log_q: int, small: Side, bound: int) -> np.ndarray:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # no float path may round silently
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    s64 = np.rint(s).astype(np.int64) if s.dtype == np.float64 else s.astype(np.int64)
    st = torch.from_numpy(s64).to(dev)
    ut = torch.from_numpy(u.astype(np.uint64).view(np.int64)).to(dev)
    out = byte_limb_matmul(st, ut, log_q, small, bound, _padded_int_mm)
    res = out.cpu().numpy().view(np.uint64)
    return np.ascontiguousarray(res if log_q == 64 else res.astype(np.uint32))
