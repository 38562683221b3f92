"""Memory-only patch buffers: where the coordinator keeps encrypted aggregates, and nowhere else.

A buffer is an anonymous private mapping (no file behind it, so nothing can
reach a disk but swap, which mlock prevents), locked in RAM with mlock(2)
where RLIMIT_MEMLOCK allows, excluded from core dumps (MADV_DONTDUMP), and
zeroed before it is unmapped. A coordinator restart loses every buffer by
design; workers restore the last global adapter (see RestorePatch).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import mmap
import os
import resource
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import structlog

from common.chunks import CHUNK_BYTES
from common.errors import NotFound, ResourceExhausted
from common.updates import add_payload

log = structlog.get_logger("fedfhe.patchbuf")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mlock.argtypes = _libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memset.restype = ctypes.c_void_p


class MlockRefused(ResourceExhausted):
    """mlock(2) failed and the coordinator runs with --require-mlock."""


def memlock_limit() -> int:
    """RLIMIT_MEMLOCK soft limit in bytes (-1: unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


class PatchBuffer:
    """One anonymous, locked, undumpable region holding uint64 words."""

    def __init__(self, size_bytes: int, *, require_mlock: bool = False) -> None:
        if size_bytes <= 0 or size_bytes % 8:
            raise ValueError(f"a patch buffer holds whole uint64 words, got {size_bytes} bytes")
        self.size = size_bytes
        self._mm: mmap.mmap | None = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._mm.madvise(mmap.MADV_DONTDUMP)
        cbuf = (ctypes.c_char * size_bytes).from_buffer(self._mm)
        self.address = ctypes.addressof(cbuf)
        del cbuf  # drop the export so the mapping can be closed later
        self.locked = _libc.mlock(self.address, size_bytes) == 0
        if not self.locked:
            err = ctypes.get_errno()
            why = (f"mlock of {size_bytes} bytes failed ({os.strerror(err)}; RLIMIT_MEMLOCK "
                   f"{memlock_limit()} bytes): raise it with `ulimit -l` or run without --require-mlock")
            if require_mlock:
                self._mm.close()
                self._mm = None
                raise MlockRefused(why)
            log.warning("patch buffer not locked in RAM", reason=why)

    def _live(self) -> mmap.mmap:
        if self._mm is None:
            raise NotFound("patch buffer was evicted")
        return self._mm

    def write(self, offset: int, data: bytes) -> None:
        """Copy bytes in at offset (assembling an incoming update in place)."""
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset} exceeds the {self.size}-byte buffer")
        self._live()[offset:offset + len(data)] = data

    def add(self, payload: bytes | PatchBuffer) -> None:
        """Add uint64 words (bytes, or another buffer's content) into this one, mod 2^64.

        No numpy view of either mapping outlives the call, so both can still be closed.
        """
        view = np.frombuffer(self._live(), dtype=np.uint64)
        other = np.frombuffer(payload._live(), dtype=np.uint8) if isinstance(payload, PatchBuffer) else payload
        try:
            add_payload(view, other)
        finally:
            del view, other

    def transform(self, fn: Callable[[np.ndarray], None]) -> None:
        """fn(words) changes the content in place, through a uint64 view that does not outlive the call."""
        view = np.frombuffer(self._live(), dtype=np.uint64)
        try:
            fn(view)
        finally:
            del view

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        return self._live()[start:end]

    def digest(self) -> bytes:
        """SHA-256 of the content, hashed in place."""
        h = hashlib.sha256()
        for start in range(0, self.size, CHUNK_BYTES):
            h.update(self._live()[start:start + CHUNK_BYTES])
        return h.digest()

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Zero, unlock and unmap. Idempotent."""
        if self._mm is None:
            return
        _libc.memset(self.address, 0, self.size)
        if self.locked:
            _libc.munlock(self.address, self.size)
        self._mm.close()
        self._mm = None

    def __del__(self) -> None:
        if getattr(self, "_mm", None) is not None:  # __init__ may have failed before mapping
            self.close()


class PatchStore:
    """The aggregates of the last `keep` rounds, each in its own PatchBuffer; older ones are zeroed and dropped."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError("keep at least one round")
        self.keep = keep
        self._buffers: OrderedDict[int, PatchBuffer] = OrderedDict()

    def put(self, round_: int, buf: PatchBuffer) -> list[int]:
        """Store a round's aggregate; returns the rounds evicted to make room."""
        if round_ in self._buffers:
            self._buffers.pop(round_).close()
        self._buffers[round_] = buf
        evicted = []
        while len(self._buffers) > self.keep:
            old, b = self._buffers.popitem(last=False)
            b.close()
            evicted.append(old)
        return evicted

    def get(self, round_: int) -> PatchBuffer | None:
        return self._buffers.get(round_)

    def rounds(self) -> list[int]:
        return list(self._buffers)

    def buffers(self) -> list[PatchBuffer]:
        return list(self._buffers.values())

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self._buffers.values())

    def close(self) -> None:
        for b in self._buffers.values():
            b.close()
        self._buffers.clear()
