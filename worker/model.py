"""The worker's Llama: readable torch where every frozen base linear is a call to a pluggable backend.

A Llama block is sequential, so it has four dependent linear stages (README,
"four dependent stages"): QKV = [q; k; v] on RMSNorm(x), O on the attention
output, GATE_UP = [gate; up] on RMSNorm(h), DOWN on SiLU(gate)·up. Each stage
is one `BaseLinearFn` call: forward y = W·x and backward δx = Wᵀ·δy both go to
the backend (plain float, local quantized, or the encrypted FHE node); the
model holds no base projection weights. Embeddings and norms are frozen
buffers (public); LoRA adapters are ordinary `nn.Linear` modules, so Opacus
computes their per-sample gradients with its own grad samplers.

Generation keeps a KV cache on the worker (`KVCache`, `SplitLlama.forward_cached`):
after one prefill pass over the prompt each step feeds only the new token, so
every stage sends the node one token's ciphertext instead of the whole prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.models import LlamaShape, ModelWeights
from common.stages import STAGE_PROJECTIONS, Stage


class BaseLinears(Protocol):
    """Computes the frozen base projections of one stage of one layer, both directions."""

    def forward(self, layer: int, stage: Stage, x: torch.Tensor) -> torch.Tensor:
        """x (N, d_in) float32 -> W·x as (N, d_out) with the stage's projections stacked."""
        ...

    def backward(self, layer: int, stage: Stage, grad_out: torch.Tensor) -> torch.Tensor:
        """grad_out (N, d_out) -> Wᵀ·grad_out as (N, d_in)."""
        ...


class BaseLinearFn(torch.autograd.Function):
    """One remote (or local) linear stage; no weight gradient: the base model is frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: BaseLinears, layer: int, stage: Stage) -> torch.Tensor:  # type: ignore[override]
        ctx.base, ctx.layer, ctx.stage = base, layer, stage
        lead = x.shape[:-1]
        y = base.forward(layer, stage, x.reshape(-1, x.shape[-1]).detach())
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        lead = grad.shape[:-1]
        gx = ctx.base.backward(ctx.layer, ctx.stage, grad.reshape(-1, grad.shape[-1]).contiguous())
        return gx.reshape(*lead, gx.shape[-1]), None, None, None


def stage_dims(shape: LlamaShape) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every projection."""
    kv = shape.num_kv_heads * shape.head_dim
    h, m = shape.hidden, shape.intermediate
    return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (m, h), "up": (m, h), "down": (h, m)}


def projection_of(proj: str) -> Stage:
    return next(s for s, projs in STAGE_PROJECTIONS.items() if proj in projs)


