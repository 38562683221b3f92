"""Benchmark of PII scrubbers on labelled notes: recall and precision per category, words kept, notes/second.

    python scripts/bench_scrub.py --out /tmp/bench_scrub.json [--meddeid FILE.jsonl] [--spacy-model DIR]

Corpora (both synthetic, both with exact character spans):
  - fedfhe-data: 3 hospitals x 200 notes, seed 0 (every MRN, date and phone format the generator has);
  - meddeid-data en-US (AGPL; run as a separate program, never imported): 250 notes, seed 7, made here
    with `meddeid-data generate` unless --meddeid gives a file. Its labels map to ours (see MEDDEID).

Scrubbers: Presidio's analyzer as shipped but with no NLP engine (pattern recognizers only: no spaCy
model can be downloaded here); with --spacy-model, Presidio with that spaCy pipeline's NER too;
scrubadub (default detectors + date of birth; its name detectors need NLTK/spaCy data that cannot be
downloaded); philter-ucsf (its shipped config; two stand-ins make it run at all: NLTK's POS tagger needs a
data download, so capitalised words are tagged NNP and numbers CD, which is what its name and number
filters ask the tagger; and its patterns put (?i) mid-expression, which Python 3.11's re rejects, so it
gets the regex module instead); and
worker.scrub.Scrubber, the one fedfhe uses.

Matching rule. A labelled span counts as caught when at least 90% of its non-space characters are
covered by the scrubber's spans, whatever label the scrubber gave them (a DOB scrubbed as a DATE does not
leak). A predicted span counts as correct (precision) when at least half of its non-space characters lie
inside labelled spans of any category. "Words kept": of the words (\\w+) wholly outside labelled spans,
the share the scrubber left untouched. Throughput: notes/second on one core (pinned to CPU 0, BLAS/OMP
threads 1), scrubber already built; build time is reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch load (Presidio imports torch): one core means one thread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.datagen.generator import generate_dataset  # noqa: E402
from common.notes import load_notes  # noqa: E402

Spans = list[tuple[int, int, str]]
# Direct identifiers: the goal's categories (names, IDs, contact details, addresses, dates, ages over 89).
DIRECT = ("NAME", "DOCTOR", "DOB", "DATE", "AGE", "MRN", "ID", "PHONE", "EMAIL", "URL", "ADDRESS")
# Scrubbed too, but not a direct identifier; and quasi-identifiers meddeid labels that fedfhe keeps on purpose.
OTHER = ("HOSPITAL", "ORGANIZATION", "PROFESSION", "AGE<=89")


@dataclass
class Doc:
    text: str
    gold: Spans


# --------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------


def fedfhe_corpus(seed: int, records: int, hospitals: int) -> list[Doc]:
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp), hospitals=hospitals, seed=seed, records=[records] * hospitals,
                         eval_fraction=0.0, global_eval=0)
        notes = [n for h in range(hospitals) for n in load_notes(Path(tmp) / f"hospital-{h + 1}" / "train.jsonl")]
    return [Doc(n.text, [(s.start, s.end, s.label) for s in n.pii]) for n in notes]


_AGE_SHAPE = re.compile(r"(\d+)[ -](year|month|week|day)s?[ -]old")


def _meddeid_label(label: str, text: str) -> str:
    kind, _, who = label.partition(":")
    if kind == "Name":
        return "DOCTOR" if who == "Caregiver" else "NAME"
    if kind == "Age_Birthdate":
        age = _AGE_SHAPE.match(text)
        if age is None:
            return "DOB"
        years = int(age.group(1)) if age.group(2).startswith("year") else 0  # "18-month-old" is under a year
        return "AGE" if years > 89 else "AGE<=89"
    if kind == "ID":
        return "ID"
    if kind == "Contactdetails":
        return "EMAIL" if "@" in text else "URL" if "://" in text or text.startswith("www.") else "PHONE"
    if kind == "Address_Location":
        return "ADDRESS"
    if kind == "Organization":
        return "HOSPITAL" if who == "Healthcare" else "ORGANIZATION"
    if kind == "Date":
        return "DATE"
    if kind == "Profession":
        return "PROFESSION"
    raise ValueError(f"unmapped meddeid label {label!r}")


# meddeid label -> ours, documented by _meddeid_label; listed here for the report.
MEDDEID = {"Name:Patient": "NAME", "Name:Other": "NAME", "Name:Caregiver": "DOCTOR",
           "Age_Birthdate": "DOB (a date) / AGE (over 89) / AGE<=89 (kept by policy)", "ID:*": "ID",
           "Contactdetails": "PHONE / EMAIL / URL", "Address_Location:*": "ADDRESS",
           "Organization:Healthcare": "HOSPITAL", "Organization:Other": "ORGANIZATION", "Date": "DATE",
           "Profession": "PROFESSION"}


def meddeid_corpus(path: Path | None, count: int, seed: int) -> tuple[list[Doc], str]:
    """meddeid-data's en-US notes: generated by its own CLI (a separate process: the package is AGPL)."""
    if path is None:
        exe = shutil.which("meddeid-data") or str(Path(sys.executable).parent / "meddeid-data")
        path = Path(tempfile.mkdtemp()) / f"meddeid-en-US-{count}-seed{seed}.jsonl"
        subprocess.run([exe, "generate", "--language-profile", "en-US", "--count", str(count), "--seed", str(seed),
                        "--output", str(path)], check=True, stdout=subprocess.DEVNULL)
    docs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text = row["text"]
        gold = [(s["begin"], s["end"], _meddeid_label(s["label"], text[s["begin"]:s["end"]])) for s in row["spans"]]
        docs.append(Doc(text, gold))
    return docs, str(path)


