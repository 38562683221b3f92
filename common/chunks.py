"""Splitting payloads into message-sized chunks and reassembling them strictly.

Protocol-free: servicers feed `Chunk` fields (index, count, data) and map
ChunkError to INVALID_ARGUMENT, PayloadTooLarge to RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from common.errors import InvalidArgument, ResourceExhausted

DEFAULT_CHUNK_BYTES = 1 << 20  # well under the 16 MiB message limit, with room for headers


class ChunkError(InvalidArgument):
    """Chunks out of order, duplicated, missing or inconsistent."""


class PayloadTooLarge(ResourceExhausted):
    """A reassembled payload would exceed its limit."""


def split(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, int, bytes]]:
    """Yield (index, count, piece) covering data; an empty payload is one empty chunk."""
    if chunk_bytes <= 0:
        raise ValueError("chunk size must be positive")
    count = max(1, -(-len(data) // chunk_bytes))
    for i in range(count):
        yield i, count, data[i * chunk_bytes : (i + 1) * chunk_bytes]


class Assembler:
    """Reassembles one payload from chunks that must arrive in order: 0, 1, …, count−1.

    With `sink`, each chunk is handed to sink(offset, data) instead of being kept
    (the coordinator writes updates straight into a locked scratch buffer).
    """

    def __init__(self, max_bytes: int, sink: Callable[[int, bytes], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._seen = 0
        self._count: int | None = None
        self._size = 0
        self._sink = sink

    @property
    def size(self) -> int:
        return self._size

    @property
    def complete(self) -> bool:
        return self._count is not None and self._seen == self._count

    def add(self, index: int, count: int, data: bytes) -> bool:
        """Add the next chunk; returns True when the payload is complete."""
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
        self._size += len(data)
        self._seen += 1
        return self.complete

    def payload(self) -> bytes:
        if not self.complete:
            raise ChunkError(f"payload incomplete: {self._seen} of {self._count} chunks")
        if self._sink is not None:
            raise ChunkError("this payload went to a sink")
        return b"".join(self._parts)
