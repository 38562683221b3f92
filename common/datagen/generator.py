"""The synthetic hospital-notes generator behind `fedfhe-data` (protocol-free; no party owns it).

    fedfhe-data OUT_DIR --hospitals 3 --seed 0 [--records 200] [--eval-fraction 0.2] [--global-eval 70]

writes OUT_DIR/<hospital>/{train,eval}.jsonl per hospital and a global held-out
OUT_DIR/eval.jsonl that mixes every specialty evenly, in the format of
`common.notes`, with exact character offsets for every PII value inserted.
The notes are synthetic: Faker (seeded) for identities, the project's own
templates (`common.datagen.templates`) for clinical content. The split is
non-IID: each hospital has its own specialty mix, size, house style, date and
MRN formats. The same seed gives byte-identical files; every note draws from
its own seed, derived from (seed, hospital, index), so no note depends on how
many others were generated before it.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from faker import Faker

from common.datagen import templates
from common.notes import Note, PiiSpan, write_jsonl

# --------------------------------------------------------------------------------------------------
# Hospitals
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HospitalProfile:
    name: str                   # the federation identity, e.g. hospital-1 (matches fedfhe-certs names)
    mix: Mapping[str, float]    # specialty -> weight
    size: float                 # train records relative to the largest hospital
    style: int                  # house style: template variant, date, MRN and phone formats


# Non-IID by construction: each hospital leans on different specialties and has a different size.
_MIXES: tuple[dict[str, float], ...] = (
    {"cardiology": 0.50, "pulmonology": 0.15, "endocrinology": 0.12, "gastroenterology": 0.10,
     "neurology": 0.08, "oncology": 0.05},
    {"oncology": 0.50, "gastroenterology": 0.18, "pulmonology": 0.14, "endocrinology": 0.08,
     "cardiology": 0.06, "neurology": 0.04},
    {"pediatrics": 0.45, "neurology": 0.35, "pulmonology": 0.08, "endocrinology": 0.07, "gastroenterology": 0.05},
    {"neurology": 0.45, "cardiology": 0.20, "endocrinology": 0.15, "pulmonology": 0.10, "gastroenterology": 0.10},
    {"gastroenterology": 0.45, "endocrinology": 0.25, "oncology": 0.15, "cardiology": 0.10, "pediatrics": 0.05},
    {"endocrinology": 0.40, "pulmonology": 0.30, "pediatrics": 0.15, "cardiology": 0.10, "neurology": 0.05},
)
_SIZES = (1.0, 0.6, 0.35, 0.8, 0.5, 0.25)


def hospital_profiles(n: int) -> list[HospitalProfile]:
    """hospital-1..n; beyond six the mixes repeat (with other names, identities and seeds)."""
    if n < 1:
        raise ValueError(f"need at least one hospital, got {n}")
    return [HospitalProfile(f"hospital-{i + 1}", _MIXES[i % len(_MIXES)], _SIZES[i % len(_SIZES)], i)
            for i in range(n)]


def derive_seed(seed: int, *labels: object) -> int:
    """An independent 64-bit seed per purpose; hashlib, not hash(), so it is stable across processes."""
    material = "/".join(str(x) for x in (seed, *labels)).encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big")


@dataclass(frozen=True)
class _Site:
    """A hospital's synthetic identity: name, contact details, staff by specialty."""

    profile: HospitalProfile
    display: str
    initials: str
    address: str
    phone: str
    state: str
    domain: str
    staff: Mapping[str, tuple[str, ...]]
    radiologists: tuple[str, ...]


_SITE_KINDS = ("Memorial Hospital", "Medical Center", "General Hospital", "Regional Medical Center",
               "University Hospital", "Community Hospital")
_PHONE_FORMATS = ("(%##) %##-####", "%##-%##-####", "%##.%##.####")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
FIRST_DAY = date(2021, 1, 1)
_DAYS = (date(2024, 12, 31) - FIRST_DAY).days  # fixed window: Faker's date helpers read today's date


def new_faker() -> Faker:
    return Faker("en_US")


