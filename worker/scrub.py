"""PII scrubbing at ingest: a hospital's notes lose their identifiers before any of them is tokenized.

    fedfhe-scrub IN.jsonl|IN.csv -o OUT.jsonl [--report FILE.json] [--max-chars N]

`Scrubber().scrub(text)` returns the text with every identifier replaced by a
typed placeholder ("[NAME]", "[MRN]", ...), the count per label and the spans
(offsets in the original text, never the identifier itself). `load_records(...,
scrubber=...)` in worker.data runs it on every training and eval note.

How it finds identifiers. Microsoft Presidio's analyzer is the engine: its
registry, its conflict handling and its validated recognizers for phone numbers
(libphonenumber), SSNs, card numbers, IBANs, IPs, NPIs, DEA and NHS numbers.
No NER runs: Presidio gets its no-op NLP engine, so no spaCy model is loaded
(none can be downloaded on hospital machines, and the en_core_web_sm wheels on
PyPI are third-party re-uploads). Our own recognizers, registered beside
Presidio's, cover the clinical formats: MRNs and other IDs in every format the
generator and labelled corpora use, dates in every common format (DOB when a
birth context precedes), ages over 89, street addresses, facility names, e-mail
and URLs (Presidio's e-mail and URL recognizers are left out: they fetch the
public-suffix list over the network). Names come from
  - context: "Patient:", "Re:", "Emergency contact:", "Mr./Ms.", "Dr", "signed by", ...;
  - a gazetteer: a first name followed by a last name, both from Faker's locale data;
  - every other mention in the same note of a name found by the first two
    ("Ms. Clark", a child's first name, a name at the start of a sentence).
What it misses, and how often, is measured by scripts/bench_scrub.py.

Placeholders, not surrogates. A fake name in place of a real one would look
exactly like a real name the scrubber missed, so a reviewer (or a test) could no
longer tell scrubbed from leaked; surrogates that are consistent across notes need
a keyed mapping from real to fake values, which is one more secret per hospital,
and an unkeyed (hashed) mapping is reversible by trying every name. For training,
a placeholder is a short fixed token sequence the model learns at once, while
random surrogate names and numbers are noise the adapter would spend capacity and
DP budget memorising. The cost: intervals between dates are lost, and generated
text contains "[NAME]" where a name would be; both are acceptable for an adapter
that should never emit an identifier. "Mr."/"Ms." stay outside the NAME span
(sex is clinical information); "Dr" goes into the DOCTOR span.

A Scrubber holds only compiled patterns and frozen word sets, all built in its
constructor, and keeps no state between calls: build one per process and share it
across threads. Construction takes ~0.2 s; importing Presidio ~1.4 s in a worker
(which has loaded transformers already), ~8 s in a bare interpreter. Scrubbing
runs at ~150 notes/s on one core and is linear in the text's length.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerRegistry, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts, NoOpNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    IbanRecognizer,
    IpRecognizer,
    MedicalLicenseRecognizer,
    NhsRecognizer,
    PhoneRecognizer,
    UsNpiRecognizer,
    UsSsnRecognizer,
)

from common.notes import NOTE_SUFFIXES, Note, NotesFormatError

# Placeholder labels, in the order reports list them.
LABELS = ("NAME", "DOCTOR", "DOB", "DATE", "AGE", "MRN", "ID", "PHONE", "EMAIL", "URL", "ADDRESS", "HOSPITAL")
# A longer "note" is an export error (a whole table in one cell, a binary blob), not something to train on.
MAX_NOTE_CHARS = 1_000_000

# Presidio's entity names -> ours. Its DATE_TIME recognizer is not used: ours covers more formats, and its
# low-score "mm/yy" patterns match pain scores and blood pressures.
_PRESIDIO_LABELS = {"PHONE_NUMBER": "PHONE", "US_SSN": "ID", "CREDIT_CARD": "ID", "IBAN_CODE": "ID",
                    "IP_ADDRESS": "ID", "MEDICAL_LICENSE": "ID", "UK_NHS": "ID", "US_NPI": "ID"}
# Drops Presidio's weakest guesses; its validated recognizers (checksums, libphonenumber) score above it.
_MIN_SCORE = 0.35


class ScrubError(NotesFormatError):
    """A notes file cannot be scrubbed; the message names the file and, where there is one, the line."""


@dataclass(frozen=True)
class Span:
    """An identifier's place in the original text; its characters are deliberately not kept."""

    start: int
    end: int
    label: str


@dataclass(frozen=True)
class ScrubResult:
    text: str
    counts: dict[str, int]
    spans: tuple[Span, ...]


# --------------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------------

