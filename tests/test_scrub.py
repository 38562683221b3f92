"""PII scrubbing at ingest: recall per category, placeholders, fedfhe-scrub on files, canaries on the training path."""

from __future__ import annotations

import hashlib
import json
import math
import re
import runpy
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from canaries import make_canaries, plant_canaries

from common.datagen.generator import generate_dataset
from common.notes import PII_LABELS, Note, load_notes, write_jsonl
from worker.data import load_records
from worker.runtime import ByteTokenizer
from worker.scrub import LABELS, Scrubber, main

TOK = ByteTokenizer()
PLACEHOLDER = re.compile(r"\[(?:" + "|".join(LABELS) + r")\]")


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return Scrubber()  # one per process, as the worker builds it


@pytest.fixture(scope="module")
def notes(tmp_path_factory: pytest.TempPathFactory) -> list[Note]:
    """Every hospital's house style (MRN, date and phone formats), small: 3 hospitals, 58 train notes."""
    root = tmp_path_factory.mktemp("notes")
    generate_dataset(root, hospitals=3, seed=5, records=[30], global_eval=0)
    return [n for h in (1, 2, 3) for n in load_notes(root / f"hospital-{h}" / "train.jsonl")]


def caught(text: str, start: int, end: int, spans) -> bool:  # type: ignore[no-untyped-def]
    """The bench's rule: at least 90% of the identifier's non-space characters lie in scrubbed spans."""
    covered = {i for s in spans for i in range(s.start, s.end)}
    chars = [i for i in range(start, end) if not text[i].isspace()]
    return sum(i in covered for i in chars) >= 0.9 * len(chars)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- finding identifiers ---------------------------------------------------------------------------


def test_recall_on_generator_notes_per_category(scrubber: Scrubber, notes: list[Note]) -> None:
    total: Counter[str] = Counter()
    hit: Counter[str] = Counter()
    for note in notes:
        spans = scrubber.scrub(note.text).spans
        for s in note.pii:
            total[s.label] += 1
            hit[s.label] += caught(note.text, s.start, s.end, spans)
    assert set(total) == set(PII_LABELS)  # the corpus exercises every category
    recall = {label: hit[label] / total[label] for label in total}
    assert all(r >= 0.95 for r in recall.values()), recall
    assert sum(hit.values()) / sum(total.values()) >= 0.98


def test_identifiers_leave_nothing_behind_and_clinical_words_stay(scrubber: Scrubber, notes: list[Note]) -> None:
    for note in notes:
        out = scrubber.scrub(note.text).text
        for s in note.pii:
            assert s.text not in out, (s.label, note.id)
    kept = total = 0
    for note in notes:
        out_words = Counter(re.findall(r"\w+", scrubber.scrub(note.text).text))
        inside = {i for s in note.pii for i in range(s.start, s.end)}
        for m in re.finditer(r"\w+", note.text):
            if not inside.intersection(range(m.start(), m.end())):
                total += 1
                kept += out_words[m.group()] > 0
    assert kept / total >= 0.9  # the goal is 60%; "Dr" goes with the doctor's name


def test_placeholders_counts_and_spans(scrubber: Scrubber) -> None:
    text = ("Patient: Nicole Clark | MRN: GU-2980360 | DOB 09/18/1936\n"
            "Seen 2023-01-05 at Gill University Hospital by Dr. Amanda Kelly; call 791-868-5780 or a.kelly@gill.org.\n"
            "Lives at 12 Oak Street, Springfield, MA 01103. Ms. Clark is a 93-year-old woman.")
    res = scrubber.scrub(text)
    assert res.text == ("Patient: [NAME] | MRN: [MRN] | DOB [DOB]\n"
                        "Seen [DATE] at [HOSPITAL] by [DOCTOR]; call [PHONE] or [EMAIL].\n"
                        "Lives at [ADDRESS]. Ms. [NAME] is a [AGE] woman.")
    assert res.counts == {"NAME": 2, "MRN": 1, "DOB": 1, "DATE": 1, "HOSPITAL": 1, "DOCTOR": 1, "PHONE": 1,
                          "EMAIL": 1, "ADDRESS": 1, "AGE": 1}
    assert [text[s.start:s.end] for s in res.spans][:3] == ["Nicole Clark", "GU-2980360", "09/18/1936"]
    assert all(s.label in LABELS for s in res.spans)
    assert len(PLACEHOLDER.findall(res.text)) == sum(res.counts.values()) == len(res.spans)
    assert scrubber.scrub("") == type(res)("", {}, ())


