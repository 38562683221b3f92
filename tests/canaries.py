"""Canary notes for the membership tests: planted records whose exposure the trained adapter is measured on."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar, cast

from common.datagen import templates
from common.datagen.generator import FIRST_DAY, derive_seed, new_faker, person_name, street_address
from common.notes import Note, PiiSpan

CANARY_TEMPLATE = "Patient {name}, MRN {mrn}, DOB {dob}, phone {phone}, lives at {address}. Diagnosis code {code}."

R = TypeVar("R", Note, dict[str, Any])


def make_canaries(n: int, seed: int) -> list[Note]:
    """n canary notes of random PII (name, 8-digit MRN, DOB, phone, address, code), all from seed.

    Planted and control canaries come from the same distribution; use a different
    seed for the never-seen control set than for the planted one.
    """
    if n < 0:
        raise ValueError(f"canary count must be >= 0, got {n}")
    fake = new_faker()
    out = []
    for i in range(n):
        rng = random.Random(derive_seed(seed, "canary", i))
        fake.seed_instance(derive_seed(seed, "canary", i, "faker"))
        first, last = person_name(fake)
        dob = FIRST_DAY - timedelta(days=rng.randint(18 * 365, 90 * 365))
        state = fake.state_abbr(include_territories=False)
        pii = {
            "name": (f"{first} {last}", "NAME"),
            "mrn": ("".join(str(rng.randrange(10)) for _ in range(8)), "MRN"),
            "dob": (dob.isoformat(), "DOB"),
            "phone": (fake.numerify("(%##) %##-####"), "PHONE"),
            "address": (street_address(fake, state), "ADDRESS"),
        }
        code = f"{rng.choice('ABCDEGIJKMN')}{rng.randint(10, 99)}.{rng.randint(0, 9)}"
        text, spans = templates.render(CANARY_TEMPLATE, {"code": code}, pii, rng)
        out.append(Note(text=text, id=f"canary-{seed}-{i:04d}", hospital="canary", specialty="canary",
                        note_type="canary", pii=tuple(PiiSpan(s, e, lab, text[s:e]) for s, e, lab in spans)))
    return out


def plant_canaries(records: Sequence[R], n: int, seed: int, *, repeats: int = 1) -> tuple[list[R], list[str]]:
    """Insert n canaries (each `repeats` times) at seeded positions; returns (records, canary texts).

    The canaries take the records' own form: Note, or the JSONL dict when records are dicts.
    The other records keep their order. make_canaries(n, seed) gives back the same canaries.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    canaries = make_canaries(n, seed)
    out: list[R] = list(records)
    as_dict = bool(out) and isinstance(out[0], dict)
    rng = random.Random(derive_seed(seed, "canary", "positions"))
    for canary in canaries:
        item = cast(R, canary.to_record() if as_dict else canary)
        for _ in range(repeats):
            out.insert(rng.randint(0, len(out)), item)
    return out, [c.text for c in canaries]


