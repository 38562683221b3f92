"""The operator's side of CoordinatorService: start rounds, watch them close, read status, finish.

Used by fedfhe-local, by scripts/rounds.py against a running coordinator, and by
tests. Over mTLS the calls need the operator certificate (fedfhe-certs makes
`operator.pem`); under --insecure (loopback) an anonymous caller is the operator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from common.config import ChannelConfig
from common.messages import config_to_proto
from common.rpc import RpcClient
from common.training import TrainingConfig
from fedfhe.v1 import coordinator_pb2 as pb
from fedfhe.v1 import coordinator_pb2_grpc


class OperatorClient(RpcClient):
    def __init__(self, target: str, channel: ChannelConfig) -> None:
        super().__init__(target, channel)
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)

    async def status(self) -> pb.GetStatusResponse:
        return await self.stub.GetStatus(pb.GetStatusRequest())

    async def connected(self) -> set[str]:
        return {w.worker_id for w in (await self.status()).workers if w.connected}

    async def wait_connected(self, names: Sequence[str], timeout: float = 60.0, poll: float = 0.2) -> None:
        """Until every name holds a round stream; a coordinator still starting up (UNAVAILABLE) is waited for too."""
        deadline = time.monotonic() + timeout
        connected: set[str] = set()
        while True:
            try:
                connected = await self.connected()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            if set(names) <= connected:
                return
            if time.monotonic() > deadline:
                missing = sorted(set(names) - connected)
                raise TimeoutError(f"{', '.join(missing)} did not connect within {timeout:.0f} s")
            await asyncio.sleep(poll)

    async def start_round(self, cfg: TrainingConfig, deadline_seconds: float = 0.0) -> pb.StartRoundResponse:
        return await self.stub.StartRound(pb.StartRoundRequest(config=config_to_proto(cfg),
                                                               deadline_seconds=deadline_seconds))

    def watch(self) -> AsyncIterator[pb.WatchRoundsResponse]:
        """Round events as the coordinator broadcasts them (the operator observes, it is never waited for)."""
        return self.stub.WatchRounds(pb.WatchRoundsRequest())

    async def run_round(self, cfg: TrainingConfig, deadline_seconds: float = 0.0, timeout: float | None = None,
                        after_start: Callable[[pb.StartRoundResponse], Awaitable[None]] | None = None,
                        ) -> tuple[pb.StartRoundResponse, pb.RoundClosed]:
        """Start a round and wait for it to close; the watch opens first so the close cannot be missed."""
        call = self.watch()
        try:
            started = await self.start_round(cfg, deadline_seconds)
            if after_start is not None:
                await after_start(started)

            async def closed() -> pb.RoundClosed:
                async for ev in call:
                    if ev.WhichOneof("event") == "closed" and ev.closed.round == started.round:
                        return ev.closed
                raise ConnectionError("the coordinator ended the watch before the round closed")
            return started, await asyncio.wait_for(closed(), timeout)
        finally:
            call.cancel()  # type: ignore[attr-defined]

    async def finish(self) -> int:
        return (await self.stub.FinishFederation(pb.FinishFederationRequest())).last_round
