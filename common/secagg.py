"""Secure aggregation on top of the consortium pads: pairwise and self masks, t-of-n recovery of dropouts.

Double masking after Bonawitz et al. (CCS 2017), complete graph. Per round, each
hospital k of the mask set M (sorted by name; position i_k = 1, 2, ...):

- draws two X25519 key pairs, c (its shares are encrypted to c_pk) and s (pairwise
  masks), and a 32-byte self-mask seed b_k; it signs (federation, round, k, c_pk,
  s_pk, SHA-256 commitment to b_k) with its federation certificate's key, so the
  coordinator that relays the keys cannot substitute its own, nor replay a round's;
- sends each peer j, encrypted under AES-256-GCM with a key from X25519(c_k, c_j),
  its Shamir share (threshold t, index i_j) of s_sk_k and of b_k;
- uploads y_k = c_k + PRG(b_k) + Σ_{j∈M, j≠k} σ_kj·PRG(s_kj)   (mod 2^64)

where c_k is today's pad-encrypted update (common.updates), s_kj =
HKDF(X25519(s_k, s_j)) bound to (federation, round, {k, j}) and σ_kj = +1 if k < j,
−1 otherwise, so the pairwise masks cancel in a sum over all of M. When the uploads
close with survivors U ⊆ M (|U| ≥ t) and dropouts D = M \\ U, each survivor reveals,
for every j, exactly one of its two shares of j: of b_j if j ∈ U, of s_sk_j if j ∈ D.
From t of them the coordinator rebuilds those secrets and removes what does not cancel:

    Σ_{k∈U} y_k − Σ_{k∈U} PRG(b_k) − Σ_{k∈U, j∈D} σ_kj·PRG(s_kj) = Σ_{k∈U} c_k   (mod 2^64)

which is exactly the aggregate of the pad-only scheme, still under the consortium pads:
the coordinator learns nothing, not even the sum, and the homomorphic tag inside each c_k
verifies the result as before (masks are removed exactly, so they cannot weaken it; a wrong
removal leaves uniform noise that fails the tag). A hospital declared dropped although it
uploaded keeps its self mask, so its y_k stays hidden. Before revealing, a survivor
requires t signatures of members of U over U itself, so a coordinator cannot tell
different hospitals different survivor sets to collect both shares of one hospital.

Secrets (private keys, seeds, shares) live in MemberSecrets and are zeroed by close().
Everything here is protocol-free; failures raise SecAggError subclasses.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import combinations
from pathlib import Path

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from common.errors import FailedPrecondition, FedfheError, InvalidArgument, PermissionDenied
from common.updates import bind, keystream_words

SCHEME = "pairwise+self masks (Bonawitz et al. 2017), Shamir t-of-n, complete graph"
MAX_MEMBERS = 255  # Shamir indices are 1..n
SECRET_BYTES = 32
_HALF = 16  # pycryptodome's Shamir shares 16-byte secrets in GF(2^128): a 32-byte secret is two halves
_SHARE_PLAIN = 2 + 4 * _HALF  # index, then the halves of the mask-key share and of the self-seed share
_NONCE = 12


class SecAggError(FedfheError):
    """Base of every secure-aggregation failure."""


class KeyRefused(SecAggError, PermissionDenied):
    """A member's keys are not signed by its own federation certificate for this federation and round."""


class ShareError(SecAggError, InvalidArgument):
    """A share that cannot be opened, belongs to someone else, or does not rebuild the committed secret."""


class RecoveryError(SecAggError, FailedPrecondition):
    """Too few survivors, confirmations or shares to remove the masks (the round fails, nothing is kept)."""


class ShareKind(IntEnum):  # values match fedfhe.v1.ShareKind
    SELF_MASK = 1
    MASK_KEY = 2


def majority(members: int) -> int:
    """The default threshold: more than half of the mask set."""
    return members // 2 + 1


