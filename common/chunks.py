"""Chunked transfer: every payload larger than a message (ciphertexts, results, hints, updates, patches) travels so.

One size, one splitter, one strict reassembler with the digest check, for the
node, the coordinator, the worker and the tests. The sender cuts a payload into
`fedfhe.v1.Chunk` messages of CHUNK_BYTES; the receiver feeds each message to
an `Assembler`, which refuses chunks out of order, duplicated, missing,
inconsistent or past its size limit, and (given the sender's SHA-256) a payload
that does not match it. Servicers map ChunkError to INVALID_ARGUMENT and
PayloadTooLarge to RESOURCE_EXHAUSTED through the error types they derive from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Protocol

from common.errors import InvalidArgument, ResourceExhausted
from fedfhe.v1 import common_pb2

CHUNK_BYTES = 1 << 20  # well under the 16 MiB message limit, with room for headers


class ChunkError(InvalidArgument):
    """Chunks out of order, duplicated, missing or inconsistent, or a payload that fails its digest."""


class PayloadTooLarge(ResourceExhausted):
    """A reassembled payload would exceed its limit."""


class ChunkLike(Protocol):
    """What a receiver reads from a chunk message (fedfhe.v1.Chunk)."""

    @property
    def index(self) -> int: ...

    @property
    def count(self) -> int: ...

    @property
    def data(self) -> bytes: ...


def split(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int, bytes]]:
    """Yield (index, count, piece) covering data; an empty payload is one empty chunk."""
    return read_split(len(data), lambda start, end: data[start:end], chunk_bytes)


def read_split(size: int, read: Callable[[int, int], bytes],
               chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int, bytes]]:
    """Like split, reading each piece with read(start, end) only when it is sent (no whole copy)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk size must be positive")
    count = max(1, -(-size // chunk_bytes))
    for i in range(count):
        yield i, count, read(i * chunk_bytes, min(size, (i + 1) * chunk_bytes))


def chunk_messages(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[common_pb2.Chunk]:
    """The chunk messages that carry data."""
    for i, n, piece in split(data, chunk_bytes):
        yield common_pb2.Chunk(index=i, count=n, data=piece)


class Assembler:
    """Reassembles one payload from chunks that must arrive in order: 0, 1, …, count−1.

    With `sink`, each chunk is handed to sink(offset, data) instead of being kept
    (the coordinator writes updates straight into a locked scratch buffer). With
    `digest`, the completed payload must hash to it (SHA-256).
    """

    def __init__(self, max_bytes: int, sink: Callable[[int, bytes], None] | None = None, *,
                 digest: bytes | None = None) -> None:
        self.max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._seen = 0
        self._count: int | None = None
        self._size = 0
        self._sink = sink
        self._digest = digest
        self._hash = hashlib.sha256() if digest is not None else None

    @property
    def size(self) -> int:
        return self._size

    @property
    def complete(self) -> bool:
        return self._count is not None and self._seen == self._count

    def add(self, chunk: ChunkLike) -> bool:
        """Add the next chunk; returns True when the payload is complete (and its digest checked)."""
        index, count, data = chunk.index, chunk.count, chunk.data
        if count < 1:
            raise ChunkError(f"chunk count must be at least 1, got {count}")
        if count > max(1, self.max_bytes):
            raise PayloadTooLarge(f"{count} chunks cannot hold a payload of at most {self.max_bytes} bytes")
        if not data and count > 1:
            raise ChunkError(f"chunk {index} of {count} is empty (only a lone chunk may be)")
        if self._count is None:
            self._count = count
        elif count != self._count:
            raise ChunkError(f"chunk count changed from {self._count} to {count}")
        if self.complete:
            raise ChunkError(f"chunk {index} arrived after all {count} chunks")
        if index != self._seen:
            raise ChunkError(f"expected chunk {self._seen} of {count}, got chunk {index}")
        if self._size + len(data) > self.max_bytes:
            raise PayloadTooLarge(f"payload exceeds {self.max_bytes} bytes")
        if self._sink is not None:
            self._sink(self._size, data)
        else:
            self._parts.append(bytes(data))
        if self._hash is not None:
            self._hash.update(data)
        self._size += len(data)
        self._seen += 1
        if self.complete and self._hash is not None and self._hash.digest() != self._digest:
            raise ChunkError("payload does not match its SHA-256 digest (corrupted in transit)")
        return self.complete

    def finish(self, size: int | None = None) -> None:
        """Check that the payload is complete (and, given size, exactly that long)."""
        if not self.complete:
            raise ChunkError(f"payload incomplete: {self._seen} of {self._count or '?'} chunks")
        if size is not None and self._size != size:
            raise ChunkError(f"payload is {self._size} bytes, the header says {size}")

    def payload(self) -> bytes:
        self.finish()
        if self._sink is not None:
            raise ChunkError("this payload went to a sink")
        return b"".join(self._parts)
