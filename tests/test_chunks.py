"""Chunk splitting and strict reassembly."""

from __future__ import annotations

import hashlib

import pytest

from common.chunks import Assembler, ChunkError, PayloadTooLarge, chunk_messages, split
from fedfhe.v1.common_pb2 import Chunk


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 4500])
def test_split_and_reassemble(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    parts = list(split(data, 1000))
    assert len(parts) == max(1, -(-size // 1000))
    asm = Assembler(max_bytes=10_000)
    done = [asm.add(Chunk(index=i, count=c, data=d)) for i, c, d in parts]
    assert done[-1] and not any(done[:-1])
    assert asm.payload() == data


def test_out_of_order_duplicate_and_extra_chunks_are_refused() -> None:
    asm = Assembler(max_bytes=100)
    with pytest.raises(ChunkError, match="expected chunk 0 of 2, got chunk 1"):
        asm.add(Chunk(index=1, count=2, data=b"x"))
    asm.add(Chunk(index=0, count=2, data=b"a"))
    with pytest.raises(ChunkError, match="expected chunk 1"):
        asm.add(Chunk(index=0, count=2, data=b"a"))
    with pytest.raises(ChunkError, match="count changed"):
        asm.add(Chunk(index=1, count=3, data=b"b"))
    assert asm.add(Chunk(index=1, count=2, data=b"b"))
    with pytest.raises(ChunkError, match="after all"):
        asm.add(Chunk(index=2, count=2, data=b"c"))
    with pytest.raises(ChunkError, match="at least 1"):
        Assembler(10).add(Chunk(index=0, count=0, data=b""))


def test_incomplete_and_oversized_payloads() -> None:
    asm = Assembler(max_bytes=5)
    asm.add(Chunk(index=0, count=3, data=b"abc"))
    with pytest.raises(ChunkError, match="incomplete"):
        asm.payload()
    with pytest.raises(PayloadTooLarge, match="exceeds 5 bytes"):
        asm.add(Chunk(index=1, count=3, data=b"def"))


def test_digest_is_checked_on_completion() -> None:
    data = bytes(range(200)) * 30
    good = Assembler(max_bytes=10_000, digest=hashlib.sha256(data).digest())
    assert [good.add(c) for c in chunk_messages(data, 1000)][-1]
    assert good.payload() == data
    bad = Assembler(max_bytes=10_000, digest=hashlib.sha256(data[:-1] + b"\xff").digest())
    pieces = list(chunk_messages(data, 1000))
    for c in pieces[:-1]:
        assert not bad.add(c)  # nothing can be told before the last chunk
    with pytest.raises(ChunkError, match="digest"):
        bad.add(pieces[-1])


def test_size_is_checked_by_finish() -> None:
    asm = Assembler(max_bytes=100)
    asm.add(Chunk(index=0, count=1, data=b"abc"))
    asm.finish(3)
    with pytest.raises(ChunkError, match="header says 4"):
        asm.finish(4)