class FloatLinears:
    """Plain float32 base weights: the reference the quantized and encrypted paths are measured against."""

    def __init__(self, weights: ModelWeights) -> None:
        self.w = [{s: torch.from_numpy(np.concatenate([layer[p] for p in projs])) for s, projs in
                   STAGE_PROJECTIONS.items()} for layer in weights.layers]

    def forward(self, layer: int, stage: Stage, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w[layer][stage].T

    def backward(self, layer: int, stage: Stage, grad_out: torch.Tensor) -> torch.Tensor:
        return grad_out @ self.w[layer][stage]


@dataclass(frozen=True)
class LoraConfig:
    """LoRA (Hu et al. 2021): y = W0·x + (α/r)·B·A·x. FFA-LoRA (Sun et al. 2024): A frozen, only B trained."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    ffa: bool = True  # A frozen from the shared seed: FedAvg of B alone is exact
    seed: int = 0  # shared by the federation; public, not key material


class LoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg: LoraConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.lora_a = nn.Linear(d_in, cfg.rank, bias=False)
        self.lora_b = nn.Linear(cfg.rank, d_out, bias=False)
        self.scale = cfg.alpha / cfg.rank
        self._init_a(gen)
        nn.init.zeros_(self.lora_b.weight)  # the adapter starts as the identity edit
        self.lora_a.weight.requires_grad_(not cfg.ffa)

    def _init_a(self, gen: torch.Generator) -> None:
        with torch.no_grad():  # Kaiming-uniform bound as in the LoRA reference code, from the shared seed
            bound = 1.0 / np.sqrt(self.lora_a.in_features)
            self.lora_a.weight.copy_((torch.rand(self.lora_a.weight.shape, generator=gen) * 2 - 1) * bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_b(self.lora_a(x)) * self.scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


LayerKV = tuple[torch.Tensor, torch.Tensor]  # one layer's (K, V), each (B, nkv, T, hd)


@dataclass(frozen=True)
class KVCache:
    """Every layer's K and V of the tokens decoded so far: K after RoPE, both before the GQA repeat.

    Worker-side plaintext, like every activation: the node never holds state between products.
    """

    layers: tuple[LayerKV, ...]

    @property
    def length(self) -> int:
        """Tokens cached, which is also the absolute position of the next token."""
        return self.layers[0][0].shape[2] if self.layers else 0


class Block(nn.Module):
    input_norm: torch.Tensor  # buffers (public RMSNorm weights), typed for the checker
    post_norm: torch.Tensor

    def __init__(self, layer: int, shape: LlamaShape, weights: ModelWeights, lora: LoraConfig,
                 gen: torch.Generator) -> None:
        super().__init__()
        self.layer, self.shape = layer, shape
        self.register_buffer("input_norm", torch.from_numpy(weights.tensors[f"layers.{layer}.input_norm"]))
        self.register_buffer("post_norm", torch.from_numpy(weights.tensors[f"layers.{layer}.post_norm"]))
        dims = stage_dims(shape)
        self.lora = nn.ModuleDict({p: LoRA(dims[p][1], dims[p][0], lora, gen) for p in lora.targets})

    def _stage(self, base: BaseLinears, stage: Stage, x: torch.Tensor) -> list[torch.Tensor]:
        """The stage's projections of x, each plus its LoRA term when targeted."""
        y = BaseLinearFn.apply(x, base, self.layer, stage)
        dims = stage_dims(self.shape)
        outs = y.split([dims[p][0] for p in STAGE_PROJECTIONS[stage]], dim=-1)
        return [o + self.lora[p](x) if p in self.lora else o
                for p, o in zip(STAGE_PROJECTIONS[stage], outs, strict=True)]

    def forward(self, x: torch.Tensor, base: BaseLinears, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """x + Attn(RMSNorm(x)), then + MLP(RMSNorm(·)), over the whole sequence x (B, T, C)."""
        q, k, v = self._qkv(x, base, cos, sin)
        return self._attend_and_mlp(x, base, q, k, v, mask)

    def forward_cached(self, x: torch.Tensor, base: BaseLinears, cos: torch.Tensor, sin: torch.Tensor,
                       mask: torch.Tensor | None, past: LayerKV | None) -> tuple[torch.Tensor, LayerKV]:
        """The same block for the new tokens x (B, T_new, C) only, attending to past ‖ new keys and values.

        K and V of position j depend on token j alone (RoPE at j, per-token base linears and LoRA), so the
        earlier tokens' are reused from `past` and each base stage sees only the T_new new rows.
        Returns the block's output for the new tokens and the extended (K, V).
        """
        q, k, v = self._qkv(x, base, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, nkv, T_past + T_new, hd)
            v = torch.cat((past[1], v), dim=2)  # (B, nkv, T_past + T_new, hd)
        return self._attend_and_mlp(x, base, q, k, v, mask), (k, v)

    def _qkv(self, x: torch.Tensor, base: BaseLinears, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[q; k; v] = W_qkv·RMSNorm(x) (+ LoRA), then RoPE on q and k: q·cos + rotate_half(q)·sin."""
        s = self.shape
        B, T, _ = x.shape
        h = rms_norm(x, self.input_norm, s.rms_eps)
        q, k, v = self._stage(base, Stage.QKV, h)
        q = q.view(B, T, s.num_heads, s.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def _attend_and_mlp(self, x: torch.Tensor, base: BaseLinears, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """h = x + W_o·softmax(q·kᵀ/√hd + mask)·v, then h + W_down·(SiLU(W_gate·RMSNorm(h)) ⊙ W_up·RMSNorm(h)).

        q (B, nh, T_q, hd) are the queries' rows of x (B, T_q, C); k, v (B, nkv, T_k, hd) may be longer (cache).
        """
        s = self.shape
        B, T, _ = x.shape
        rep = s.num_heads // s.num_kv_heads  # grouped-query attention: each kv head serves `rep` q heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, T_k, hd)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T_q, hd)
        att = att.transpose(1, 2).reshape(B, T, s.hidden)  # (B, T_q, C)
        (o,) = self._stage(base, Stage.O, att)
        x = x + o
        h = rms_norm(x, self.post_norm, s.rms_eps)
        gate, up = self._stage(base, Stage.GATE_UP, h)
        (down,) = self._stage(base, Stage.DOWN, F.silu(gate) * up)
        return x + down


class SplitLlama(nn.Module):
    """Causal LM whose base linears run on `base`; logits from the tied embedding, on the worker."""

    embed: torch.Tensor  # buffers, typed for the checker
    norm: torch.Tensor
    inv_freq: torch.Tensor

    def __init__(self, weights: ModelWeights, base: BaseLinears, lora: LoraConfig | None = None) -> None:
        super().__init__()
        self.shape, self.base = weights.shape, base
        lora = lora or LoraConfig()
        gen = torch.Generator().manual_seed(lora.seed)
        self.register_buffer("embed", torch.from_numpy(weights.tensors["embed"]))
        self.register_buffer("norm", torch.from_numpy(weights.tensors["norm"]))
        self.blocks = nn.ModuleList([Block(i, self.shape, weights, lora, gen) for i in range(self.shape.num_layers)])
        hd = self.shape.head_dim
        self.register_buffer("inv_freq", 1.0 / self.shape.rope_theta ** (torch.arange(0, hd, 2).float() / hd),
                             persistent=False)

    def _rope(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of θ_{p,i} = p·θ^(-2i/hd) at the absolute positions p = start … start + T − 1."""
        freqs = torch.arange(start, start + T, dtype=torch.float32)[:, None] * self.inv_freq[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        return emb.cos(), emb.sin()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.embed[input_ids]  # (B, T, C)
        cos, sin = self._rope(0, T)
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T) causal
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]  # padding keys masked out
            mask = mask | torch.eye(T, dtype=torch.bool)  # a padded query still attends to itself: no NaN rows
        for block in self.blocks:
            x = block(x, self.base, cos, sin, mask)
        return rms_norm(x, self.norm, self.shape.rms_eps) @ self.embed.T  # (B, T, vocab)

    def forward_cached(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T_new, vocab) of the new tokens input_ids (B, T_new) after the cached ones, and the new cache.

        The new tokens sit at absolute positions p = cache.length … cache.length + T_new − 1 (their RoPE
        angles) and token p attends to every position ≤ p; with cache=None this is the prefill, equal to
        `forward(input_ids)`. Every base stage carries the T_new new rows only: through the FHE node one
        token's ciphertext per stage per generated token. No padding: every row of the batch has the same
        length (`generate` decodes one sequence).
        """
        start = 0 if cache is None else cache.length
        T = input_ids.shape[1]
        x = self.embed[input_ids]  # (B, T_new, C)
        cos, sin = self._rope(start, T)
        # Query i (position start + i) sees key j iff j ≤ start + i; a single new token sees everything.
        mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool).tril(start)[None, None]  # (1, 1, T, T_k)
        layers = []
        for i, block in enumerate(self.blocks):
            assert isinstance(block, Block)  # for the type checker: ModuleList yields Module
            x, kv = block.forward_cached(x, self.base, cos, sin, mask, None if cache is None else cache.layers[i])
            layers.append(kv)
        logits = rms_norm(x, self.norm, self.shape.rms_eps) @ self.embed.T  # (B, T_new, vocab)
        return logits, KVCache(tuple(layers))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over non-padding targets."""
    targets = input_ids[:, 1:].clone()
    if attention_mask is not None:
        targets[attention_mask[:, 1:] == 0] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def per_sequence_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each sequence over its own non-padding targets.

    Each row depends on that sequence alone, which DP-SGD's per-sample clipping needs.
    """
    B, T, V = logits.shape
    targets = input_ids[:, 1:].clone()
    valid = attention_mask[:, 1:].bool()
    targets[~valid] = 0
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets.reshape(-1), reduction="none").view(B, T - 1)
    return (nll * valid).sum(1) / valid.sum(1).clamp(min=1)


@torch.no_grad()
def generate(model: SplitLlama, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None, *,
             use_cache: bool = True) -> list[int]:
    """Greedy decoding of one sequence (input_ids[0]): t_{n+1} = argmax logits(t_1 … t_n), until eos or the limit.

    With the KV cache: one prefill pass over the prompt, then one token per step (each base stage sees a
    single row). use_cache=False recomputes the whole prefix every step: the reference it must equal.
    """
    ids = input_ids[0].tolist()
    if max_new_tokens <= 0:
        return ids
    if not use_cache:
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos_id:
                break
        return ids
    logits, cache = model.forward_cached(input_ids[:1])
    for n in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos_id or n == max_new_tokens - 1:
            break  # no forward for a token that will not be followed
        logits, cache = model.forward_cached(torch.tensor([[nxt]]), cache)
    return ids


def train_steps(model: SplitLlama, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int,
                lr: float) -> list[float]:
    """A few Adam steps on the trainable (LoRA) parameters; returns the loss before each step."""
    opt = torch.optim.Adam(trainable_parameters(model), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = next_token_loss(model(input_ids, attention_mask), input_ids, attention_mask)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
