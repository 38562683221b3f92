"""Greedy generation with the KV cache equals recomputing the prefix, token for token, in every compute mode.

The cache is a pure optimisation: float (up to float ties, none on these seeds), local and fhe with the
exact set (bit-exact integer products) must all pick the same tokens as `generate(..., use_cache=False)`.
Through the FHE node every step after the prefill must send one token per stage, not the whole prefix.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from common.lwe.params import EXACT
from common.stages import PublicWeights, WeightKey
from worker.linears import FheEngine, QuantizedLinears
from worker.model import LoraConfig, SplitLlama, generate
from worker.runtime import build

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "gate", "down"), seed=3)
PROMPTS = [[5, 17, 99, 3], [72, 101, 97, 114, 116, 32, 114, 97, 116, 101, 58]]  # the second: b"Heart rate:"
NEW = 10


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model's products are too small to split; on a shared 2-core machine the threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)





def with_adapter(model: SplitLlama, seed: int = 11) -> SplitLlama:
    """A non-zero LoRA B (A is already random), so the adapter terms change the new tokens' activations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("lora_b.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.mark.parametrize("mode", ["float", "local"])
def test_cached_generation_equals_recomputing_the_prefix(tiny, mode: str) -> None:
    adapted = with_adapter(build(mode, "tiny", EXACT, LORA).model)
    base = build(mode, "tiny", EXACT, LORA).model  # B = 0: the adapter must make a difference (positive control)
    outs: dict[str, list[list[int]]] = {"adapted": [], "base": []}
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        for name, model in [("adapted", adapted), ("base", base)]:
            cached = generate(model, ids, NEW)
            assert cached == generate(model, ids, NEW, use_cache=False), (name, prompt)
            assert len(cached) == len(prompt) + NEW and cached[:len(prompt)] == prompt
            outs[name].append(cached)
    assert outs["adapted"] != outs["base"]


def test_cached_logits_follow_the_full_forward(tiny) -> None:
    """Prefill == forward bit for bit; each later chunk's logits == the full forward's rows (float rounding)."""
    model = with_adapter(build("float", "tiny", EXACT, LORA).model)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model.forward_cached(ids[:, :4])
        assert torch.equal(logits, model(ids[:, :4])) and cache.length == 4
        for lo, hi in [(4, 5), (5, 8), (8, 11)]:  # one token, then chunks (the multi-token causal mask)
            logits, cache = model.forward_cached(ids[:, lo:hi], cache)
            torch.testing.assert_close(logits, full[:, lo:hi], rtol=0, atol=1e-4)
        assert cache.length == 11
        k, v = cache.layers[0]
        s = tiny.shape
        assert k.shape == v.shape == (2, s.num_kv_heads, 11, s.head_dim)  # before the GQA repeat


def test_stopping_rule_matches_uncached(tiny) -> None:
    model = with_adapter(build("local", "tiny", EXACT, LORA).model)
    ids = torch.tensor([PROMPTS[1]])
    full = generate(model, ids, NEW, use_cache=False)
    eos = full[len(PROMPTS[1]) + 2]  # the third new token: both must stop at its first occurrence
    out = generate(model, ids, NEW, eos_id=eos)
    assert out == generate(model, ids, NEW, eos_id=eos, use_cache=False)
    assert out[-1] == eos and len(out) <= len(PROMPTS[1]) + 3
    assert generate(model, ids, 0) == PROMPTS[1]


def test_encrypted_cached_generation_is_exact_and_sends_one_token_per_stage(tiny, client) -> None:
    engine = FheEngine(client, PublicWeights(tiny))
    remote = with_adapter(SplitLlama(tiny, QuantizedLinears(engine), LORA))
    local = with_adapter(build("local", "tiny", EXACT, LORA).model)
    calls: list[tuple[WeightKey, int, int]] = []  # (stage key, token columns sent, bytes uploaded)
    product = engine.product

    def counting(key: WeightKey, x_int: np.ndarray) -> np.ndarray:
        up0 = client.bytes_up
        y = product(key, x_int)
        calls.append((key, x_int.shape[1], client.bytes_up - up0))
        return y

    engine.product = counting  # type: ignore[method-assign]
    prompt = PROMPTS[1]
    ids = torch.tensor([prompt])
    cached = generate(remote, ids, NEW)
    per_pass = 4 * tiny.shape.num_layers  # QKV, O, GATE_UP, DOWN in every layer
    # One prefill pass, then one pass per new token except the last (its successor is never needed).
    assert len(calls) == per_pass * NEW
    assert all(n == len(prompt) for _, n, _ in calls[:per_pass])
    steps = calls[per_pass:]
    assert all(n == 1 for _, n, _ in steps)
    step_bytes = [sum(b for _, _, b in steps[i:i + per_pass]) for i in range(0, len(steps), per_pass)]
    assert len(set(step_bytes)) == 1 and step_bytes[0] > 0  # every step uploads the same, one token's worth
    prefill_bytes = sum(b for _, _, b in calls[:per_pass])
    assert step_bytes[0] * len(prompt) <= prefill_bytes * 1.05
    # Exact set: the node's products equal the worker's own, so identical tokens everywhere.
    calls.clear()
    uncached = generate(remote, ids, NEW, use_cache=False)
    assert cached == uncached == generate(local, ids, NEW) == generate(local, ids, NEW, use_cache=False)
    # Without the cache step n re-encrypts all len(prompt) + n tokens of the prefix.
    assert sum(n for _, n, _ in calls) == per_pass * sum(len(prompt) + i for i in range(NEW))
