"""SmolLM2 layer benchmark: encrypted stages vs plaintext in the same run, bytes, hints, full forward.

    python scripts/bench_layer.py [--tokens 16] [--param-set exact] [--skip-model] [--json]

Per stage of layer 0 (QKV, O, GATE_UP, DOWN; forward), times in one process:
plaintext float32 x·Wᵀ; worker encrypt (quantize, A·S + E + Δ·X); node W·B;
worker decrypt (H·S, rounding, dequantize). Then the whole layer (four stages)
and a full 30-layer forward through a real gRPC stream (node on its own event
loop thread) against the float model, in ms per token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import ChannelConfig, ServerConfig
from common.lwe import scheme
from common.lwe.params import by_name
from common.lwe.prg import expand_a, new_seed
from common.lwe.quant import dequantize_product, quantize_tokens
from common.models import load_model
from common.rpc import start_server
from common.stages import Direction, NodeWeights, Stage, WeightKey
from fedfhe.v1 import fhe_pb2_grpc
from fhe_server.__main__ import SERVICE
from fhe_server.service import FheServicer
from worker.fhe_client import FheClient
from worker.linears import FheEngine, QuantizedLinears
from worker.model import FloatLinears, SplitLlama


def best(fn, repeat: int = 3) -> float:
    """Best of `repeat` timed calls after one warm-up call (BLAS threads, caches, allocations)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_stages(weights: NodeWeights, params, tokens: int) -> list[dict]:
    rng = np.random.default_rng(0)  # benchmark inputs only
    seed = new_seed()
    rows = []
    for stage in Stage:
        key = WeightKey(0, stage, Direction.FORWARD)
        w_int, scales = weights.matrix(key), weights.row_scales(key)
        w_float = torch.from_numpy(w_int.astype(np.float32) * scales[:, None])
        d_out, d_in = w_int.shape
        x = rng.standard_normal((tokens, d_in)).astype(np.float32)
        xt = torch.from_numpy(x)
        plan = weights.plan(params, key)
        a = expand_a(seed, d_in, params)
        t0 = time.perf_counter()
        h = weights.hint(params, seed, key)
        hint_s = time.perf_counter() - t0
        plain = best(lambda xt=xt, w=w_float: xt @ w.T)
        x_int, sx = quantize_tokens(x, plan.act_bits)
        enc_box = {}

        def encrypt(x_int=x_int, a=a, plan=plan, box=enc_box):
            box["e"] = scheme.encrypt(params, a, np.ascontiguousarray(x_int.T), plan.delta_bits)

        t_enc = best(encrypt)
        enc = enc_box["e"]
        y = weights.evaluate(params, key, enc.b)
        t_node = best(lambda key=key, b=enc.b: weights.evaluate(params, key, b))

        def decrypt(y=y, h=h, s=enc.s, plan=plan, sc=scales, sx=sx):
            dequantize_product(scheme.decrypt(params, y, h, s, plan.delta_bits), sc, sx)

        t_dec = best(decrypt)
        total = t_enc + t_node + t_dec
        rows.append({"stage": stage.name, "d_out": d_out, "d_in": d_in, "tokens": tokens,
                     "act_bits": plan.act_bits, "plaintext_ms": plain * 1e3, "encrypt_ms": t_enc * 1e3,
                     "node_ms": t_node * 1e3, "decrypt_ms": t_dec * 1e3, "encrypted_ms": total * 1e3,
                     "ratio": total / plain, "up_bytes_per_token": d_in * params.word_bytes,
                     "down_bytes_per_token": d_out * params.word_bytes,
                     "hint_bytes": d_out * params.n * params.word_bytes, "hint_s": hint_s})
    return rows


def bench_model(model_weights, params, tokens: int) -> dict:
    servicer = FheServicer(NodeWeights(model_weights, hint_cache_entries=1))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    running = asyncio.run_coroutine_threadsafe(start_server(
        ServerConfig(insecure=True), lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s),
        [SERVICE]), loop).result()
    ids = torch.randint(0, model_weights.shape.vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    with FheClient(running.address, ChannelConfig(insecure=True), params, model_weights.model_id) as client:
        t0 = time.perf_counter()
        client.prefetch_hints([WeightKey(layer, stage, Direction.FORWARD)
                               for layer in range(model_weights.shape.num_layers) for stage in Stage])
        hints_s = time.perf_counter() - t0
        enc_model = SplitLlama(model_weights, QuantizedLinears(FheEngine(client)))
        float_model = SplitLlama(model_weights, FloatLinears(model_weights))
        with torch.no_grad():
            up0 = client.bytes_up
            t_enc = best(lambda: enc_model(ids), repeat=1)
            up = client.bytes_up - up0
            t_plain = best(lambda: float_model(ids))
    asyncio.run_coroutine_threadsafe(running.stop(0), loop).result()
    return {"tokens": tokens, "layers": model_weights.shape.num_layers, "hint_download_s": hints_s,
            "encrypted_ms_per_token": t_enc * 1e3 / tokens, "plaintext_ms_per_token": t_plain * 1e3 / tokens,
            "ratio": t_enc / t_plain, "up_bytes_per_token_per_layer": up / tokens / model_weights.shape.num_layers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--param-set", default="exact", choices=["exact", "compact"])
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    parser.add_argument("--skip-model", action="store_true", help="only the per-stage table")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    params = by_name(args.param_set)
    mw = load_model(args.model)
    stages = bench_stages(NodeWeights(mw), params, args.tokens)
    layer = {k: sum(r[k] for r in stages) for k in ("plaintext_ms", "encrypt_ms", "node_ms", "decrypt_ms",
                                                      "encrypted_ms", "up_bytes_per_token", "hint_bytes")}
    layer["ratio"] = layer["encrypted_ms"] / layer["plaintext_ms"]
    result = {"machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads",
              "param_set": args.param_set, "model": args.model, "stages": stages, "layer_forward": layer}
    if not args.skip_model:
        result["model_forward"] = bench_model(mw, params, args.tokens)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model}, {args.param_set} set, T={args.tokens}, {result['machine']}")
    print(f"{'stage':8} {'shape':>10} {'plain ms':>9} {'enc ms':>8} {'node ms':>8} {'dec ms':>8} "
          f"{'ratio':>6} {'up B/tok':>9} {'hint MB':>8} {'hint s':>7}")
    for r in [*stages, {"stage": "layer", "d_out": 0, "d_in": 0, "hint_s": float("nan"), **layer}]:
        shape = f"{r['d_out']}x{r['d_in']}" if r["d_out"] else "4 stages"
        print(f"{r['stage']:8} {shape:>10} {r['plaintext_ms']:9.3f} {r['encrypt_ms']:8.2f} {r['node_ms']:8.2f} "
              f"{r['decrypt_ms']:8.2f} {r['ratio']:6.0f} {r['up_bytes_per_token']:9d} "
              f"{r['hint_bytes'] / 2**20:8.1f} {r['hint_s']:7.2f}")
    if "model_forward" in result:
        m = result["model_forward"]
        print(f"full {m['layers']}-layer forward over gRPC: encrypted {m['encrypted_ms_per_token']:.1f} ms/token, "
              f"float {m['plaintext_ms_per_token']:.2f} ms/token (x{m['ratio']:.0f}); "
              f"hints {m['hint_download_s']:.1f} s; "
              f"{m['up_bytes_per_token_per_layer'] / 1024:.1f} KiB up per token per layer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
