"""Synthetic hospital notes, the notes loader, batching and DP canaries: determinism, exact PII spans, non-IID split."""

from __future__ import annotations

import csv
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from canaries import make_canaries, plant_canaries

from common.datagen import templates
from common.datagen.generator import generate_dataset, main
from common.notes import PII_LABELS, Note, NotesFormatError, load_notes
from worker.data import batches, tokenize_notes

RECORDS = 40      # train notes of the largest hospital: enough for the specialty mix to show
GLOBAL_EVAL = 21  # three per specialty


def _generate(out: Path, seed: int = 0) -> Path:
    generate_dataset(out, hospitals=3, seed=seed, records=(RECORDS,), global_eval=GLOBAL_EVAL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jsonl"))}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("notes"))


class ByteTokenizer:
    """Stands in for the HF tokenizer: one id per UTF-8 byte, EOS 256."""

    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


# --- generator -------------------------------------------------------------------------------------


def test_layout(dataset: Path) -> None:
    assert sorted(_files(dataset)) == [
        "eval.jsonl",
        "hospital-1/eval.jsonl", "hospital-1/train.jsonl",
        "hospital-2/eval.jsonl", "hospital-2/train.jsonl",
        "hospital-3/eval.jsonl", "hospital-3/train.jsonl",
    ]
    for path in dataset.rglob("*.jsonl"):
        for rec in _records(path):
            assert list(rec) == ["id", "hospital", "specialty", "note_type", "text", "pii"]
            assert rec["specialty"] in templates.SPECIALTIES
            assert rec["note_type"] in templates.NOTE_TYPES


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = _files(_generate(tmp_path / "again"))
    assert again == _files(dataset)
    other = _files(_generate(tmp_path / "other", seed=1))
    assert other.keys() == again.keys()
    for name in again:
        assert other[name] != again[name], name


def test_pii_spans_are_exact_and_cover_every_inserted_value(dataset: Path) -> None:
    labels: Counter[str] = Counter()
    for path in dataset.rglob("*.jsonl"):
        for rec in _records(path):
            text, spans = rec["text"], rec["pii"]
            for s in spans:
                assert text[s["start"]:s["end"]] == s["text"], (rec["id"], s)
                assert s["label"] in PII_LABELS
            ends = [(s["start"], s["end"]) for s in spans]
            assert ends == sorted(ends) and all(a[1] <= b[0] for a, b in itertools.pairwise(ends))
            assert {"NAME", "MRN"} <= {s["label"] for s in spans}, rec["id"]
            # No PII value is left unlabelled elsewhere in the same note.
            covered = {(s["start"], s["end"]) for s in spans}
            for s in spans:
                if len(s["text"]) < 6:  # short values (a surname) may occur inside longer words
                    continue
                at = text.find(s["text"])
                while at != -1:
                    assert any(a <= at and at + len(s["text"]) <= b for a, b in covered), (rec["id"], s["text"])
                    at = text.find(s["text"], at + 1)
            labels.update(s["label"] for s in spans)
    assert set(labels) == set(PII_LABELS)


def test_note_lengths_are_moderate(dataset: Path) -> None:
    # About 3 characters per SmolLM2 token on these notes: 60-200 tokens is roughly 180-900 characters.
    lengths = [len(r["text"]) for p in dataset.rglob("*.jsonl") for r in _records(p)]
    assert 180 <= min(lengths) and max(lengths) <= 1000
    assert 350 <= sum(lengths) / len(lengths) <= 650


def test_hospitals_are_non_iid(dataset: Path) -> None:
    train = {h: _records(dataset / h / "train.jsonl") for h in ("hospital-1", "hospital-2", "hospital-3")}
    sizes = [len(train[h]) for h in sorted(train)]
    assert sizes == [40, 24, 14]  # 1.0x, 0.6x, 0.35x
    dominant = {h: Counter(r["specialty"] for r in recs).most_common(1)[0][0] for h, recs in train.items()}
    assert dominant == {"hospital-1": "cardiology", "hospital-2": "oncology", "hospital-3": "pediatrics"}
    assert not any(r["specialty"] == "pediatrics" for r in train["hospital-1"] + train["hospital-2"])
    # House styles differ too: each hospital writes its own date format.
    dobs = {h: next(s["text"] for s in recs[0]["pii"] if s["label"] == "DOB") for h, recs in train.items()}
    assert "-" in dobs["hospital-1"] and "/" in dobs["hospital-2"] and " " in dobs["hospital-3"]


def test_train_and_eval_are_disjoint(dataset: Path) -> None:
    every_train: set[str] = set()
    for h in ("hospital-1", "hospital-2", "hospital-3"):
        train, held = _records(dataset / h / "train.jsonl"), _records(dataset / h / "eval.jsonl")
        assert held and {r["hospital"] for r in train + held} == {h}
        assert not {r["id"] for r in train} & {r["id"] for r in held}
        assert not {r["text"] for r in train} & {r["text"] for r in held}
        every_train |= {r["text"] for r in train}
    global_eval = _records(dataset / "eval.jsonl")
    assert len(global_eval) == GLOBAL_EVAL
    assert not {r["text"] for r in global_eval} & every_train
    assert Counter(r["specialty"] for r in global_eval) == {s: 3 for s in templates.SPECIALTIES}


def test_cli_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--hospitals", "2", "--records", "6", "4", "--global-eval", "7"]) == 0
    assert len(_records(tmp_path / "hospital-2" / "train.jsonl")) == 4
    assert "hospital-1/train.jsonl" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--hospitals", "3", "--records", "6", "4"])  # one count, or one per hospital


def test_render_records_nested_pii_spans() -> None:
    values = {"ref": "{title} {surname}", "title": "Ms."}
    pii = {"surname": ("Okafor", "NAME"), "mrn": ("12345678", "MRN")}
    text, spans = templates.render("Seen: {ref}, MRN {mrn}, day {n:3-3}.", values, pii, random.Random(0))
    assert text == "Seen: Ms. Okafor, MRN 12345678, day 3."
    assert [text[s:e] for s, e, _ in spans] == ["Okafor", "12345678"]
    with pytest.raises(templates.TemplateError, match="nope"):
        templates.render("{nope}", values, pii, random.Random(0))


# --- loader ----------------------------------------------------------------------------------------


def test_loader_round_trips_generator_output(dataset: Path) -> None:
    path = dataset / "hospital-2" / "train.jsonl"
    notes = load_notes(path)
    assert [n.to_record() for n in notes] == _records(path)
    assert all(isinstance(n, Note) and n.hospital == "hospital-2" for n in notes)
    with pytest.raises(AttributeError):
        notes[0].text = "changed"  # type: ignore[misc]


def test_loader_reads_csv(tmp_path: Path) -> None:
    path = tmp_path / "notes.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "ward"])
        writer.writerow(["a1", 'First line, with a comma and "quotes"\nsecond line', "4B"])
        writer.writerow(["", "Second note", "ICU"])
    notes = load_notes(path)
    assert [n.text for n in notes] == ['First line, with a comma and "quotes"\nsecond line', "Second note"]
    assert [n.id for n in notes] == ["a1", "notes-2"]


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("notes.jsonl", '{"text": "ok"}\n{"text": "fine"}\n{"text": broken}\n', "notes.jsonl line 3: invalid JSON"),
    ("notes.jsonl", '{"text": "ok"}\n{"body": "no text here"}\n', "notes.jsonl line 2: missing 'text' field"),
    ("notes.jsonl", '{"text": "ok"}\n\n{"text": "   "}\n', "notes.jsonl line 3: empty text"),
    ("notes.jsonl", '["text"]\n', "line 1: expected a JSON object"),
    ("notes.jsonl", '{"text": 7}\n', "line 1: 'text' must be a string"),
    ("notes.jsonl", '{"text": "Jo Bloggs", "pii": [{"start": 0, "end": 2, "label": "NAME", "text": "Bo"}]}\n',
     "line 1: pii span 0"),
    ("notes.jsonl", "\n\n", "notes.jsonl: no notes (empty file)"),
    ("notes.csv", "", "notes.csv: no notes (empty file)"),
    ("notes.csv", "id,text\n", "notes.csv: no notes (empty file)"),
    ("notes.csv", "id,body\n1,hello\n", "notes.csv line 1: no 'text' column"),
    ("notes.csv", 'id,text\n1,fine\n2,"multi\nline"\n3,\n', "notes.csv line 5: empty text"),
    ("notes.csv", "id,text\n1,fine\n2,too,many\n", "notes.csv line 3: row 2 has 3 fields"),
    ("notes.csv", 'id,text\n1,fine\n2,"bad"quote\n', "notes.csv line 3: malformed CSV"),
    ("notes.txt", "hello\n", "notes.txt: unknown extension '.txt'"),
])
def test_loader_errors_name_file_and_line(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(NotesFormatError) as err:
        load_notes(path)
    assert str(err.value).startswith(str(tmp_path))
    assert expected in str(err.value)


def test_loader_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "notes.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(NotesFormatError, match="line 2: not UTF-8"):
        load_notes(path)


# --- tokens and batches ----------------------------------------------------------------------------


def test_tokenize_appends_eos_and_truncates() -> None:
    ids = tokenize_notes([Note("abc"), "hello world"], ByteTokenizer(), max_len=5)
    assert ids == [[97, 98, 99, 256], list(b"hello")]

    def hf_style(text: str) -> dict[str, list[int]]:  # callable only, like tokenizer(text)["input_ids"]
        return {"input_ids": list(text.encode())}

    assert tokenize_notes(["hi"], hf_style, max_len=8) == [[104, 105]]  # no eos_token_id: none added


def test_batches_pad_and_mask() -> None:
    seqs = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11, 12]]
    out = list(batches(seqs, 2, max_len=4, pad_id=0, shuffle=False))
    assert len(out) == 2
    ids, mask = out[0]
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = out[1]
    assert ids.tolist() == [[5, 6, 7, 8], [11, 12, 0, 0]]  # cut to max_len, padded to the longest row
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_batches_seeded_order_covers_every_sequence() -> None:
    seqs = [[i + 1] * (i % 5 + 1) for i in range(23)]

    def firsts(seed: int) -> list[int]:
        return [int(row[0]) for ids, _ in batches(seqs, 4, seed=seed, pad_id=99) for row in ids]

    assert firsts(3) == firsts(3)
    assert firsts(3) != firsts(4)
    assert sorted(firsts(3)) == list(range(1, 24))
    for ids, mask in batches(seqs, 4, seed=3, pad_id=99):
        assert ids.shape == mask.shape and ids.shape[0] <= 4
        assert ((ids == 99) == (mask == 0)).all()
        assert (mask.sum(dim=1) == torch.tensor([len(seqs[int(r[0]) - 1]) for r in ids])).all()
    assert sum(1 for _ in batches(seqs, 4, drop_last=True)) == 5
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        list(batches([[1], []], 2, shuffle=False))


