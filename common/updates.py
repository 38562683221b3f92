"""Encrypted adapter updates: fixed point mod 2^64, pads from the consortium key, a homomorphic tag.

The consortium update key K is shared by the hospitals and never by the
coordinator. For round r, worker k with n_k samples sends, per tensor t,

    c_k,t = m_k,t + pad(K; federation, r, k, nonce_k, t)   (mod 2^64)
    m_k,t = round(n_k · w_k,t · 2^F)               (fixed point, F = 32 fractional bits)

where nonce_k is fresh per encryption (a retried submission never reuses a
pad: two payloads under one pad would reveal their difference) and w_k is
its adapter after local training (FedAvg of models: every
participant started the round from the same global adapter, so this equals
the global adapter plus the sample-weighted mean of the deltas). Pads come
from HKDF-SHA256 → AES-256-CTR and look uniform, so the coordinator's sum
Σ_k c_k is uniform bytes to it. A worker that holds K removes the pads of the
participants the coordinator lists and divides by Σ n_k:

    Σ_k c_k − Σ_k pad_k = Σ_k m_k  (exact integers: |m| < 2^53, at most 1024 participants)

Tamper detection (linearly homomorphic tag). Each update carries six tag
words: for three primes p_j ≈ 2^31 and two secret vectors r_j,l derived from
K and the round, t_j,l = Σ_i r_j,l,i · m_i + r_j,l,0 · n_k (mod p_j). Tags add
like the data, so after pad removal Σ_k t_k ≡ tag(Σ_k m_k, Σ_k n_k) (mod p_j).
A change e ≠ 0 to the decrypted integers (|e_i| < 2^64) is non-zero modulo at
least one p_j (their product exceeds 2^64), where each of its two tags misses
it with probability 1/p_j: a forgery succeeds with probability below 2^-61.
Changing the sample total breaks the r_0 term; adding, renaming or dropping a
participant leaves pads unremoved; renaming or reshaping a tensor changes the
secret vectors. What the tag cannot stop: the coordinator holds each c_k, so
it can serve any subset of the round's contributions (one alone, even), which
the worker answers with a floor on the number of participants it opens.
A key check value (HKDF of K under its own label) makes a wrong key a clear
error instead of a silently garbled adapter.

Everything here is protocol-free; failures raise UpdateCryptoError subclasses.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import FailedPrecondition, FedfheError, InvalidArgument

KEY_BYTES = 32
KCV_BYTES = 8
NONCE_BYTES = 16
FRAC_BITS = 32
MAX_FIXED = (1 << 53) - 1  # per worker and entry: exact in float64, and 1024 of them sum below 2^63
MAX_PARTICIPANTS = 1024
TAG_PRIMES = (2147483647, 2147483629, 2147483587)  # product > 2^64: see the module docstring
TAGS_PER_PRIME = 2
TAG_NAME = "fedfhe.tag"  # the reserved last tensor of every payload
TAG_WORDS = len(TAG_PRIMES) * TAGS_PER_PRIME
UPDATE, RESTORE = "update", "restore"
KINDS = (UPDATE, RESTORE)
KEY_FILE_HEADER = "# fedfhe consortium update key v1: shared by the hospitals only; keep this file 0600"


class UpdateCryptoError(FedfheError):
    """Base of every failure to encrypt, add or decrypt an update."""


class UpdateFormatError(UpdateCryptoError, InvalidArgument):
    """Tensor names, shapes, sizes or values that the format cannot carry."""


class WrongConsortiumKey(UpdateCryptoError, FailedPrecondition):
    """The key check value differs: this key did not make the aggregate (or the federation's key)."""


class TamperedAggregate(UpdateCryptoError):
    """The aggregate fails its homomorphic tag: changed bytes, participants or sample total."""


class KeyFileError(UpdateCryptoError):
    """A consortium key file is missing, malformed or readable by others."""


# --------------------------------------------------------------------------------------------------
# The consortium key
# --------------------------------------------------------------------------------------------------


class ConsortiumKey:
    """The hospitals' shared update key. Its repr never shows the key."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise KeyFileError(f"a consortium key is {KEY_BYTES} bytes, got {len(raw)}")
        self._raw = bytes(raw)

    @classmethod
    def generate(cls) -> ConsortiumKey:
        return cls(os.urandom(KEY_BYTES))

    def __repr__(self) -> str:
        return f"ConsortiumKey(check_value={self.check_value().hex()})"

    def derive(self, label: bytes, length: int = 32) -> bytes:
        """A subkey for one purpose: HKDF-SHA256 with info `fedfhe/v1/<label>`."""
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                    info=b"fedfhe/v1/" + label).derive(self._raw)

    def check_value(self) -> bytes:
        """Public fingerprint of the key (one-way): equal values mean the same key."""
        return self.derive(b"key-check", KCV_BYTES)

    def raw_bytes(self) -> bytes:
        """The key itself: for writing the key file, and for tests that scan files and logs for leaks."""
        return self._raw


def write_key_file(path: Path, key: ConsortiumKey, *, force: bool = False) -> None:
    """Write the key to a new file that is 0600 from its first byte; refuse to replace one unless force."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists: refusing to replace a consortium key (use --force)") from None
    try:
        os.fchmod(fd, 0o600)
        text = f"{KEY_FILE_HEADER}\n{base64.b64encode(key.raw_bytes()).decode()}\n"
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def load_key_file(path: Path) -> ConsortiumKey:
    """Read a key file written by write_key_file; refuse one that group or others can read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(f"consortium key file {path} does not exist (make one with fedfhe-keygen)") from None
    if st.st_uid != os.getuid():
        raise KeyFileError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path} is readable by group or others (mode {st.st_mode & 0o777:o}): chmod 600 it")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    try:
        if len(lines) != 1:
            raise ValueError
        raw = base64.b64decode(lines[0], validate=True)
    except ValueError:
        raise KeyFileError(f"{path} is not a fedfhe consortium key file") from None
    return ConsortiumKey(raw)


# --------------------------------------------------------------------------------------------------
# Layout, pads and tags
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorLayout:
    """The tensors of an update in payload order (the tag block last)."""

    specs: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> TensorLayout:
        specs = [(name, tuple(int(d) for d in np.shape(t))) for name, t in sorted(tensors.items())]
        return cls.checked([*specs, (TAG_NAME, (TAG_WORDS,))])

    @classmethod
    def checked(cls, specs: Sequence[tuple[str, Sequence[int]]], *, max_words: int = 1 << 28) -> TensorLayout:
        """Validate names and shapes from a message: unique names, positive dims, bounded size, tag last."""
        out, seen, words = [], set(), 0
        for name, shape in specs:
            shape = tuple(int(d) for d in shape)
            if not name or len(name) > 256 or name in seen:
                raise UpdateFormatError(f"tensor name {name[:40]!r} is empty, too long or repeated")
            if not shape or len(shape) > 8 or any(not 0 < d < 1 << 31 for d in shape):
                raise UpdateFormatError(f"tensor {name!r} has shape {shape}; 1-8 dimensions, each in [1, 2^31)")
            size = math.prod(shape)  # Python integers: an absurd shape cannot wrap around to a small size
            words += size
            if words > max_words:
                raise UpdateFormatError(f"update exceeds {max_words} words")
            seen.add(name)
            out.append((name, shape))
        if not out or out[-1] != (TAG_NAME, (TAG_WORDS,)) or TAG_NAME in {n for n, _ in out[:-1]}:
            raise UpdateFormatError(f"the last tensor must be the tag block {TAG_NAME!r} of {TAG_WORDS} words")
        return cls(tuple(out))

    @property
    def words(self) -> int:
        return sum(math.prod(s) for _, s in self.specs)

    @property
    def size_bytes(self) -> int:
        return 8 * self.words

    @property
    def data_words(self) -> int:
        return self.words - TAG_WORDS


def bind(*fields: str | int | bytes) -> bytes:
    """Unambiguous encoding of the context a pad or tag is bound to (length-prefixed fields)."""
    out = bytearray()
    for f in fields:
        b = f.encode() if isinstance(f, str) else f if isinstance(f, bytes) else struct.pack("<Q", f)
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


def keystream_words(key: bytes, words: int) -> np.ndarray:
    """`words` uint64 from AES-256-CTR under a one-use key (so the all-zero counter block is safe)."""
    enc = Cipher(algorithms.AES256(key), modes.CTR(b"\x00" * 16)).encryptor()
    return np.frombuffer(enc.update(bytes(8 * words)), dtype="<u8").astype(np.uint64)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _pads(key: ConsortiumKey, kind: str, federation: str, round_: int, worker: str, nonce: bytes,
          layout: TensorLayout) -> np.ndarray:
    """A contribution's pad for the whole payload: one keystream per tensor, bound to its name and shape."""
    return np.concatenate([
        keystream_words(key.derive(kind.encode() + b"-pad" + bind(federation, round_, worker, nonce, name,
                                                                     _shape(shape))), math.prod(shape))
        for name, shape in layout.specs])