_UP, _LOW = r"\p{Lu}", r"\p{Ll}"
# A name word: Title case (with McX, O'X, X-Y inside), or ALL CAPS as in headers.
_WORD = rf"(?:(?:{_UP}['’])?{_UP}{_LOW}+(?:{_UP}{_LOW}+)?(?:['’-]{_UP}?{_LOW}+)*|{_UP}{{2,}}(?:['’-]{_UP}+)*)"
_INITIAL = rf"{_UP}\."
_PERSON = rf"{_WORD}(?:[ \t]+(?:{_INITIAL}[ \t]+)?{_WORD}){{0,2}}"
_INVERTED = rf"{_WORD},[ \t]*{_WORD}(?:[ \t]+{_INITIAL})?"  # "SMITH, JOHN" in a labelled field
_CAPSEQ = (rf"{_UP}[\p{{L}}'’&-]*"
           rf"(?:[ \t]+(?:(?:of|the|and|at|for|de|del|la|y)[ \t]+)?(?:{_UP}[\p{{L}}'’&-]*|&|\d+)){{0,7}}")


def _cases(*words: str) -> str:
    """Title Case and UPPER CASE spellings only: "Hospital", "HOSPITAL", never "hospital" (a common noun)."""
    forms = {w for word in words for w in (word, word.upper())}
    return "(?:" + "|".join(sorted(forms, key=len, reverse=True)) + ")"


_MONTH = _cases("January", "February", "March", "April", "May", "June", "July", "August", "September",
                "October", "November", "December", "Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep",
                "Sept", "Oct", "Nov", "Dec")
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_MM = r"(?:0?[1-9]|1[0-2])"
_DD = r"(?:0?[1-9]|[12]\d|3[01])"
_YEAR = r"(?:1[89]\d\d|2[01]\d\d)"
_TIME = r"(?:(?:,?[ \t]+(?:at[ \t]+)?|T)(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?(?:[ \t]*[AaPp]\.?[Mm]\.?)?)?"
_DATES = [
    rf"\b{_YEAR}-{_MM}-{_DD}\b{_TIME}",                                  # 2023-01-05
    rf"\b{_YEAR}/{_MM}/{_DD}\b{_TIME}",                                  # 2023/01/05
    rf"(?<![\d/.-]){_DD}([/.-]){_DD}\1(?:{_YEAR}|\d\d)\b(?![/.-]\d){_TIME}",  # 05/01/2023, 5.1.23, 01-05-2023
    rf"\b{_MONTH}\.?[ \t]+{_DAY},?[ \t]+{_YEAR}\b{_TIME}",               # Jan 5, 2023
    rf"\b{_DAY}(?:[ \t]+of)?[ \t]+{_MONTH}\.?,?[ \t]+{_YEAR}\b{_TIME}",  # 5 January 2023, 5th of Jan 2023
    rf"\b{_DAY}-{_MONTH}-(?:{_YEAR}|\d\d)\b{_TIME}",                     # 5-Jan-2023, 05-JAN-23
    rf"\b{_MONTH}\.?[ -]{_YEAR}\b",                                      # January 2023
    rf"\b{_MONTH}\.?[ \t]+{_DAY}\b(?![.,]?\d|[ \t]*(?:mg|mcg|g|ml|mL|units?|%))",  # Jan 5 (no year)
    rf"(?<![\d/.-]){_MM}/{_YEAR}\b",                                     # 03/2021
]
# A date shortly after one of these words, on the same line with no number between, is a birth date.
_DOB_CONTEXT = regex.compile(r"(?i:\bDOB\b|D\.O\.B|date of birth|birth[ \t-]?date|\bborn\b|\bb\.)[^\n\d]{0,12}$")

_AGES = [
    r"\b(?:9\d|1[01]\d)(?:[ \t-]*(?:years?|yrs?)[ \t-]*old|[ \t-]*(?:yo|y/o|y\.o\.|yr-old|year-old))\b",
    r"(?i:\baged?)[ \t]+(?P<pii>(?:9\d|1[01]\d))\b(?![.,]\d)",
]

_ID_VALUE = r"[A-Z0-9](?:[A-Z0-9/.-]*[A-Z0-9])?(?:[ ]\d{2,}){0,3}"
_MRN_CONTEXT = (r"(?i:\bMRN\b|\bMR#|medical[ \t]+record(?:[ \t]+(?:number|no\.?|#))?|hospital[ \t]+number|"
                r"chart[ \t]+(?:number|no\.?|#))(?!\p{L})")
