"""The worker's configuration: flags and FEDFHE_* environment variables (common.config), validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.config import ChannelConfig, ConfigError, LogConfig, opt
from common.dp_recipe import MAX_GRAD_NORM
from common.lwe.params import PARAM_SETS
from common.models import MODEL_IDS
from worker.runtime import MODES
from worker.train import ACCOUNTANTS, DpSettings


@dataclass(frozen=True)
class WorkerConfig(ChannelConfig, LogConfig):
    fhe: str = opt("", help="FHE node address HOST:PORT (compute mode fhe); several, comma-separated, in order "
                            "of preference: the worker moves to the next when a node's answer fails verification")
    mode: str = opt("fhe", help="compute mode: fhe (encrypted), local (same arithmetic, own CPU), float",
                    choices=list(MODES))
    model: str = opt("tiny", help="base model", choices=list(MODEL_IDS))
    param_set: str = opt("exact", help="LWE parameter set", choices=sorted(PARAM_SETS))
    pad_pool_mb: int = opt(512, help="fhe mode: the most memory (MiB) the pads made ahead by a background thread "
                                     "may take (0: make each pad when its product needs it)")

    def validate(self) -> None:
        if self.mode == "fhe" and not self.fhe:
            raise ConfigError("--mode fhe needs the FHE node's address: --fhe HOST:PORT")
        if not 0 <= self.pad_pool_mb <= 1 << 20:
            raise ConfigError("--pad-pool-mb must be in [0, 1048576]")
        if self.tls_dir is not None and self.identity:
            missing = [n for n in ("ca.pem", f"{self.identity}.pem", f"{self.identity}.key")
                       if not (self.tls_dir / n).is_file()]
            if missing:
                raise ConfigError(f"{', '.join(missing)} not found in {self.tls_dir}: ask your federation admin for "
                                  f"ca.pem, {self.identity}.pem and {self.identity}.key (do not run fedfhe-certs "
                                  "yourself: it would make a new CA that nobody trusts)")
        if self.log_file is not None:
            writable_dir(self.log_file, "--log-file")


def readable_file(path: Path, flag: str) -> None:
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"{flag} {path}: no such readable file")


def writable_dir(path: Path, flag: str) -> None:
    """The file may not exist yet, but its directory must (found out now, not after a round of training)."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: the directory {parent} does not exist or is not writable")


@dataclass(frozen=True)
class GenerateConfig(WorkerConfig):
    coordinator: str = opt("", help="fetch the federated adapter from this coordinator (HOST:PORT)")
    consortium_key: Path | None = opt(None, help="the consortium update key file that opens the adapter")
    round: int = opt(0, help="the round whose global adapter to apply (0: the newest)")
    min_aggregate: int = opt(2, help="open only aggregates of at least this many hospitals")
    prompt: str = opt("", help="text to continue")
    max_new_tokens: int = opt(20, help="tokens to generate")
    compare_base: bool = opt(False, help="also generate with the base model (no adapter), in the same run")

    def validate(self) -> None:
        super().validate()
        if bool(self.coordinator) != (self.consortium_key is not None):
            raise ConfigError("--coordinator and --consortium-key go together (the adapter is encrypted)")
        if self.consortium_key is not None:
            readable_file(self.consortium_key, "--consortium-key")
        if not self.prompt:
            raise ConfigError("--prompt is required")
        if self.round < 0 or self.max_new_tokens < 1:
            raise ConfigError("--round must be >= 0 and --max-new-tokens >= 1")


