"""fedfhe-worker: a hospital's worker. `generate` runs the split model on a prompt (encrypted by default).

    fedfhe-worker generate --fhe 127.0.0.1:50051 --insecure --model smollm2-135m --prompt "..."
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
import torch

from common.config import ChannelConfig, LogConfig, add_arguments, from_namespace, opt
from common.logs import configure_logging
from common.lwe.params import PARAM_SETS, by_name
from common.models import MODEL_IDS
from worker.model import generate
from worker.runtime import MODES, build, tokenizer


@dataclass(frozen=True)
class WorkerConfig(ChannelConfig, LogConfig):
    fhe: str = opt("", help="FHE node address HOST:PORT (compute mode fhe)")
    mode: str = opt("fhe", help="compute mode: fhe (encrypted), local (same arithmetic, own CPU), float",
                    choices=list(MODES))
    model: str = opt("tiny", help="base model", choices=list(MODEL_IDS))
    param_set: str = opt("exact", help="LWE parameter set", choices=sorted(PARAM_SETS))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfhe-worker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="greedy generation with the split model")
    add_arguments(gen, WorkerConfig)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args(argv)
    cfg = from_namespace(WorkerConfig, args)
    configure_logging(cfg.log_format, cfg.log_level, cfg.log_file)
    log = structlog.get_logger("fedfhe.worker")
    runtime = build(cfg.mode, cfg.model, by_name(cfg.param_set), fhe_target=cfg.fhe, channel=cfg)
    try:
        tok = tokenizer(cfg.model)
        ids = torch.tensor([tok.encode(args.prompt)])
        start = time.perf_counter()
        out = generate(runtime.model, ids, args.max_new_tokens, eos_id=tok.eos_token_id)
        seconds = time.perf_counter() - start
        new = out[ids.shape[1]:]
        log.info("generated", mode=cfg.mode, tokens=len(new), seconds=round(seconds, 2),
                 bytes_up=runtime.client.bytes_up if runtime.client else 0)
        print(tok.decode(new))
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
