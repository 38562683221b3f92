"""Start, watch and stop federated rounds against a running coordinator, as the federation's operator.

    python scripts/rounds.py --coordinator HOST:PORT --tls-dir DIR status
    python scripts/rounds.py --coordinator HOST:PORT --tls-dir DIR run --rounds 3 --local-steps 10
    python scripts/rounds.py --coordinator HOST:PORT --tls-dir DIR start      # one round, do not wait
    python scripts/rounds.py --coordinator HOST:PORT --tls-dir DIR watch      # print events until finished
    python scripts/rounds.py --coordinator HOST:PORT --tls-dir DIR finish     # workers exit cleanly

Over mTLS it presents DIR/operator.pem (fedfhe-certs makes it); the coordinator
refuses round control to any other certificate. `--insecure` works on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.config import ChannelConfig
from common.dp_recipe import RECIPE_FIELDS, auto_recipe
from common.errors import FedfheError
from common.training import TrainingConfig
from coordinator.operator import OperatorClient
from fedfhe.v1 import coordinator_pb2 as pb

console = Console()


def show_status(st: pb.GetStatusResponse) -> None:
    console.print(f"federation [bold]{st.federation_id}[/] · round {st.current_round} · min workers "
                  f"{st.min_workers} · keeps {st.keep_rounds} aggregates · buffers "
                  f"{'locked' if st.buffers_locked else 'NOT locked'} in RAM · "
                  f"{st.buffer_bytes_total / 1e6:.2f} MB held{' · finished' if st.finished else ''}")
    workers = Table("worker", "connected", "records", "last round", "ε spent / budget", "PII scrubbed", "note",
                    title="workers")
    for w in st.workers:
        eps = "no DP" if w.no_dp or math.isinf(w.epsilon) else f"{w.epsilon:.3f} / {w.epsilon_budget:g}"
        workers.add_row(escape(w.worker_id), "yes" if w.connected else "no", str(w.num_records), str(w.last_round),
                        eps, "yes" if w.pii_scrubbed else "NO", escape(w.declined))
    console.print(workers)
    rounds = Table("round", "state", "participants", "train loss", "held-out loss", "seconds", "received",
                   "secure aggregation", "reason", title="rounds")
    for r in st.rounds:
        m = r.mask_recovery
        masks = (f"t={m.threshold}, {m.phase}" + (f", dropped {', '.join(m.dropped)}" if m.dropped else "")
                 if r.HasField("mask_recovery") else "off")
        rounds.add_row(str(r.round), r.state, escape(", ".join(p.worker_id for p in r.participants)),
                       _loss(train_loss(r.participants)), _loss(r.eval_loss or math.nan), f"{r.seconds:.1f}",
                       f"{r.bytes_received / 1e6:.2f} MB", escape(masks), escape(r.reason))
    console.print(rounds)


def _loss(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def train_loss(participants: list[pb.Participant] | object) -> float:
    """Mean of the participants' reported training losses, weighted by their samples (nan: none)."""
    pairs = [(p.train_loss, p.num_samples) for p in participants  # type: ignore[attr-defined]
             if math.isfinite(p.train_loss) and p.train_loss > 0]
    total = sum(n for _, n in pairs)
    return sum(loss * n for loss, n in pairs) / total if total else math.nan


def describe(ev: pb.WatchRoundsResponse) -> str:
    """One line per event, as rich markup with every worker-supplied string escaped."""
    kind = ev.WhichOneof("event")
    if kind == "started":
        return f"round {ev.started.round} started (base round {ev.started.base_round})"
    if kind == "closed":
        c = ev.closed
        outcome = "aggregated" if c.outcome == pb.ROUND_OUTCOME_AGGREGATED else "[red]FAILED[/]"
        eps = ", ".join(f"{p.worker_id} {'no-DP' if p.no_dp else f'ε {p.epsilon:.2f}'}" for p in c.participants)
        return (f"round {c.round} {outcome}: {c.total_samples} samples from {escape('[' + eps + ']')}, train loss "
                f"{_loss(train_loss(c.participants))} — {escape(c.reason)}")
    if kind == "finished":
        return f"federation finished after round {ev.finished.last_round}"
    return f"round {getattr(ev, kind).round}: secure aggregation, {kind.replace('_', ' ')}"


async def held_out(op: OperatorClient, closed: pb.RoundClosed, seconds: float) -> str:
    """The round's held-out loss once every participant reported it (or what arrived within `seconds`)."""
    want = {p.worker_id for p in closed.participants}
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        r = next((r for r in (await op.status()).rounds if r.round == closed.round), None)
        got = {e.worker_id for e in r.evaluations} if r is not None else set()
        if r is not None and (want <= got or asyncio.get_running_loop().time() > deadline):
            return f"round {closed.round}: held-out loss {_loss(r.eval_loss or math.nan)} ({len(got)} hospital(s))"
        await asyncio.sleep(0.5)