def person_name(fake: Faker, sex: str | None = None) -> tuple[str, str]:
    first = fake.first_name_female() if sex == "F" else fake.first_name_male() if sex == "M" else fake.first_name()
    return first, fake.last_name()


def street_address(fake: Faker, state: str, building: bool = False) -> str:
    street = f"{fake.building_number()} {fake.street_name()}" if building else fake.street_address()
    return f"{street}, {fake.city()}, {state} {fake.postcode_in_state(state)}"


def _site(profile: HospitalProfile, seed: int, fake: Faker) -> _Site:
    fake.seed_instance(derive_seed(seed, profile.name, "site"))
    head = fake.last_name() if fake.random.random() < 0.5 else fake.city()
    display = f"{head} {fake.random.choice(_SITE_KINDS)}"
    words = [w for w in display.split() if w.isalpha()]
    state = fake.state_abbr(include_territories=False)
    staff = {name: tuple(" ".join(person_name(fake)) for _ in range(3)) for name in sorted(templates.SPECIALTIES)}
    return _Site(
        profile=profile, display=display, initials="".join(w[0] for w in words[:2]).upper(),
        address=street_address(fake, state, building=True), phone=fake.numerify(_PHONE_FORMATS[profile.style % 3]),
        state=state,
        domain="".join(w.lower() for w in words[:2]) + ".org", staff=staff,
        radiologists=tuple(" ".join(person_name(fake)) for _ in range(2)),
    )


def _fmt_date(d: date, style: int) -> str:
    # Locale-free on purpose: strftime("%b") would follow the machine's locale and break byte-identity.
    kind = style % 3
    if kind == 0:
        return d.isoformat()
    if kind == 1:
        return f"{d.month:02d}/{d.day:02d}/{d.year}"
    return f"{d.day} {_MONTHS[d.month - 1]} {d.year}"


def _mrn(site: _Site, rng: random.Random) -> str:
    def digits(k: int) -> str:
        return "".join(str(rng.randrange(10)) for _ in range(k))

    kind = site.profile.style % 3
    if kind == 0:
        return digits(8)
    if kind == 1:
        return f"{site.initials}-{digits(7)}"
    return f"{site.initials[:1]}{digits(2)}-{digits(6)}"


def _email(name: str, domain: str) -> str:
    first, _, last = name.partition(" ")
    return f"{first[0]}.{''.join(c for c in last if c.isalpha())}@{domain}".lower()


