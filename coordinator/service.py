"""CoordinatorService servicer: thin over coordinator.state. Rounds and patches arrive with the federation."""

from __future__ import annotations

import grpc

from common.errors import FedfheError
from common.rpc import abort_with
from common.tls import peer_identity
from coordinator.state import Federation
from fedfhe.v1 import coordinator_pb2, coordinator_pb2_grpc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, federation: Federation, *, insecure: bool) -> None:
        self.federation = federation
        self.insecure = insecure

    def _identity(self, request: coordinator_pb2.RegisterRequest, context: grpc.aio.ServicerContext):
        if self.insecure:  # loopback-only mode: the name is taken from the request
            return request.worker_name, "worker"
        who = peer_identity(context)  # Unauthenticated without a verified client certificate
        return who.name, who.role

    async def Register(self, request: coordinator_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> coordinator_pb2.RegisterResponse:
        try:
            name, role = self._identity(request, context)
            worker = self.federation.register(name, role, request.num_records)
        except FedfheError as exc:
            await abort_with(context, exc)
            raise AssertionError("unreachable") from exc
        return coordinator_pb2.RegisterResponse(worker_id=worker.worker_id,
                                                federation_id=self.federation.federation_id)

    async def GetStatus(self, request: coordinator_pb2.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> coordinator_pb2.GetStatusResponse:
        fed = self.federation
        return coordinator_pb2.GetStatusResponse(
            federation_id=fed.federation_id, current_round=fed.current_round,
            workers=[coordinator_pb2.WorkerStatus(worker_id=w.worker_id, last_round=w.last_round,
                                                  epsilon=w.epsilon) for w in fed.workers.values()])
