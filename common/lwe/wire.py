"""Versioned little-endian wire format for matrices of residues (ciphertexts, results, hints).

Layout (16-byte header, then the payload, row-major, little-endian):

    0  magic    4s  b"FFLW"
    4  version  u8  1
    5  kind     u8  1 ciphertext B, 2 evaluation result W·B, 3 hint W·A
    6  log_q    u8  32 or 64 (word size of the payload)
    7  reserved u8  0
    8  rows     u32
    12 cols     u32
    16 payload  rows·cols·(log_q/8) bytes

Every malformed input (short, wrong magic, version, kind, word size, shape or
length) raises WireFormatError and nothing else.
"""

from __future__ import annotations

import struct
from enum import IntEnum

import numpy as np

MAGIC = b"FFLW"
VERSION = 1
_HEADER = struct.Struct("<4sBBBBII")
HEADER_BYTES = _HEADER.size
MAX_DIM = 1 << 24


class WireFormatError(ValueError):
    """Bytes that are not a valid wire-format matrix."""


class Kind(IntEnum):
    CIPHERTEXT = 1
    RESULT = 2
    HINT = 3


def encode(kind: Kind, matrix: np.ndarray) -> bytes:
    """Serialize a 2-D uint32/uint64 matrix."""
    if matrix.ndim != 2:
        raise WireFormatError(f"expected a 2-D matrix, got {matrix.ndim}-D")
    if matrix.dtype == np.uint64:
        log_q, le = 64, "<u8"
    elif matrix.dtype == np.uint32:
        log_q, le = 32, "<u4"
    else:
        raise WireFormatError(f"expected uint32 or uint64 residues, got {matrix.dtype}")
    rows, cols = matrix.shape
    header = _HEADER.pack(MAGIC, VERSION, int(kind), log_q, 0, rows, cols)
    return header + np.ascontiguousarray(matrix, dtype=le).tobytes()


def decode(
    data: bytes | bytearray | memoryview, *, kind: Kind | None = None, log_q: int | None = None,
    rows: int | None = None, cols: int | None = None,
) -> np.ndarray:
    """Parse and validate; optional expectations on kind, word size and shape must all hold."""
    view = memoryview(data)
    if len(view) < HEADER_BYTES:
        raise WireFormatError(f"truncated header: {len(view)} of {HEADER_BYTES} bytes")
    magic, version, k, lq, reserved, r, c = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireFormatError(f"unsupported wire version {version}, this build reads {VERSION}")
    if k not in Kind._value2member_map_:
        raise WireFormatError(f"unknown matrix kind {k}")
    if lq not in (32, 64):
        raise WireFormatError(f"unsupported word size log2 q = {lq}")
    if reserved != 0:
        raise WireFormatError("reserved header byte is not zero")
    if not (0 < r <= MAX_DIM and 0 < c <= MAX_DIM):
        raise WireFormatError(f"bad shape {r}×{c}")
    expected = r * c * (lq // 8)
    payload = view[HEADER_BYTES:]
    if len(payload) != expected:
        raise WireFormatError(
            f"payload is {len(payload)} bytes, a {r}×{c} matrix of {lq}-bit words needs {expected}"
        )
    if kind is not None and k != kind:
        raise WireFormatError(f"expected a {Kind(kind).name.lower()}, got a {Kind(k).name.lower()}")
    if log_q is not None and lq != log_q:
        raise WireFormatError(f"expected {log_q}-bit words, got {lq}-bit")
    if (rows is not None and r != rows) or (cols is not None and c != cols):
        raise WireFormatError(f"expected shape {rows}×{cols}, got {r}×{c}")
    le, native = ("<u8", np.uint64) if lq == 64 else ("<u4", np.uint32)
    return np.frombuffer(payload, dtype=le).astype(native).reshape(r, c)


def encoded_size(rows: int, cols: int, log_q: int) -> int:
    return HEADER_BYTES + rows * cols * (log_q // 8)
