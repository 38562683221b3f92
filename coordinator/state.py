"""Federation membership state, protocol-free: who is enrolled, under which identity."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from common.errors import InvalidArgument, PermissionDenied


@dataclass
class Worker:
    worker_id: str
    num_records: int
    registered_at: float = field(default_factory=time.time)
    last_round: int = 0
    epsilon: float = 0.0


class Federation:
    def __init__(self, federation_id: str | None = None) -> None:
        self.federation_id = federation_id or "fed-" + secrets.token_hex(4)
        self.workers: dict[str, Worker] = {}
        self.current_round = 0

    def register(self, name: str, role: str, num_records: int) -> Worker:
        """Enroll (or re-enroll, after a restart) a worker under its certificate name."""
        if role != "worker":
            raise PermissionDenied(f"certificate {name!r} has role {role!r}, not worker")
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
            raise InvalidArgument(f"worker name {name!r} must be 1-64 letters, digits, '-' or '_'")
        worker = self.workers.get(name)
        if worker is None:
            worker = self.workers[name] = Worker(name, num_records)
        worker.num_records = num_records
        return worker