@pytest.mark.parametrize("value, label", [
    ("Jan 5, 2023", "DATE"), ("January 5 2023", "DATE"), ("05/01/2023", "DATE"), ("2023-01-05", "DATE"),
    ("5-Jan-2023", "DATE"), ("5 Jan 2023", "DATE"), ("05.01.2023", "DATE"), ("March 2019", "DATE"),
    ("12345678", "MRN"), ("GU-2980360", "MRN"), ("G12-345678", "MRN"), ("MRN-07602434", "MRN"),
    ("(617) 555-0134", "PHONE"), ("617.555.0134", "PHONE"), ("+44 20 7946 0958", "PHONE"),
])
def test_formats(scrubber: Scrubber, value: str, label: str) -> None:
    context = {"DATE": "Seen on {}.", "MRN": "MRN: {} today.", "PHONE": "Call {} now."}[label]
    text = context.format(value)
    res = scrubber.scrub(text)
    assert res.text == context.format(f"[{label}]"), res.text


@pytest.mark.parametrize("text, expected", [
    ("A 93-year-old woman, aged 91.", "A [AGE] woman, aged [AGE]."),
    ("A 45-year-old man.", "A 45-year-old man."),  # ages up to 89 are not identifiers (HIPAA Safe Harbor)
    ("Seen at Springfield Memorial Hospital today.", "Seen at [HOSPITAL] today."),
    ("Reviewed by Dr. Steven Gamble.", "Reviewed by [DOCTOR]."),
    ("Mr. O'Brien and Mrs. Nkemelu-Adeyemi agreed.", "Mr. [NAME] and Mrs. [NAME] agreed."),
    ("Patient Kristofer Kodsi was reviewed.", "Patient [NAME] was reviewed."),
    ("SSN 123-45-6789, acct # A1234567", "SSN [ID], acct # [ID]"),
    # clinical text that looks like identifiers and is not
    ("BP 120/80, pain 7/10, strength 3/5, Hb 9.7 g/dL, ICD-10 M80.08XA, T 37.2 C.",
     "BP 120/80, pain 7/10, strength 3/5, Hb 9.7 g/dL, ICD-10 M80.08XA, T 37.2 C."),
    ("Parkinson disease; Graves disease; Patient Education given; Cardiology Clinic follow-up.",
     "Parkinson disease; Graves disease; Patient Education given; Cardiology Clinic follow-up."),
])
def test_clinical_forms(scrubber: Scrubber, text: str, expected: str) -> None:
    assert scrubber.scrub(text).text == expected


def test_every_mention_of_a_found_name_goes(scrubber: Scrubber) -> None:
    text = "Re: Aulora Shaheen, DOB 1959-02-18\nAulora was seen again; SHAHEEN, A. consented."
    assert scrubber.scrub(text).text == "Re: [NAME], DOB [DOB]\n[NAME] was seen again; [NAME], A. consented."


def test_scrub_notes_keeps_metadata_and_drops_spans(scrubber: Scrubber, notes: list[Note]) -> None:
    out = scrubber.scrub_notes(notes[:3])
    for before, after in zip(notes[:3], out, strict=True):
        assert before.pii and after.pii == ()
        assert (after.id, after.hospital, after.specialty, after.note_type) == \
               (before.id, before.hospital, before.specialty, before.note_type)
        assert after.text == scrubber.scrub(before.text).text


def test_one_scrubber_serves_many_threads(scrubber: Scrubber, notes: list[Note]) -> None:
    texts = [n.text for n in notes] * 3
    with ThreadPoolExecutor(max_workers=6) as pool:
        parallel = list(pool.map(lambda t: scrubber.scrub(t), texts))
    assert parallel == [scrubber.scrub(t) for t in texts]


# --- fedfhe-scrub ----------------------------------------------------------------------------------


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def test_cli_jsonl_passes_every_other_field_through(tmp_path: Path, notes: list[Note]) -> None:
    src = tmp_path / "in.jsonl"
    records = [{**n.to_record(), "ward": "B4", "extra": {"nested": [1, 2]}, "score": 0.5} for n in notes[:6]]
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    before = sha256(src)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert run_cli(src, "-o", out, "--report", report) == 0
    assert sha256(src) == before
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(written) == len(records)
    for r, w in zip(records, written, strict=True):
        assert "pii" not in w  # the labelled spans are the identifiers themselves
        assert {k: v for k, v in r.items() if k not in ("text", "pii")} == {k: v for k, v in w.items() if k != "text"}
        assert list(w) == [k for k in r if k != "pii"]  # field order too
        assert all(s["text"] not in w["text"] for s in r["pii"])
    rep = json.loads(report.read_text())
    assert rep["notes_read"] == rep["notes_written"] == 6 and rep["notes_skipped"] == 0
    placeholders = Counter(m.group()[1:-1] for w in written for m in PLACEHOLDER.finditer(w["text"]))
    assert {k: v for k, v in rep["replacements"].items() if v} == dict(placeholders)
    assert rep["replacements_total"] == sum(placeholders.values()) > 0