# --------------------------------------------------------------------------------------------------
# Scrubbers: each is built, then maps a text to (start, end, label) spans in our label vocabulary
# --------------------------------------------------------------------------------------------------

Detect = Callable[[str], Spans]

_PRESIDIO_MAP = {"PERSON": "NAME", "PHONE_NUMBER": "PHONE", "EMAIL_ADDRESS": "EMAIL", "URL": "URL",
                 "DATE_TIME": "DATE", "LOCATION": "ADDRESS", "US_SSN": "ID", "US_DRIVER_LICENSE": "ID",
                 "US_BANK_NUMBER": "ID", "US_ITIN": "ID", "US_PASSPORT": "ID", "CREDIT_CARD": "ID",
                 "IBAN_CODE": "ID", "IP_ADDRESS": "ID", "MEDICAL_LICENSE": "ID", "UK_NHS": "ID", "NRP": "OTHER",
                 "ORGANIZATION": "HOSPITAL", "CRYPTO": "ID", "MAC_ADDRESS": "ID", "UUID": "ID"}


def _offline_tldextract() -> None:
    """Presidio's e-mail recognizer asks tldextract, which fetches the public-suffix list; use the bundled copy."""
    import tldextract
    from presidio_analyzer.predefined_recognizers.generic import email_recognizer

    email_recognizer.tldextract = SimpleNamespace(  # type: ignore[assignment]
        extract=tldextract.TLDExtract(suffix_list_urls=()))


def build_presidio(spacy_model: str | None = None) -> Detect:
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NoOpNlpEngine, SpacyNlpEngine

    _offline_tldextract()
    if spacy_model:
        nlp: Any = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": spacy_model}])
    else:
        nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    nlp.load()
    engine = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])

    def detect(text: str) -> Spans:
        return [(r.start, r.end, _PRESIDIO_MAP.get(r.entity_type, "OTHER")) for r in engine.analyze(text, "en")]
    return detect