_ID_CONTEXT = (r"(?i:\b(?:SSN|social[ \t]+security(?:[ \t]+(?:number|no\.?))?|NHS(?:[ \t]+(?:number|no\.?))?|"
               r"patient[ \t]+id|pt[ \t]+id|ID|identifier|identity[ \t]+confirmed[ \t]+with|account|acct|"
               r"accession|acc|report|specimen|sample|encounter|visit|claim|member(?:[ \t]+id)?|policy|"
               r"insurance(?:[ \t]+(?:id|number|no\.?))?|licen[cs]e|lic|NPI|DEA|professional[ \t]+id|"
               r"registration|reg|case|order|requisition|referral)(?:[ \t]+(?:number|no\.?|#|id))?)(?!\p{L})")
_IDS = [
    r"\b\d{3}-\d{2}-\d{4}\b",                    # SSN
    r"\b\d{3} \d{2} \d{4}\b",                    # SSN with spaces
    r"\b\d{3} \d{3} \d{3,4}\b",                  # NHS-style or spaced 9-10 digit IDs
    r"\b[A-Z]{1,5}\d{0,3}-\d{5,}\b",             # GU-2980360, G12-345678, MRN-07602434, LIC-42843181
    r"\b[A-Z]{1,4}\d{6,}\b",                     # M5378568, LIC35367137
    r"(?<![\d.,/:-])\d{7,}(?![.,]?\d)",          # bare 7+ digit numbers: lab values never run that long
    r"\b\d{6}/\d{2}\b",                          # 097318/88
]

_PHONES = [
    r"(?<![\w+])(?:\+?1[ .-]?)?(?:\(\d{3}\)[ \t]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?:[ \t]*(?:x|ext\.?)[ \t]*\d{1,5})?\b",
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}\b",
]
_EMAIL = r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"
_URL = r"\b(?:https?://|www\.)[^\s<>\"'|]+"

_STATE_ABBR = ("AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM NY NC "
               "ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY AS GU MP PR VI UM FM MH PW AA AE AP").split()
_STATE = "(?:" + "|".join(_STATE_ABBR) + ")"
_ZIP = r"\d{5}(?:-\d{4})?"
_UNIT = r"(?:,?[ \t]*(?:Apt|Apartment|Suite|Ste|Unit|Fl|Floor|Rm|Room|Bldg|#)\.?[ \t]*[\w-]+)?"
# Puerto Rico puts the urbanización before the street: "URB San Patricio, 357 Cll Hostos"
_PR_PREFIX = (r"(?:(?:URB|Urb\.?|Urbanizaci[oó]n|Bo\.?|Barrio|Cond\.?|Condominio|Res\.?|Residencial)"
              r"[^\n|,;:]{1,40},[ \t]*)?")
_USPS = ("St", "Ave", "Av", "Rd", "Dr", "Ln", "Blvd", "Ct", "Pl", "Pkwy", "Hwy", "Trl", "Cir", "Ter", "Sq", "Rte",
         "Expy", "Fwy", "Cres", "Cl", "Mt")


def _address_patterns(suffixes: Iterable[str]) -> list[str]:
    # "St." keeps its period; "Street." ends a sentence, and the period stays in the text
    words = "|".join(sorted(set(suffixes), key=len, reverse=True))
    suffix = rf"(?:(?:{'|'.join(_USPS)})\b\.?|(?:{words})\b)"
    street_no = r"(?:\d{1,6}[A-Za-z]?|P\.?[ \t]?O\.?[ \t]+Box[ \t]+\d+)"
    return [
        # number + street + city + state + ZIP: the ZIP anchors it, so the street part may be anything on the line
        rf"{_PR_PREFIX}\b{street_no}[ \t]+[^\n|,;:]{{2,60}}?{_UNIT},"
        rf"[ \t]*[^\n|,;:\d]{{2,40}},[ \t]*{_STATE}[ \t]+{_ZIP}\b",
        rf"(?<![\w,][ \t]?){_UP}[^\n|,;:\d]{{1,40}},[ \t]*{_STATE}[ \t]+{_ZIP}\b",   # City, ST 12345
        # 12 Oak St, 4 N. Main Street Apt 2
        rf"\b\d{{1,6}}[A-Za-z]?[ \t]+(?:[NSEW]\.?[ \t]+)?(?:{_UP}[\p{{L}}'’.-]*[ \t]+){{1,4}}{suffix}{_UNIT}",
    ]


# Two-word forms first: "Health Services" is one facility word, not "Health" and then a department.
_FACILITY = (_cases("Medical", "Health", "Surgical", "Rehabilitation", "Cancer", "Nursing", "Care")
             + r"[ \t]+" + _cases("Center", "Centre", "Ctr", "System", "Systems", "Network", "Alliance",
                                  "Services", "Group", "Institute", "Home", "Partners")
             + "|" + _cases("Hospital", "Hospitals", "Infirmary", "Hospice", "Sanatorium", "Clinic", "Clinics",
                            "Healthcare", "Health"))
