"""Chunk splitting and strict reassembly."""

from __future__ import annotations

import pytest

from common.chunks import Assembler, ChunkError, PayloadTooLarge, split


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 4500])
def test_split_and_reassemble(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    parts = list(split(data, 1000))
    assert len(parts) == max(1, -(-size // 1000))
    asm = Assembler(max_bytes=10_000)
    done = [asm.add(i, c, d) for i, c, d in parts]
    assert done[-1] and not any(done[:-1])
    assert asm.payload() == data


def test_out_of_order_duplicate_and_extra_chunks_are_refused() -> None:
    asm = Assembler(max_bytes=100)
    with pytest.raises(ChunkError, match="expected chunk 0 of 2, got chunk 1"):
        asm.add(1, 2, b"x")
    asm.add(0, 2, b"a")
    with pytest.raises(ChunkError, match="expected chunk 1"):
        asm.add(0, 2, b"a")
    with pytest.raises(ChunkError, match="count changed"):
        asm.add(1, 3, b"b")
    assert asm.add(1, 2, b"b")
    with pytest.raises(ChunkError, match="after all"):
        asm.add(2, 2, b"c")
    with pytest.raises(ChunkError, match="at least 1"):
        Assembler(10).add(0, 0, b"")


def test_incomplete_and_oversized_payloads() -> None:
    asm = Assembler(max_bytes=5)
    asm.add(0, 3, b"abc")
    with pytest.raises(ChunkError, match="incomplete"):
        asm.payload()
    with pytest.raises(PayloadTooLarge, match="exceeds 5 bytes"):
        asm.add(1, 3, b"def")
