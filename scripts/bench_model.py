"""SmolLM2 encrypted vs plaintext in one run: stages, layers, full forward and a LoRA training step, with a breakdown.

Its per-stage table and its gRPC forward replace the earlier bench_layer.py.
The FHE node runs as its own process (this script with --node-child; `--node
thread` keeps it in this process) and the worker reaches it through a real gRPC
stream on loopback (mTLS with a throwaway PKI unless --insecure). Three backends
run the same SplitLlama, interleaved, best of --repeat after one warm-up:

- fhe: the base linears on the node over LWE ciphertexts (`--param-set`);
- local: the worker multiplies the same int8 weights itself (same integers
  as fhe with the exact set: the plaintext reference for the encrypted path);
- float: float32 weights (what a worker holding the float model would run).

Sections: (1) every linear stage of layer 0, forward and backward; (2) layer
latency, the four dependent stages of a block ("two passes") timed by hooks on
every block during the full forward; (3) full forward in ms per token; (4) one
training step as `worker.model.train_steps` does it (Adam on LoRA, forward and
backward through every layer). The fhe time is split by wrapping the real
functions in place: worker crypto offline (sampling S and E, A·S, H·S: none
depends on the data), worker crypto online (Δ·X + add, Y − H·S, rounding),
quantization, node GEMM, serialization (wire encode/decode on both sides),
network (gRPC round trip minus all of the former) and the rest of the worker
(torch: norms, attention, LoRA, logits, optimizer).

    python scripts/bench_model.py [--tokens 32] [--batch 1] [--layers 30] [--param-set exact|compact]
        [--repeat 2] [--stage-repeat 5] [--skip-stages | --stages-only] [--skip-train] [--threads 1]
        [--node process|thread] [--insecure] [--json FILE]

On a shared machine use --threads 1: two-thread torch/OpenBLAS slows down many
times over when another tenant holds a core (see BENCHMARKS.md).

The exact set's hints take 85 MB per layer forward and 53 MB backward (4.2 GB for
30 layers, both directions); `--param-set compact` or `--layers N` need less.
`--layers N` keeps the first N blocks: for timing only (the truncated model's
outputs mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_matmul import THREAD_VARS, child_env, cpu_pressure, machine_info, machine_line  # noqa: E402

from common.certs import make_federation_pki  # noqa: E402
from common.config import ChannelConfig, ServerConfig  # noqa: E402
from common.logs import configure_logging  # noqa: E402
from common.lwe import scheme, wire  # noqa: E402
from common.lwe.params import LweParams, by_name  # noqa: E402
from common.lwe.verify import Verifier  # noqa: E402
from common.models import ModelWeights, load_model  # noqa: E402
from common.rpc import RunningServer, start_server  # noqa: E402
from common.stages import Direction, PublicWeights, Stage, WeightKey  # noqa: E402
from fedfhe.v1 import fhe_pb2_grpc  # noqa: E402
from fhe_server.__main__ import SERVICE  # noqa: E402
from fhe_server.node import Limits, Node  # noqa: E402
from fhe_server.service import FheServicer  # noqa: E402
from worker.fhe_client import FheClient  # noqa: E402
from worker.linears import FheEngine, LocalEngine, QuantizedLinears  # noqa: E402
from worker.model import FloatLinears, LoraConfig, SplitLlama, train_steps  # noqa: E402

BACKENDS = ("fhe", "local", "float")


# ------------------------------------------------------------------ instrumentation


class Probe:
    """Accumulates time spent in wrapped functions (any thread); `patch` wraps in place, `close` restores."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._undo: list[Callable[[], None]] = []

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seconds)

    @property
    def phase(self) -> str | None:
        return getattr(self._local, "phase", None)

    def patch(self, owner: Any, attr: str, name: Callable[..., str | None], phase: str | None = None) -> None:
        """Time owner.attr under the label name(*args, **kwargs) (None: do not record)."""
        original = getattr(owner, attr)
        instance_attr = not isinstance(owner, type) and attr in getattr(owner, "__dict__", {})

        def timed(*args: Any, **kwargs: Any) -> Any:
            label = name(*args, **kwargs)
            previous = self.phase
            if phase is not None:
                self._local.phase = phase
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if label is not None:
                    self.add(label, time.perf_counter() - t0)
                self._local.phase = previous

        setattr(owner, attr, timed)
        if isinstance(owner, type | types.ModuleType) or instance_attr:
            self._undo.append(lambda: setattr(owner, attr, original))
        else:  # an instance attribute shadowing the class's method: remove it again
            self._undo.append(lambda: delattr(owner, attr))

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()