# "Mental Health" is a field of medicine; "Andalusia Health" is a health system.
_FACILITY_WORDS = frozenset("hospital hospitals infirmary hospice sanatorium clinic clinics healthcare health medical "
                            "surgical rehabilitation cancer nursing care center centre ctr system systems network "
                            "alliance services group institute home partners of the and & de del la".split())
_HEALTH_FIELDS = frozenset("mental public behavioral behavioural occupational sexual oral reproductive population "
                           "global environmental home women's men's child maternal digital primary allied student "
                           "employee community family adolescent".split())
# A department, not part of the facility's name: "X Hospital Department of Radiology", "X Hospital Imaging".
_DEPARTMENT = (r"(?i:\p{L}*(?:ology|iatry|iatrics|ics)|department|dept|clinical|laborator(?:y|ies)|lab|pharmacy|"
               r"imaging|emergency|unit|ward|wing|services?|division|clinic|outpatient|inpatient|surgery|medicine|"
               r"nursing|records|office|floor|building|course|day|admission|discharge)\b")
_DEPARTMENT_WORD = regex.compile(rf"(?:{_UP}[\p{{L}}'’-]*[ \t]+)*{_DEPARTMENT}")
# A capitalised word; a period only closes a short abbreviation ("St. Mary's"), never a sentence.
_FWORD = rf"{_UP}[\p{{L}}'’-]*(?:(?<=(?<!\p{{L}})\p{{L}}{{1,3}})\.)?"
_HOSPITALS = [
    # proper words, then a facility word, then (not a department) a branch: "Mercy Hospital South", "of Oak Ridge"
    rf"(?<![\p{{L}}])(?:{_FWORD}[ \t]+(?:(?:of|the|and|&|de|del|la)[ \t]+)?){{1,6}}(?:{_FACILITY})\b"
    rf"(?:[ \t]*(?:&|and)[ \t]*{_cases('Clinic', 'Clinics')}\b)?"
    rf"(?:(?:[ \t]+(?:(?:of|and|&)[ \t]+)?|[ \t]*[-/][ \t]*)(?!{_DEPARTMENT})(?:{_FWORD}|#\d+)){{0,5}}"
    rf"(?:,?[ \t]+(?:Inc|LLC|Llc)\b\.?)?",
    # a labelled field: "Organization: X |", "Laboratory: X\n"
    r"(?i:\b(?:organi[sz]ation|facility|institution|hospital|laboratory)[ \t]*:[ \t]*)"
    r"(?P<pii>[^\n|;:]{3,80}?)(?=[ \t]*(?:\||\n|;|$))",
    rf"\b(?:[Aa]dmitted|[Tt]ransferred|[Pp]resented|[Rr]eferred|[Dd]ischarged)[ \t]+(?:to|from)[ \t]+"
    rf"(?P<pii>(?!the\b){_CAPSEQ})(?=[ \t]+on\b|[ \t]*[.,;\n])",
]

_NAME_CONTEXT = (r"(?i:patient(?:'s)?(?:[ \t]+name)?|pt|name|re|regarding|emergency[ \t]+contact|next[ \t]+of[ \t]+kin|"
                 r"nok|parent/guardian|guardian|parent|mother|father|son|daughter|spouse|wife|husband|partner|"
                 r"sister|brother|relative|carer|contact|informant|accompanied[ \t]+by|given[ \t]+to|"
                 r"discussed[ \t]+with|reviewed[ \t]+with|lives[ \t]+with)")
_DOCTOR_CONTEXT = (r"(?i:attending|consultant|clinician|physician|surgeon|provider|prescriber|referring[ \t]+physician|"
                   r"signed[ \t]+by|signed|dictated[ \t]+by|reviewed[ \t]+by|validated[ \t]+by|authori[sz]ed[ \t]+by|"
                   r"reported[ \t]+by|requested[ \t]+by|ordered[ \t]+by|seen[ \t]+by|cc)")
# Words that fill a name field without being a name ("Name: Unknown", "Re: Follow-up").
_NOT_NAMES = frozenset("unknown none self anonymous redacted same above below patient family staff team nurse "
                       "referral follow up appointment results discharge admission".split())
_SPECIFIC = frozenset({"DOB", "MRN", "DOCTOR"})  # each wins a tie with its general form (DATE, ID, NAME)
_TITLES = frozenset({"Dr", "Doctor", "Prof", "Professor", "Mr", "Mrs", "Ms", "Miss", "Mx", "Mister"})