def _tag_vectors(key: ConsortiumKey, kind: str, federation: str, round_: int,
                 layout: TensorLayout) -> list[np.ndarray]:
    """Secret r_j,l (entry 0 for the sample count), uniform mod p_j, shared by the round's participants.

    They depend on the names and shapes of the tensors, so a header that renames or reshapes them fails.
    """
    specs = hashlib.sha256(bind(*(f"{n}:{_shape(s)}" for n, s in layout.specs))).digest()
    out = []
    for j, p in enumerate(TAG_PRIMES):
        for ell in range(TAGS_PER_PRIME):
            sub = key.derive(kind.encode() + b"-tag" + bind(federation, round_, j, ell) + specs)
            out.append(keystream_words(sub, layout.data_words + 1) % np.uint64(p))
    return out


def _tags(m: np.ndarray, samples: int, vectors: list[np.ndarray]) -> np.ndarray:
    """Tag words of integer data m (int64) and a sample count: Σ r_i·m_i + r_0·n mod p_j for each vector."""
    out = np.zeros(TAG_WORDS, dtype=np.uint64)
    for idx, r in enumerate(vectors):
        p = TAG_PRIMES[idx // TAGS_PER_PRIME]
        residues = np.mod(m, p).astype(np.uint64)  # [0, p): products stay below 2^62
        acc = ((residues * r[1:]) % np.uint64(p)).sum(dtype=np.uint64)  # < 2^33 terms of < 2^31: no wrap
        out[idx] = (int(acc) + (samples % p) * int(r[0])) % p
    return out


# --------------------------------------------------------------------------------------------------
# Encrypt, add, decrypt
# --------------------------------------------------------------------------------------------------


def to_fixed(values: np.ndarray, weight: int) -> np.ndarray:
    """round(weight · values · 2^F) as int64; refuses non-finite values and entries beyond MAX_FIXED."""
    v = np.asarray(values, dtype=np.float64) * float(weight) * float(1 << FRAC_BITS)
    if not np.all(np.isfinite(v)):
        raise UpdateFormatError("update holds NaN or infinite values")
    if v.size and float(np.max(np.abs(v))) > MAX_FIXED:
        limit = MAX_FIXED / (1 << FRAC_BITS) / weight
        raise UpdateFormatError(f"update value {float(np.max(np.abs(values))):.3g} exceeds the fixed-point "
                                f"range ±{limit:.3g} at weight {weight}")
    return np.rint(v).astype(np.int64)


@dataclass(frozen=True)
class EncryptedUpdate:
    layout: TensorLayout
    payload: bytes  # layout.size_bytes, little-endian uint64 words
    nonce: bytes  # public; the coordinator lists it with the participant

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.payload).digest()


