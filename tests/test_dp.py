"""Differential privacy at a hospital: clipping, noise, accounting, the budget, and an empirical canary test."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from canaries import make_canaries, plant_canaries
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant, create_accountant
from scipy import stats

from common.datagen.generator import generate_dataset
from common.dp_recipe import MAX_GRAD_NORM
from common.lwe.params import EXACT
from common.lwe.prg import DeterministicRandomness
from common.notes import load_notes
from common.training import TrainingConfig
from worker.data import pad_batch, tokenize_notes
from worker.model import LoraConfig, per_sequence_loss, trainable_parameters
from worker.runtime import ByteTokenizer, build
from worker.train import CsprngDPOptimizer, DpSettings, Trainer, gaussian, poisson_sample, uniform

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")
TOK = ByteTokenizer()
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def tiny_runtime(targets=("q", "v", "down"), rank: int = 4, ffa: bool = True, seed: int = 1,  # type: ignore[no-untyped-def]
                 mode: str = "local", **kw):
    return build(mode, "tiny", EXACT, LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets, ffa=ffa, seed=seed),
                 **kw)


def records(n: int, seed: int = 0) -> list[list[int]]:
    return tokenize_notes([c.text for c in make_canaries(n, seed)], TOK, 64)


def test_csprng_gaussian_and_sampling_have_the_right_distribution() -> None:
    z = gaussian((400_000,), 2.5).numpy().astype(np.float64)
    assert abs(z.std() / 2.5 - 1) < 0.01 and abs(z.mean()) < 0.02
    assert stats.kstest(z / 2.5, "norm").pvalue > 1e-3
    u = uniform(200_000)
    assert 0 < u.min() and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-3
    picks = [len(poisson_sample(1000, 0.05)) for _ in range(200)]
    assert abs(np.mean(picks) - 50) < 2.5  # Binomial(1000, 0.05): sd of the mean 0.49
    # deterministic randomness in tests gives reproducible draws; the default is the OS CSPRNG
    a, b = gaussian((5,), 1.0, DeterministicRandomness(3)), gaussian((5,), 1.0, DeterministicRandomness(3))
    assert torch.equal(a, b) and not torch.equal(gaussian((5,), 1.0), gaussian((5,), 1.0))


@pytest.mark.parametrize("clip", [1e-3, 1e-1, 1e3])
def test_every_per_sample_gradient_is_clipped_to_c(clip: float) -> None:
    rt = tiny_runtime()
    gsm = GradSampleModule(rt.model, batch_first=True, loss_reduction="sum")
    params = trainable_parameters(rt.model)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    recs = records(6)

    def clipped_sum(rows: list[list[int]]) -> torch.Tensor:
        opt = CsprngDPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                                expected_batch_size=1, loss_reduction="mean")
        opt.zero_grad()
        ids, mask = pad_batch(rows, 64)
        per_sequence_loss(gsm(ids, mask), ids, mask).sum().backward()
        raw = torch.cat([p.grad_sample.reshape(len(rows), -1) for p in params], 1).norm(dim=1)
        opt.pre_step()  # clip, accumulate, (zero) noise, scale by 1/expected batch
        return torch.cat([p.grad.reshape(-1) for p in params]), raw

    singles = []
    for row in recs:
        g, raw = clipped_sum([row])
        singles.append(g)
        assert g.norm() <= clip * (1 + 1e-5)
        if raw[0] > clip:
            assert g.norm() == pytest.approx(clip, rel=1e-3)  # clipped exactly to C
        else:
            assert g.norm() == pytest.approx(float(raw[0]), rel=1e-4)  # small gradients untouched
    batch, raw = clipped_sum(recs)
    # clipping is per sample: the batch gradient is the sum of the individually clipped gradients
    torch.testing.assert_close(batch, torch.stack(singles).sum(0), rtol=1e-4, atol=1e-6 * clip)
    assert clip < 1 or raw.max() < clip  # the large C really left them unclipped


def test_noise_has_standard_deviation_sigma_c() -> None:
    sigma, clip = 1.3, 0.7
    p = torch.nn.Parameter(torch.zeros(300_000))
    opt = CsprngDPOptimizer(torch.optim.SGD([p], lr=0.0), noise_multiplier=sigma, max_grad_norm=clip,
                            expected_batch_size=1, loss_reduction="mean")
    draws = []
    for _ in range(4):
        p.grad_sample = torch.zeros((0, *p.shape))  # an empty Poisson batch: noise only
        opt.pre_step()
        draws.append(p.grad.detach().numpy().copy())
        opt.zero_grad()
    z = np.concatenate(draws)
    assert abs(z.std() / (sigma * clip) - 1) < 0.05
    assert abs(z.mean()) < 0.01 and abs(stats.kurtosis(z)) < 0.05
    assert np.corrcoef(draws[0], draws[1])[0, 1] < 0.01  # fresh noise each step


def test_reported_epsilon_equals_opacus_accountant_and_the_budget_is_enforced() -> None:
    rt = tiny_runtime()
    recs = records(40)
    cfg = TrainingConfig(local_steps=5, batch_size=8, learning_rate=1e-2, lora_rank=4, lora_alpha=8.0,
                         lora_targets=("q", "v", "down"), max_seq_len=64, total_rounds=3)
    trainer = Trainer(rt.model, recs, DpSettings(epsilon=4.0))
    assert trainer.delta == pytest.approx(1 / 400)  # default δ = 1/(10·N)
    results = [trainer.train_round(cfg) for _ in range(3)]
    sigma, q = trainer.noise_multiplier, 8 / 40
    assert sigma is not None and sigma > 0.5
    for i, res in enumerate(results):
        ref = RDPAccountant()
        for _ in range(cfg.local_steps * (i + 1)):
            ref.step(noise_multiplier=sigma, sample_rate=q)
        assert res.epsilon == pytest.approx(ref.get_epsilon(1 / 400), rel=1e-12)
    assert results[-1].epsilon <= 4.0 and results[-1].epsilon > 3.9  # calibrated: the budget is spent
    assert results[0].epsilon < results[1].epsilon < results[2].epsilon
    # a fourth round would exceed the budget: refused, and the accountant is unchanged
    why = trainer.refusal(cfg)
    assert why is not None and "DP budget" in why and "> 4" in why
    with pytest.raises(PermissionError, match="DP budget"):
        trainer.train_round(cfg)
    assert trainer.epsilon == results[-1].epsilon
    # PRV is an option and is also Opacus' own
    prv = Trainer(tiny_runtime().model, recs, DpSettings(epsilon=4.0, accountant="prv", noise_multiplier=1.0))
    res = prv.train_round(cfg)
    ref = create_accountant("prv")
    for _ in range(cfg.local_steps):
        ref.step(noise_multiplier=1.0, sample_rate=q)
    assert res.epsilon == pytest.approx(ref.get_epsilon(1 / 400), rel=1e-9)


def test_privacy_ledger_survives_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    recs = records(30)
    cfg = TrainingConfig(local_steps=3, batch_size=6, lora_rank=4, lora_alpha=8.0,
                         lora_targets=("q", "v", "down"), max_seq_len=64, total_rounds=4)
    ledger = tmp_path / "ledger.json"
    first = Trainer(tiny_runtime().model, recs, DpSettings(epsilon=5.0), ledger=ledger)
    eps = first.train_round(cfg).epsilon
    again = Trainer(tiny_runtime().model, recs, DpSettings(epsilon=5.0), ledger=ledger)
    assert again.epsilon == pytest.approx(eps) and again.noise_multiplier == first.noise_multiplier
    assert again.train_round(cfg).epsilon > eps
    with pytest.raises(ValueError, match="another accountant, data set or delta"):
        Trainer(tiny_runtime().model, recs[:10], DpSettings(epsilon=5.0), ledger=ledger)
    with pytest.raises(ValueError, match="delta"):  # a larger delta must not buy budget after a restart
        Trainer(tiny_runtime().model, recs, DpSettings(epsilon=5.0, delta=0.01), ledger=ledger)
    with pytest.raises(ValueError, match="noise multiplier"):
        Trainer(tiny_runtime().model, recs, DpSettings(epsilon=5.0, noise_multiplier=0.1), ledger=ledger)


CANARIES = 160  # planted, and as many never-seen ones: the AUC's standard error is about 0.03


def membership_auc(notes_dir: Path, dp: DpSettings, steps: int) -> tuple[float, float, float]:
    """Train on a hospital's notes with planted canaries; AUC of −loss for planted vs never-seen canaries.

    Each canary is one record (no repeats), so DP's per-record guarantee covers it. Full LoRA on every
    projection gives the adapter room to memorize. The float compute mode is used for speed: DP acts on
    the LoRA gradients and is the same in every mode (see test_dp_training_is_identical_in_fhe_and_local_modes).
    """
    notes, planted = plant_canaries(load_notes(notes_dir / "hospital-1" / "train.jsonl"), CANARIES, seed=7)
    control = [c.text for c in make_canaries(CANARIES, seed=8)]
    rt = tiny_runtime(targets=ALL, rank=16, ffa=False, seed=5, mode="float")
    cfg = TrainingConfig(local_steps=max(steps, 1), batch_size=32, learning_rate=5e-3, lora_rank=16,
                         lora_alpha=32.0, lora_targets=ALL, ffa=False, max_seq_len=96, total_rounds=1)
    trainer = Trainer(rt.model, tokenize_notes(notes, TOK, 96), dp, rng=DeterministicRandomness(11))
    if steps:
        trainer.train_round(cfg)

    @torch.no_grad()
    def neg_losses(texts: list[str]) -> np.ndarray:
        ids, mask = pad_batch(tokenize_notes(texts, TOK, 96), 96)
        return -per_sequence_loss(rt.model(ids, mask), ids, mask).numpy()

    members, others = neg_losses(planted), neg_losses(control)
    auc = stats.mannwhitneyu(members, others).statistic / (len(members) * len(others))
    return float(auc), trainer.epsilon, float(-members.mean())


@pytest.mark.timeout(600)
def test_canaries_are_exposed_without_dp_and_hidden_with_it(tmp_path: Path) -> None:
    """A strong attacker (250 steps, full LoRA everywhere) against the default clipping norm, the DP recipe's."""
    generate_dataset(tmp_path, hospitals=1, seed=3, records=[40], global_eval=1)
    auc_untrained, _, _ = membership_auc(tmp_path, DpSettings(enabled=False), steps=0)
    auc_plain, eps_plain, loss_plain = membership_auc(tmp_path, DpSettings(enabled=False), steps=250)
    auc_dp, eps_dp, loss_dp = membership_auc(tmp_path, DpSettings(epsilon=8.0), steps=250)
    print(f"membership AUC: untrained {auc_untrained:.3f}, no DP {auc_plain:.3f} (canary loss {loss_plain:.2f}), "
          f"DP eps={eps_dp:.2f} {auc_dp:.3f} (canary loss {loss_dp:.2f})")
    assert DpSettings().max_grad_norm == MAX_GRAD_NORM == 0.5
    assert math.isinf(eps_plain) and 7.9 < eps_dp <= 8.0
    assert auc_plain >= 0.8
    assert auc_dp <= 0.6
    assert abs(auc_untrained - 0.5) < 0.1  # this sample of canaries is itself near chance