def _direction(key: WeightKey) -> str:
    return "fwd" if key.direction == Direction.FORWARD else "bwd"


def instrument_wire(probe: Probe) -> None:
    """Serialization, by the kind of matrix (the node's and the worker's calls have different kinds)."""
    enc_names = {wire.Kind.CIPHERTEXT: "ser.worker_encode", wire.Kind.RESULT: "ser.node_encode",
                 wire.Kind.HINT: "hint.node_encode"}
    dec_names = {wire.Kind.CIPHERTEXT: "ser.node_decode", wire.Kind.RESULT: "ser.worker_decode",
                 wire.Kind.HINT: "hint.worker_decode"}
    probe.patch(wire, "encode", lambda kind, matrix: enc_names[wire.Kind(kind)])
    probe.patch(wire, "decode", lambda data, **k: dec_names.get(k.get("kind"), "ser.other"))


def instrument_node(probe: Probe, node: Node) -> None:
    probe.patch(node, "product", lambda params, key, b: f"node.gemm.{_direction(key)}")
    probe.patch(node, "hint", lambda *a, **k: "hint.node_compute")


def instrument_worker(probe: Probe, client: FheClient, bases: dict[str, Any]) -> None:
    """Wrap the worker crypto, the gRPC round trip and each backend's linears."""
    p = probe
    # encrypt/decrypt set a phase so that their inner products and sampling are attributed.
    p.patch(scheme, "encrypt", lambda *a, **k: "worker.encrypt", phase="encrypt")
    p.patch(scheme, "decrypt", lambda *a, **k: "worker.decrypt", phase="decrypt")
    p.patch(scheme, "sample_gaussian", lambda *a, **k: "worker.offline.sample" if p.phase else None)
    p.patch(scheme, "matmul_mod", lambda *a, **k: {"encrypt": "worker.offline.AS",
                                                   "decrypt": "worker.offline.HS"}.get(p.phase or ""))
    # Pads: made on the critical path (the worker's thread waited for one) or ahead by the pool's thread.
    p.patch(scheme, "make_pad", lambda *a, **k: "worker.offline.pad" if threading.current_thread()
            is threading.main_thread() else "worker.pool.pad")
    p.patch(scheme, "seal", lambda *a, **k: "worker.online.seal")
    p.patch(scheme, "unseal", lambda *a, **k: "worker.online.unseal")
    # The worker's view of one remote product: encode, send, wait, receive, decode.
    p.patch(client, "multiply", lambda key, b: f"roundtrip.{_direction(key)}")
    # The Freivalds checks of every answer (products and hints) before decryption.
    # On the critical path: R·Y against what was expected; the expectation itself is computed while the node
    # works (its own label), hints once per seed.
    p.patch(Verifier, "compare", lambda *a, **k: "worker.verify")
    p.patch(Verifier, "expected", lambda *a, **k: "worker.verify_overlapped")
    for name, base in bases.items():
        p.patch(base, "forward", lambda *a, name=name: f"{name}.linears.fwd")
        p.patch(base, "backward", lambda *a, name=name: f"{name}.linears.bwd")


def breakdown(delta: dict[str, float], total: float) -> dict[str, float]:
    """Seconds per category of one fhe run, from the probe's counters (categories add up to total)."""
    g = lambda k: delta.get(k, 0.0)  # noqa: E731
    offline = (g("worker.offline.sample") + g("worker.offline.AS") + g("worker.offline.HS")
               + g("worker.offline.pad"))  # without a pool: inside encrypt/decrypt; with one: pads made on demand
    online = g("worker.online.seal") + g("worker.online.unseal")
    crypto = g("worker.encrypt") + g("worker.decrypt") + g("worker.offline.pad") + online
    node = g("node.gemm.fwd") + g("node.gemm.bwd")
    ser = g("ser.worker_encode") + g("ser.node_decode") + g("ser.node_encode") + g("ser.worker_decode")
    roundtrip = g("roundtrip.fwd") + g("roundtrip.bwd")
    linears = g("fhe.linears.fwd") + g("fhe.linears.bwd")
    verify = g("worker.verify")
    return {
        "worker_crypto_offline": offline,
        "worker_crypto_online": crypto - offline,
        "worker_verify": verify,
        "worker_quantization": linears - crypto - roundtrip - verify,
        "serialization": ser,
        "node_gemm": node,
        "network_grpc": roundtrip - node - ser,
        "worker_model_rest": total - linears,
    }