def _kdf(material: bytes, label: bytes, *context: str | int | bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fedfhe/v1/secagg/" + label + bind(*context)).derive(material)


def commitment(self_seed: bytes) -> bytes:
    return hashlib.sha256(b"fedfhe/v1/secagg/self-commit" + self_seed).digest()


def keys_message(federation: str, round_: int, worker: str, cipher_public: bytes, mask_public: bytes,
                 self_commitment: bytes) -> bytes:
    """What a member signs: its keys, bound to the federation and round (a replay elsewhere fails)."""
    return b"fedfhe/v1/secagg/keys" + bind(federation, round_, worker, cipher_public, mask_public, self_commitment)


def survivors_message(federation: str, round_: int, survivors: Iterable[str]) -> bytes:
    return b"fedfhe/v1/secagg/survivors" + bind(federation, round_, *sorted(survivors))


# --------------------------------------------------------------------------------------------------
# Identities: the federation certificate that signs, the CA that checks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    """A worker's federation certificate and its private key (the TLS client identity)."""

    name: str
    key: ec.EllipticCurvePrivateKey
    certificate: bytes  # PEM

    @classmethod
    def load(cls, tls_dir: Path, name: str) -> Signer:
        try:
            key = serialization.load_pem_private_key((tls_dir / f"{name}.key").read_bytes(), None)
            cert = (tls_dir / f"{name}.pem").read_bytes()
        except FileNotFoundError as exc:
            raise FailedPrecondition(f"secure aggregation signs with the worker's certificate: {exc.filename} "
                                     "is missing (ask your federation admin for NAME.pem and NAME.key)") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FailedPrecondition(f"{tls_dir / (name + '.key')} is not an EC private key")
        return cls(name, key, cert)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message, ec.ECDSA(hashes.SHA256()))


