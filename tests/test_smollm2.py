"""SmolLM2-135M, all 30 layers: encrypted == local quantized, cost of quantization, exact backward, training.

Marked slow (minutes on a 2-core CPU, ~12 GB RAM): `bash scripts/test.sh -m slow`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ServerThread
from test_split_model import dequantized

from common.config import ChannelConfig, ServerConfig
from common.lwe.params import EXACT
from common.models import load_model
from common.rpc import start_server
from common.stages import PublicWeights
from fedfhe.v1 import fhe_pb2_grpc
from fhe_server.__main__ import SERVICE
from fhe_server.node import Limits, Node
from fhe_server.service import FheServicer
from worker.fhe_client import FheClient
from worker.linears import FheEngine, LocalEngine, QuantizedLinears
from worker.model import (
    FloatLinears,
    LoraConfig,
    SplitLlama,
    generate,
    next_token_loss,
    train_steps,
    trainable_parameters,
)
from worker.runtime import tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
NOTES = (Path(__file__).parent / "data" / "clinical_notes.txt").read_text().strip().splitlines()
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"), seed=1)


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def client(smol) -> Iterator[FheClient]:
    servicer = FheServicer(Node(PublicWeights(smol), Limits(hint_cache_entries=4)))

    async def start():
        return await start_server(ServerConfig(insecure=True),
                                  lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s), [SERVICE])

    thread = ServerThread(start)
    with FheClient(thread.running.address, ChannelConfig(insecure=True), EXACT, "smollm2-135m") as c:
        yield c
    thread.stop()


def encode(texts: list[str], max_len: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    tok = tokenizer("smollm2-135m")
    seqs = [tok.encode(t)[:max_len] for t in texts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


def test_encrypted_forward_and_generation_equal_local(smol, client) -> None:
    local = SplitLlama(smol, QuantizedLinears(LocalEngine(PublicWeights(smol), EXACT)))
    remote = SplitLlama(smol, QuantizedLinears(FheEngine(client, PublicWeights(smol))))
    ids, mask = encode(NOTES[:1], max_len=24)
    up0, start = client.bytes_up, time.perf_counter()
    with torch.no_grad():
        enc = remote(ids, mask)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        assert torch.equal(enc, local(ids, mask))
    print(f"\nencrypted 30-layer forward: {ids.shape[1]} tokens in {seconds:.1f} s (hints fetched on first use), "
          f"{(client.bytes_up - up0) / ids.shape[1] / 30 / 1024:.0f} KiB up per token per layer")
    prompt = torch.tensor([tokenizer("smollm2-135m").encode("Patient admitted with chest pain. Diagnosis:")])
    a = generate(remote, prompt, 20)
    assert a == generate(local, prompt, 20)
    print("greedy (encrypted == local):", repr(tokenizer("smollm2-135m").decode(a[prompt.shape[1]:])))


def test_quantization_costs_under_2_percent_cross_entropy(smol) -> None:
    ids, mask = encode(NOTES, max_len=64)
    with torch.no_grad():
        ce_float = float(next_token_loss(SplitLlama(smol, FloatLinears(smol))(ids, mask), ids, mask))
        quant = SplitLlama(smol, QuantizedLinears(LocalEngine(PublicWeights(smol), EXACT)))
        ce_quant = float(next_token_loss(quant(ids, mask), ids, mask))
    rel = ce_quant / ce_float - 1
    print(f"\nheld-out clinical CE: float {ce_float:.4f}, int8 W x planner-width X {ce_quant:.4f} ({rel:+.3%})")
    assert abs(rel) < 0.02


def test_encrypted_lora_gradients_match_plain_autograd_every_layer(smol, client) -> None:
    ids, mask = encode(NOTES[2:3], max_len=16)
    grads = {}
    for name, base in [("fhe", QuantizedLinears(FheEngine(client, PublicWeights(smol)))),
                       ("autograd", FloatLinears(dequantized(smol)))]:
        model = SplitLlama(smol, base, LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up",
                                                                             "down"), ffa=False, seed=2))
        with torch.no_grad():
            for p in trainable_parameters(model):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
        next_token_loss(model(ids, mask), ids, mask).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads["fhe"]) == 30 * 7 * 2
    cos = {n: float(torch.nn.functional.cosine_similarity(g.flatten(), grads["autograd"][n].flatten(), dim=0))
           for n, g in grads["fhe"].items()}
    worst = min(cos, key=cos.get)
    print(f"\nLoRA gradient cosine, encrypted vs plain autograd: min {cos[worst]:.5f} ({worst}), "
          f"median {np.median(list(cos.values())):.6f}")
    assert cos[worst] >= 0.99


def test_lora_steps_through_fhe_lower_clinical_loss(smol, client) -> None:
    model = SplitLlama(smol, QuantizedLinears(FheEngine(client, PublicWeights(smol))), LORA)
    ids, mask = encode(NOTES[3:5], max_len=24)
    losses = train_steps(model, ids, mask, steps=4, lr=3e-3)
    print("\nFHE LoRA training loss:", [round(v, 4) for v in losses])
    assert losses[-1] < losses[0]
