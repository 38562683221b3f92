"""A bounded pool of pads made ahead: the worker's data-independent crypto off the critical path.

A background thread makes pads (common.lwe.scheme.make_pad: A·S + E and H·S for
fresh secrets) for the weight matrices the worker will use next, in chunks of
`chunk_tokens` columns: one GEMM per chunk instead of one per product, so the
per-call costs (limb splitting, conversions) are paid once per chunk. The
consumer takes exactly the columns a product needs; every column serves one
product and is zeroed when used or dropped. The pool never holds more than
`limit_bytes` of pads (plus the one chunk being made); when it is empty for a
key, the consumer makes the pad itself (as without a pool).

Which matrices next: keys are given in the order a training step uses them
(forward stages, then backward). The producer refills, in that order starting
from the key after the last one taken, each key to the column count its last
product needed (or one chunk), so the pads of the coming stages are ready first.
Protocol-free; the A and H it works with are public (H verified by the caller).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from common.lwe.scheme import Pad

Maker = Callable[[Hashable, int], Pad]  # (key, tokens) -> a fresh pad for that key's (A, H)


@dataclass
class _Stock:
    pads: list[Pad] = field(default_factory=list)
    demand: int = 0  # columns its last product needed

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.pads)


class PadPool:
    def __init__(self, make: Maker, order: Sequence[Hashable], *, limit_bytes: int, chunk_tokens: int = 128) -> None:
        if limit_bytes < 0 or chunk_tokens < 1:
            raise ValueError("the pool needs a non-negative byte limit and chunks of at least one token")
        self._make, self.order, self.limit, self.chunk = make, list(order), limit_bytes, chunk_tokens
        self._stocks: dict[Hashable, _Stock] = {k: _Stock() for k in self.order}
        self._bytes = 0
        self._cursor = 0  # index in `order` of the key after the last one taken
        self._epoch = 0  # bumped by reset: a pad made for an old (A, H) is dropped on arrival
        self._cond = threading.Condition()
        self._closed = False
        self.made_ahead = self.made_on_demand = self.taken = 0  # columns, for metrics
        self.peak_bytes = 0
        self.failures, self.last_failure = 0, ""
        self._thread = threading.Thread(target=self._produce, name="pad-pool", daemon=True) if limit_bytes else None
        if self._thread is not None:
            self._thread.start()

    @property
    def bytes(self) -> int:
        return self._bytes

    def take(self, key: Hashable, tokens: int) -> Pad:
        """A pad of exactly `tokens` columns for `key`: from the pool, topped up on demand."""
        parts: list[Pad] = []
        with self._cond:
            stock = self._stocks.setdefault(key, _Stock())
            stock.demand = tokens
            if key in self.order:
                self._cursor = (self.order.index(key) + 1) % len(self.order)
            need = tokens
            while need and stock.pads:
                head = stock.pads[0]
                before = head.nbytes
                if head.tokens <= need:
                    stock.pads.pop(0)
                    parts.append(head)
                    self._bytes -= before
                else:
                    parts.append(head.take(need))
                    self._bytes -= before - head.nbytes
                need -= parts[-1].tokens
            self.taken += tokens
            self._cond.notify_all()  # room to make more
        if need:
            parts.append(self._make(key, need))
            with self._cond:
                self.made_on_demand += need
        return parts[0] if len(parts) == 1 else _join(parts)

    def _next_job(self) -> tuple[Hashable, int, int] | None:
        """(key, tokens, epoch) to make next, or None when full or nothing is wanted (called with the lock)."""
        if self._bytes >= self.limit or not self.order:
            return None
        n = len(self.order)
        for i in range(n):
            key = self.order[(self._cursor + i) % n]
            stock = self._stocks[key]
            if stock.tokens < max(stock.demand, self.chunk):
                return key, self.chunk, self._epoch
        return None

    def _produce(self) -> None:
        while True:
            with self._cond:
                job = self._next_job()
                while not self._closed and job is None:
                    self._cond.wait()
                    job = self._next_job()
                if self._closed or job is None:
                    return
            key, tokens, epoch = job
            try:
                pad = self._make(key, tokens)  # outside the lock: the GEMMs release the GIL
            except Exception as exc:  # the consumer meets the same error on demand, and reports it
                self.failures += 1
                self.last_failure = f"{type(exc).__name__}: {exc}"[:300]
                with self._cond:  # a node restarting, a hint not verified: try again a little later
                    self._cond.wait(1.0)
                continue
            with self._cond:
                if self._closed or epoch != self._epoch:
                    pad.zeroize()
                    continue
                self._stocks[key].pads.append(pad)
                self._bytes += pad.nbytes
                self.peak_bytes = max(self.peak_bytes, self._bytes)
                self.made_ahead += pad.tokens
                self._cond.notify_all()

    def reset(self, order: Sequence[Hashable] | None = None) -> None:
        """New A and H (a new seed): zero and drop every pad; the producer starts over."""
        with self._cond:
            self._epoch += 1
            for stock in self._stocks.values():
                for pad in stock.pads:
                    pad.zeroize()
                stock.pads.clear()
            if order is not None:
                self.order = list(order)
                self._stocks = {k: self._stocks.get(k, _Stock()) for k in self.order}
            self._bytes, self._cursor = 0, 0
            self._cond.notify_all()

    def wait_full(self, timeout: float | None = None) -> bool:
        """Block until the producer has nothing more to make (benchmarks: pads made before timing starts)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._next_job() is None, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.reset()


def _join(parts: list[Pad]) -> Pad:
    import numpy as np

    pad = Pad(np.concatenate([p.masked for p in parts], axis=1), np.concatenate([p.hs for p in parts], axis=1))
    for p in parts:
        p.zeroize()
    return pad
