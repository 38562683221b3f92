"""The coordinator's side of secure aggregation for one round: relay keys and shares, then remove the masks.

The coordinator holds no secret here. It collects the members' signed public
keys and fixes the mask set, routes each encrypted share to its recipient, and
after the uploads close asks the survivors to confirm the survivor set and to
reveal, for every member, one share (common.secagg). From t of them it rebuilds
the self-mask seeds of the survivors and the mask keys of the dropouts and
removes their masks from the sum. The result is still under the consortium pads.

Phases: KEYS → SHARES → UPLOADS → CONFIRM → REVEAL → DONE (or FAILED). Each
method checks the phase and the caller, and raises a domain error otherwise;
the Federation (coordinator.state) drives the phases, their timers and events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from common.errors import FailedPrecondition, InvalidArgument
from common.secagg import MAX_MEMBERS, SECRET_BYTES, MemberKeys, RevealedShare, majority, unmask


class MaskPhase(StrEnum):
    KEYS = "keys"  # waiting for the members' signed public keys
    SHARES = "shares"  # waiting for their encrypted shares
    UPLOADS = "uploads"  # the mask set is fixed: masked updates stream in
    CONFIRM = "confirm"  # survivors sign the survivor set
    REVEAL = "reveal"  # survivors reveal one share per member
    DONE = "done"
    FAILED = "failed"


@dataclass
class MaskRound:
    federation: str
    round: int
    threshold_setting: int  # 0: a majority of the mask set
    phase: MaskPhase = MaskPhase.KEYS
    keys: dict[str, MemberKeys] = field(default_factory=dict)
    threshold: int = 0
    members: list[str] = field(default_factory=list)  # who may upload (those who sent their shares)
    shares: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sender -> recipient -> ciphertext
    survivors: list[str] = field(default_factory=list)
    confirmations: dict[str, bytes] = field(default_factory=dict)
    reveals: dict[str, list[RevealedShare]] = field(default_factory=dict)
    outcome: str = ""

    def _expect(self, phase: MaskPhase, what: str) -> None:
        if self.phase != phase:
            raise FailedPrecondition(f"round {self.round}: {what} comes in the {phase.value} phase of secure "
                                     f"aggregation, not in the {self.phase.value} phase")

    # ---- setup ------------------------------------------------------------------------------------

    def advertise(self, worker: str, keys: MemberKeys) -> None:
        self._expect(MaskPhase.KEYS, "a member's public keys")
        if keys.worker != worker:
            raise InvalidArgument(f"keys named {keys.worker!r} sent by {worker!r}")
        if worker in self.keys:
            raise FailedPrecondition(f"{worker!r} already sent its keys for round {self.round}")
        if len(self.keys) >= MAX_MEMBERS:
            raise FailedPrecondition(f"secure aggregation takes at most {MAX_MEMBERS} members")
        self.keys[worker] = keys

    def fix_keys(self) -> tuple[int, list[MemberKeys]]:
        """Close the key phase: the mask set and its threshold (FailedPrecondition if it cannot work)."""
        self._expect(MaskPhase.KEYS, "fixing the mask set")
        keys = [self.keys[w] for w in sorted(self.keys)]
        t = self.threshold_setting or majority(len(keys))
        if not keys or t > len(keys) or t < majority(len(keys)):
            self.phase = MaskPhase.FAILED
            raise FailedPrecondition(f"{len(keys)} member(s) sent keys; threshold {t} needs a majority of the mask "
                                     "set and at most its size")
        self.threshold, self.phase = t, MaskPhase.SHARES
        return t, keys

    def share(self, worker: str, shares: Mapping[str, bytes]) -> None:
        self._expect(MaskPhase.SHARES, "encrypted shares")
        if worker not in self.keys:
            raise FailedPrecondition(f"{worker!r} is not in the mask set of round {self.round}")
        if worker in self.shares:
            raise FailedPrecondition(f"{worker!r} already sent its shares for round {self.round}")
        want = set(self.keys) - {worker}
        if set(shares) != want:
            raise InvalidArgument(f"shares must go to exactly the other {len(want)} member(s) of the mask set")
        if any(not 0 < len(ct) <= 1024 for ct in shares.values()):
            raise InvalidArgument("an encrypted share is empty or larger than 1 KiB")
        self.shares[worker] = dict(shares)

    def fix_shares(self) -> list[str]:
        """Close the share phase: the members who sent shares may upload (and need the threshold)."""
        self._expect(MaskPhase.SHARES, "fixing the members")
        self.members = sorted(self.shares)
        if len(self.members) < self.threshold:
            self.phase = MaskPhase.FAILED
            raise FailedPrecondition(f"{len(self.members)} member(s) sent their shares, fewer than the threshold "
                                     f"{self.threshold}")
        self.phase = MaskPhase.UPLOADS
        return self.members

    def inbox(self, recipient: str) -> dict[str, bytes]:
        """The shares addressed to one member, by sender, from the members who may upload."""
        return {s: self.shares[s][recipient] for s in self.members if s != recipient}

    @property
    def waiting_for(self) -> set[str]:
        """Who the current phase still waits for."""
        if self.phase == MaskPhase.SHARES:
            return set(self.keys) - set(self.shares)
        if self.phase == MaskPhase.CONFIRM:
            return set(self.survivors) - set(self.confirmations)
        if self.phase == MaskPhase.REVEAL:
            return set(self.confirmations) - set(self.reveals)
        return set()

    # ---- recovery ---------------------------------------------------------------------------------

    def check_upload(self, worker: str, masked: bool) -> None:
        if self.phase != MaskPhase.UPLOADS:
            raise FailedPrecondition(f"round {self.round} takes no uploads in the {self.phase.value} phase of "
                                     "secure aggregation")
        if worker not in self.members:
            raise FailedPrecondition(f"{worker!r} is not in the mask set of round {self.round} (it joined late or "
                                     "sent no shares): it takes part in the next round")
        if not masked:
            raise FailedPrecondition(f"round {self.round} uses secure aggregation: the update must be masked "
                                     "(upgrade the worker, or run the coordinator with --no-secagg)")

    def start_recovery(self, survivors: Sequence[str]) -> None:
        self._expect(MaskPhase.UPLOADS, "the survivor set")
        self.survivors = sorted(survivors)
        if len(self.survivors) < self.threshold:
            self.phase = MaskPhase.FAILED
            raise FailedPrecondition(f"{len(self.survivors)} survivor(s), fewer than the threshold "
                                     f"{self.threshold}: the masks cannot be removed")
        self.phase = MaskPhase.CONFIRM

    def confirm(self, worker: str, signature: bytes) -> None:
        self._expect(MaskPhase.CONFIRM, "a confirmation of the survivor set")
        if worker not in self.survivors:
            raise FailedPrecondition(f"{worker!r} is not a survivor of round {self.round}")
        if worker in self.confirmations:
            raise FailedPrecondition(f"{worker!r} already confirmed the survivors of round {self.round}")
        if not 0 < len(signature) <= 256:
            raise InvalidArgument("a survivor signature is 1-256 bytes")
        self.confirmations[worker] = signature

    def fix_confirmations(self) -> dict[str, bytes]:
        self._expect(MaskPhase.CONFIRM, "closing the confirmations")
        if len(self.confirmations) < self.threshold:
            self.phase = MaskPhase.FAILED
            raise FailedPrecondition(f"{len(self.confirmations)} survivor(s) confirmed, fewer than the threshold "
                                     f"{self.threshold}")
        self.phase = MaskPhase.REVEAL
        return dict(self.confirmations)

    def reveal(self, worker: str, shares: Sequence[RevealedShare]) -> None:
        self._expect(MaskPhase.REVEAL, "revealed shares")
        if worker not in self.confirmations:
            raise FailedPrecondition(f"{worker!r} did not confirm the survivors of round {self.round}")
        if worker in self.reveals:
            raise FailedPrecondition(f"{worker!r} already revealed its shares for round {self.round}")
        members = set(self.members)
        if len(shares) > len(members) or any(s.owner not in members or len(s.value) != SECRET_BYTES
                                             or not 1 <= s.index <= MAX_MEMBERS for s in shares):
            raise InvalidArgument("revealed shares name members outside the mask set or have the wrong size")
        self.reveals[worker] = list(shares)

    def remove_masks(self, words: np.ndarray) -> None:
        """Unmask the sum of the survivors' uploads in place (RecoveryError if the shares do not suffice)."""
        self._expect(MaskPhase.REVEAL, "unmasking")
        try:
            unmask(words, self.federation, self.round, [self.keys[m] for m in self.members], self.survivors,
                   [r for shares in self.reveals.values() for r in shares], self.threshold)
        except BaseException:
            self.phase = MaskPhase.FAILED
            raise
        self.phase = MaskPhase.DONE

    @property
    def dropped(self) -> list[str]:
        return [m for m in self.members if m not in self.survivors]