def build_scrubadub() -> Detect:
    import scrubadub

    scrubber = scrubadub.Scrubber(locale="en_US")
    scrubber.add_detector("date_of_birth")
    names = {"email": "EMAIL", "phone": "PHONE", "url": "URL", "social_security_number": "ID",
             "credit_card": "ID", "date_of_birth": "DOB", "twitter": "ID", "credential": "ID"}

    def detect(text: str) -> Spans:
        return [(f.beg, f.end, names.get(f.type, "OTHER")) for f in scrubber.iter_filth(text)]
    return detect


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def build_philter() -> Callable[[Sequence[str]], list[Spans]]:
    """philter-ucsf is file-based: it reads a folder of .txt notes and writes them back with PHI as asterisks."""
    import importlib.util

    import nltk

    def shape_tagger(tokens: Sequence[str], *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [(t, "CD" if t.isdigit() else "NNP" if t[:1].isupper() else "NN") for t in tokens]

    nltk.pos_tag = shape_tagger  # NLTK's tagger data cannot be downloaded here
    import philter_ucsf.philter
    import regex

    # Its patterns put flags such as (?i) mid-expression, which Python 3.11's re rejects; regex accepts them.
    philter_ucsf.philter.re = regex  # type: ignore[attr-defined]
    from philter_ucsf.philter import Philter

    spec = importlib.util.find_spec("philter_ucsf")
    assert spec is not None and spec.origin is not None
    home = Path(spec.origin).parent

    def run(texts: Sequence[str]) -> list[Spans]:
        with tempfile.TemporaryDirectory() as tmp, _cwd(home):  # its config names filter files relative to itself
            src, dst = Path(tmp, "in"), Path(tmp, "out")
            src.mkdir()
            dst.mkdir()
            for i, text in enumerate(texts):
                (src / f"{i:06d}.txt").write_text(text, encoding="utf-8")
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                philter = Philter({"verbose": False, "run_eval": False, "finpath": f"{src}/", "foutpath": f"{dst}/",
                                   "outformat": "asterisk", "filters": "configs/philter_delta.json"})
                philter.map_coordinates()
                philter.transform()
            out = []
            for i, text in enumerate(texts):
                masked = (dst / f"{i:06d}.txt").read_text(encoding="utf-8")
                stars = [j for j, (a, b) in enumerate(zip(text, masked, strict=True)) if b == "*" and a != "*"]
                out.append(_runs(stars))
            return out
    return run


def _runs(positions: Sequence[int]) -> Spans:
    spans: Spans = []
    for p in positions:
        if spans and spans[-1][1] == p:
            spans[-1] = (spans[-1][0], p + 1, "PHI")
        else:
            spans.append((p, p + 1, "PHI"))
    return spans


def build_fedfhe() -> Detect:
    from worker.scrub import Scrubber

    scrubber = Scrubber()
    return lambda text: [(s.start, s.end, s.label) for s in scrubber.scrub(text).spans]


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _solid(text: str, start: int, end: int) -> list[int]:
    return [i for i in range(start, end) if not text[i].isspace()]


def score(docs: Sequence[Doc], predicted: Sequence[Spans]) -> dict[str, Any]:
    caught: Counter[str] = Counter()
    total: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    emitted: Counter[str] = Counter()
    words_out = words_kept = 0
    for doc, pred in zip(docs, predicted, strict=True):
        covered: set[int] = set()
        for s, e, _ in pred:
            covered.update(range(s, e))
        inside: set[int] = set()
        for s, e, _ in doc.gold:
            inside.update(range(s, e))
        for s, e, label in doc.gold:
            chars = _solid(doc.text, s, e)
            total[label] += 1
            if chars and sum(c in covered for c in chars) >= 0.9 * len(chars):
                caught[label] += 1
        for s, e, label in pred:
            chars = _solid(doc.text, s, e)
            emitted[label] += 1
            if chars and sum(c in inside for c in chars) >= 0.5 * len(chars):
                correct[label] += 1
        for m in re.finditer(r"\w+", doc.text):
            span = range(m.start(), m.end())
            if not any(i in inside for i in span):
                words_out += 1
                words_kept += not any(i in covered for i in span)
    recall = {k: {"caught": caught[k], "total": total[k], "recall": round(caught[k] / total[k], 4)}
              for k in (*DIRECT, *OTHER) if total[k]}
    direct_total = sum(total[k] for k in DIRECT)
    direct_caught = sum(caught[k] for k in DIRECT)
    precision = {k: {"correct": correct[k], "predicted": emitted[k], "precision": round(correct[k] / emitted[k], 4)}
                 for k in sorted(emitted)}
    all_emitted = sum(emitted.values())
    return {
        "recall": recall,
        "recall_direct_overall": round(direct_caught / direct_total, 4) if direct_total else None,
        "recall_direct_min": min((recall[k]["recall"] for k in DIRECT if k in recall), default=None),
        "precision": precision,
        "precision_overall": round(sum(correct.values()) / all_emitted, 4) if all_emitted else None,
        "words_kept": round(words_kept / words_out, 4) if words_out else None,
    }


def run_scrubber(name: str, docs: Sequence[Doc], build: Callable[[], Any], batch: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    detect = build()
    built = time.perf_counter() - t0
    t1 = time.perf_counter()
    predicted = detect([d.text for d in docs]) if batch else [detect(d.text) for d in docs]
    seconds = time.perf_counter() - t1
    out = score(docs, predicted)
    out.update({"build_seconds": round(built, 3), "notes": len(docs),
                "notes_per_second": round(len(docs) / seconds, 1)})
    print(f"  {name:<18} direct recall {out['recall_direct_overall']}  min {out['recall_direct_min']}  "
          f"precision {out['precision_overall']}  words kept {out['words_kept']}  "
          f"{out['notes_per_second']} notes/s", file=sys.stderr)
    return out


def cold_start(notes_file: Path, n: int) -> dict[str, Any]:
    """Scrubbing n notes in a fresh process, imports and Scrubber construction included: a worker's one-off cost.

    Twice: in a bare interpreter, and in a worker's state (worker.__main__ imported, SmolLM2's tokenizer
    loaded where its GGUF is on disk), which has already paid for most of what Presidio imports.
    """
    code = f"""
import json, sys, time
tokenizer = "none"
if sys.argv[1] == "worker":
    import worker.__main__  # noqa: F401
    from worker.runtime import tokenizer as load_tokenizer
    try:
        load_tokenizer("smollm2-135m")
        tokenizer = "smollm2-135m"
    except Exception:  # no GGUF here: transformers' tokenizer classes at least
        from transformers import AutoTokenizer  # noqa: F401
        tokenizer = "transformers imported, no GGUF"
t1 = time.perf_counter()
from common.notes import load_notes
from worker.scrub import Scrubber
notes = load_notes({str(notes_file)!r})[:{n}]
t2 = time.perf_counter()
scrubber = Scrubber()
t3 = time.perf_counter()
scrubber.scrub_notes(notes)
t4 = time.perf_counter()
print(json.dumps({{"import_s": round(t2 - t1, 3), "build_s": round(t3 - t2, 3), "scrub_s": round(t4 - t3, 3),
                  "total_s": round(t4 - t1, 3), "notes": len(notes), "tokenizer": tokenizer}}))
"""
    out = {}
    for mode in ("bare", "worker"):
        runs = []
        for _ in range(3):
            res = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, check=True, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        out[mode] = min(runs, key=lambda r: r["total_s"])  # the least disturbed of three
    # The quickstart's rounds (README, this machine): 90.5, 50.0 and 44.5 s. Scrubbing happens once, when a
    # worker loads its notes; against the shortest round it would be this share:
    out["share_of_shortest_quickstart_round"] = round(out["worker"]["total_s"] / 44.5, 4)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON results go")
    parser.add_argument("--fedfhe-seed", type=int, default=0)
    parser.add_argument("--fedfhe-records", type=int, default=200, help="notes per hospital (3 hospitals)")
    parser.add_argument("--meddeid", type=Path, help="a meddeid-data JSONL file (default: generate one)")
    parser.add_argument("--meddeid-count", type=int, default=250)
    parser.add_argument("--meddeid-seed", type=int, default=7)
    parser.add_argument("--spacy-model", help="a spaCy pipeline folder: adds Presidio with spaCy NER")
    parser.add_argument("--only", nargs="+", help="scrubbers to run (default: all)")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the throughput figures claim

    print("corpora ...", file=sys.stderr)
    fedfhe = fedfhe_corpus(args.fedfhe_seed, args.fedfhe_records, 3)
    meddeid, meddeid_path = meddeid_corpus(args.meddeid, args.meddeid_count, args.meddeid_seed)
    scrubbers: dict[str, tuple[Callable[[], Any], bool]] = {
        "presidio-patterns": (build_presidio, False),
        "scrubadub": (build_scrubadub, False),
        "philter-ucsf": (build_philter, True),
        "fedfhe": (build_fedfhe, False),
    }
    if args.spacy_model:
        model = args.spacy_model
        scrubbers["presidio-spacy-sm"] = (lambda: build_presidio(model), False)
    chosen = {k: v for k, v in scrubbers.items() if not args.only or k in args.only}
    results: dict[str, Any] = {}
    for corpus, docs in (("fedfhe-data", fedfhe), ("meddeid-en-US", meddeid)):
        print(f"{corpus}: {len(docs)} notes, {sum(len(d.gold) for d in docs)} labelled spans", file=sys.stderr)
        gold = Counter(label for d in docs for _, _, label in d.gold)
        results[corpus] = {"notes": len(docs), "labelled_spans": dict(sorted(gold.items())), "scrubbers": {}}
        for name, (build, batch) in chosen.items():
            results[corpus]["scrubbers"][name] = run_scrubber(name, docs, build, batch)
    notes_file = Path(tempfile.mkdtemp()) / "notes.jsonl"
    with notes_file.open("w", encoding="utf-8") as f:
        for d in fedfhe[:40]:
            f.write(json.dumps({"text": d.text}) + "\n")
    startup = cold_start(notes_file, 40) if "fedfhe" in chosen else None
    report = {
        "matching_rule": "gold span caught if >= 90% of its non-space characters are covered by predicted spans "
                         "(any label); predicted span correct if >= 50% of its non-space characters are in gold "
                         "spans; words kept: share of \\w+ words outside gold spans left untouched",
        "direct_categories": list(DIRECT),
        "corpora": {"fedfhe-data": {"hospitals": 3, "notes_per_hospital": args.fedfhe_records,
                                    "seed": args.fedfhe_seed},
                    "meddeid-en-US": {"count": len(meddeid), "seed": args.meddeid_seed, "file": meddeid_path,
                                      "label_map": MEDDEID}},
        "results": results,
        "startup_40_notes": startup,
        "cpu": {"cores_used": 1, "threads": os.environ["OMP_NUM_THREADS"]},
        "python": sys.version.split()[0],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
