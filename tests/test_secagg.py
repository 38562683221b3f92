"""Secure aggregation's cryptography (common.secagg), without servers: masks cancel, dropouts are recovered,
a colluding hospital plus everything the coordinator saw still sees uniform bytes, forged and replayed keys
are refused, and a survivor never reveals both shares of one hospital."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from scipy import stats

from common.certs import make_federation_pki
from common.secagg import (
    KeyRefused,
    MemberKeys,
    MemberSecrets,
    RecoveryError,
    RevealedShare,
    ShareError,
    ShareKind,
    Signer,
    check_members,
    commitment,
    load_anchor,
    majority,
    pair_mask,
    rebuild,
    self_mask,
    survivors_message,
    unmask,
)
from common.updates import (
    ConsortiumKey,
    Contribution,
    EncryptedUpdate,
    _pads,
    decrypt_aggregate,
    encrypt_update,
    to_fixed,
)

FED, ROUND = "fed-secagg", 7
NAMES = ["hospital-1", "hospital-2", "hospital-3", "hospital-4"]
KEY = ConsortiumKey.generate()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_federation_pki(d, NAMES, ["localhost"])
    return d


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("other-pki")
    make_federation_pki(d, NAMES, ["localhost"])
    return d


def tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"b": rng.normal(0, 0.05, (64, 8)).astype(np.float32), "c": rng.normal(0, 0.05, (16,)).astype(np.float32)}


@dataclasses.dataclass
class Run:
    members: dict[str, MemberSecrets]
    keys: list[MemberKeys]
    threshold: int
    uploads: dict[str, np.ndarray]  # y_k as the coordinator receives it
    encrypted: dict[str, EncryptedUpdate]
    anchor: x509.Certificate


def setup_round(pki: Path, names: list[str] = NAMES, threshold: int | None = None, round_: int = ROUND) -> Run:
    members = {n: MemberSecrets(FED, round_, Signer.load(pki, n)) for n in names}
    t = threshold or majority(len(names))
    keys = check_members([m.keys for m in members.values()], load_anchor(pki), FED, round_, t)
    outgoing = {m.worker: m.shares_for(keys, t) for m in members.values()}
    for sender, shares in outgoing.items():
        for to, ct in shares.items():
            members[to].receive(sender, ct)
    uploads, encrypted = {}, {}
    for i, (n, m) in enumerate(members.items()):
        enc = encrypt_update(KEY, FED, round_, n, tensors(i), 10 + i)
        words = np.frombuffer(enc.payload, dtype="<u8").astype(np.uint64)
        m.mask(words)
        uploads[n], encrypted[n] = words, enc
    return Run(members, keys, t, uploads, encrypted, load_anchor(pki))


def reveal_all(run: Run, survivors: list[str]) -> list[RevealedShare]:
    """What the coordinator collects: every survivor confirms the set, then reveals its shares."""
    sigs = {k: run.members[k].confirm(survivors) for k in survivors}
    return [r for k in survivors for r in run.members[k].reveal(survivors, sigs, run.anchor)]


def recover(run: Run, survivors: list[str]) -> np.ndarray:
    total = np.zeros_like(run.uploads[survivors[0]])
    with np.errstate(over="ignore"):
        for k in survivors:
            total += run.uploads[k]
    unmask(total, FED, ROUND, run.keys, survivors, reveal_all(run, survivors), run.threshold)
    return total


def fedavg(run: Run, names: list[str]) -> dict[str, np.ndarray]:
    idx = {n: i for i, n in enumerate(run.members)}
    total = sum(10 + idx[n] for n in names)
    return {t: sum((10 + idx[n]) * tensors(idx[n])[t].astype(np.float64) for n in names) / total
            for t in tensors(0)}


@pytest.mark.parametrize("survivors", [NAMES, NAMES[:3], [NAMES[0], NAMES[2], NAMES[3]]], ids=["all", "4 drops",
                                                                                              "2 drops"])
def test_masks_cancel_and_dropouts_are_recovered_exactly(pki: Path, survivors: list[str]) -> None:
    run = setup_round(pki)
    total = recover(run, survivors)
    enc = run.encrypted[survivors[0]]
    parts = [Contribution(n, 10 + NAMES.index(n), run.encrypted[n].nonce) for n in survivors]
    mean = decrypt_aggregate(KEY, FED, ROUND, parts, sum(p.num_samples for p in parts), enc.layout,
                             total.astype("<u8").tobytes(), KEY.check_value())
    want = fedavg(run, survivors)
    for name in want:
        np.testing.assert_allclose(mean[name], want[name], rtol=0, atol=2e-7)


def test_too_few_survivors_reveal_nothing(pki: Path) -> None:
    run = setup_round(pki)  # t = 3 of 4
    with pytest.raises(RecoveryError, match="fewer than the threshold"):
        run.members[NAMES[0]].confirm(NAMES[:2])
    sigs = {k: run.members[k].confirm(NAMES[:3]) for k in NAMES[:2]}  # only 2 of the 3 confirm
    with pytest.raises(RecoveryError, match="valid confirmations"):
        run.members[NAMES[0]].reveal(NAMES[:3], sigs, run.anchor)


def test_a_survivor_signs_one_survivor_set_and_never_reveals_both_shares(pki: Path) -> None:
    """A coordinator that tells a survivor two different stories gets refused on the second."""
    run = setup_round(pki)
    m = run.members[NAMES[0]]
    first = NAMES[:3]  # hospital-4 "dropped": its mask-key share
    sigs = {k: run.members[k].confirm(first) for k in first}
    got = {r.owner: r.kind for r in m.reveal(first, sigs, run.anchor)}
    assert got[NAMES[3]] == ShareKind.MASK_KEY and got[NAMES[1]] == ShareKind.SELF_MASK
    second = NAMES  # now "hospital-4 survived": its self-seed share would unmask y_4
    with pytest.raises(RecoveryError, match="second, different survivor set"):
        m.confirm(second)
    # t genuine signatures over the second set (the other members signed it: say they were told it first)
    sigs = {k: Signer.load(pki, k).sign(survivors_message(FED, ROUND, second)) for k in NAMES}
    with pytest.raises(RecoveryError, match="only for the survivor set this member confirmed"):
        m.reveal(second, sigs, run.anchor)
    m._confirmed = tuple(second)  # even past that check (a bug, say), it never reveals both kinds for one member
    with pytest.raises(RecoveryError, match="both kinds"):
        m.reveal(second, sigs, run.anchor)


def test_forged_replayed_and_foreign_keys_are_refused(pki: Path, other_pki: Path) -> None:
    anchor = load_anchor(pki)
    genuine = MemberSecrets(FED, ROUND, Signer.load(pki, NAMES[0])).keys
    check_members([genuine], anchor, FED, ROUND, 1)
    impostor = MemberSecrets(FED, ROUND, Signer.load(pki, NAMES[1])).keys
    # the coordinator substitutes its own keys under hospital-1's name and certificate
    forged = dataclasses.replace(genuine, cipher_public=impostor.cipher_public, mask_public=impostor.mask_public)
    with pytest.raises(KeyRefused, match="not signed"):
        forged.check(anchor, FED, ROUND)
    # hospital-1's genuine keys of an earlier round, replayed
    old = MemberSecrets(FED, ROUND - 1, Signer.load(pki, NAMES[0])).keys
    with pytest.raises(KeyRefused, match="replayed"):
        old.check(anchor, FED, ROUND)
    # keys signed by hospital-2 but presented as hospital-1's
    with pytest.raises(KeyRefused, match="names"):
        dataclasses.replace(impostor, worker=NAMES[0]).check(anchor, FED, ROUND)
    # a certificate from another CA
    foreign = MemberSecrets(FED, ROUND, Signer.load(other_pki, NAMES[0])).keys
    with pytest.raises(KeyRefused, match="not issued by the federation CA"):
        foreign.check(anchor, FED, ROUND)
    # positive control: the checks accept the genuine keys of this round
    genuine.check(anchor, FED, ROUND)


def test_a_tampered_or_misrouted_share_does_not_open(pki: Path) -> None:
    a, b, c = (MemberSecrets(FED, ROUND, Signer.load(pki, n)) for n in NAMES[:3])
    keys = check_members([a.keys, b.keys, c.keys], load_anchor(pki), FED, ROUND, 2)
    shares = a.shares_for(keys, 2)
    b.shares_for(keys, 2)
    c.shares_for(keys, 2)
    bad = bytearray(shares[NAMES[1]])
    bad[-1] ^= 1
    with pytest.raises(ShareError, match="does not open"):
        b.receive(NAMES[0], bytes(bad))
    with pytest.raises(ShareError, match="does not open"):
        c.receive(NAMES[0], shares[NAMES[1]])  # b's share delivered to c
    b.receive(NAMES[0], shares[NAMES[1]])  # positive control
    assert NAMES[0] in b.holds


def chi2_p(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def test_coordinator_plus_one_hospital_sees_uniform_bytes_positive_control_recovers(pki: Path) -> None:
    """Collusion: the coordinator (every upload, public key and revealed share of a full round, in which the
    victim survived, so its self seed was rebuilt) with one hospital (the consortium key and its own pairwise
    key) strips the victim's pad, self mask and their shared pairwise mask: the rest is uniform bytes. Holding
    every pairwise secret of the victim (what fewer than t hospitals never have) recovers it exactly."""
    run = setup_round(pki)
    victim, colluder = NAMES[1], NAMES[2]
    reveals = reveal_all(run, NAMES)
    committed = run.keys[NAMES.index(victim)].self_commitment
    seed = rebuild([(r.index, r.value) for r in reveals if r.owner == victim], run.threshold,
                   lambda s: commitment(s) == committed, "victim's self seed")
    enc = run.encrypted[victim]
    n = run.uploads[victim].size
    peer_of = {k.worker: k for k in run.keys}
    with np.errstate(over="ignore"):
        seen = (run.uploads[victim] - _pads(KEY, "update", FED, ROUND, victim, enc.nonce, enc.layout)
                - self_mask(seed, FED, ROUND, n))
        seen += pair_mask(run.members[colluder]._mask, colluder, peer_of[victim], FED, ROUND, n)  # its own pair
    assert chi2_p(seen.astype("<u8").tobytes()) > 1e-3
    m = to_fixed(np.concatenate([np.ravel(tensors(1)[t]) for t in sorted(tensors(1))]), 11)
    assert abs(np.corrcoef(seen[:m.size].view(np.int64).astype(np.float64), m)[0, 1]) < 5 / np.sqrt(m.size)
    # Positive control: with the victim's remaining pairwise secrets as well, the update comes out exactly.
    with np.errstate(over="ignore"):
        clear = seen.copy()
        for peer in run.keys:
            if peer.worker not in (victim, colluder):
                clear -= pair_mask(run.members[victim]._mask, victim, peer, FED, ROUND, n)
    np.testing.assert_array_equal(clear[:m.size].view(np.int64), m)
    assert chi2_p(clear.astype("<u8").tobytes()) < 1e-6  # and the test sees non-uniform bytes when they are


def test_close_zeroes_the_seed(pki: Path) -> None:
    m = MemberSecrets(FED, ROUND, Signer.load(pki, NAMES[0]))
    assert any(m._seed)
    m.close()
    assert not any(m._seed) and not m.holds