def _synth_note(site: _Site, note_seed: int, fake: Faker, note_id: str, specialty: str | None = None) -> Note:
    """One synthetic note from its own seed: specialty, type, diagnosis, patient, PII, text and spans."""
    rng = random.Random(note_seed)
    fake.seed_instance(derive_seed(note_seed, "faker"))
    style = site.profile.style
    if specialty is None:
        names = list(site.profile.mix)
        specialty = rng.choices(names, weights=[site.profile.mix[s] for s in names])[0]
    note_type = templates.choose_note_type(specialty, rng)
    dx = templates.choose_dx(specialty, note_type, rng)
    patient = templates.choose_patient(specialty, dx, rng)

    admit = FIRST_DAY + timedelta(days=rng.randrange(_DAYS))
    los = rng.randint(1, 9)
    hday = rng.randint(2, max(2, los))
    discharge = admit + timedelta(days=los)
    note_date = {"discharge": discharge, "progress": admit + timedelta(days=hday - 1)}.get(note_type, admit)
    dob = admit - timedelta(days=int(patient.age_months * 30.44) + rng.randint(0, 28))

    first, surname = person_name(fake, patient.sex)
    guardian_first, _ = person_name(fake)
    # Most patients live in the hospital's own state.
    state = site.state if rng.random() < 0.85 else fake.state_abbr(include_territories=False)
    doctor = rng.choice(site.staff[specialty])

    def day(d: date) -> str:
        return _fmt_date(d, style)

    pii: dict[str, tuple[str, str]] = {
        "name": (f"{first} {surname}", "NAME"),
        "first": (first, "NAME"),
        "surname": (surname, "NAME"),
        "guardian": (f"{guardian_first} {surname}", "NAME"),
        "dob": (day(dob), "DOB"),
        "mrn": (_mrn(site, rng), "MRN"),
        "address": (street_address(fake, state), "ADDRESS"),
        "phone": (fake.numerify(_PHONE_FORMATS[style % 3]), "PHONE"),
        "email": (_email(doctor, site.domain), "EMAIL"),
        "doctor": (doctor, "DOCTOR"),
        "consultant": (" ".join(person_name(fake)), "DOCTOR"),
        "radiologist": (rng.choice(site.radiologists), "DOCTOR"),
        "hospital": (site.display, "HOSPITAL"),
        "hospital_address": (site.address, "ADDRESS"),
        "hospital_phone": (site.phone, "PHONE"),
        "date": (day(note_date), "DATE"),
        "admit_date": (day(admit), "DATE"),
        "discharge_date": (day(discharge), "DATE"),
        "followup_date": (day(discharge + timedelta(days=rng.randint(7, 42))), "DATE"),
        "prior_date": (day(note_date - timedelta(days=rng.randint(20, 720))), "DATE"),
        "collected": (f"{day(note_date)} {rng.randint(5, 22):02d}:{rng.randrange(60):02d}", "DATE"),
    }
    facts = {"los": str(los), "hday": str(hday)}
    text, spans = templates.compose(note_type, specialty, dx, patient, pii, facts, rng, style)
    return Note(text=text, id=note_id, hospital=site.profile.name, specialty=specialty, note_type=note_type,
                pii=tuple(PiiSpan(s, e, label, text[s:e]) for s, e, label in spans))


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSummary:
    hospital: str
    split: str
    path: Path
    notes: tuple[Note, ...] = field(repr=False)

    @property
    def specialties(self) -> Counter[str]:
        return Counter(n.specialty for n in self.notes)


def split_sizes(profiles: Sequence[HospitalProfile], records: Sequence[int] = (200,),
                eval_fraction: float = 0.2) -> list[tuple[int, int]]:
    """(train, eval) per hospital: records is one count (the largest hospital's, others scaled) or one each."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    if len(records) == 1:
        if records[0] < 1:
            raise ValueError(f"record counts must be positive, got {records[0]}")
        trains = [max(1, round(records[0] * p.size)) for p in profiles]
    elif len(records) == len(profiles):
        trains = list(records)
    else:
        raise ValueError(f"--records takes one count or one per hospital ({len(profiles)}), got {len(records)}")
    if any(t < 1 for t in trains):
        raise ValueError(f"record counts must be positive, got {trains}")
    out = []
    for t in trains:
        n_eval = round(t * eval_fraction / (1.0 - eval_fraction))
        out.append((t, max(1, n_eval) if eval_fraction > 0 else 0))
    return out


_GOLDEN = 0.6180339887498949


def _specialty_at(mix: Mapping[str, float], index: int, offset: float) -> str:
    """Specialty of a hospital's index-th note: a golden-ratio sequence through the mix's CDF.

    Unlike independent draws this keeps every prefix close to the mix (a 14-note hospital still
    shows its specialty profile), and note i does not depend on how many notes are generated.
    """
    u = (offset + index * _GOLDEN) % 1.0
    total = sum(mix.values())
    acc = 0.0
    for name, weight in mix.items():
        acc += weight / total
        if u < acc:
            return name
    return list(mix)[-1]  # u rounding past the last edge


def hospital_notes(profile: HospitalProfile, n_train: int, n_eval: int, seed: int,
                   fake: Faker | None = None) -> tuple[list[Note], list[Note]]:
    """A hospital's notes, split into train and held-out eval by a seeded shuffle (each in id order)."""
    fake = fake or new_faker()
    site = _site(profile, seed, fake)
    total = n_train + n_eval
    offset = random.Random(derive_seed(seed, profile.name, "mix")).random()
    notes = [_synth_note(site, derive_seed(seed, profile.name, "note", i), fake, f"{profile.name}-{i:05d}",
                        specialty=_specialty_at(profile.mix, i, offset))
             for i in range(total)]
    order = list(range(total))
    random.Random(derive_seed(seed, profile.name, "split")).shuffle(order)
    held = set(order[:n_eval])
    return [n for i, n in enumerate(notes) if i not in held], [n for i, n in enumerate(notes) if i in held]