# --------------------------------------------------------------------------------------------------
# Recognizers: ours, registered in Presidio beside its own
# --------------------------------------------------------------------------------------------------

Check = Callable[[str, Any], "str | None"]


class _RegexRecognizer(EntityRecognizer):
    """Compiled patterns; the group "pii" (or else the whole match) is the identifier, labelled labels[0].

    check(text, match) may veto a match (None) or give its label; it sees the whole match, context included.
    """

    def __init__(self, name: str, labels: Sequence[str], patterns: Sequence[str], *, check: Check | None = None,
                 overlapped: bool = False, score: float = 0.9) -> None:
        self._regexes = [regex.compile(p) for p in patterns]
        self._label, self._check, self._overlapped, self._score = labels[0], check, overlapped, score
        super().__init__(supported_entities=list(labels), name=name, supported_language="en")

    def load(self) -> None:  # patterns are compiled in __init__: nothing is loaded lazily, so calls share no state
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None,
                ) -> list[RecognizerResult]:
        out = []
        for pattern in self._regexes:
            for m in pattern.finditer(text, overlapped=self._overlapped):
                label = self._check(text, m) if self._check else self._label
                if label is None:
                    continue
                start, end = m.span("pii") if "pii" in pattern.groupindex else m.span()
                if end > start:
                    out.append(RecognizerResult(label, start, end, self._score))
        return out


# --------------------------------------------------------------------------------------------------
# Word lists from Faker's locale data (Faker is a dependency already; no download)
# --------------------------------------------------------------------------------------------------

_NAME_LOCALES = ("en_US", "en_GB", "en_IE", "en_NZ", "en_IN", "es_MX", "es_ES", "it_IT", "de_DE", "fr_FR", "nl_NL",
                 "pt_BR", "ga_IE")


def _gazetteers() -> tuple[frozenset[str], frozenset[str], frozenset[str], tuple[str, ...]]:
    """(first names, last names, common English words, street suffixes), from Faker's providers."""
    import importlib

    first: set[str] = set()
    last: set[str] = set()
    for locale in _NAME_LOCALES:
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        for attr in ("first_names", "first_names_male", "first_names_female"):
            first.update(getattr(provider, attr, ()) or ())
        last.update(getattr(provider, "last_names", ()) or ())
    common = importlib.import_module("faker.providers.lorem.en_US").Provider.word_list
    suffixes = importlib.import_module("faker.providers.address.en_US").Provider.street_suffixes
    # Only proper-looking entries: some locales list particles ("van", "de") or multi-word names.
    first = {n for n in first if n[:1].isupper() and n.isalpha()}
    last = {n for n in last if n[:1].isupper() and n.replace("-", "").replace("'", "").isalpha()}
    return frozenset(first), frozenset(last), frozenset(w.lower() for w in common), tuple(suffixes)


# --------------------------------------------------------------------------------------------------
# The scrubber
# --------------------------------------------------------------------------------------------------


