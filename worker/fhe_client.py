"""Worker side of FheService: one Evaluate stream per session, results matched to requests by id.

Torch autograd calls the base linears synchronously, so the client runs its
grpc.aio channel on an event loop in a background thread and exposes blocking
`hint` / `multiply` methods; several calls may be in flight at once (each
waits on its own future, the stream multiplexes them by request id).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import numpy as np
import structlog

from common.chunks import CHUNK_BYTES, Assembler, chunk_messages
from common.config import ChannelConfig
from common.errors import FailedPrecondition
from common.lwe import wire
from common.lwe.params import LweParams
from common.lwe.prg import new_seed
from common.messages import PARAM_SET_VALUES, key_to_proto
from common.rpc import Backoff, make_channel, retryable
from common.stages import Direction, Stage, WeightKey
from fedfhe.v1 import fhe_pb2, fhe_pb2_grpc
from worker.linears import StageMeta

T = TypeVar("T")
log = structlog.get_logger("fedfhe.fhe_client")


class StreamEnded(FailedPrecondition):
    """The node ended the session stream while requests were outstanding."""


class FheClient:
    """A session with the FHE node under a fresh public seed (a new A per session)."""

    def __init__(self, target: str, channel: ChannelConfig, params: LweParams, model_id: str,
                 *, chunk_bytes: int = CHUNK_BYTES, max_result_bytes: int = 1 << 30,
                 reconnect_seconds: float = 60.0) -> None:
        self.target, self.channel_cfg, self.params, self.model_id = target, channel, params, model_id
        self.seed = new_seed()
        self.chunk_bytes, self.max_result_bytes = chunk_bytes, max_result_bytes
        self.reconnect_seconds = reconnect_seconds
        self.model_info: fhe_pb2.ModelInfo | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.sessions_opened = 0
        self._hints: dict[WeightKey, tuple[StageMeta, np.ndarray]] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[np.ndarray], Assembler]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fhe-client", daemon=True)
        self._thread.start()
        self._run(self._connect())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _connect(self) -> None:
        self._channel = make_channel(self.target, self.channel_cfg)
        self._stub = fhe_pb2_grpc.FheServiceStub(self._channel)
        self._reopen_lock = asyncio.Lock()
        self._generation = 0
        await self._open_session(wait_for_ready=False)

    async def _open_session(self, *, wait_for_ready: bool) -> None:
        """A new Evaluate stream under the same public seed: A, and so every hint, stays valid."""
        self._outbox: asyncio.Queue[fhe_pb2.EvaluateRequest | None] = asyncio.Queue()
        self._opened: asyncio.Future[fhe_pb2.SessionOpened] = self._loop.create_future()
        await self._outbox.put(fhe_pb2.EvaluateRequest(open=fhe_pb2.OpenSession(
            seed=self.seed, param_set=PARAM_SET_VALUES[self.params.name], model_id=self.model_id)))
        self._call = self._stub.Evaluate(self._requests(self._outbox), wait_for_ready=wait_for_ready)
        self._reader = asyncio.create_task(self._read(self._call, self._opened))
        opened = await self._opened
        if self.model_info is not None and opened.model.weights_digest != self.model_info.weights_digest:
            raise FailedPrecondition("the FHE node now serves different weights than this session's hints")
        self.model_info = opened.model
        self.sessions_opened += 1
        self._generation += 1

    @staticmethod
    async def _requests(outbox: asyncio.Queue[fhe_pb2.EvaluateRequest | None]
                        ) -> AsyncIterator[fhe_pb2.EvaluateRequest]:
        while (msg := await outbox.get()) is not None:
            yield msg

    async def _read(self, call: Any, opened: asyncio.Future[fhe_pb2.SessionOpened]) -> None:
        try:
            async for resp in call:
                if resp.WhichOneof("kind") == "opened":
                    opened.set_result(resp.opened)
                    continue
                r = resp.result
                self.bytes_down += len(r.result.data)
                fut, asm = self._pending[r.request_id]
                if asm.add(r.result):
                    del self._pending[r.request_id]
                    fut.set_result(wire.decode(asm.payload(), kind=wire.Kind.RESULT, log_q=self.params.log_q))
            raise StreamEnded("the FHE node closed the session stream")
        except BaseException as exc:  # every waiter learns why the stream ended
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(exc)
            if not opened.done():
                opened.set_exception(exc)
            self._pending.clear()

    async def _reopen(self, generation: int) -> None:
        """After a broken stream, one caller opens the next session; the others wait for it."""
        async with self._reopen_lock:
            if self._generation != generation:
                return  # someone else already reopened
            self._reader.cancel()
            await self._open_session(wait_for_ready=True)
            log.warning("FHE session reopened after the stream broke", sessions=self.sessions_opened)

    @staticmethod
    def _broken(exc: BaseException) -> bool:
        """A stream broken by a node restart or a lost connection; anything else is the caller's problem."""
        return isinstance(exc, StreamEnded) or retryable(exc)

    async def _retrying(self, attempt: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run attempt(); on a broken stream (node restarted, connection lost) reopen and repeat it.

        Repeating is safe: a request re-sends the same ciphertext (no new information) under a
        new request id, and W·B is deterministic, so the result equals an uninterrupted run's.
        """
        backoff = Backoff(self.reconnect_seconds, first=0.2, cap=2.0)
        while True:
            generation = self._generation
            try:
                return await attempt()
            except (grpc.aio.AioRpcError, StreamEnded) as exc:
                if not self._broken(exc) or backoff.exhausted:
                    raise
                log.warning("FHE stream broke; reopening", error=str(exc)[:200])
            await backoff.wait()
            try:
                await self._reopen(generation)
            except (grpc.aio.AioRpcError, StreamEnded) as exc:
                if backoff.exhausted:
                    raise
                log.warning("FHE node not back yet", error=str(exc)[:200])

    async def _multiply(self, key: WeightKey, b: np.ndarray) -> np.ndarray:
        data = wire.encode(wire.Kind.CIPHERTEXT, b)

        async def attempt() -> np.ndarray:
            rid = next(self._ids)
            fut: asyncio.Future[np.ndarray] = self._loop.create_future()
            self._pending[rid] = (fut, Assembler(self.max_result_bytes))
            self.bytes_up += len(data)
            outbox = self._outbox
            for chunk in chunk_messages(data, self.chunk_bytes):
                await outbox.put(fhe_pb2.EvaluateRequest(pass_request=fhe_pb2.PassRequest(
                    request_id=rid, key=key_to_proto(key), ciphertext=chunk)))
            return await fut
        return await self._retrying(attempt)

    def multiply(self, key: WeightKey, b: np.ndarray) -> np.ndarray:
        """W·B for ciphertexts B (d_in, T); blocks until the node answers (across a node restart)."""
        return self._run(self._multiply(key, b))

    async def _fetch_hints(self, keys: list[WeightKey], progress: Callable[[int], None] | None = None) -> None:
        header, asm, done = None, None, 0
        request = fhe_pb2.GetHintRequest(seed=self.seed, param_set=PARAM_SET_VALUES[self.params.name],
                                         model_id=self.model_id, keys=[key_to_proto(k) for k in keys])
        async for resp in self._stub.GetHint(request):
            if resp.WhichOneof("kind") == "header":
                header, asm = resp.header, Assembler(self.max_result_bytes)
                continue
            assert header is not None and asm is not None
            self.bytes_down += len(resp.chunk.data)
            if asm.add(resp.chunk):
                h = wire.decode(asm.payload(), kind=wire.Kind.HINT, log_q=self.params.log_q,
                                rows=header.rows, cols=self.params.n)
                scales = np.frombuffer(header.row_scales, dtype="<f4").copy() if header.row_scales else None
                key = WeightKey(header.key.layer, header.key.stage, header.key.direction)
                meta = StageMeta(header.act_bits, header.delta_bits, header.rows, header.cols, scales)
                self._hints[key] = (meta, h)
                done += 1
                if progress is not None:
                    progress(done)

    @property
    def hint_count(self) -> int:
        """Hints of the whole model: every stage of every layer, both directions."""
        assert self.model_info is not None
        return self.model_info.num_layers * len(Stage) * len(Direction)

    def prefetch_hints(self, keys: list[WeightKey] | None = None, progress: Callable[[int], None] | None = None,
                       ) -> None:
        """Download hints (all of the model's when keys is None) in one stream; progress(done) after each."""
        wanted = [k for k in (keys or self._all_keys()) if k not in self._hints]  # a retry resumes
        if wanted:
            self._run(self._retrying(lambda: self._fetch_hints(
                [k for k in wanted if k not in self._hints], progress)))

    def _all_keys(self) -> list[WeightKey]:
        assert self.model_info is not None
        return [WeightKey(layer, stage, direction) for layer in range(self.model_info.num_layers)
                for stage in Stage for direction in Direction]

    def hint(self, key: WeightKey) -> tuple[StageMeta, np.ndarray]:
        if key not in self._hints:
            self._run(self._retrying(lambda: self._fetch_hints([key])))
        return self._hints[key]

    def close(self) -> None:
        async def shutdown() -> None:
            await self._outbox.put(None)  # ends the request stream: the node finishes and closes the session
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
            except (TimeoutError, asyncio.CancelledError):
                self._reader.cancel()
            await self._channel.close()

        if self._thread.is_alive():
            self._run(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> FheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