def global_eval_notes(profiles: Sequence[HospitalProfile], n: int, seed: int,
                      fake: Faker | None = None) -> list[Note]:
    """Held-out notes for the global adapter: specialties in equal turns, each at a random hospital."""
    fake = fake or new_faker()
    sites = [_site(p, seed, fake) for p in profiles]
    names = sorted(templates.SPECIALTIES)
    rng = random.Random(derive_seed(seed, "global", "sites"))
    return [_synth_note(rng.choice(sites), derive_seed(seed, "global", "note", i), fake, f"global-{i:05d}",
                       specialty=names[i % len(names)])
            for i in range(n)]


def generate_dataset(out_dir: Path, *, hospitals: int = 3, seed: int = 0, records: Sequence[int] = (200,),
                     eval_fraction: float = 0.2, global_eval: int = 70) -> list[SplitSummary]:
    """Write every hospital's train/eval JSONL and the global eval JSONL under out_dir."""
    profiles = hospital_profiles(hospitals)
    sizes = split_sizes(profiles, records, eval_fraction)
    if global_eval < 0:
        raise ValueError(f"global eval size must be >= 0, got {global_eval}")
    fake = new_faker()
    out: list[SplitSummary] = []
    for profile, (n_train, n_eval) in zip(profiles, sizes, strict=True):
        train, held = hospital_notes(profile, n_train, n_eval, seed, fake)
        for split, notes in (("train", train), ("eval", held)):
            path = out_dir / profile.name / f"{split}.jsonl"
            write_jsonl(path, notes)
            out.append(SplitSummary(profile.name, split, path, tuple(notes)))
    if global_eval:
        path = out_dir / "eval.jsonl"
        notes = global_eval_notes(profiles, global_eval, seed, fake)
        write_jsonl(path, notes)
        out.append(SplitSummary("all", "eval (global)", path, tuple(notes)))
    return out


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _share(counter: Counter[str], total: int, top: int = 2) -> str:
    return ", ".join(f"{k} {v / total:.0%}" for k, v in counter.most_common(top)) if total else "-"


def print_summary(summaries: Sequence[SplitSummary], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"synthetic notes written under {out_dir}")
    table.add_column("file", no_wrap=True)
    table.add_column("notes", justify="right")
    table.add_column("top specialties")
    table.add_column("chars", justify="right")
    table.add_column("PII", justify="right")
    for s in summaries:
        total = len(s.notes)
        mean = sum(len(n.text) for n in s.notes) / total if total else 0.0
        table.add_row(str(s.path.relative_to(out_dir)), str(total), _share(s.specialties, total), f"{mean:.0f}",
                      str(sum(len(n.pii) for n in s.notes)))
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfhe-data", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where <hospital>/{train,eval}.jsonl go")
    parser.add_argument("--hospitals", type=int, default=3, help="number of hospitals (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    parser.add_argument("--records", type=int, nargs="+", default=[200], metavar="N",
                        help="train notes of the largest hospital, the others scaled by their size "
                             "(1.0, 0.6, 0.35, ...); or one count per hospital (default 200)")
    parser.add_argument("--eval-fraction", type=float, default=0.2,
                        help="share of each hospital's notes held out in eval.jsonl (default 0.2)")
    parser.add_argument("--global-eval", type=int, default=70,
                        help="notes in OUT_DIR/eval.jsonl, all specialties in equal turns (default 70)")
    parser.add_argument("--quiet", action="store_true", help="no summary table")
    args = parser.parse_args(argv)
    try:
        summaries = generate_dataset(args.out_dir, hospitals=args.hospitals, seed=args.seed, records=args.records,
                                     eval_fraction=args.eval_fraction, global_eval=args.global_eval)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.quiet:
        print_summary(summaries, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