def test_cli_csv_keeps_every_column(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes("\ufeffid,ward,text,pii\r\nn1,B4,\"Patient: Nicole Clark, MRN 12345678.\nStable.\",x\r\n"
                    "n2,C1,No identifiers here.,\r\n".encode())
    before = sha256(src)
    out = tmp_path / "out.jsonl"
    assert run_cli(src, "-o", out) == 0
    assert sha256(src) == before
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"id": "n1", "ward": "B4", "text": "Patient: [NAME], MRN [MRN].\nStable."},
                    {"id": "n2", "ward": "C1", "text": "No identifiers here."}]
    assert load_notes(out)[0].text.startswith("Patient: [NAME]")  # the worker reads what fedfhe-scrub writes


@pytest.mark.filterwarnings("ignore:'worker.scrub' found in sys.modules")
def test_cli_runs_as_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m worker.scrub` (in-process: a fresh interpreter would spend seconds importing Presidio)."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"text": "Dr. Amanda Kelly saw her."}) + "\n", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["fedfhe-scrub", str(src), "-o", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("worker.scrub", run_name="__main__")
    assert exit_.value.code == 0
    assert json.loads(out.read_text())["text"] == "[DOCTOR] saw her."


def test_the_readme_command_runs_as_a_console_script(tmp_path: Path) -> None:
    """`fedfhe-scrub notes.jsonl -o scrubbed.jsonl --report counts.json`, word for word from the README."""
    (tmp_path / "notes.jsonl").write_text(json.dumps({"id": "a", "text": "Patient Nicole Clark, MRN 12345678."})
                                          + "\n", encoding="utf-8")
    exe = Path(sys.executable).with_name("fedfhe-scrub")
    done = subprocess.run([str(exe), "notes.jsonl", "-o", "scrubbed.jsonl", "--report", "counts.json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "scrubbed.jsonl").read_text())["text"] == "Patient [NAME], MRN [MRN]."
    assert json.loads((tmp_path / "counts.json").read_text())["replacements"]["MRN"] == 1


@pytest.mark.parametrize("name, content, where", [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2"),
    ("nocol.csv", b"id,body\n1,Patient Nicole Clark\n", "line 1"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', "line 2"),
    ("notobj.jsonl", b'["text"]\n', "line 1"),
    ("notext.jsonl", b'{"id": 1}\n', "line 1"),
    ("number.jsonl", b'{"text": 5}\n', "line 1"),
    ("ragged.csv", b"id,text\n1,a,b\n", "line 2"),
    ("quote.csv", b'id,text\n1,"unterminated\n', "line"),
    ("empty.jsonl", b"", "no notes"),
    ("notes.txt", b"hello\n", "unknown extension"),
])
def test_cli_bad_input_is_an_error_naming_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        name: str, content: bytes, where: str) -> None:
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out.jsonl"
    out.write_text("previous run\n")  # an error must leave what was there
    assert run_cli(src, "-o", out, "--report", tmp_path / "r.json") == 2
    err = capsys.readouterr().err
    assert str(src) in err and where in err, err
    assert out.read_text() == "previous run\n" and not (tmp_path / "r.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "out.jsonl"])  # no temp file left
    assert src.read_bytes() == content


def test_cli_skips_and_counts_notes_it_cannot_use(tmp_path: Path) -> None:
    big = "Stable. " * (10 * 1024 * 1024 // 8)  # a 10 MB note: an export error, not a note
    lines = [{"id": "a", "text": "Patient Nicole Clark is stable."}, {"id": "b", "text": "   "},
             {"id": "c", "text": big}, {"id": "d", "text": "Nicole Clark, 12345678, 2023-01-05"},
             {"id": "e", "text": "Follow-up in two weeks."}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    before = sha256(src)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert run_cli(src, "-o", out, "--report", report) == 0
    assert sha256(src) == before
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "e"]
    rep = json.loads(report.read_text())
    assert (rep["notes_read"], rep["notes_written"], rep["notes_skipped"]) == (5, 2, 3)
    assert rep["skipped"] == {"empty text": {"count": 1, "lines": [2]},
                              "longer than 1000000 characters": {"count": 1, "lines": [3]},
                              "nothing left but identifiers": {"count": 1, "lines": [4]}}


def test_cli_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "Patient Nicole Clark."}) + "\n")
    before = sha256(src)
    assert run_cli(src, "-o", src) == 2
    assert run_cli(tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl") == 2
    assert run_cli(src, "-o", tmp_path / "no" / "such" / "dir.jsonl") == 2
    assert sha256(src) == before


# --- the training path -----------------------------------------------------------------------------


def test_canary_identifiers_reach_no_token_sequence(tmp_path: Path, scrubber: Scrubber, notes: list[Note]) -> None:
    planted, _ = plant_canaries(notes, 24, seed=7)
    path = tmp_path / "train.jsonl"
    write_jsonl(path, planted)
    canaries = make_canaries(24, seed=7)
    secrets = {s.text for c in canaries for s in c.pii if s.label in ("NAME", "MRN")}
    secrets |= {part for c in canaries for s in c.pii if s.label == "NAME" for part in s.text.split()}

    def leaked(records: list[list[int]]) -> set[str]:
        decoded = [TOK.decode(r) for r in records]
        return {s for s in secrets if any(s in d for d in decoded)}

    plain = load_records(path, TOK, 4096)
    assert leaked(plain) == secrets  # positive control: without the scrubber every canary is there
    scrubbed = load_records(path, TOK, 4096, scrubber=scrubber)
    assert len(scrubbed) == len(plain)
    assert leaked(scrubbed) == set()
    decoded = {TOK.decode(r) for r in scrubbed}
    assert all(scrubber.scrub(c.text).text in decoded for c in canaries)  # the canaries are there, scrubbed
    assert all(c.text.startswith("Patient [NAME], MRN [MRN], DOB [DOB]") for c in scrubber.scrub_notes(canaries))
    held_out = load_records(path, TOK, 4096, limit=10, scrubber=scrubber)  # eval notes take the same path
    assert len(held_out) == 10 and leaked(held_out) == set()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_scrubbing_hides_canary_identifiers_from_membership_inference(tmp_path: Path, scrubber: Scrubber) -> None:
    """Train without DP on notes with planted canaries; AUC of the identifier bytes' loss, planted vs never seen.

    Without scrubbing the adapter memorises the canaries' names, MRNs, DOBs, phones and addresses (positive
    control, AUC well above 0.5); with it, the training data holds none of them and the AUC is chance.
    """
    import numpy as np
    import torch
    from scipy import stats

    from common.lwe.params import EXACT
    from common.lwe.prg import DeterministicRandomness
    from common.messages import TrainingConfig
    from worker.data import pad_batch, tokenize_notes
    from worker.model import LoraConfig
    from worker.runtime import build
    from worker.train import DpSettings, Trainer

    n, length, targets = 64, 96, ("q", "k", "v", "o", "gate", "up", "down")
    generate_dataset(tmp_path, hospitals=1, seed=3, records=[40], global_eval=1)
    base = load_notes(tmp_path / "hospital-1" / "train.jsonl")
    notes, _ = plant_canaries(base, n, seed=7, repeats=3)
    write_jsonl(tmp_path / "planted.jsonl", notes)
    members, others = make_canaries(n, seed=7), make_canaries(n, seed=8)

    @torch.no_grad()
    def identifier_loss(model: torch.nn.Module, canaries: list[Note]) -> np.ndarray:
        ids, mask = pad_batch(tokenize_notes([c.text for c in canaries], TOK, length), length)  # (B, T)
        logp = torch.log_softmax(model(ids, mask)[:, :-1].float(), -1)  # (B, T-1, V): position t predicts t+1
        nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        sel = torch.zeros_like(nll)
        for b, c in enumerate(canaries):
            for s in c.pii:
                sel[b, max(s.start - 1, 0):min(s.end - 1, length - 1)] = 1
        return ((nll * sel).sum(1) / sel.sum(1)).numpy()

    def auc(scrub: Scrubber | None) -> float:
        records = load_records(tmp_path / "planted.jsonl", TOK, length, scrubber=scrub)
        rt = build("float", "tiny", EXACT, LoraConfig(rank=16, alpha=32.0, targets=targets, ffa=False, seed=5))
        cfg = TrainingConfig(local_steps=100, batch_size=16, learning_rate=5e-3, lora_rank=16, lora_alpha=32.0,
                             lora_targets=targets, ffa=False, max_seq_len=length, total_rounds=1)
        Trainer(rt.model, records, DpSettings(enabled=False), rng=DeterministicRandomness(11)).train_round(cfg)
        m, o = -identifier_loss(rt.model, members), -identifier_loss(rt.model, others)
        return float(stats.mannwhitneyu(m, o).statistic / (len(m) * len(o)))

    plain, scrubbed = auc(None), auc(scrubber)
    se = math.sqrt((2 * n + 1) / (12 * n * n))  # the AUC's standard error under the null
    print(f"identifier membership AUC: without scrubbing {plain:.3f}, with scrubbing {scrubbed:.3f} (se {se:.3f})")
    assert plain >= 0.8
    assert abs(scrubbed - 0.5) <= 3 * se