async def wait_for_workers(op: OperatorClient, names: list[str] | None, timeout: float) -> None:
    """Wait for the named workers, or (none named) for the coordinator's --min-workers, to be connected."""
    if names:
        console.print(f"waiting for {', '.join(names)} to connect …")
        await op.wait_connected(names, timeout=timeout)
        return
    deadline = asyncio.get_running_loop().time() + timeout
    while len(await op.connected()) < (need := (await op.status()).min_workers):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"fewer than {need} workers connected within {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def with_recipe(op: OperatorClient, cfg: TrainingConfig, explicit: set[str]) -> TrainingConfig:
    """`--dp-recipe auto`: the measured recipe for the smallest connected hospital at the smallest ε budget."""
    st = await op.status()
    workers = [w for w in st.workers if w.connected and w.num_records > 0]
    if not workers:
        console.print("[yellow]DP recipe auto: no connected worker reported its notes; using the flags and "
                      "defaults[/]")
        return cfg
    dp = [w for w in workers if not w.no_dp]
    budgets = [w.epsilon_budget for w in dp if math.isfinite(w.epsilon_budget) and w.epsilon_budget > 0]
    if len(budgets) < len(dp):
        console.print("[yellow]DP recipe auto: a DP worker did not report its epsilon budget; using the flags and "
                      "defaults[/]")
        return cfg
    recipe = auto_recipe(min(w.num_records for w in workers), min(budgets) if budgets else None, cfg.total_rounds)
    console.print(escape(recipe.describe(explicit)
                         + "; the clipping norm is each worker's --max-grad-norm, whose default is the recipe's"))
    return recipe.apply(cfg, explicit)


async def main_async(args: argparse.Namespace) -> int:
    channel = ChannelConfig(insecure=args.insecure, tls_dir=args.tls_dir, identity=args.identity)
    values = {f.name: getattr(args, f.name) for f in fields(TrainingConfig) if getattr(args, f.name, None) is not None}
    if args.command == "run":  # workers calibrate DP noise to the planned rounds: plan the ones this runs
        values.setdefault("total_rounds", args.rounds)
    cfg = TrainingConfig(**values).validate()
    explicit = set(values) & set(RECIPE_FIELDS)
    async with OperatorClient(args.coordinator, channel) as op:
        if args.command == "status":
            show_status(await op.status())
        elif args.command == "start":
            if args.dp_recipe == "auto":
                cfg = await with_recipe(op, cfg, explicit)
            started = await op.start_round(cfg, args.deadline)
            console.print(f"round {started.round} started for {', '.join(started.eligible)}")
        elif args.command == "watch":
            async for ev in op.watch():
                console.print(describe(ev))
        elif args.command == "finish":
            console.print(f"finished after round {await op.finish()}")
        elif args.command == "run":
            await wait_for_workers(op, args.wait_for.split(",") if args.wait_for else None, args.wait_seconds)
            if args.dp_recipe == "auto":
                cfg = await with_recipe(op, cfg, explicit)
            for _ in range(args.rounds):
                started, closed = await op.run_round(cfg, args.deadline)
                console.print(describe(pb.WatchRoundsResponse(closed=closed)))
                if closed.outcome == pb.ROUND_OUTCOME_AGGREGATED and args.eval_wait > 0:
                    console.print(await held_out(op, closed, args.eval_wait))
            if args.finish:
                console.print(f"finished after round {await op.finish()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", required=True, help="HOST:PORT")
    p.add_argument("--tls-dir", type=Path, help="directory made by fedfhe-certs (with operator.pem/.key)")
    p.add_argument("--identity", default="operator", help="certificate name in --tls-dir")
    p.add_argument("--insecure", action="store_true", help="plaintext, loopback coordinators only")
    p.add_argument("command", choices=["status", "start", "watch", "finish", "run"])
    p.add_argument("--rounds", type=int, default=1, help="run: how many rounds")
    p.add_argument("--finish", action="store_true", help="run: finish the federation afterwards")
    p.add_argument("--wait-for", help="run: comma-separated workers to wait for first (default: wait for the "
                                      "coordinator's --min-workers)")
    p.add_argument("--wait-seconds", type=float, default=600.0, help="run: how long to wait for them")
    p.add_argument("--eval-wait", type=float, default=300.0,
                   help="run: after each round, wait this long for the hospitals' held-out losses (0: do not)")
    p.add_argument("--deadline", type=float, default=0.0, help="seconds per round (0: the coordinator's default)")
    p.add_argument("--dp-recipe", choices=["auto", "none"], default="auto",
                   help="start/run: auto (default) picks the expected batch, local steps and learning rate from the "
                        "smallest connected hospital's notes, the smallest epsilon budget and the planned rounds, as "
                        "the DP utility benchmark measured them, and prints its choice and the kept fraction it "
                        "predicts; explicit round settings win. none: the settings below")
    defaults = TrainingConfig()
    for f in fields(TrainingConfig):
        kind = type(getattr(defaults, f.name))
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                       type=(lambda s: tuple(s.split(","))) if kind is tuple else
                       (lambda s: s.lower() in ("1", "true", "yes")) if kind is bool else kind,
                       help=f"round setting (default {getattr(defaults, f.name)})")
    args = p.parse_args(argv)
    if not args.insecure and args.tls_dir is None:
        p.error("--tls-dir is required unless --insecure")
    try:
        return asyncio.run(main_async(args))
    except grpc.aio.AioRpcError as exc:
        console.print(f"[red]{exc.code().name}[/]: {escape(exc.details() or '')}")
        return 1
    except FedfheError as exc:  # a round setting no worker could train with
        console.print(f"[red]refused[/]: {escape(str(exc))}")
        return 2
    except TimeoutError as exc:
        console.print(f"[red]timed out[/]: {escape(str(exc))}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
