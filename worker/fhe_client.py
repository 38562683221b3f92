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
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import structlog

from common.chunks import CHUNK_BYTES, Assembler, chunk_messages
from common.config import ChannelConfig
from common.errors import FailedPrecondition, FedfheError, NodeMisbehaved
from common.lwe import wire
from common.lwe.params import LweParams
from common.lwe.prg import new_seed
from common.messages import PARAM_SET_VALUES, key_from_proto, key_to_proto
from common.rpc import Backoff, make_channel, retryable
from common.stages import Direction, Stage, WeightKey
from fedfhe.v1 import fhe_pb2, fhe_pb2_grpc
from worker.linears import StageMeta

T = TypeVar("T")
log = structlog.get_logger("fedfhe.fhe_client")


class StreamEnded(FailedPrecondition):
    """The node ended the session stream while requests were outstanding."""


class FheClient:
    """A session with an FHE node under a public seed of this worker's choosing.

    `targets` lists the nodes this worker may use, in order of preference; it uses one at a
    time and moves to the next when `abandon` is called (the node's answer failed a check).
    `rotate` starts over under a fresh seed (a new A, new hints). Any answer this client cannot
    attribute or parse (an unknown or repeated request id, malformed chunks or bytes, no answer
    within `reply_seconds`) fails the calls waiting on that session with NodeMisbehaved and ends
    the session; the next call opens a new one, so the client stays usable.
    """

    def __init__(self, targets: str | Sequence[str], channel: ChannelConfig, params: LweParams, model_id: str,
                 *, weights_digest: bytes | None = None, chunk_bytes: int = CHUNK_BYTES,
                 max_result_bytes: int = 1 << 30, reconnect_seconds: float = 60.0,
                 reply_seconds: float = 600.0) -> None:
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ValueError("no FHE node address")
        self.node_index = 0
        self.channel_cfg, self.params, self.model_id = channel, params, model_id
        self.weights_digest = weights_digest  # the public model this worker loaded itself
        self.seed = new_seed()
        self.chunk_bytes, self.max_result_bytes = chunk_bytes, max_result_bytes
        self.reconnect_seconds, self.reply_seconds = reconnect_seconds, reply_seconds
        self.model_info: fhe_pb2.ModelInfo | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.sessions_opened = 0
        self.seeds_used = 1
        self.abandoned: list[tuple[str, str]] = []  # (node, why): nodes whose answers failed a check
        self._hints: dict[WeightKey, tuple[StageMeta, np.ndarray]] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[np.ndarray], Assembler]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fhe-client", daemon=True)
        self._thread.start()
        self._run(self._connect())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def target(self) -> str:
        return self.targets[self.node_index]

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
        if self.weights_digest is not None and opened.model.weights_digest != self.weights_digest:
            raise NodeMisbehaved(f"the FHE node {self.target} serves other weights than the public model "
                                 f"{self.model_id!r} this worker loaded")
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
                entry = self._pending.get(r.request_id)
                if entry is None:
                    raise NodeMisbehaved(f"the FHE node answered request id {r.request_id}, which is not waiting "
                                         "for an answer (unknown, or already answered)")
                fut, asm = entry
                try:
                    done = asm.add(r.result)
                    y = wire.decode(asm.payload(), kind=wire.Kind.RESULT, log_q=self.params.log_q) if done else None
                except (FedfheError, wire.WireFormatError) as exc:
                    raise NodeMisbehaved(f"malformed answer to request {r.request_id}: {exc}") from None
                if y is not None:
                    del self._pending[r.request_id]
                    fut.set_result(y)
            raise StreamEnded("the FHE node closed the session stream")
        except BaseException as exc:  # every waiter learns why the stream ended
            if isinstance(exc, NodeMisbehaved):
                log.error("FHE node misbehaved; session ended", node=self.target, error=str(exc))
                call.cancel()
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
            if self._reader.done():  # the last session ended (a misbehaving node): open the next one
                await self._reopen(self._generation)
            rid = next(self._ids)
            fut: asyncio.Future[np.ndarray] = self._loop.create_future()
            self._pending[rid] = (fut, Assembler(self.max_result_bytes))
            self.bytes_up += len(data)
            outbox = self._outbox
            for chunk in chunk_messages(data, self.chunk_bytes):
                await outbox.put(fhe_pb2.EvaluateRequest(pass_request=fhe_pb2.PassRequest(
                    request_id=rid, key=key_to_proto(key), ciphertext=chunk)))
            try:
                return await asyncio.wait_for(asyncio.shield(fut), self.reply_seconds)
            except TimeoutError:
                self._pending.pop(rid, None)
                raise NodeMisbehaved(f"the FHE node {self.target} did not answer request {rid} within "
                                     f"{self.reply_seconds:g} s") from None
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
            if header is None or asm is None:
                raise NodeMisbehaved("the FHE node sent hint bytes before a hint header")
            self.bytes_down += len(resp.chunk.data)
            try:
                done = asm.add(resp.chunk)
                h = wire.decode(asm.payload(), kind=wire.Kind.HINT, log_q=self.params.log_q, rows=header.rows,
                                cols=self.params.n) if done else None
                key = key_from_proto(header.key)
            except (FedfheError, wire.WireFormatError) as exc:
                raise NodeMisbehaved(f"malformed hint from the FHE node: {exc}") from None
            if h is not None:
                if key not in keys:
                    raise NodeMisbehaved(f"the FHE node sent a hint for {key}, which was not asked for")
                scales = np.frombuffer(header.row_scales, dtype="<f4").copy() if header.row_scales else None
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

    async def _end_session(self) -> None:
        await self._outbox.put(None)  # ends the request stream: the node finishes and closes the session
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
        except (TimeoutError, asyncio.CancelledError):
            self._reader.cancel()
        except BaseException:  # noqa: S110 - the session is over whatever it ended with
            pass

    async def _new_seed(self, *, next_node: bool) -> None:
        await self._end_session()
        self._hints.clear()
        self.seed, self.model_info = new_seed(), None
        self.seeds_used += 1
        if next_node:
            await self._channel.close()
            self.node_index = (self.node_index + 1) % len(self.targets)
            await self._connect()
        else:
            await self._open_session(wait_for_ready=True)

    def rotate(self) -> None:
        """Start over under a fresh seed (a new public A): new session, hints fetched again when next needed."""
        self._run(self._new_seed(next_node=False))
        log.info("FHE seed rotated", seeds=self.seeds_used, node=self.target)

    def abandon(self, why: str) -> None:
        """This node's answer failed a check: stop using it and move to the next node (with a fresh seed)."""
        bad = self.target
        self.abandoned.append((bad, why))
        self._run(self._new_seed(next_node=True))
        if self.target == bad:
            log.warning("no other FHE node to move to; a fresh session on the same node", node=bad, reason=why)
        else:
            log.warning("moved to another FHE node", abandoned=bad, node=self.target, reason=why)

    def close(self) -> None:
        async def shutdown() -> None:
            await self._end_session()
            await self._channel.close()

        if self._thread.is_alive():
            self._run(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> FheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