def test_dp_training_is_identical_in_fhe_and_local_modes() -> None:
    """The encrypted path gives the same integers as local, so DP-SGD with the same randomness agrees bit for bit."""

    from conftest import ServerThread

    from common.config import ChannelConfig, ServerConfig
    from common.models import load_model
    from common.rpc import start_server
    from common.stages import PublicWeights
    from fedfhe.v1 import fhe_pb2_grpc
    from fhe_server.__main__ import SERVICE
    from fhe_server.node import Node
    from fhe_server.service import FheServicer
    from worker.lora import lora_state_dict

    servicer = FheServicer(Node(PublicWeights(load_model("tiny"))))

    async def start():  # type: ignore[no-untyped-def]
        return await start_server(ServerConfig(insecure=True),
                                  lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s), [SERVICE])

    thread = ServerThread(start)
    cfg = TrainingConfig(local_steps=2, batch_size=4, learning_rate=1e-2, lora_rank=4, lora_alpha=8.0,
                         lora_targets=("q", "v", "down"), max_seq_len=40, total_rounds=2)
    recs = records(12)
    try:
        states, eps = [], []
        for mode in ("local", "fhe"):
            rt = tiny_runtime(mode=mode, fhe_target=thread.running.address, channel=ChannelConfig(insecure=True))
            trainer = Trainer(rt.model, recs, DpSettings(epsilon=6.0), rng=DeterministicRandomness(4))
            res = trainer.train_round(cfg)
            states.append(lora_state_dict(rt.model))
            eps.append(res.epsilon)
            assert rt.client is None or rt.client.bytes_up > 0
            rt.close()
        assert eps[0] == eps[1] and 0 < eps[0] < 6
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
        assert any(float(v.abs().max()) > 0 for v in states[0].values())
    finally:
        thread.stop()


