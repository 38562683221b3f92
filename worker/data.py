"""Token batches from a hospital's notes: tokenizing, padding and batching for training and evaluation.

Reading the notes themselves (`common.notes.load_notes`) and making synthetic
ones (`common.datagen`) live outside the worker package.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.notes import Note, load_notes

if TYPE_CHECKING:
    import torch

    from worker.scrub import Scrubber



def _encode(tokenizer: Any, text: str) -> list[int]:
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        ids = encode(text)
    else:
        out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(i) for i in ids]


def tokenize_notes(notes: Sequence[Note | str], tokenizer: Any, max_len: int, *,
                   add_eos: bool = True) -> list[list[int]]:
    """Token ids per note, EOS appended (so the model learns where a note ends), cut to max_len.

    tokenizer: anything with encode(text) -> ids, or callable returning {"input_ids": ids} (HF style).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    out = []
    for note in notes:
        ids = _encode(tokenizer, note.text if isinstance(note, Note) else note)
        if eos is not None:
            ids.append(int(eos))
        out.append(ids[:max_len])
    return out


def batches(token_lists: Sequence[Sequence[int]], batch_size: int, *, max_len: int | None = None,
            pad_id: int = 0, seed: int = 0, shuffle: bool = True,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask), both LongTensor (B, T): right-padded to the batch's longest row.

    Rows are cut to max_len; the order is a shuffle seeded by seed (pass seed + epoch for a new
    order each epoch), or the given order with shuffle=False. The mask is 1 on tokens, 0 on padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    order = list(range(len(token_lists)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        for i in idx:
            if not token_lists[i]:
                raise ValueError(f"sequence {i} is empty: nothing to train on")
        yield pad_batch([token_lists[i] for i in idx], max_len, pad_id)


def pad_batch(rows: Sequence[Sequence[int]], max_len: int | None, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, T) LongTensors, right-padded to the longest row (cut to max_len)."""
    import torch

    cut = [list(r)[:max_len] for r in rows]
    width = max(len(r) for r in cut)
    ids = torch.full((len(cut), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(cut), width), dtype=torch.long)  # (B, T)
    for b, r in enumerate(cut):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, :len(r)] = 1
    return ids, mask


def load_records(path: Path | None, tokenizer: Any, max_len: int, limit: int | None = None,
                 scrubber: Scrubber | None = None) -> list[list[int]]:
    """Token ids of a notes file (its first `limit` notes), each note scrubbed of PII first when given a scrubber."""
    if path is None:
        return []
    notes = load_notes(path)
    notes = notes[:limit] if limit else notes
    if scrubber is not None:
        notes = scrubber.scrub_notes(notes)
    return [r for r in tokenize_notes(notes, tokenizer, max_len) if len(r) >= 2]
