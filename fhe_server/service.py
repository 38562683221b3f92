"""FheService servicer: stream plumbing over fhe_server.node (identity, message conversion, concurrent products).

Domain errors raised here or in the node become status codes in common.rpc.CallInterceptor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import structlog

from common.chunks import CHUNK_BYTES, chunk_messages
from common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from common.lwe import wire
from common.messages import key_from_proto, key_to_proto, params_from_proto
from common.stages import WeightKey
from common.tls import peer_identity
from fedfhe.v1 import fhe_pb2, fhe_pb2_grpc
from fhe_server.node import Node, Session, check_seed

log = structlog.get_logger("fedfhe.fhe_server")


class FheServicer(fhe_pb2_grpc.FheServiceServicer):
    def __init__(self, node: Node, *, insecure: bool = True, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.node = node
        self.insecure = insecure
        self.chunk_bytes = chunk_bytes

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        """Who is calling: a worker certificate's name (other roles are refused), or under --insecure
        (loopback only, no identities) the connection, so that the per-client limits apply in both modes."""
        if self.insecure:
            return str(context.peer())
        who = peer_identity(context)  # Unauthenticated without a verified client certificate
        if who.role != "worker":
            raise PermissionDenied(f"certificate {who.name!r} has role {who.role!r}; only workers use the node")
        return who.name

    def _model_info(self) -> fhe_pb2.ModelInfo:
        w = self.node.weights
        s = w.model.shape
        return fhe_pb2.ModelInfo(
            model_id=w.model.model_id, weights_digest=w.digest, num_layers=s.num_layers, hidden_size=s.hidden,
            intermediate_size=s.intermediate, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads)

    async def Evaluate(self, request_iterator: AsyncIterator[fhe_pb2.EvaluateRequest],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[fhe_pb2.EvaluateResponse]:
        with self.node.slot(self._client(context), "sessions"):
            session: Session | None = None
            out: asyncio.Queue[fhe_pb2.EvaluateResponse | BaseException | None] = asyncio.Queue()
            tasks: set[asyncio.Task[None]] = set()

            async def multiply(s: Session, rid: int, key: WeightKey, data: bytes) -> None:
                try:
                    result = await asyncio.to_thread(self.node.multiply, s, rid, key, data)
                    for chunk in chunk_messages(result, self.chunk_bytes):
                        await out.put(fhe_pb2.EvaluateResponse(result=fhe_pb2.PassResult(request_id=rid,
                                                                                          result=chunk)))
                except BaseException as exc:  # surfaced to the caller by the response loop
                    await out.put(exc)

            async def read() -> None:
                nonlocal session
                try:
                    async for req in request_iterator:
                        kind = req.WhichOneof("kind")
                        if kind == "open":
                            if session is not None:
                                raise FailedPrecondition("session already open on this stream")
                            session = self.node.open_session(req.open.seed, params_from_proto(req.open.param_set),
                                                             req.open.model_id)
                            structlog.contextvars.bind_contextvars(session=session.id[:12])
                            log.info("session opened", params=session.params.name)
                            await out.put(fhe_pb2.EvaluateResponse(opened=fhe_pb2.SessionOpened(
                                session_id=session.id, model=self._model_info())))
                        elif kind == "pass_request":
                            if session is None:
                                raise FailedPrecondition("the first message of a stream must be OpenSession")
                            p = req.pass_request
                            key = key_from_proto(p.key)
                            data = self.node.accept(session, p.request_id, key, p.ciphertext)
                            if data is not None:
                                task = asyncio.create_task(multiply(session, p.request_id, key, data))
                                tasks.add(task)
                                task.add_done_callback(tasks.discard)
                        else:
                            raise InvalidArgument("empty EvaluateRequest: set open or pass")
                    if tasks:
                        await asyncio.gather(*tasks)
                    self.node.finish_stream(session)
                    await out.put(None)
                except BaseException as exc:
                    await out.put(exc)

            reader = asyncio.create_task(read())
            try:
                while (item := await out.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                reader.cancel()
                for t in tasks:
                    t.cancel()
                if session is not None:
                    self.node.close_session(session)

    async def GetHint(self, request: fhe_pb2.GetHintRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[fhe_pb2.GetHintResponse]:
        with self.node.slot(self._client(context), "hint streams"):
            params = params_from_proto(request.param_set)
            self.node.check_model(request.model_id)
            check_seed(request.seed)
            keys = self.node.hint_keys([key_from_proto(k) for k in request.keys])
            for key in keys:
                h = await asyncio.to_thread(self.node.hint, params, request.seed, key)
                info = self.node.hint_info(params, key)
                yield fhe_pb2.GetHintResponse(header=fhe_pb2.HintHeader(
                    key=key_to_proto(key), rows=info.plan.d_out, cols=info.plan.d_in, act_bits=info.plan.act_bits,
                    delta_bits=info.plan.delta_bits,
                    row_scales=info.row_scales.astype("<f4").tobytes() if info.row_scales is not None else b""))
                for chunk in chunk_messages(wire.encode(wire.Kind.HINT, h), self.chunk_bytes):
                    yield fhe_pb2.GetHintResponse(chunk=chunk)