class Scrubber:
    """Finds identifiers with Presidio plus our clinical recognizers and replaces each with "[LABEL]".

    Build once per process (construction compiles every pattern and loads the gazetteers); `scrub` keeps no
    state on the instance, so one Scrubber may serve many threads.
    """

    def __init__(self) -> None:
        self._first, self._last, self._common, suffixes = _gazetteers()
        name_ok = self._name_word_ok

        def person(label: str) -> Check:
            def check(text: str, m: Any) -> str | None:
                return label if _trim_person(m, name_ok) else None
            return check

        def gazetteer_pair(text: str, m: Any) -> str | None:
            words = m.group().split()
            return "NAME" if words[0].title() in self._first and words[-1].title() in self._last else None

        def date(text: str, m: Any) -> str | None:
            left = text[max(0, m.start() - 40):m.start()]
            return "DOB" if _DOB_CONTEXT.search(left) else "DATE"

        def at_least(n: int, label: str) -> Check:
            def check(text: str, m: Any) -> str | None:
                value = m.group("pii") if "pii" in m.re.groupindex else m.group()
                return label if sum(c.isdigit() for c in value) >= n else None
            return check

        def hospital(text: str, m: Any) -> str | None:
            value = m.group("pii") if "pii" in m.re.groupindex else m.group()
            words = value.split()
            lower = [w.lower() for w in words]
            if lower[-1] == "health" and all(w in _HEALTH_FIELDS or w in self._common for w in lower[:-1]):
                return None
            # "Cardiology Clinic" is a department; "Mayo Clinic" is a place
            named = [w for w, lw in zip(words, lower, strict=True) if lw not in _FACILITY_WORDS]
            if named and all(_DEPARTMENT_WORD.fullmatch(w) for w in named):
                return None
            return "HOSPITAL"

        ours = [
            _RegexRecognizer("fedfhe-email", ["EMAIL"], [_EMAIL], score=1.0),
            _RegexRecognizer("fedfhe-url", ["URL"], [_URL]),
            _RegexRecognizer("fedfhe-phone", ["PHONE"], _PHONES, check=at_least(10, "PHONE")),
            _RegexRecognizer("fedfhe-date", ["DATE", "DOB"], _DATES, check=date),
            _RegexRecognizer("fedfhe-age", ["AGE"], _AGES),
            _RegexRecognizer("fedfhe-mrn", ["MRN"], [rf"{_MRN_CONTEXT}[ \t]*[:#]?[ \t]*(?P<pii>{_ID_VALUE})\b"],
                             check=at_least(4, "MRN")),
            _RegexRecognizer("fedfhe-id-context", ["ID"], [rf"{_ID_CONTEXT}[ \t]*[:#]?[ \t]*(?P<pii>{_ID_VALUE})\b"],
                             check=at_least(4, "ID")),
            _RegexRecognizer("fedfhe-id", ["ID"], _IDS),
            _RegexRecognizer("fedfhe-address", ["ADDRESS"], _address_patterns(suffixes)),
            _RegexRecognizer("fedfhe-hospital", ["HOSPITAL"], _HOSPITALS, check=hospital),
            _RegexRecognizer("fedfhe-doctor", ["DOCTOR"], [
                rf"(?P<pii>\b(?:Dr|Doctor|Prof|Professor)\.?[ \t]+(?:{_INITIAL}[ \t]*)?{_PERSON})",
                rf"\b{_DOCTOR_CONTEXT}[ \t]*:?[ \t]+(?P<pii>{_PERSON})",
                rf"(?P<pii>{_PERSON}),?[ \t]+(?:MD|M\.D\.|DO|RN|NP|PA-C|PhD|MBBS|FRCP)\b",
            ], check=person("DOCTOR")),
            _RegexRecognizer("fedfhe-name", ["NAME"], [
                rf"\b{_NAME_CONTEXT}[ \t]*[:#-][ \t]*(?P<pii>{_INVERTED})",
                rf"\b{_NAME_CONTEXT}(?:[ \t]*[:#-][ \t]*|,?[ \t]+)(?P<pii>{_PERSON})",
                rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Mister)\.?[ \t]+(?P<pii>{_PERSON})",
            ], check=person("NAME")),
            _RegexRecognizer("fedfhe-name-gazetteer", ["NAME"], [rf"\b{_WORD}[ \t]+(?:{_INITIAL}[ \t]+)?{_WORD}\b"],
                             check=gazetteer_pair, overlapped=True),
        ]
        theirs: list[EntityRecognizer] = [
            PhoneRecognizer(supported_regions=("US", "GB", "CA")), UsSsnRecognizer(), CreditCardRecognizer(),
            IbanRecognizer(), IpRecognizer(), MedicalLicenseRecognizer(), NhsRecognizer(), UsNpiRecognizer(),
        ]
        registry = RecognizerRegistry(recognizers=[*ours, *theirs], supported_languages=["en"])
        nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
        nlp.load()
        self._analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"],
                                        default_score_threshold=_MIN_SCORE)
        self._city_after_name = regex.compile(rf",?[ \t]+(?:in|of|from)[ \t]+(?P<pii>{_CAPSEQ})(?=[ \t]*[.;\n]|$)")
        self._city_after_hospital = regex.compile(rf",[ \t]*(?P<pii>{_CAPSEQ})[ \t]*(?=$|[\n.;|])")
        self.scrub("Warm-up: Patient John Smith, MRN 12345678, DOB 01/02/1950, tel (617) 555-0134.")

    # -- name helpers ------------------------------------------------------------------------------

    def _name_word_ok(self, word: str) -> bool:
        """A capitalised word can be part of a name unless it is a common English word that no one is named."""
        title = word.title()
        if title in self._first or title in self._last:
            return True
        parts = word.lower().replace("’", "'").split("-")
        return word not in _TITLES and not all(p in self._common or p in _NOT_NAMES for p in parts)

    def _mentions(self, text: str, spans: list[Span]) -> list[Span]:
        """Every other whole-word mention, in this note, of the words of each name found."""
        words: dict[str, str] = {}
        for s in spans:
            if s.label not in ("NAME", "DOCTOR"):
                continue
            for w in regex.findall(_WORD, text[s.start:s.end]):
                if len(w) > 1 and self._name_word_ok(w):
                    words.setdefault(w, s.label)
                    words.setdefault(w.upper(), s.label)
        if not words:
            return []
        alternation = "|".join(regex.escape(w) for w in sorted(words, key=len, reverse=True))
        return [Span(m.start(), m.end(), words[m.group()])
                for m in regex.finditer(rf"(?<![\p{{L}}\d])(?:{alternation})(?![\p{{L}}\d])", text)]

    def _places(self, text: str, spans: list[Span]) -> list[Span]:
        """A place named right after a person or facility: "relative, Jo Bloggs, in Springfield"."""
        out = []
        for s in spans:
            rule = (self._city_after_name if s.label in ("NAME", "DOCTOR")
                    else self._city_after_hospital if s.label == "HOSPITAL" else None)
            if rule is None:
                continue
            m = rule.match(text, s.end)
            if m and not _DEPARTMENT_WORD.fullmatch(m.group("pii")):
                out.append(Span(m.start("pii"), m.end("pii"), "ADDRESS"))
        return out

    # -- public API --------------------------------------------------------------------------------

    def find(self, text: str) -> list[Span]:
        """The identifiers in text: merged, non-overlapping spans in text order."""
        found = [Span(r.start, r.end, _PRESIDIO_LABELS.get(r.entity_type, r.entity_type))
                 for r in self._analyzer.analyze(text, language="en")]
        found = [s for s in found if s.label in LABELS]
        found += self._places(text, found)
        found += self._mentions(text, found)
        return _merge(text, found)

    def scrub(self, text: str) -> ScrubResult:
        """text with each identifier replaced by "[LABEL]"; counts per label; spans in the original text."""
        spans = self.find(text) if text else []
        parts, at = [], 0
        for s in spans:
            parts += [text[at:s.start], f"[{s.label}]"]
            at = s.end
        parts.append(text[at:])
        return ScrubResult("".join(parts), dict(Counter(s.label for s in spans)), tuple(spans))

    def scrub_notes(self, notes: Iterable[Note]) -> list[Note]:
        """The notes with scrubbed text; their labelled spans are dropped (the offsets are stale, the text is PII)."""
        return [dataclasses.replace(n, text=self.scrub(n.text).text, pii=()) for n in notes]


