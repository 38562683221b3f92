"""A worker's LoRA adapter state under stable names: what it encrypts and submits, and loads after aggregation.

The adapters themselves live in `worker.model` (`LoraConfig`, `LoRA`): each
targeted projection adds its low-rank term to its slice of the stage output,

    y = W0·x + (α/r)·B·A·x            (LoRA, Hu et al. 2021, arXiv:2106.09685)

with B zero-initialised, so training starts at the base model. FFA-LoRA (Sun
et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning", ICLR)
keeps A frozen at its shared-seed init and trains only B, so FedAvg of the B
matrices is the exact average of the updates; only trained tensors are state.

Names must not depend on how the model is wrapped: Opacus' GradSampleModule
prefixes every parameter with `_module.`, and the encrypted update binds each
tensor's keystream pad to its name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DP-training wrappers (Opacus' GradSampleModule keeps it as `_module`)."""
    while isinstance(inner := getattr(model, "_module", None), nn.Module):
        model = inner
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trained LoRA tensors, e.g. `blocks.3.lora.q.lora_b.weight`, wrapped or not."""
    return {n: p.detach().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the trained LoRA tensors in place (optimizers keep their references).

    Strict: the names must be exactly the model's trained tensors and the shapes
    must match, so an adapter from another rank, target set or FFA mode is an
    error rather than a partly applied update.
    """
    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise KeyError(f"LoRA state does not fit this model: missing {missing[:4]}{'…' if len(missing) > 4 else ''}, "
                       f"unexpected {unexpected[:4]}{'…' if len(unexpected) > 4 else ''}")
    for name, p in params.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(state[name].shape)}, the model has {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
