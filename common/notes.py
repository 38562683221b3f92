"""A hospital's notes on disk: the record format every party's tools share, and its strict loader.

One note a JSON line (or a CSV row with a "text" column):

    {"id", "hospital", "specialty", "note_type", "text",
     "pii": [{"start", "end", "label", "text"}, ...]}

Only "text" is required. "pii" spans, where present (the synthetic generator
writes them; labelled corpora have them), carry exact character offsets:
text[start:end] == span text. `load_notes` raises NotesFormatError, naming
the file and line, for anything it cannot read, and never modifies the file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PII_LABELS = ("NAME", "DOB", "MRN", "ADDRESS", "PHONE", "EMAIL", "DATE", "DOCTOR", "HOSPITAL")
NOTE_SUFFIXES = (".jsonl", ".ndjson", ".csv")

# --------------------------------------------------------------------------------------------------
# Notes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PiiSpan:
    start: int
    end: int
    label: str
    text: str


@dataclass(frozen=True)
class Note:
    text: str
    id: str = ""
    hospital: str = ""
    specialty: str = ""
    note_type: str = ""
    pii: tuple[PiiSpan, ...] = ()

    def to_record(self) -> dict[str, Any]:
        """The JSONL form written by the generator."""
        return {"id": self.id, "hospital": self.hospital, "specialty": self.specialty,
                "note_type": self.note_type, "text": self.text,
                "pii": [{"start": s.start, "end": s.end, "label": s.label, "text": s.text} for s in self.pii]}


class NotesFormatError(ValueError):
    """A notes file cannot be read; the message names the file and, where there is one, the line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        where = f"{self.path} line {line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")



def write_jsonl(path: Path, notes: Sequence[Note]) -> None:
    """Write notes one JSON object a line (the form load_notes reads back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # newline="\n" and ensure_ascii=False: the same bytes on every platform, and spans count characters.
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for note in notes:
            f.write(json.dumps(note.to_record(), ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# Loading a hospital's own notes
# --------------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise NotesFormatError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})", line) from None


def _spans(raw: Any, text: str, path: Path, line: int) -> tuple[PiiSpan, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise NotesFormatError(path, "'pii' must be a list of spans", line)
    out = []
    for k, span in enumerate(raw):
        if not isinstance(span, dict):
            raise NotesFormatError(path, f"pii span {k} is not an object", line)
        start, end, label = span.get("start"), span.get("end"), span.get("label")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(text)):
            raise NotesFormatError(path, f"pii span {k}: start/end {start!r}..{end!r} outside the text", line)
        if not isinstance(label, str):
            raise NotesFormatError(path, f"pii span {k}: missing 'label'", line)
        if "text" in span and span["text"] != text[start:end]:
            raise NotesFormatError(path, f"pii span {k}: text {span['text']!r} != text[{start}:{end}] "
                                         f"{text[start:end]!r}", line)
        out.append(PiiSpan(start, end, label, text[start:end]))
    return tuple(out)


def _note(obj: Mapping[str, Any], path: Path, line: int, default_id: str) -> Note:
    if "text" not in obj or obj["text"] is None:
        raise NotesFormatError(path, "missing 'text' field", line)
    text = obj["text"]
    if not isinstance(text, str):
        raise NotesFormatError(path, f"'text' must be a string, got {type(text).__name__}", line)
    if not text.strip():
        raise NotesFormatError(path, "empty text", line)
    meta = {}
    for key in ("id", "hospital", "specialty", "note_type"):
        value = obj.get(key)
        meta[key] = "" if value is None else str(value)
    return Note(text=text, id=meta["id"] or default_id, hospital=meta["hospital"], specialty=meta["specialty"],
                note_type=meta["note_type"], pii=_spans(obj.get("pii"), text, path, line))


def _load_jsonl(path: Path, content: str) -> list[Note]:
    notes = []
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue  # blank lines (a trailing newline, say) carry no note
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NotesFormatError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", line_no) from None
        if not isinstance(obj, dict):
            raise NotesFormatError(path, f"expected a JSON object, got {type(obj).__name__}", line_no)
        notes.append(_note(obj, path, line_no, f"{path.stem}-{line_no}"))
    return notes


def _load_csv(path: Path, content: str) -> list[Note]:
    # strict: a stray quote is an error, not a silently merged field.
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        columns = [c.strip() for c in header]
        if "text" not in columns:
            raise NotesFormatError(path, f"no 'text' column in the header (columns: {', '.join(columns)})", 1)
        notes = []
        row_no = 0
        start = reader.line_num + 1
        for row in reader:
            if not any(cell.strip() for cell in row):
                start = reader.line_num + 1
                continue
            row_no += 1
            where = start  # a quoted field may span lines: report the line its row starts on
            if len(row) != len(columns):
                raise NotesFormatError(path, f"row {row_no} has {len(row)} fields, the header has {len(columns)}",
                                       where)
            obj = dict(zip(columns, row, strict=True))
            obj.pop("pii", None)  # spans need JSON; a CSV 'pii' column is not read
            notes.append(_note(obj, path, where, f"{path.stem}-{row_no}"))
            start = reader.line_num + 1
        return notes
    except csv.Error as exc:
        raise NotesFormatError(path, f"malformed CSV: {exc}", reader.line_num) from None


def load_notes(path: str | Path) -> list[Note]:
    """A hospital's notes from JSONL (one object a line, with at least "text") or CSV (a "text" column).

    JSONL lines may carry the generator's id/hospital/specialty/note_type/pii; CSV
    reads id/hospital/specialty/note_type columns where present and ignores the
    rest. Any problem raises NotesFormatError naming the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in NOTE_SUFFIXES:
        raise NotesFormatError(path, f"unknown extension {path.suffix!r}; expected one of {', '.join(NOTE_SUFFIXES)}")
    content = _read_text(path)
    notes = _load_csv(path, content) if suffix == ".csv" else _load_jsonl(path, content)
    if not notes:
        raise NotesFormatError(path, "no notes (empty file)")
    return notes