BREAKDOWN_LABELS = {
    "worker_crypto_offline": "worker crypto, offline on the critical path (S, E; A·S; H·S; pads not made ahead)",
    "worker_crypto_online": "worker crypto, online (Δ·X + add; Y − H·S; round)",
    "worker_verify": "worker Freivalds checks of the node's answers (products, hints)",
    "worker_quantization": "worker quantize / dequantize",
    "serialization": "serialization (wire encode + decode, both sides)",
    "node_gemm": "node GEMM (W·B mod q)",
    "network_grpc": "network (gRPC loopback, chunking, event loops)",
    "worker_model_rest": "worker model rest (torch: norms, attention, LoRA, logits, optimizer)",
}


# ------------------------------------------------------------------ setup


class NodeThread:
    """The FHE node in this process: a grpc.aio server on its own event loop (shares the GIL with the worker)."""

    def __init__(self, node: Node, server_cfg: ServerConfig) -> None:
        servicer = FheServicer(node)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fhe-node", daemon=True)
        self.thread.start()
        self.running: RunningServer = asyncio.run_coroutine_threadsafe(start_server(
            server_cfg, lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s), [SERVICE]),
            self.loop).result(timeout=60)
        self.port = self.running.port

    def snapshot(self) -> dict[str, float]:
        return {}  # the node's counters are in this process's probe

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class NodeProcess:
    """The FHE node as its own process (as deployed): this script with --node-child; counters over a pipe."""

    def __init__(self, model: str, layers: int, tls_dir: str | None) -> None:
        cmd = [sys.executable, __file__, "--node-child", "--model", model, "--layers", str(layers)]
        cmd += ["--tls-dir", tls_dir] if tls_dir else ["--insecure"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = 0

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the node process exited (rc {self.proc.wait()})")
        self.port = json.loads(line)["port"]

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def snapshot(self) -> dict[str, float]:
        return json.loads(self._ask("snapshot"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self._ask("stop")
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def node_child(args: argparse.Namespace) -> int:
    """Runs in the node process: serve, then answer 'snapshot' with the counters until 'stop'."""
    configure_logging(level="warning")
    mw = load_model(args.model)
    fhe_node = Node(PublicWeights(truncated(mw, args.layers or mw.shape.num_layers)), Limits(hint_cache_entries=1))
    probe = Probe()
    instrument_wire(probe)
    instrument_node(probe, fhe_node)
    cfg = ServerConfig(insecure=True) if args.insecure else ServerConfig(tls_dir=Path(args.tls_dir))
    node = NodeThread(fhe_node, cfg)
    print(json.dumps({"port": node.port}), flush=True)
    for line in sys.stdin:
        if line.strip() == "snapshot":
            print(json.dumps(probe.snapshot()), flush=True)
        elif line.strip() == "stop":
            break
    node.stop()
    print("{}", flush=True)
    return 0


class Counters:
    """This process's probe plus the node's, one snapshot."""

    def __init__(self, probe: Probe, node: NodeThread | NodeProcess) -> None:
        self.probe, self.node = probe, node

    def snapshot(self) -> dict[str, float]:
        return {**self.probe.snapshot(), **self.node.snapshot()}


def truncated(mw: ModelWeights, layers: int) -> ModelWeights:
    """The first `layers` blocks (timing only: a truncated SmolLM2 is not a useful model)."""
    if layers >= mw.shape.num_layers:
        return mw
    return dataclasses.replace(mw, shape=dataclasses.replace(mw.shape, num_layers=layers), layers=mw.layers[:layers])


def token_batch(model_id: str, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, tokens) ids cut from synthetic clinical notes (worker.data), no padding."""
    from common.datagen.generator import hospital_notes, hospital_profiles
    from worker.data import tokenize_notes
    from worker.runtime import tokenizer

    notes, _ = hospital_notes(hospital_profiles(1)[0], n_train=4 * batch + 8, n_eval=0, seed=0)
    stream = [t for ids in tokenize_notes(notes, tokenizer(model_id), max_len=1 << 16) for t in ids]
    need = batch * tokens
    if len(stream) < need:
        stream = (stream * (need // max(1, len(stream)) + 1))[:need]
    ids = torch.tensor(stream[:need], dtype=torch.long).view(batch, tokens)  # (B, T)
    return ids, torch.ones_like(ids)


class LayerClock:
    """Forward hooks on every block: wall time per block forward, while enabled."""

    def __init__(self, model: SplitLlama) -> None:
        self.enabled = False
        self.times: list[float] = [0.0] * len(model.blocks)
        self._t0 = 0.0
        for i, block in enumerate(model.blocks):
            block.register_forward_pre_hook(lambda *_: self._start())
            block.register_forward_hook(lambda *_, i=i: self._stop(i))

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, i: int) -> None:
        if self.enabled:
            self.times[i] = time.perf_counter() - self._t0


# ------------------------------------------------------------------ sections


SETTLE_S = 0.05  # before each timed run: background threads (gRPC event loops) finish what the last run left
ONLINE = "_prepared"  # the fhe backend again, its pads made before the timer starts (the online cost)


def sustained(fn: Callable[[], Any], model: SplitLlama, passes: int = 3) -> float:
    """Seconds per pass of `passes` back-to-back fhe passes that start with an empty pad pool: the pads are made
    while the passes run, so this is what the worker sustains when it computes without pause (training)."""
    pool = model.base.engine.pool
    pool.reset()
    t0 = time.perf_counter()
    for _ in range(passes):
        fn()
    return (time.perf_counter() - t0) / passes


def pads_ready(model: SplitLlama) -> Callable[[], None]:
    """Wait until the fhe engine's pad pool has made every pad it wants (a generous bound: 10 minutes)."""
    engine = model.base.engine

    def wait() -> None:
        engine.pool.wait_full(600)
    return wait


def best_runs(fns: dict[str, Callable[[], Any]], repeat: int, probe: Counters,
              on_run: Callable[[str], None] | None = None,
              prepare: dict[str, Callable[[], Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Interleaved: each round runs every backend once. Keeps, per backend, the fastest run's time and probe delta.

    Round 0 is a warm-up (caches, BLAS buffers, the worker's A) and is not kept. prepare[name]() runs before
    that backend's timer starts (e.g. waiting for the pad pool to be full: the online figure).
    """
    best: dict[str, dict[str, Any]] = {}
    values: dict[str, list[Any]] = {}
    for round_ in range(repeat + 1):
        for name, fn in fns.items():
            if prepare and name in prepare:
                prepare[name]()
            time.sleep(SETTLE_S)
            before = probe.snapshot()
            t0 = time.perf_counter()
            value = fn()
            seconds = time.perf_counter() - t0
            after = probe.snapshot()
            values.setdefault(name, []).append(value)
            if round_ == 0:
                continue
            delta = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
            if name not in best or seconds < best[name]["seconds"]:
                best[name] = {"seconds": seconds, "delta": delta, "value": value}
            if on_run:
                on_run(name)
    for name, b in best.items():
        b["values"] = values[name]  # every round's return value, warm-up first
    return best


def bench_stages(bases: dict[str, Any], weights: PublicWeights, params: LweParams, rows: int, repeat: int,
                 probe: Counters, client: FheClient) -> list[dict[str, Any]]:
    """Every linear stage of layer 0, both directions, rows = batch·tokens activations at once."""
    rng = np.random.default_rng(0)  # benchmark inputs only
    out = []
    for direction in Direction:
        for stage in Stage:
            key = WeightKey(0, stage, direction)
            d_out, d_in = weights.matrix(key).shape
            x = torch.from_numpy(rng.standard_normal((rows, d_in)).astype(np.float32))
            fwd = direction == Direction.FORWARD
            fns = {name: (lambda b=b, s=stage, x=x: b.forward(0, s, x)) if fwd else
                   (lambda b=b, s=stage, x=x: b.backward(0, s, x)) for name, b in bases.items()}
            up0, down0 = client.bytes_up, client.bytes_down
            best = best_runs(fns, repeat, probe)
            runs = repeat + 1
            fhe = best["fhe"]
            parts = breakdown(fhe["delta"], fhe["seconds"])
            parts.pop("worker_model_rest")
            plan = weights.plan(params, key)
            out.append({
                "stage": stage.name, "direction": direction.name.lower(), "d_out": d_out, "d_in": d_in, "rows": rows,
                "act_bits": plan.act_bits, "delta_bits": plan.delta_bits,
                "float_ms": best["float"]["seconds"] * 1e3, "local_ms": best["local"]["seconds"] * 1e3,
                "fhe_ms": fhe["seconds"] * 1e3, "fhe_parts_ms": {k: v * 1e3 for k, v in parts.items()},
                "ratio_vs_local": fhe["seconds"] / best["local"]["seconds"],
                "ratio_vs_float": fhe["seconds"] / best["float"]["seconds"],
                "up_bytes_per_row": (client.bytes_up - up0) / runs / rows,
                "down_bytes_per_row": (client.bytes_down - down0) / runs / rows,
                "hint_bytes": d_out * params.n * params.word_bytes,
            })
    return out


def bench_forward(models: dict[str, SplitLlama], clocks: dict[str, LayerClock], ids: torch.Tensor,
                  mask: torch.Tensor, repeat: int, probe: Counters, client: FheClient) -> dict[str, Any]:
    per_layer: dict[str, list[list[float]]] = {name: [] for name in models}

    def run(name: str) -> Callable[[], None]:
        def fn() -> None:
            clocks[name].enabled = True
            with torch.no_grad():
                models[name](ids, mask)
            clocks[name].enabled = False
        return fn

    def keep_layers(name: str) -> None:
        per_layer.setdefault(name, []).append(list(clocks[name.removesuffix(ONLINE)].times))

    up0, down0 = client.bytes_up, client.bytes_down
    fns = {name: run(name) for name in models}
    fns["fhe" + ONLINE] = run("fhe")  # the same model, its pads made before the timer starts
    best = best_runs(fns, repeat, probe, on_run=keep_layers, prepare={"fhe" + ONLINE: pads_ready(models["fhe"])})
    n_tok = ids.numel()
    n_layers = len(models["fhe"].blocks)
    runs = repeat + 1
    out: dict[str, Any] = {"tokens": n_tok, "layers": n_layers}
    for name, b in best.items():
        # Layer latency: per block the fastest of the runs, then the median block.
        fastest = [min(r[i] for r in per_layer[name]) for i in range(n_layers)]
        out[name] = {"seconds": b["seconds"], "ms_per_token": b["seconds"] * 1e3 / n_tok,
                     "layer_ms": statistics.median(fastest) * 1e3, "layer_ms_min": min(fastest) * 1e3,
                     "layer_ms_max": max(fastest) * 1e3}
    fhe = best["fhe"]
    out["fhe"]["parts_s"] = breakdown(fhe["delta"], fhe["seconds"])
    out["fhe"]["probe_s"] = fhe["delta"]  # the raw counters behind parts_s
    out["ratio_fhe_vs_local"] = fhe["seconds"] / best["local"]["seconds"]
    out["ratio_fhe_vs_float"] = fhe["seconds"] / best["float"]["seconds"]
    out["online_ratio_fhe_vs_float"] = best["fhe" + ONLINE]["seconds"] / best["float"]["seconds"]
    out["fhe" + ONLINE]["parts_s"] = breakdown(best["fhe" + ONLINE]["delta"], best["fhe" + ONLINE]["seconds"])
    out["fhe_sustained_s"] = sustained(fns["fhe"], models["fhe"])
    out["sustained_ratio_fhe_vs_float"] = out["fhe_sustained_s"] / best["float"]["seconds"]
    out["layer_ratio_vs_local"] = out["fhe"]["layer_ms"] / out["local"]["layer_ms"]
    out["up_bytes_per_token_per_layer"] = (client.bytes_up - up0) / runs / n_tok / n_layers
    out["down_bytes_per_token_per_layer"] = (client.bytes_down - down0) / runs / n_tok / n_layers
    return out


def bench_train(models: dict[str, SplitLlama], ids: torch.Tensor, mask: torch.Tensor, repeat: int, probe: Counters,
                client: FheClient, lr: float) -> dict[str, Any]:
    up0, down0 = client.bytes_up, client.bytes_down
    fns = {name: (lambda m=m: train_steps(m, ids, mask, steps=1, lr=lr)[0]) for name, m in models.items()}
    fns["fhe" + ONLINE] = fns["fhe"]
    best = best_runs(fns, repeat, probe, prepare={"fhe" + ONLINE: pads_ready(models["fhe"])})
    runs = repeat + 1
    out: dict[str, Any] = {"tokens": ids.numel(), "layers": len(models["fhe"].blocks)}
    for name, b in best.items():
        out[name] = {"seconds": b["seconds"], "losses": b["values"]}  # loss before each step, warm-up first
    fhe = best["fhe"]
    out["fhe"]["parts_s"] = breakdown(fhe["delta"], fhe["seconds"])
    out["fhe"]["probe_s"] = fhe["delta"]
    d = fhe["delta"]
    out["fhe"]["node_gemm_fwd_s"] = d.get("node.gemm.fwd", 0.0)
    out["fhe"]["node_gemm_bwd_s"] = d.get("node.gemm.bwd", 0.0)
    out["ratio_fhe_vs_local"] = fhe["seconds"] / best["local"]["seconds"]
    out["ratio_fhe_vs_float"] = fhe["seconds"] / best["float"]["seconds"]
    out["verify_fraction_of_step"] = d.get("worker.verify", 0.0) / fhe["seconds"]
    out["online_ratio_fhe_vs_float"] = best["fhe" + ONLINE]["seconds"] / best["float"]["seconds"]
    out["fhe" + ONLINE]["parts_s"] = breakdown(best["fhe" + ONLINE]["delta"], best["fhe" + ONLINE]["seconds"])
    out["fhe_sustained_s"] = sustained(fns["fhe"], models["fhe"])
    out["sustained_ratio_fhe_vs_float"] = out["fhe_sustained_s"] / best["float"]["seconds"]
    out["up_bytes_per_step"] = (client.bytes_up - up0) / runs
    out["down_bytes_per_step"] = (client.bytes_down - down0) / runs
    return out


# ------------------------------------------------------------------ report


def print_report(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    console.print(f"[bold]{r['model']}[/bold] ({r['layers']} layers), {r['param_set']} set, batch {r['batch']} × "
                  f"{r['tokens']} tokens, best of {r['repeat']} interleaved; {r['transport']}")
    console.print(f"machine: {machine_line(r['machine'])}; 1-min load {r['machine']['load_avg_1min']} → "
                  f"{r['load_avg_1min_after']}; CPU pressure after: {r['cpu_pressure_after']}; "
                  f"model load {r['model_load_s']:.0f} s")
    h = r["hints"]
    console.print(f"hints (once per session): {h['bytes'] / 2**20:,.0f} MiB for {h['keys']} matrices in "
                  f"{h['seconds']:.1f} s (node W·A {h['node_compute_s']:.1f} s, encode {h['node_encode_s']:.1f} s, "
                  f"worker decode {h['worker_decode_s']:.1f} s)")
    parts_cols = ("worker_crypto_offline", "worker_crypto_online", "worker_quantization", "serialization",
                  "node_gemm", "network_grpc")
    if r.get("stages"):
        t = Table(title=f"linear stages of layer 0 ({r['batch'] * r['tokens']} rows at once; ms)")
        for col in ("stage", "dir", "shape", "act bits", "float", "local", "fhe", "×local", "×float", "offline",
                    "online", "quant", "ser", "node", "net", "up B/row", "hint MiB"):
            t.add_column(col, justify="right")
        for s in r["stages"]:
            p = s["fhe_parts_ms"]
            t.add_row(s["stage"], s["direction"], f"{s['d_out']}×{s['d_in']}", str(s["act_bits"]),
                      f"{s['float_ms']:.2f}", f"{s['local_ms']:.2f}", f"{s['fhe_ms']:.1f}",
                      f"{s['ratio_vs_local']:.0f}", f"{s['ratio_vs_float']:.0f}",
                      *(f"{p[k]:.1f}" for k in parts_cols), f"{s['up_bytes_per_row']:,.0f}",
                      f"{s['hint_bytes'] / 2**20:.1f}")
        console.print(t)
    sections = []
    if r.get("forward"):
        f = r["forward"]
        t = Table(title=f"full forward ({f['tokens']} tokens, {f['layers']} layers) and layer latency (4 stages, "
                        f"median block)")
        for col in ("backend", "forward s", "ms/token", "×local", "×float", "layer ms", "layer ms/token"):
            t.add_column(col, justify="right")
        for name in (*BACKENDS, "fhe" + ONLINE):
            b = f[name]
            t.add_row(name, f"{b['seconds']:.2f}", f"{b['ms_per_token']:.2f}",
                      f"{b['seconds'] / f['local']['seconds']:.1f}", f"{b['seconds'] / f['float']['seconds']:.1f}",
                      f"{b['layer_ms']:.2f}", f"{b['layer_ms'] / f['tokens']:.3f}")
        console.print(t)
        console.print(f"upload {f['up_bytes_per_token_per_layer'] / 1024:.1f} KiB, download "
                      f"{f['down_bytes_per_token_per_layer'] / 1024:.1f} KiB per token per layer (wire payloads)")
        sections.append(("forward", f))
    if r.get("train"):
        tr = r["train"]
        t = Table(title=f"one training step (train_steps, Adam on LoRA; {tr['tokens']} tokens, {tr['layers']} layers)")
        for col in ("backend", "step s", "×local", "×float", "loss before each step"):
            t.add_column(col, justify="right")
        for name in (*BACKENDS, "fhe" + ONLINE):
            b = tr[name]
            t.add_row(name, f"{b['seconds']:.2f}", f"{b['seconds'] / tr['local']['seconds']:.1f}",
                      f"{b['seconds'] / tr['float']['seconds']:.1f}", " ".join(f"{v:.4f}" for v in b["losses"]))
        console.print(t)
        console.print(f"upload {tr['up_bytes_per_step'] / 2**20:.1f} MiB, download "
                      f"{tr['down_bytes_per_step'] / 2**20:.1f} MiB per step")
        sections.append(("training step", tr))
    if not sections:
        return
    t = Table(title="where the fhe time goes (s, share of the run)")
    t.add_column("part")
    for title, _ in sections:
        t.add_column(title, justify="right")
    for key, label in BREAKDOWN_LABELS.items():
        t.add_row(label, *(f"{s['fhe']['parts_s'][key]:.2f} ({s['fhe']['parts_s'][key] / s['fhe']['seconds']:.0%})"
                           for _, s in sections))
    t.add_row("total", *(f"{s['fhe']['seconds']:.2f}" for _, s in sections))
    console.print(t)


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    ap.add_argument("--param-set", default="exact", choices=["exact", "compact"])
    ap.add_argument("--tokens", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1, help="sequences per batch")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N blocks (timing only; 0: all)")
    ap.add_argument("--repeat", type=int, default=2, help="timed rounds after one warm-up (best is kept)")
    ap.add_argument("--stage-repeat", type=int, default=5, help="timed rounds of the per-stage section")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--skip-stages", action="store_true", help="no per-stage section")
    ap.add_argument("--stages-only", action="store_true", help="only the per-stage section (forward hints only)")
    ap.add_argument("--skip-train", action="store_true", help="no training step (and no backward hints)")
    ap.add_argument("--pad-pool-mb", type=int, default=512,
                    help="the fhe engine's pool of pads made ahead (the worker's default; 0: every pad on demand)")
    ap.add_argument("--node", default="process", choices=["process", "thread"],
                    help="the node in its own process (as deployed) or on a thread of this one (one model load)")
    ap.add_argument("--insecure", action="store_true", help="plaintext gRPC instead of mTLS on loopback")
    ap.add_argument("--threads", default="default",
                    help="BLAS/OpenMP threads of the worker and the node (N or default); 1 is the robust choice on a "
                         "shared machine: 2-thread torch collapses when another tenant holds a core")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--node-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads != "default" and any(os.environ.get(v) != args.threads for v in THREAD_VARS):
        # OpenBLAS and OpenMP read their thread counts at import: start again with them set.
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], child_env(args.threads))
    if args.threads != "default":
        torch.set_num_threads(int(args.threads))
    if args.node_child:
        return node_child(args)
    configure_logging(level="warning")
    started = time.perf_counter()
    params = by_name(args.param_set)
    info = machine_info()
    pki = None
    if args.insecure:
        server_cfg, channel, target_host = ServerConfig(insecure=True), ChannelConfig(insecure=True), "127.0.0.1"
        transport = "gRPC over loopback, plaintext (--insecure)"
    else:
        pki = tempfile.TemporaryDirectory(prefix="bench-pki-")
        make_federation_pki(Path(pki.name), ["hospital-1"], ["localhost", "127.0.0.1"])
        server_cfg = ServerConfig(tls_dir=Path(pki.name))
        channel = ChannelConfig(tls_dir=Path(pki.name), identity="hospital-1")
        target_host = "localhost"
        transport = "gRPC over loopback with mTLS"
    transport += f", node in its own {args.node}"
    node: NodeThread | NodeProcess | None = None
    if args.node == "process":  # loads the model in parallel with this process
        node = NodeProcess(args.model, args.layers, pki.name if pki else None)
    t0 = time.perf_counter()
    mw = load_model(args.model)
    load_s = time.perf_counter() - t0
    mw = truncated(mw, args.layers or mw.shape.num_layers)
    n_layers = mw.shape.num_layers
    weights = PublicWeights(mw)
    probe = Probe()
    instrument_wire(probe)
    if node is None:
        fhe_node = Node(weights, Limits(hint_cache_entries=1))
        instrument_node(probe, fhe_node)
        node = NodeThread(fhe_node, server_cfg)
    elif isinstance(node, NodeProcess):
        node.wait_ready()
    client = FheClient(f"{target_host}:{node.port}", channel, params, mw.model_id)
    counters = Counters(probe, node)
    try:
        engine = FheEngine(client, weights, pool_bytes=args.pad_pool_mb << 20)
        bases = {"fhe": QuantizedLinears(engine),
                 "local": QuantizedLinears(LocalEngine(weights, params)),
                 "float": FloatLinears(mw)}
        instrument_worker(probe, client, bases)
        directions = [Direction.FORWARD] if args.skip_train and args.skip_stages else list(Direction)
        layers = [0] if args.stages_only else range(n_layers)
        keys = [WeightKey(layer, stage, d) for layer in layers for stage in Stage for d in directions]
        down0, t0 = client.bytes_down, time.perf_counter()
        client.prefetch_hints(keys)
        hint_s = time.perf_counter() - t0
        snap = counters.snapshot()
        hints = {"keys": len(keys), "bytes": client.bytes_down - down0, "seconds": hint_s,
                 "node_compute_s": snap.get("hint.node_compute", 0.0),
                 "node_encode_s": snap.get("hint.node_encode", 0.0),
                 "worker_decode_s": snap.get("hint.worker_decode", 0.0)}
        print(f"hints: {hints['bytes'] / 2**20:,.0f} MiB in {hint_s:.1f} s", file=sys.stderr, flush=True)
        lora = LoraConfig()
        models = {name: SplitLlama(mw, base, lora) for name, base in bases.items()}
        clocks = {name: LayerClock(m) for name, m in models.items()}
        ids, mask = token_batch(args.model, args.batch, args.tokens)
        result: dict[str, Any] = {
            "benchmark": "bench_model", "command": " ".join(["bench_model.py", *sys.argv[1:]]),
            "model": args.model, "layers": n_layers, "param_set": args.param_set, "tokens": args.tokens,
            "batch": args.batch, "repeat": args.repeat, "stage_repeat": args.stage_repeat, "transport": transport,
            "node": args.node, "threads": args.threads, "machine": info, "model_load_s": load_s, "hints": hints,
            "lora": {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets), "ffa": lora.ffa},
        }
        if not args.skip_stages:
            result["stages"] = bench_stages(bases, weights, params, ids.numel(), args.stage_repeat, counters,
                                            client)
            print(f"stages done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        if not args.stages_only:
            result["forward"] = bench_forward(models, clocks, ids, mask, args.repeat, counters, client)
        print(f"forward done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        if not args.skip_train and not args.stages_only:
            result["train"] = bench_train(models, ids, mask, args.repeat, counters, client, args.lr)
            print(f"training step done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        result["pad_pool"] = {"limit_mb": args.pad_pool_mb, "peak_bytes": engine.pool.peak_bytes,
                              "made_ahead_columns": engine.pool.made_ahead,
                              "made_on_demand_columns": engine.pool.made_on_demand,
                              "producer_failures": engine.pool.failures}
        result["worker_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        engine.close()
        result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
        result["cpu_pressure_after"] = cpu_pressure()
        result["seconds"] = time.perf_counter() - started
    finally:
        probe.close()
        client.close()
        node.stop()
        if pki is not None:
            pki.cleanup()
    print_report(result)
    print(f"total {result['seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
