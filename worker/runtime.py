"""Builds a worker's split model for a compute mode: `fhe` (encrypted, remote node) or `local` (same arithmetic)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from common.config import ChannelConfig
from common.lwe.params import LweParams
from common.models import ModelWeights, load_model, locate_smollm2_gguf
from common.stages import PublicWeights
from worker.fhe_client import FheClient
from worker.linears import FheEngine, LocalEngine, QuantizedLinears
from worker.model import FloatLinears, LoraConfig, SplitLlama

MODES = ("fhe", "local", "float")


@dataclass
class Runtime:
    model: SplitLlama
    weights: ModelWeights
    client: FheClient | None
    engine: FheEngine | None = None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()  # stops the pad pool and zeroes its pads
        if self.client is not None:
            self.client.close()


DEFAULT_PAD_POOL_BYTES = 512 << 20


def build(mode: str, model_id: str, params: LweParams, lora: LoraConfig | None = None, *,
          fhe_target: str = "", channel: ChannelConfig | None = None, reconnect_seconds: float = 60.0,
          pad_pool_bytes: int = DEFAULT_PAD_POOL_BYTES) -> Runtime:
    """fhe: base linears on the node over LWE; local: the worker multiplies the same int weights; float: reference.

    fhe_target may list several nodes, comma-separated: the worker moves to the next one when a node's
    answer fails verification.
    """
    weights = load_model(model_id)
    client, engine = None, None
    if mode == "fhe":
        if not fhe_target:
            raise ValueError("fhe mode needs the FHE node's address (--fhe HOST:PORT)")
        public = PublicWeights(weights)  # the worker's own plans and check rows come from these
        client = FheClient([t.strip() for t in fhe_target.split(",") if t.strip()],
                           channel or ChannelConfig(insecure=True), params, model_id,
                           weights_digest=public.digest, reconnect_seconds=reconnect_seconds)
        engine = FheEngine(client, public, pool_bytes=pad_pool_bytes)
        base: Any = QuantizedLinears(engine)
    elif mode == "local":
        base = QuantizedLinears(LocalEngine(PublicWeights(weights), params))
    elif mode == "float":
        base = FloatLinears(weights)
    else:
        raise ValueError(f"unknown compute mode {mode!r}; one of {MODES}")
    return Runtime(SplitLlama(weights, base, lora), weights, client, engine)


class ByteTokenizer:
    """The tiny model's tokenizer: UTF-8 bytes (vocab 256)."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


@functools.cache
def tokenizer(model_id: str) -> Any:
    if model_id == "tiny":
        return ByteTokenizer()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = locate_smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