def _trim_person(m: Any, word_ok: Callable[[str], bool]) -> bool:
    """Whether the captured person, title and initials aside, has a word that could be a name.

    "Patient Education" is two common words; "Billion Brumme" has one that is not.
    """
    words = [w.rstrip(".") for w in m.group("pii").split()]
    return any(word_ok(w) for w in words if w not in _TITLES and len(w) > 1)


def _merge(text: str, spans: Iterable[Span]) -> list[Span]:
    """Overlapping spans become one; so do same-label spans separated only by spaces ("[NAME] [NAME]").

    The merged span takes the label of its longest part (an address that contains a street named after a person
    stays an ADDRESS); between equally long parts, the more specific label (DOB over DATE, MRN over ID, DOCTOR
    over NAME).
    """
    out: list[tuple[int, int, str, tuple[int, int]]] = []  # start, end, label, rank of the part that gave the label
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        rank = (s.end - s.start, s.label in _SPECIFIC)
        if out:
            start, end, label, best = out[-1]
            touching = s.label == label and not text[end:s.start].strip(" \t")
            if s.start < end or touching:
                out[-1] = (start, max(end, s.end), s.label if rank > best else label, max(best, rank))
                continue
        out.append((s.start, s.end, s.label, rank))
    return [Span(a, b, label) for a, b, label, _ in out]


# --------------------------------------------------------------------------------------------------
# Files: fedfhe-scrub
# --------------------------------------------------------------------------------------------------

# A note's own identifiers, as offsets and values: scrubbed output must not carry them.
_DROPPED_FIELDS = ("pii",)


