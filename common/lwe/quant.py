"""Per-output-row weight and per-token activation quantization (scales stay in float32).

Weights: W ≈ diag(s_w)·W_int with W_int int8 (public scales). Activations:
X ≈ X_int·diag(s_x), one scale per token from that token's absmax, so a
token's scale never depends on another token (and stays on the worker).
"""

from __future__ import annotations

import numpy as np


def quantize_rows(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantization: returns (W_int (d_out, d_in) int8/int16, scales (d_out,) float32)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"weight bits must be in [2, 16], got {bits}")
    w = np.asarray(w, dtype=np.float64)
    qmax = (1 << (bits - 1)) - 1
    absmax = np.abs(w).max(axis=1)
    scales = np.where(absmax > 0, absmax / qmax, 1.0)
    w_int = np.clip(np.rint(w / scales[:, None]), -qmax, qmax)
    dtype = np.int8 if bits <= 8 else np.int16
    return w_int.astype(dtype), scales.astype(np.float32)


def quantize_tokens(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token quantization of x (T, d): returns (X_int (T, d) int64, scales (T,) float64)."""
    if not 2 <= bits <= 32:
        raise ValueError(f"activation bits must be in [2, 32], got {bits}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a (tokens, features) matrix, got shape {x.shape}")
    qmax = (1 << (bits - 1)) - 1
    absmax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0])
    safe = np.where(absmax > 0, absmax / qmax, 1.0)
    x_int = np.clip(np.rint(x / safe[:, None]), -qmax, qmax).astype(np.int64)
    # An all-zero token gets scale 0, so it dequantizes to exactly 0 even when its product carries
    # noise (the compact set is not exact): the zero gradient rows of padding stay zero.
    return x_int, np.where(absmax > 0, safe, 0.0)


def dequantize_product(y_int: np.ndarray, row_scales: np.ndarray, token_scales: np.ndarray) -> np.ndarray:
    """(W_int·X_intᵀ) of shape (d_out, T) back to floats (T, d_out): y[t, r] = s_x[t]·s_w[r]·y_int[r, t]."""
    return (y_int.astype(np.float64).T * token_scales[:, None]) * row_scales.astype(np.float64)[None, :]