def encrypt_update(key: ConsortiumKey, federation: str, round_: int, worker: str,
                   tensors: Mapping[str, np.ndarray], num_samples: int, *, kind: str = UPDATE) -> EncryptedUpdate:
    """Encrypt num_samples · tensors for one round: fixed point, tag, pads under a fresh nonce.

    kind UPDATE is a round's contribution; RESTORE re-seeds a restarted coordinator with a global adapter
    (weight 1). The two are keyed apart, so a single worker's update can never pass for a restored aggregate.
    """
    if kind not in KINDS:
        raise UpdateFormatError(f"unknown update kind {kind!r}")
    if kind == RESTORE and num_samples != 1:
        raise UpdateFormatError("a restored aggregate has weight 1")
    if num_samples < 1:
        raise UpdateFormatError(f"an update needs at least one sample, got {num_samples}")
    if TAG_NAME in tensors:
        raise UpdateFormatError(f"tensor name {TAG_NAME!r} is reserved")
    layout = TensorLayout.of(tensors)
    m = np.concatenate([to_fixed(np.ravel(tensors[name]), num_samples) for name, _ in layout.specs[:-1]]
                       or [np.zeros(0, np.int64)])
    tags = _tags(m, num_samples, _tag_vectors(key, kind, federation, round_, layout))
    words = np.concatenate([m.astype(np.uint64), tags])
    nonce = os.urandom(NONCE_BYTES)
    with np.errstate(over="ignore"):
        words += _pads(key, kind, federation, round_, worker, nonce, layout)
    return EncryptedUpdate(layout, words.astype("<u8").tobytes(), nonce)