@dataclass(frozen=True)
class JoinConfig(WorkerConfig):
    coordinator: str = opt("", help="coordinator address HOST:PORT")
    data: Path | None = opt(None, help="this hospital's training notes (JSONL or CSV with a text column)")
    eval_data: Path | None = opt(None, help="held-out notes to evaluate each round's global adapter on")
    eval_records: int = opt(32, help="evaluate on at most this many held-out notes")
    consortium_key: Path | None = opt(None, help="the consortium update key file (0600; made by fedfhe-keygen)")
    epsilon: float = opt(8.0, help="this hospital's DP budget epsilon over the whole federation")
    delta: float = opt(0.0, help="DP delta (0: 1/(10·N) for N training records)")
    no_dp: bool = opt(False, help="train WITHOUT differential privacy (comparison runs only; shown everywhere)")
    max_grad_norm: float = opt(MAX_GRAD_NORM, help="DP-SGD per-sample clipping norm C (the DP recipe's)")
    noise_multiplier: float = opt(0.0, help="DP-SGD noise multiplier sigma (0: calibrated to spend --epsilon "
                                            "over the federation's planned rounds)")
    accountant: str = opt("rdp", help="privacy accountant", choices=list(ACCOUNTANTS))
    physical_batch: int = opt(32, help="notes per forward pass: a larger (Poisson) batch is split into pieces whose "
                                       "gradients are added before the one clip-and-noise step (0: never split)")
    metrics_file: Path | None = opt(None, help="append one JSON line per round event (losses, epsilon, bytes)")
    privacy_ledger: Path | None = opt(None, help="JSON file keeping the DP accountant's history across restarts "
                                                 "(no data in it; without it a restarted worker starts at epsilon 0)")
    reconnect_seconds: float = opt(120.0, help="keep retrying an unreachable coordinator this long")
    min_aggregate: int = opt(2, help="open only aggregates of at least this many hospitals (the coordinator "
                                     "holds each contribution and could otherwise serve one alone)")
    progress: bool = opt(False, help="show progress bars for local steps and hint downloads")
    scrub_pii: bool = opt(True, help="replace identifiers (names, IDs, contacts, addresses, dates, ...) in every "
                                     "note with typed placeholders before tokenization (worker.scrub); "
                                     "--no-scrub-pii trains on the raw text (comparison runs only)")
    rotate_seed_rounds: int = opt(1, help="a fresh public seed (a new LWE matrix A, new hints) every this many "
                                          "rounds, set up after submitting (0: one seed for the whole run)")
    replay_seed: int = opt(0, help="draw batch sampling and DP noise from an AES-CTR stream keyed by this seed "
                                   "and the worker name, so a run can be repeated exactly (comparisons only: "
                                   "noise that can be replayed protects nothing; 0: the OS CSPRNG)")

    def validate(self) -> None:
        super().validate()
        if not self.coordinator:
            raise ConfigError("--coordinator HOST:PORT is required")
        if self.data is None or self.consortium_key is None:
            raise ConfigError("--data and --consortium-key are required")
        if (self.eval_records < 0 or self.reconnect_seconds < 0 or self.min_aggregate < 1 or self.replay_seed < 0
                or self.rotate_seed_rounds < 0 or self.physical_batch < 0):
            raise ConfigError("--eval-records, --reconnect-seconds, --replay-seed, --rotate-seed-rounds and "
                              "--physical-batch must be >= 0, --min-aggregate >= 1")
        if not self.no_dp and self.privacy_ledger is None:
            raise ConfigError("--privacy-ledger FILE is required with DP: it keeps the epsilon spent across "
                              "restarts (a restarted worker must not start again from 0)")
        readable_file(self.data, "--data")
        readable_file(self.consortium_key, "--consortium-key")
        if self.eval_data is not None:
            readable_file(self.eval_data, "--eval-data")
        for path, flag in ((self.privacy_ledger, "--privacy-ledger"), (self.metrics_file, "--metrics-file")):
            if path is not None:
                writable_dir(path, flag)
        try:
            self.dp_settings()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def dp_settings(self) -> DpSettings:
        return DpSettings(enabled=not self.no_dp, epsilon=self.epsilon, delta=self.delta or None,
                          max_grad_norm=self.max_grad_norm, noise_multiplier=self.noise_multiplier or None,
                          accountant=self.accountant).validate()