def test_batches_from_generated_notes(dataset: Path) -> None:
    notes = load_notes(dataset / "hospital-3" / "eval.jsonl")
    ids = tokenize_notes(notes, ByteTokenizer(), max_len=128)
    total = 0
    for input_ids, mask in batches(ids, 3, max_len=128, seed=0):
        assert input_ids.shape[1] <= 128
        total += int(mask.sum())
    assert total == sum(len(x) for x in ids)


# --- canaries --------------------------------------------------------------------------------------


def test_canaries_are_planted_and_recoverable(dataset: Path) -> None:
    notes = load_notes(dataset / "hospital-1" / "train.jsonl")
    planted, texts = plant_canaries(notes, 3, seed=7, repeats=2)
    assert len(planted) == len(notes) + 6
    counts = Counter(n.text for n in planted)
    assert all(counts[t] == 2 for t in texts)
    assert [n for n in planted if n.note_type != "canary"] == notes  # the rest keep their order
    assert [c.text for c in make_canaries(3, seed=7)] == texts
    unseen = make_canaries(3, seed=8)
    assert not {c.text for c in unseen} & set(texts)
    for canary in make_canaries(3, seed=7):
        assert canary.text.startswith("Patient ")
        mrn = next(s.text for s in canary.pii if s.label == "MRN")
        assert len(mrn) == 8 and mrn.isdigit()
        assert all(canary.text[s.start:s.end] == s.text for s in canary.pii)
    # JSONL dicts get dict canaries.
    records = _records(dataset / "hospital-1" / "eval.jsonl")
    with_dicts, dict_texts = plant_canaries(records, 2, seed=7)
    assert dict_texts == texts[:2]
    assert sum(isinstance(r, dict) and r["note_type"] == "canary" for r in with_dicts) == 2
