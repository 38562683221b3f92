"""What every participant of a round trains with: the operator's settings, checked once, as a domain type.

The coordinator passes it through untouched (it never trains); workers build
their LoRA adapter and DP-SGD steps from it. `common.messages` converts it
to and from fedfhe.v1.RoundConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import InvalidArgument
from common.models import PROJECTIONS


@dataclass(frozen=True)
class TrainingConfig:
    """What every participant of a round trains with (fedfhe.v1.RoundConfig)."""

    local_steps: int = 10
    batch_size: int = 8
    learning_rate: float = 5e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    ffa: bool = True  # FFA-LoRA: A frozen from lora_seed, only B trained, so FedAvg is exact
    lora_seed: int = 0
    max_seq_len: int = 128
    total_rounds: int = 1  # planned rounds: DP noise is calibrated to spend the budget over them

    def validate(self) -> TrainingConfig:
        checks = [
            (1 <= self.local_steps <= 100_000, f"local_steps {self.local_steps} not in [1, 100000]"),
            (1 <= self.batch_size <= 65_536, f"batch_size {self.batch_size} not in [1, 65536]"),
            (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 10,
             f"learning_rate {self.learning_rate} not in (0, 10]"),
            (1 <= self.lora_rank <= 1024, f"lora_rank {self.lora_rank} not in [1, 1024]"),
            (math.isfinite(self.lora_alpha) and self.lora_alpha > 0, f"lora_alpha {self.lora_alpha} must be > 0"),
            (bool(self.lora_targets) and set(self.lora_targets) <= set(PROJECTIONS)
             and len(set(self.lora_targets)) == len(self.lora_targets),
             f"lora_targets {list(self.lora_targets)} must be distinct names from {list(PROJECTIONS)}"),
            (2 <= self.max_seq_len <= 8192, f"max_seq_len {self.max_seq_len} not in [2, 8192]"),
            (1 <= self.total_rounds <= 1_000_000, f"total_rounds {self.total_rounds} not in [1, 1000000]"),
        ]
        for ok, why in checks:
            if not ok:
                raise InvalidArgument(f"round config: {why}")
        return self
