"""Secure aggregation's cost per hospital and for the coordinator, beside the pads alone, at 3, 10 and 30 hospitals.

An in-process simulation with the real cryptography (common.secagg, common.updates), one thread: every
hospital makes its keys, checks all peers' keys against the federation CA, shares its secrets, opens its
peers' shares, pad-encrypts and masks its update, confirms the survivor set and reveals its shares; the
coordinator adds the uploads and removes the masks, with no dropout and with 10% of the hospitals dropped
after the setup. Bytes are the payloads of the messages each party sends (protobuf framing excluded).
The baseline is today's pad scheme: encrypt_update per hospital, one addition per upload at the coordinator.

    python scripts/bench_secagg.py [--hospitals 3 10 30] [--model tiny|smollm2-135m] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from common.certs import make_federation_pki
from common.secagg import MemberSecrets, Signer, check_members, load_anchor, majority, unmask
from common.updates import ConsortiumKey, add_payload, encrypt_update

FED = "bench"


def adapter(model: str, seed: int) -> dict[str, np.ndarray]:
    """A LoRA-B update of the quickstart's shape: tiny (rank 8 on q,v,o,gate,down, 2 layers) or SmolLM2 (rank 8
    on q,v, 30 layers)."""
    rng = np.random.default_rng(seed)  # public benchmark data
    if model == "tiny":
        shapes = {f"blocks.{i}.lora.{p}.lora_b.weight": (d, 8) for i in range(2)
                  for p, d in (("q", 64), ("v", 32), ("o", 64), ("gate", 128), ("down", 64))}
    else:
        shapes = {f"blocks.{i}.lora.{p}.lora_b.weight": (d, 8) for i in range(30) for p, d in (("q", 576), ("v", 192))}
    return {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, what: str, fn, *args):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t0
        return out


def run(n: int, model: str, pki: Path, dropped: int) -> dict[str, Any]:
    names = [f"hospital-{i + 1}" for i in range(n)]
    key, anchor = ConsortiumKey.generate(), load_anchor(pki)
    signers = {w: Signer.load(pki, w) for w in names}
    hosp, coord = Clock(), Clock()  # hospital seconds are summed over all of them, then divided by n
    sent: dict[str, int] = {"keys": 0, "shares": 0, "update": 0, "confirm": 0, "reveal": 0}
    members = {w: hosp.time("keys", MemberSecrets, FED, 1, signers[w]) for w in names}
    keys = [m.keys for m in members.values()]
    sent["keys"] = sum(len(k.cipher_public) + len(k.mask_public) + len(k.self_commitment) + len(k.signature)
                       + len(k.certificate) for k in keys)
    t = majority(n)
    checked = {w: hosp.time("check peers' keys", check_members, keys, anchor, FED, 1, t) for w in names}
    outgoing = {w: hosp.time("make shares", members[w].shares_for, checked[w], t) for w in names}
    sent["shares"] = sum(len(ct) for out in outgoing.values() for ct in out.values())
    for sender, out in outgoing.items():
        for to, ct in out.items():
            hosp.time("open shares", members[to].receive, sender, ct)
    survivors = names[:n - dropped]
    uploads = {}
    for i, w in enumerate(survivors):
        enc = hosp.time("pad-encrypt (as today)", encrypt_update, key, FED, 1, w, adapter(model, i), 10 + i)
        words = np.frombuffer(enc.payload, dtype="<u8").astype(np.uint64)
        hosp.time("mask", members[w].mask, words)
        uploads[w] = words
        sent["update"] += words.nbytes
    total = np.zeros_like(next(iter(uploads.values())))
    for w in survivors:
        coord.time("add uploads (as today)", add_payload, total, uploads[w].astype("<u8").tobytes())
    sigs = {w: hosp.time("confirm survivors", members[w].confirm, survivors) for w in survivors}
    sent["confirm"] = sum(len(s) for s in sigs.values())
    reveals = []
    for w in survivors:
        shares = hosp.time("reveal shares", members[w].reveal, survivors, sigs, anchor)
        sent["reveal"] += sum(len(r.value) + len(r.owner) + 8 for r in shares)
        reveals.extend(shares)
    coord.time("remove masks", unmask, total, FED, 1, keys, survivors, reveals, t)
    per_hospital = {k: v / (n if k in ("keys", "check peers' keys", "make shares", "open shares") else len(survivors))
                    for k, v in hosp.seconds.items()}
    relayed = sent["keys"] * n + sent["shares"] + sent["confirm"] * len(survivors)  # what the coordinator sends out
    payload = next(iter(uploads.values())).nbytes
    return {
        "hospitals": n, "dropped": dropped, "threshold": t, "payload_bytes": payload,
        "hospital_seconds": {k: round(v, 5) for k, v in per_hospital.items()},
        "hospital_seconds_secagg": round(sum(v for k, v in per_hospital.items() if "as today" not in k), 5),
        "hospital_seconds_pads_only": round(per_hospital["pad-encrypt (as today)"], 5),
        "hospital_bytes_sent_secagg_extra": round((sent["keys"] + sent["shares"] + sent["confirm"] + sent["reveal"])
                                                  / n),
        "hospital_bytes_received_secagg_extra": round(relayed / n),
        "hospital_bytes_update": payload,
        "coordinator_seconds": {k: round(v, 5) for k, v in coord.seconds.items()},
        "coordinator_bytes_relayed_secagg": relayed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hospitals", type=int, nargs="+", default=[3, 10, 30])
    ap.add_argument("--model", default="smollm2-135m", choices=["tiny", "smollm2-135m"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp)
        make_federation_pki(pki, [f"hospital-{i + 1}" for i in range(max(args.hospitals))], ["localhost"])
        for n in args.hospitals:
            for dropped in (0, max(1, n // 10)):
                r = run(n, args.model, pki, dropped)
                results.append(r)
                print(f"n={n:2d} dropped={dropped}: hospital {r['hospital_seconds_secagg'] * 1e3:8.1f} ms secagg "
                      f"(pads alone {r['hospital_seconds_pads_only'] * 1e3:6.1f} ms), "
                      f"+{r['hospital_bytes_sent_secagg_extra'] / 1024:6.1f} KiB sent per hospital; coordinator "
                      f"unmask {r['coordinator_seconds']['remove masks'] * 1e3:8.1f} ms "
                      f"(adding {r['coordinator_seconds']['add uploads (as today)'] * 1e3:5.1f} ms), relays "
                      f"{r['coordinator_bytes_relayed_secagg'] / 1024:7.1f} KiB", flush=True)
    out = {"model": args.model, "machine": {"cpu": platform.processor() or platform.machine(),
                                            "cores": os.cpu_count(), "python": platform.python_version()},
           "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