@dataclass
class _Report:
    input: str
    output: str
    notes_read: int = 0
    notes_written: int = 0
    skipped: dict[str, list[int]] = dataclasses.field(default_factory=dict)   # reason -> input lines
    replacements: Counter[str] = dataclasses.field(default_factory=Counter)

    def skip(self, reason: str, line: int) -> None:
        self.skipped.setdefault(reason, []).append(line)

    def to_json(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "notes_read": self.notes_read,
                "notes_written": self.notes_written,
                "notes_skipped": sum(len(v) for v in self.skipped.values()),
                "skipped": {k: {"count": len(v), "lines": v} for k, v in sorted(self.skipped.items())},
                "replacements": {k: self.replacements.get(k, 0) for k in LABELS},
                "replacements_total": sum(self.replacements.values()),
                "dropped_fields": list(_DROPPED_FIELDS)}


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a BOM (as common.notes)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ScrubError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})", line) from None


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) for each note in a JSONL or CSV file, every field kept (load_notes keeps only its own).

    The rules are common.notes.load_notes': UTF-8 (BOM allowed), one JSON object a line or a CSV with a header
    that has a "text" column, blank lines skipped, a stray quote is an error. Raises ScrubError.
    """
    suffix = path.suffix.lower()
    if suffix not in NOTE_SUFFIXES:
        raise ScrubError(path, f"unknown extension {path.suffix!r}; expected one of {', '.join(NOTE_SUFFIXES)}")
    content = _decode(path)
    if suffix != ".csv":
        for line_no, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScrubError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", line_no) from None
            if not isinstance(obj, dict):
                raise ScrubError(path, f"expected a JSON object, got {type(obj).__name__}", line_no)
            yield line_no, obj
        return
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        columns = [c.strip() for c in header]
        if "text" not in columns:
            raise ScrubError(path, f"no 'text' column in the header (columns: {', '.join(columns)})", 1)
        start = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                if len(row) != len(columns):
                    raise ScrubError(path, f"row has {len(row)} fields, the header has {len(columns)}", start)
                yield start, dict(zip(columns, row, strict=True))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ScrubError(path, f"malformed CSV: {exc}", reader.line_num) from None


def scrub_file(src: Path, dst: Path, scrubber: Scrubber, *, max_chars: int = MAX_NOTE_CHARS) -> dict[str, Any]:
    """Scrub src (JSONL or CSV) into dst (JSONL); returns the report. dst appears whole or not at all.

    Every field passes through unchanged except "text" (scrubbed) and "pii" (dropped: its spans are the
    identifiers). Skipped, counted and reported by line: empty notes, notes over max_chars, and notes that are
    nothing but identifiers. Anything else wrong raises ScrubError; src is only ever read.
    """
    if dst.resolve() == src.resolve():
        raise ScrubError(dst, "the output would overwrite the input")
    if not dst.parent.is_dir():
        raise ScrubError(dst, "the output's folder does not exist")
    report = _Report(str(src), str(dst))
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            for line, record in read_records(src):
                report.notes_read += 1
                text = record.get("text")
                if text is None:
                    raise ScrubError(src, "missing 'text' field", line)
                if not isinstance(text, str):
                    raise ScrubError(src, f"'text' must be a string, got {type(text).__name__}", line)
                if not text.strip():
                    report.skip("empty text", line)
                    continue
                if len(text) > max_chars:
                    report.skip(f"longer than {max_chars} characters", line)
                    continue
                result = scrubber.scrub(text)
                if not _has_content(result.text):
                    report.skip("nothing left but identifiers", line)
                    continue
                report.replacements.update(result.counts)
                out.write(json.dumps({k: (result.text if k == "text" else v) for k, v in record.items()
                                      if k not in _DROPPED_FIELDS}, ensure_ascii=False) + "\n")
                report.notes_written += 1
            if report.notes_read == 0:
                raise ScrubError(src, "no notes (empty file)")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return report.to_json()


def _has_content(text: str) -> bool:
    """Whether anything but placeholders, punctuation and spaces is left."""
    return bool(regex.search(r"\p{L}", regex.sub(r"\[(?:" + "|".join(LABELS) + r")\]", "", text)))


def _write_json_atomically(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfhe-scrub", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, metavar="IN", help="notes: .jsonl/.ndjson (a 'text' field) or .csv "
                                                               "(a 'text' column)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.jsonl",
                        help="scrubbed notes, one JSON object a line, every other field unchanged, 'pii' dropped")
    parser.add_argument("--report", type=Path, metavar="FILE.json",
                        help="counts: notes read/written/skipped (with input lines), replacements per label")
    parser.add_argument("--max-chars", type=int, default=MAX_NOTE_CHARS,
                        help=f"skip (and report) notes longer than this (default {MAX_NOTE_CHARS})")
    args = parser.parse_args(argv)
    if args.max_chars < 1:
        parser.error("--max-chars must be >= 1")
    try:
        if args.report is not None and not args.report.parent.is_dir():
            raise ScrubError(args.report, "the report's folder does not exist")
        if not args.input.is_file():
            raise ScrubError(args.input, "no such file")
        report = scrub_file(args.input, args.output, Scrubber(), max_chars=args.max_chars)
        if args.report is not None:
            _write_json_atomically(args.report, report)
    except (ScrubError, OSError) as exc:
        print(f"fedfhe-scrub: error: {exc}", file=sys.stderr)
        return 2
    skipped = report["notes_skipped"]
    print(f"{report['notes_written']} of {report['notes_read']} notes written to {args.output}"
          f"{f', {skipped} skipped' if skipped else ''}; {report['replacements_total']} identifiers replaced",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