def add_payload(acc: np.ndarray, payload: bytes | memoryview | np.ndarray) -> None:
    """acc += payload (uint64 words mod 2^64), in place: the coordinator's whole share of the work."""
    words = np.frombuffer(payload, dtype="<u8")
    if words.shape != acc.shape:
        raise UpdateFormatError(f"payload has {words.size} words, the aggregate {acc.size}")
    np.add(acc, words, out=acc)  # uint64 arithmetic wraps: addition mod 2^64


@dataclass(frozen=True)
class Contribution:
    """A participant as the aggregate's header lists it."""

    worker_id: str
    num_samples: int
    nonce: bytes


def decrypt_aggregate(key: ConsortiumKey, federation: str, round_: int, participants: Sequence[Contribution],
                      total_samples: int, layout: TensorLayout, payload: bytes, key_check_value: bytes, *,
                      kind: str = UPDATE, min_participants: int = 1) -> dict[str, np.ndarray]:
    """The sample-weighted mean Σ n_k·w_k / Σ n_k per tensor (float32), or an UpdateCryptoError.

    Nothing is returned unless the key check value matches and every tag verifies,
    so a caller that applies the result only on success never applies a partial
    or tampered adapter. The coordinator holds every single contribution, so it
    could serve one alone as "the aggregate": min_participants is the reader's
    floor against being shown one hospital's own update (a restored aggregate is
    keyed as RESTORE and is a single contribution by design).
    """
    if kind not in KINDS:
        raise UpdateFormatError(f"unknown update kind {kind!r}")
    if kind == UPDATE and len(participants) < min_participants:
        raise TamperedAggregate(f"aggregate of round {round_} lists {len(participants)} participant(s); this "
                                f"worker opens only aggregates of at least {min_participants}")
    if kind == RESTORE and (len(participants) != 1 or total_samples != 1):
        raise TamperedAggregate("a restored aggregate is one contribution of weight 1")
    if key_check_value != key.check_value():
        raise WrongConsortiumKey(
            f"the aggregate of round {round_} was made under consortium key {key_check_value.hex() or '(none)'}, "
            f"this worker holds {key.check_value().hex()}: wrong consortium key file")
    if not participants or len(participants) > MAX_PARTICIPANTS:
        raise TamperedAggregate(f"aggregate lists {len(participants)} participants (1-{MAX_PARTICIPANTS} allowed)")
    if len({p.worker_id for p in participants}) != len(participants):
        raise TamperedAggregate("aggregate lists a participant twice")
    if total_samples != sum(p.num_samples for p in participants) or total_samples < 1:
        raise TamperedAggregate(f"sample total {total_samples} is not the sum of the participants' counts")
    if len(payload) != layout.size_bytes:
        raise UpdateFormatError(f"payload is {len(payload)} bytes, its tensors need {layout.size_bytes}")
    words = np.frombuffer(payload, dtype="<u8").astype(np.uint64)
    with np.errstate(over="ignore"):
        for p in participants:
            words -= _pads(key, kind, federation, round_, p.worker_id, p.nonce, layout)
    m = words[:-TAG_WORDS].view(np.int64)
    want = _tags(m, total_samples, _tag_vectors(key, kind, federation, round_, layout))
    got = np.array([int(t) % TAG_PRIMES[i // TAGS_PER_PRIME] for i, t in enumerate(words[-TAG_WORDS:])],
                   dtype=np.uint64)
    if not np.array_equal(want, got):
        raise TamperedAggregate(f"the aggregate of round {round_} fails its integrity tag: its bytes, "
                                "participants or sample total were changed after encryption")
    mean = m.astype(np.float64) / (float(total_samples) * float(1 << FRAC_BITS))
    out, offset = {}, 0
    for name, shape in layout.specs[:-1]:
        size = math.prod(shape)
        out[name] = mean[offset:offset + size].reshape(shape).astype(np.float32)
        offset += size
    return out
