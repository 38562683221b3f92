"""fedfhe-worker: a hospital's worker. `join` takes part in a federation; `generate` runs the split model.

    fedfhe-worker join --coordinator HOST:PORT --fhe HOST:PORT --tls-dir DIR --identity hospital-1 \\
        --data notes.jsonl --eval-data held_out.jsonl --consortium-key consortium.key [--epsilon 8]
    fedfhe-worker generate --fhe HOST:PORT --tls-dir DIR --identity hospital-1 --model smollm2-135m \\
        [--coordinator HOST:PORT --consortium-key consortium.key] --prompt "..."
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

import grpc
import structlog
import torch

from common.config import ConfigError, add_arguments, from_namespace
from common.errors import FedfheError
from common.logs import configure_logging
from common.lwe.params import by_name
from common.messages import config_from_proto
from common.notes import NotesFormatError
from common.stages import Direction
from common.updates import load_key_file
from worker.config import GenerateConfig, JoinConfig
from worker.coordinator_client import CoordinatorClient
from worker.data import load_records
from worker.federation import FederatedWorker, adapter_tensors, lora_config, open_patch
from worker.linears import training_order
from worker.lora import load_lora_state_dict, lora_state_dict
from worker.model import LoraConfig, generate
from worker.runtime import build, tokenizer
from worker.scrub import Scrubber

TOKENIZE_MAX = 4096  # notes are cut to the round's max_seq_len at batch time


async def global_adapter(cfg: GenerateConfig) -> tuple[LoraConfig, dict[str, torch.Tensor], int]:
    """Fetch, verify and decrypt the federated adapter in RAM: (its LoRA settings, its tensors, its round)."""
    assert cfg.consortium_key is not None
    key = load_key_file(cfg.consortium_key)
    async with CoordinatorClient(cfg.coordinator, cfg) as client:
        patch = await client.get_patch(cfg.round)
    mean = open_patch(key, patch.header.federation_id, patch, expected_round=cfg.round,
                      min_participants=cfg.min_aggregate)  # UpdateCryptoError: nothing is applied
    return lora_config(config_from_proto(patch.header.config)), adapter_tensors(mean), patch.header.round


def run_generate(cfg: GenerateConfig) -> int:
    """Greedy generation; with --coordinator, under the federated adapter applied in RAM only."""
    log = structlog.get_logger("fedfhe.worker")
    lora, state, round_ = None, None, 0
    if cfg.coordinator:
        lora, state, round_ = asyncio.run(global_adapter(cfg))  # fails before any model exists
    runtime = build(cfg.mode, cfg.model, by_name(cfg.param_set), lora, fhe_target=cfg.fhe, channel=cfg,
                    pad_pool_bytes=cfg.pad_pool_mb << 20)
    if runtime.engine is not None:  # generation only multiplies forward: no pads for the backward matrices
        runtime.engine.pool.reset(order=[k for k in training_order(runtime.engine.weights)
                                         if k.direction == Direction.FORWARD])
    try:
        base_state = lora_state_dict(runtime.model)  # B = 0: the base model
        tok = tokenizer(cfg.model)
        ids = torch.tensor([tok.encode(cfg.prompt)])

        def run(adapter: dict[str, torch.Tensor], what: str) -> str:
            load_lora_state_dict(runtime.model, adapter)  # strict: a mismatched adapter is refused whole
            start = time.perf_counter()
            out = generate(runtime.model, ids, cfg.max_new_tokens, eos_id=tok.eos_token_id)
            seconds = time.perf_counter() - start
            new = out[ids.shape[1]:]
            log.info("generated", mode=cfg.mode, what=what, tokens=len(new), seconds=round(seconds, 2),
                     ms_per_token=round(1e3 * seconds / max(1, len(new)), 1), adapter_round=round_,
                     bytes_up=runtime.client.bytes_up if runtime.client else 0)
            return tok.decode(new)

        if not cfg.compare_base:
            print(run(state if state is not None else base_state, "adapter" if state is not None else "base"))
        else:
            print(f"base model:        {run(base_state, 'base')!r}")
            if state is not None:
                print(f"federated adapter: {run(state, 'adapter')!r}  (round {round_})")
    finally:
        runtime.close()
    return 0


def run_join(cfg: JoinConfig) -> int:
    assert cfg.consortium_key is not None
    key = load_key_file(cfg.consortium_key)
    tok = tokenizer(cfg.model)
    scrubber = Scrubber() if cfg.scrub_pii else None  # every note, training and held-out, before tokenization
    start = time.perf_counter()
    train = load_records(cfg.data, tok, TOKENIZE_MAX, scrubber=scrubber)
    held_out = load_records(cfg.eval_data, tok, TOKENIZE_MAX, limit=cfg.eval_records or None, scrubber=scrubber)
    structlog.get_logger("fedfhe.worker").info(
        "notes loaded", train=len(train), held_out=len(held_out), scrub_pii=cfg.scrub_pii,
        seconds=round(time.perf_counter() - start, 2))
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
    worker = FederatedWorker(cfg, key, train, held_out, pad_id=int(pad))
    try:
        return asyncio.run(worker.run())
    finally:
        worker.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfhe-worker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    join = sub.add_parser("join", help="take part in a federation until the operator finishes it")
    add_arguments(join, JoinConfig)
    gen = sub.add_parser("generate", help="greedy generation with the split model (and the federated adapter)")
    add_arguments(gen, GenerateConfig)
    args = parser.parse_args(argv)
    try:
        cfg = from_namespace(JoinConfig if args.command == "join" else GenerateConfig, args)
    except ConfigError as exc:
        parser.error(str(exc))
    configure_logging(cfg.log_format, cfg.log_level, cfg.log_file)
    log = structlog.get_logger("fedfhe.worker")
    try:
        if isinstance(cfg, JoinConfig):
            return run_join(cfg)
        assert isinstance(cfg, GenerateConfig)
        return run_generate(cfg)
    except (FedfheError, NotesFormatError) as exc:
        log.error("worker stopped", error=str(exc))
        print(f"fedfhe-worker: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        log.error("worker stopped", code=exc.code().name, error=exc.details())
        print(f"fedfhe-worker: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2 if refused_setup(exc) else 3


# What the coordinator refuses because of this worker's own setup (exit 2, like a bad flag): a certificate it does
# not know or enroll, a wrong consortium key, a second process under the same certificate.
_SETUP_CODES = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS)


def refused_setup(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() in _SETUP_CODES or (exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                                          and "consortium key" in (exc.details() or ""))


if __name__ == "__main__":
    sys.exit(main())