@pytest.mark.parametrize("dp", [DpSettings(epsilon=6.0), DpSettings(enabled=False)], ids=["dp", "no-dp"])
def test_a_logical_batch_split_into_physical_pieces_trains_the_same_adapter(dp: DpSettings) -> None:
    """Gradient accumulation (the worker's --physical-batch): pieces of 3 from a Poisson batch of about 10 give the
    adapter of one forward per step (same sampling and noise), up to float summation order."""
    from worker.lora import lora_state_dict

    cfg = TrainingConfig(local_steps=3, batch_size=10, learning_rate=1e-2, lora_rank=4, lora_alpha=8.0,
                         lora_targets=("q", "v", "down"), max_seq_len=32, total_rounds=1)
    recs = records(16)
    states, losses, forwards = [], [], []
    for pieces in (None, 3):
        rt = tiny_runtime(mode="float")
        trainer = Trainer(rt.model, recs, dp, rng=DeterministicRandomness(9), max_physical_batch=pieces)
        batch = trainer._batch
        calls = []
        trainer._batch = lambda idx, c, batch=batch, calls=calls: (calls.append(len(idx)), batch(idx, c))[1]  # type: ignore[method-assign]
        res = trainer.train_round(cfg)
        forwards.append(calls)
        states.append(lora_state_dict(rt.model))
        losses.append(res.train_loss)
    assert len(forwards[0]) == 3 and max(forwards[1]) <= 3 and sum(forwards[1]) == sum(forwards[0]) > 9
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().max()) > 1e-4 for v in states[0].values())  # it trained
    with pytest.raises(ValueError, match="max_physical_batch"):
        Trainer(tiny_runtime(mode="float").model, recs, dp, max_physical_batch=0)