def load_anchor(tls_dir: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    except FileNotFoundError:
        raise FailedPrecondition(f"secure aggregation checks peers against the federation CA: {tls_dir / 'ca.pem'} "
                                 "is missing") from None


def member_certificate(anchor: x509.Certificate, pem: bytes, worker: str,
                       now: dt.datetime | None = None) -> ec.EllipticCurvePublicKey:
    """The public key of `worker`'s certificate, if the federation CA issued it to that worker, now valid."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(anchor)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise KeyRefused(f"the certificate presented for {worker!r} was not issued by the federation CA "
                         f"({type(exc).__name__})") from None
    cn = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    ou = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if cn != [worker] or ou != ["worker"]:
        raise KeyRefused(f"the certificate presented for {worker!r} names {cn} with role {ou}")
    now = now or dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KeyRefused(f"the certificate of {worker!r} is not valid now")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyRefused(f"the certificate of {worker!r} has no EC key")
    return key


def _verify(key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes, what: str) -> None:
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise KeyRefused(what) from None


@dataclass(frozen=True)
class MemberKeys:
    """One member's public keys for one round, signed with its certificate's key."""

    worker: str
    cipher_public: bytes  # X25519: peers encrypt their shares to it
    mask_public: bytes  # X25519: pairwise mask agreement
    self_commitment: bytes  # SHA-256 commitment to the self-mask seed (checks a rebuilt seed)
    signature: bytes  # ECDSA P-256 over keys_message(...)
    certificate: bytes  # PEM, issued by the federation CA

    def check(self, anchor: x509.Certificate, federation: str, round_: int) -> None:
        """Refuse keys not signed, for this federation and round, by the named worker's own certificate."""
        if len(self.cipher_public) != 32 or len(self.mask_public) != 32 or len(self.self_commitment) != 32:
            raise KeyRefused(f"keys of {self.worker!r} have the wrong lengths")
        key = member_certificate(anchor, self.certificate, self.worker)
        _verify(key, self.signature, keys_message(federation, round_, self.worker, self.cipher_public,
                                                   self.mask_public, self.self_commitment),
                f"the mask keys of {self.worker!r} are not signed by its certificate for {federation!r} round "
                f"{round_} (substituted, or replayed from another round)")


def check_members(members: Sequence[MemberKeys], anchor: x509.Certificate, federation: str, round_: int,
                  threshold: int) -> list[MemberKeys]:
    """A mask set every member can trust: distinct names, sorted, each signed, and a sound threshold."""
    names = [m.worker for m in members]
    if len(set(names)) != len(names) or not 1 <= len(names) <= MAX_MEMBERS:
        raise KeyRefused(f"the mask set {names[:8]} repeats a name or has a size outside 1..{MAX_MEMBERS}")
    if not majority(len(names)) <= threshold <= len(names):
        raise KeyRefused(f"threshold {threshold} for {len(names)} members: it must be a majority and at most "
                         "the mask set")
    for m in members:
        m.check(anchor, federation, round_)
    return sorted(members, key=lambda m: m.worker)


# --------------------------------------------------------------------------------------------------
# Shamir shares of 32-byte secrets
# --------------------------------------------------------------------------------------------------


def split(secret: bytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """count shares (index 1..count, 32 bytes each) of a 32-byte secret, any threshold of which rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError("a shared secret is 32 bytes")
    if count == 1:  # a lone member: the only share is the secret (t = 1)
        return [(1, secret)]
    lo, hi = Shamir.split(threshold, count, secret[:_HALF]), Shamir.split(threshold, count, secret[_HALF:])
    return [(i, a + b) for (i, a), (_, b) in zip(lo, hi, strict=True)]


def combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    if len(shares) == 1 and shares[0][0] == 1 and len(shares[0][1]) == SECRET_BYTES:
        return shares[0][1]
    try:
        lo = Shamir.combine([(i, s[:_HALF]) for i, s in shares])
        hi = Shamir.combine([(i, s[_HALF:]) for i, s in shares])
    except ValueError as exc:
        raise ShareError(f"shares do not combine: {exc}") from None
    return lo + hi


def rebuild(shares: Sequence[tuple[int, bytes]], threshold: int, check: Callable[[bytes], bool], what: str,
            max_tries: int = 64) -> bytes:
    """A secret from any `threshold` of the shares that passes `check`; a wrong share is outvoted by trying subsets."""
    if len(shares) < threshold:
        raise RecoveryError(f"{what}: {len(shares)} share(s), {threshold} needed")
    for tries, subset in enumerate(combinations(sorted(shares), threshold)):
        if tries >= max_tries:
            break
        try:
            secret = combine(subset)
        except ShareError:
            continue
        if check(secret):
            return secret
    raise RecoveryError(f"{what}: no {threshold} of the {len(shares)} revealed shares rebuild the committed secret")


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def _pair_seed(private: X25519PrivateKey, peer_public: bytes, federation: str, round_: int, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return _kdf(private.exchange(X25519PublicKey.from_public_bytes(peer_public)), b"pair", federation, round_, lo, hi)


def self_mask(seed: bytes, federation: str, round_: int, words: int) -> np.ndarray:
    return keystream_words(_kdf(seed, b"self", federation, round_), words)


def pair_mask(private: X25519PrivateKey, owner: str, peer: MemberKeys, federation: str, round_: int,
              words: int) -> np.ndarray:
    """σ·PRG(s_owner,peer) as owner adds it: +PRG if owner sorts first, −PRG (mod 2^64) otherwise."""
    mask = keystream_words(_pair_seed(private, peer.mask_public, federation, round_, owner, peer.worker), words)
    return mask if owner < peer.worker else (np.uint64(0) - mask)


@dataclass(frozen=True)
class RevealedShare:
    owner: str  # whose secret this is a share of
    kind: ShareKind
    index: int
    value: bytes  # 32 bytes


class MemberSecrets:
    """One member's secrets for one round, and the shares of its peers' secrets it holds."""

    def __init__(self, federation: str, round_: int, signer: Signer) -> None:
        self.federation, self.round, self.worker = federation, round_, signer.name
        self._signer = signer
        self._cipher = X25519PrivateKey.generate()
        self._mask = X25519PrivateKey.generate()
        self._seed = bytearray(os.urandom(SECRET_BYTES))
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        c_pk, s_pk = self._cipher.public_key().public_bytes(*raw), self._mask.public_key().public_bytes(*raw)
        cm = commitment(bytes(self._seed))
        self.keys = MemberKeys(self.worker, c_pk, s_pk, cm,
                               signer.sign(keys_message(federation, round_, self.worker, c_pk, s_pk, cm)),
                               signer.certificate)
        self.members: list[MemberKeys] = []  # whose pairwise masks this member adds (the final mask set)
        self.threshold = 0
        self._index: dict[str, int] = {}  # Shamir index of each member of the keys phase
        self._held: dict[str, tuple[int, bytes, bytes]] = {}  # owner -> (index, mask-key share, self-seed share)
        self._revealed: dict[str, ShareKind] = {}
        self._confirmed: tuple[str, ...] | None = None  # the one survivor set this member signs per round

    def _share_key(self, peer: MemberKeys, sender: str, receiver: str) -> bytes:
        secret = self._cipher.exchange(X25519PublicKey.from_public_bytes(peer.cipher_public))
        return _kdf(secret, b"share", self.federation, self.round, sender, receiver)

    def shares_for(self, members: Sequence[MemberKeys], threshold: int) -> dict[str, bytes]:
        """Encrypted shares of this member's secrets, one per other member (its own it keeps)."""
        self.members, self.threshold = list(members), threshold
        names = [m.worker for m in members]
        if self.worker not in names:
            raise KeyRefused(f"{self.worker!r} is not in the mask set {names}")
        self._index = {name: i + 1 for i, name in enumerate(names)}
        raw = self._mask.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())
        key_shares = split(raw, threshold, len(members))
        seed_shares = split(bytes(self._seed), threshold, len(members))
        out = {}
        for m, (idx, ks), (_, ss) in zip(members, key_shares, seed_shares, strict=True):
            if m.worker == self.worker:
                self._held[self.worker] = (idx, ks, ss)
                continue
            plain = struct.pack("<H", idx) + ks + ss
            nonce = os.urandom(_NONCE)
            aad = bind(self.federation, self.round, self.worker, m.worker)
            out[m.worker] = nonce + AESGCM(self._share_key(m, self.worker, m.worker)).encrypt(nonce, plain, aad)
        return out

    def receive(self, sender: str, ciphertext: bytes) -> None:
        """Open and keep a peer's share of its secrets (addressed to this member)."""
        peers = {m.worker: m for m in self.members}
        if sender not in peers or sender == self.worker:
            raise ShareError(f"a share from {sender!r}, who is not another member of the mask set")
        aad = bind(self.federation, self.round, sender, self.worker)
        try:
            plain = AESGCM(self._share_key(peers[sender], sender, self.worker)).decrypt(
                ciphertext[:_NONCE], ciphertext[_NONCE:], aad)
        except (InvalidTag, ValueError):
            raise ShareError(f"the share from {sender!r} does not open (tampered, or not for this member)") from None
        if len(plain) != _SHARE_PLAIN:
            raise ShareError(f"the share from {sender!r} has {len(plain)} bytes")
        idx = struct.unpack("<H", plain[:2])[0]
        if idx != self._index[self.worker]:
            raise ShareError(f"the share from {sender!r} carries index {idx}, not this member's")
        self._held[sender] = (idx, plain[2:2 + SECRET_BYTES], plain[2 + SECRET_BYTES:])

    @property
    def holds(self) -> set[str]:
        return set(self._held)

    def restrict(self, final: Sequence[str]) -> None:
        """The members who sent their shares are the final mask set: mask with them only."""
        if self.worker not in final or not set(final) <= set(self._index):
            raise KeyRefused(f"the final mask set {sorted(final)[:8]} leaves out {self.worker!r} or adds strangers")
        self.members = [m for m in self.members if m.worker in final]
        self._held = {owner: v for owner, v in self._held.items() if owner in final}

    def mask(self, words: np.ndarray) -> None:
        """Add this member's self mask and pairwise masks to its pad-encrypted payload, in place (mod 2^64)."""
        n = words.size
        with np.errstate(over="ignore"):
            words += self_mask(bytes(self._seed), self.federation, self.round, n)
            for peer in self.members:
                if peer.worker != self.worker:
                    words += pair_mask(self._mask, self.worker, peer, self.federation, self.round, n)

    def confirm(self, survivors: Sequence[str]) -> bytes:
        """Sign the survivor set the coordinator announced (the consistency check before any reveal)."""
        self._check_sets(survivors)
        announced = tuple(sorted(survivors))
        if self._confirmed is not None and self._confirmed != announced:
            raise RecoveryError(f"a second, different survivor set for round {self.round}: refused (the coordinator "
                                "told this member two stories)")
        self._confirmed = announced
        return self._signer.sign(survivors_message(self.federation, self.round, survivors))

    def _check_sets(self, survivors: Sequence[str]) -> None:
        names = {m.worker for m in self.members}
        if not set(survivors) <= names or len(set(survivors)) != len(survivors):
            raise RecoveryError(f"survivors {sorted(survivors)[:8]} are not a subset of the mask set")
        if self.worker not in survivors:
            raise RecoveryError(f"{self.worker!r} is not among the announced survivors")
        if len(survivors) < self.threshold:
            raise RecoveryError(f"{len(survivors)} survivors, fewer than the threshold {self.threshold}: no shares "
                                "are revealed")

    def reveal(self, survivors: Sequence[str], signatures: Mapping[str, bytes],
               anchor: x509.Certificate) -> list[RevealedShare]:
        """For each member, one share: of its self seed if it survived, of its mask key if it dropped.

        Only after t members of the survivor set signed that same set, and never both kinds for one member.
        """
        self._check_sets(survivors)
        if self._confirmed != tuple(sorted(survivors)):
            raise RecoveryError("shares are revealed only for the survivor set this member confirmed")
        peers = {m.worker: m for m in self.members}
        message = survivors_message(self.federation, self.round, survivors)
        valid = set()
        for name, sig in signatures.items():
            if name in survivors and name in peers:
                _verify(member_certificate(anchor, peers[name].certificate, name), sig, message,
                        f"{name!r} did not sign this survivor set")
                valid.add(name)
        if len(valid) < self.threshold:
            raise RecoveryError(f"only {len(valid)} valid confirmations of the survivor set, {self.threshold} "
                                "needed: no shares are revealed")
        out = []
        for owner, (idx, key_share, seed_share) in sorted(self._held.items()):
            kind = ShareKind.SELF_MASK if owner in survivors else ShareKind.MASK_KEY
            if self._revealed.get(owner, kind) != kind:
                raise RecoveryError(f"asked for both kinds of share of {owner!r}: refused (it would unmask it)")
            self._revealed[owner] = kind
            out.append(RevealedShare(owner, kind, idx, seed_share if kind == ShareKind.SELF_MASK else key_share))
        return out

    def close(self) -> None:
        """Zero the seed and the held shares (the X25519 keys are dropped with this object)."""
        for i in range(len(self._seed)):
            self._seed[i] = 0
        self._held.clear()


# --------------------------------------------------------------------------------------------------
# Unmasking (the coordinator)
# --------------------------------------------------------------------------------------------------


def unmask(words: np.ndarray, federation: str, round_: int, members: Sequence[MemberKeys],
           survivors: Sequence[str], reveals: Iterable[RevealedShare], threshold: int) -> None:
    """Remove from Σ_{k∈U} y_k (in place) every mask that does not cancel, from the revealed shares."""
    by_name = {m.worker: m for m in members}
    dropped = [m.worker for m in members if m.worker not in survivors]
    shares: dict[tuple[str, ShareKind], dict[int, bytes]] = {}
    for r in reveals:
        if r.owner in by_name and len(r.value) == SECRET_BYTES:
            expected = ShareKind.SELF_MASK if r.owner in survivors else ShareKind.MASK_KEY
            if r.kind == expected:
                shares.setdefault((r.owner, r.kind), {})[r.index] = r.value
    n = words.size
    with np.errstate(over="ignore"):
        for k in survivors:
            committed = by_name[k].self_commitment

            def opens(seed: bytes, committed: bytes = committed) -> bool:
                return commitment(seed) == committed
            seed = rebuild(list(shares.get((k, ShareKind.SELF_MASK), {}).items()), threshold, opens,
                           f"self mask of {k!r}")
            words -= self_mask(seed, federation, round_, n)
        for j in dropped:
            want = by_name[j].mask_public

            def fits(raw: bytes, want: bytes = want) -> bool:
                pub = X25519PrivateKey.from_private_bytes(raw).public_key()
                return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == want
            raw = rebuild(list(shares.get((j, ShareKind.MASK_KEY), {}).items()), threshold, fits,
                          f"mask key of dropped {j!r}")
            private = X25519PrivateKey.from_private_bytes(raw)
            for k in survivors:  # k added σ_kj·PRG(s_kj) = −(j's term), and j's term never arrived
                words += pair_mask(private, j, by_name[k], federation, round_, n)
