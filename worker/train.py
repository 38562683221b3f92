"""A hospital's local training: DP-SGD on the LoRA parameters (Opacus), its privacy budget, evaluation.

DP-SGD (Abadi et al. 2016) as Opacus implements it, with the randomness
drawn from the OS CSPRNG rather than torch's generator:

- Poisson sampling: each record joins a step's batch independently with
  probability q = batch_size / N (an empty batch still takes a noisy step).
- Per-sample gradients of the LoRA modules (plain nn.Linear, Opacus' own
  grad samplers; the base linears carry no parameters), clipped to norm C.
- Gaussian noise N(0, σ²C²) on the sum, divided by the expected batch q·N.
- An RDP accountant (PRV as an option) charges every step; the worker refuses
  a round whose steps would take ε past its budget.

σ is either given or calibrated once so that the budget ε is spent exactly
after the federation's planned rounds (RoundConfig.total_rounds).
The loss of each sequence is its own mean token loss, and a batch's loss is
their sum, so a sample's gradient never depends on the other samples.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from common.dp_recipe import MAX_GRAD_NORM, noise_multiplier
from common.lwe.prg import Randomness
from common.training import TrainingConfig
from worker.data import pad_batch
from worker.model import SplitLlama, per_sequence_loss, trainable_parameters

ACCOUNTANTS = ("rdp", "prv")


def _epsilon(accountant: Any, delta: float) -> float:
    """Opacus' ε at δ with its default orders (its note that a larger order might be tighter is muted)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta))


def uniform(n: int, rng: Randomness = os.urandom) -> np.ndarray:
    """n uniform floats in (0, 1) from 53 random bits each (CSPRNG; numpy only transforms the bytes)."""
    bits = np.frombuffer(rng(8 * n), dtype="<u8") >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) / float(1 << 53)


def gaussian(shape: Sequence[int], std: float, rng: Randomness = os.urandom) -> torch.Tensor:
    """N(0, std²) noise from the CSPRNG by Box–Muller.

    Like Opacus' secure_mode, each value is the sum of four Gaussians halved,
    which defeats the floating-point attacks on a single sample (Mironov 2012;
    Holohan & Braghin 2021, §5.1).
    """
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniform(8 * n, rng).reshape(4, 2, n)
    z = np.sqrt(-2.0 * np.log(u[:, 0])) * np.cos(2.0 * np.pi * u[:, 1])  # (4, n) standard normals
    return torch.from_numpy((z.sum(0) / 2.0 * std).astype(np.float32)).reshape(tuple(shape))


def poisson_sample(n: int, rate: float, rng: Randomness = os.urandom) -> np.ndarray:
    """Indices of the records that join a batch: each independently with probability `rate`."""
    return np.flatnonzero(uniform(n, rng) < rate)


class CsprngDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer (clipping, scaling, hooks) with its noise drawn from the OS CSPRNG."""

    def __init__(self, *args, rng: Randomness = os.urandom, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.rng = rng

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = gaussian(p.summed_grad.shape, self.noise_multiplier * self.max_grad_norm, self.rng)
            p.grad = (p.summed_grad + noise.to(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


@dataclass(frozen=True)
class DpSettings:
    enabled: bool = True
    epsilon: float = 8.0
    delta: float | None = None  # default 1/(10·N)
    max_grad_norm: float = MAX_GRAD_NORM
    noise_multiplier: float | None = None  # None: calibrated to spend `epsilon` over the planned rounds
    accountant: str = "rdp"

    def validate(self) -> DpSettings:
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant {self.accountant!r} is not one of {ACCOUNTANTS}")
        if self.enabled and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"--epsilon must be a positive number, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"--delta must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"--max-grad-norm must be positive, got {self.max_grad_norm}")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ValueError(f"--noise-multiplier must be >= 0, got {self.noise_multiplier}")
        return self


@dataclass(frozen=True)
class RoundResult:
    steps: int
    train_loss: float  # mean over the round's steps of the batch's mean sequence loss
    epsilon: float  # cumulative; inf without DP
    num_samples: int  # the FedAvg weight: records this worker trains on
    sampled: int  # sequences actually drawn over the round's steps
    seconds: float


class Trainer:
    """Local rounds of (DP-)training on one hospital's token sequences."""

    def __init__(self, model: SplitLlama, records: Sequence[Sequence[int]], dp: DpSettings, *,
                 pad_id: int = 0, rng: Randomness = os.urandom, ledger: Path | None = None,
                 max_physical_batch: int | None = None) -> None:
        if not records:
            raise ValueError("no training records")
        if any(len(r) < 2 for r in records):
            raise ValueError("every training record needs at least two tokens")
        self.model, self.records, self.dp, self.pad_id, self.rng = model, list(records), dp.validate(), pad_id, rng
        self.delta = dp.delta if dp.delta is not None else 1.0 / (10 * len(self.records))
        self.accountant = create_accountant(dp.accountant) if dp.enabled else None
        self.noise_multiplier = dp.noise_multiplier
        self.steps_taken = 0
        self.ledger = ledger
        self._load_ledger()
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum") if dp.enabled else None
        self.optimizer: torch.optim.Optimizer | None = None  # the current round's
        if max_physical_batch is not None and max_physical_batch < 1:
            raise ValueError(f"max_physical_batch must be >= 1, got {max_physical_batch}")
        self.max_physical_batch = max_physical_batch  # None: one forward per logical step

    def _load_ledger(self) -> None:
        """Resume privacy accounting after a restart: ε spent before must still count."""
        if self.ledger is None or self.accountant is None or not self.ledger.exists():
            return
        state = json.loads(self.ledger.read_text())
        if (state.get("accountant") != self.dp.accountant or state.get("records") != self.num_records
                or state.get("delta") != self.delta):
            raise ValueError(f"privacy ledger {self.ledger} belongs to another accountant, data set or delta "
                             f"({state.get('accountant')}, {state.get('records')} records, delta {state.get('delta')})")
        if self.noise_multiplier is not None and state["noise_multiplier"] != self.noise_multiplier:
            raise ValueError(f"privacy ledger {self.ledger} was spent at noise multiplier "
                             f"{state['noise_multiplier']}, not {self.noise_multiplier}")
        self.accountant.history = [tuple(h) for h in state["history"]]
        self.noise_multiplier = state["noise_multiplier"]
        self.steps_taken = int(state["steps"])

    def _save_ledger(self) -> None:
        if self.ledger is None or self.accountant is None:
            return
        tmp = self.ledger.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:  # on disk before the update that spent it is released
            json.dump({"accountant": self.dp.accountant, "records": self.num_records,
                       "noise_multiplier": self.noise_multiplier, "steps": self.steps_taken,
                       "delta": self.delta, "history": [list(h) for h in self.accountant.history]}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.ledger)

    @property
    def num_records(self) -> int:
        return len(self.records)

    def sample_rate(self, cfg: TrainingConfig) -> float:
        return min(1.0, cfg.batch_size / self.num_records)

    @property
    def epsilon(self) -> float:
        """ε spent so far at this worker's δ (inf without DP)."""
        if self.accountant is None:
            return math.inf
        return _epsilon(self.accountant, self.delta) if self.steps_taken else 0.0

    def calibrate(self, cfg: TrainingConfig) -> float:
        """σ that spends exactly the budget over cfg.total_rounds rounds (once; later rounds reuse it)."""
        if self.noise_multiplier is None:
            self.noise_multiplier = noise_multiplier(self.dp.epsilon, self.delta, self.sample_rate(cfg),
                                                     cfg.total_rounds * cfg.local_steps, self.dp.accountant)
        return self.noise_multiplier

    def epsilon_after(self, cfg: TrainingConfig) -> float:
        """ε this worker would have spent after one more round of cfg (the accountant itself is untouched)."""
        if self.accountant is None:
            return math.inf
        trial = copy.deepcopy(self.accountant)
        for _ in range(cfg.local_steps):
            trial.step(noise_multiplier=self.calibrate(cfg), sample_rate=self.sample_rate(cfg))
        return _epsilon(trial, self.delta)

    def refusal(self, cfg: TrainingConfig) -> str | None:
        """Why this worker must decline a round of cfg, or None if its budget allows it."""
        if self.accountant is None:
            return None
        after = self.epsilon_after(cfg)
        if after > self.dp.epsilon * (1 + 1e-9):
            return (f"DP budget: {cfg.local_steps} more steps would take epsilon from {self.epsilon:.3f} to "
                    f"{after:.3f} > {self.dp.epsilon:g} (delta {self.delta:.2g})")
        return None

    def _batch(self, idx: np.ndarray, cfg: TrainingConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch([self.records[i] for i in idx], cfg.max_seq_len, self.pad_id)

    def train_round(self, cfg: TrainingConfig, progress=None) -> RoundResult:  # type: ignore[no-untyped-def]
        """cfg.local_steps optimizer steps on this worker's records; progress(step) is called after each.

        A step that fails (an FHE node's answer rejected, say) raises before its optimizer step, its
        noise and its accountant charge: the adapter, the optimizer and the accountant keep their state
        from the step before, and no per-sample gradient outlives it. The steps that completed stay
        charged and go to the ledger: they drew on the data, even though the caller discards this
        round's adapter (charging what is never released is conservative, never the other way).
        """
        try:
            return self._train_round(cfg, progress)
        except BaseException:
            self._forget_partial_step()
            self._save_ledger()
            self.model.eval()
            raise

    def _forget_partial_step(self) -> None:
        """Drop what an interrupted forward/backward left behind: gradients, per-sample gradients, and
        Opacus' bookkeeping of a backward that never ran (saved inputs, forward counters), which would
        otherwise be paired with the next step's."""
        for p in trainable_parameters(self.model):
            p.grad = None
            for attr in ("grad_sample", "summed_grad"):
                if getattr(p, attr, None) is not None:
                    setattr(p, attr, None)
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0
        for module in self.model.modules():
            if hasattr(module, "activations"):
                module.activations = []  # type: ignore[assignment]
            if hasattr(module, "max_batch_len"):
                del module.max_batch_len

    def _train_round(self, cfg: TrainingConfig, progress=None) -> RoundResult:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        why = self.refusal(cfg)
        if why is not None:
            raise PermissionError(why)
        self.model.train()
        params = trainable_parameters(self.model)
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)  # fresh state every round
        q = self.sample_rate(cfg)
        if self.gsm is not None:
            opt = CsprngDPOptimizer(opt, noise_multiplier=self.calibrate(cfg), max_grad_norm=self.dp.max_grad_norm,
                                    expected_batch_size=max(1, round(q * self.num_records)),
                                    loss_reduction="mean", rng=self.rng)
        self.optimizer = opt  # this round's (its state is checked around an abandoned step in the tests)
        losses, sampled = [], 0
        for step in range(cfg.local_steps):
            opt.zero_grad()
            if self.gsm is not None:
                idx = poisson_sample(self.num_records, q, self.rng)
            else:  # without DP: a uniform batch without replacement
                idx = np.argsort(uniform(self.num_records, self.rng))[:cfg.batch_size]
            sampled += len(idx)
            if len(idx) == 0:  # an empty Poisson batch: zero per-sample gradients, the noise step still happens
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
            else:
                losses.append(self._forward_backward(idx, cfg, opt))
            opt.step()
            if self.accountant is not None:
                self.accountant.step(noise_multiplier=self.calibrate(cfg), sample_rate=q)
            self.steps_taken += 1
            if progress is not None:
                progress(step + 1)
        if self.gsm is not None:  # no per-sample state outlives the round
            for p in params:
                p.grad_sample = None  # type: ignore[attr-defined]
        self._save_ledger()
        self.model.eval()
        return RoundResult(cfg.local_steps, float(np.mean(losses)) if losses else math.nan, self.epsilon,
                           self.num_records, sampled, time.perf_counter() - start)

    def _forward_backward(self, idx: np.ndarray, cfg: TrainingConfig, opt: torch.optim.Optimizer) -> float:
        """Gradients of one logical batch, in physical pieces of at most max_physical_batch; its mean loss.

        As Opacus' BatchMemoryManager does: each piece but the last is clipped per sample and added to
        summed_grad by a skipped step, so the noise is drawn once, on the logical step, and scaled by
        the expected batch as one forward would be. Without DP the pieces' gradients simply add up.
        """
        size = self.max_physical_batch or len(idx)
        pieces = [idx[i:i + size] for i in range(0, len(idx), size)]
        per_seqs = []
        for n, piece in enumerate(pieces, 1):
            ids, mask = self._batch(piece, cfg)
            per_seq = per_sequence_loss((self.gsm or self.model)(ids, mask), ids, mask)  # (b,)
            with warnings.catch_warnings():  # Opacus' hooks on the first LoRA input (embeddings need no grad)
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                if self.gsm is not None:
                    per_seq.sum().backward()
                else:
                    (per_seq.mean() if len(pieces) == 1 else per_seq.sum() / len(idx)).backward()
            per_seqs.append(per_seq.detach())
            if n < len(pieces) and isinstance(opt, DPOptimizer):
                opt.signal_skip_step(do_skip=True)
                opt.step()  # clip and accumulate only
                opt.zero_grad()  # drops this piece's grad_sample, keeps summed_grad
        return float(torch.cat(per_seqs).mean())


@torch.no_grad()
def held_out_loss(model: SplitLlama, records: Sequence[Sequence[int]], max_len: int, batch_size: int = 8,
                  pad_id: int = 0, should_stop: Callable[[], bool] | None = None) -> float | None:
    """Mean next-token cross-entropy per target token over records (held-out notes).

    None if should_stop() turned true between two batches (the caller needs the model back).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(records), batch_size):
        if should_stop is not None and should_stop():
            model.train(was_training)
            return None
        ids, mask = pad_batch(records[start:start + batch_size], max_len, pad_id)
        logits = model(ids, mask)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        valid = mask[:, 1:].bool()
        total += float(nll[valid].sum())
        count += int(valid.sum())
    model.train(was_training)
    return total / max(count, 1)
