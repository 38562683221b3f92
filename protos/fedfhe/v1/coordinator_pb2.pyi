from fedfhe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("worker_name", "num_records")
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_RECORDS_FIELD_NUMBER: _ClassVar[int]
    worker_name: str
    num_records: int
    def __init__(self, worker_name: _Optional[str] = ..., num_records: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_id", "federation_id", "key_check_value")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    federation_id: str
    key_check_value: bytes
    def __init__(self, worker_id: _Optional[str] = ..., federation_id: _Optional[str] = ..., key_check_value: _Optional[bytes] = ...) -> None: ...

class RoundConfig(_message.Message):
    __slots__ = ("local_steps", "batch_size", "learning_rate", "lora_rank", "lora_alpha", "lora_targets", "ffa", "lora_seed", "max_seq_len")
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    FFA_FIELD_NUMBER: _ClassVar[int]
    LORA_SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    local_steps: int
    batch_size: int
    learning_rate: float
    lora_rank: int
    lora_alpha: float
    lora_targets: _containers.RepeatedScalarFieldContainer[str]
    ffa: bool
    lora_seed: int
    max_seq_len: int
    def __init__(self, local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_targets: _Optional[_Iterable[str]] = ..., ffa: _Optional[bool] = ..., lora_seed: _Optional[int] = ..., max_seq_len: _Optional[int] = ...) -> None: ...

class RoundStarted(_message.Message):
    __slots__ = ("round", "config", "deadline_unix_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    config: RoundConfig
    deadline_unix_ms: int
    def __init__(self, round: _Optional[int] = ..., config: _Optional[_Union[RoundConfig, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class Participant(_message.Message):
    __slots__ = ("worker_id", "num_samples", "epsilon")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    num_samples: int
    epsilon: float
    def __init__(self, worker_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., epsilon: _Optional[float] = ...) -> None: ...

class RoundClosed(_message.Message):
    __slots__ = ("round", "participants", "total_samples")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    round: int
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    total_samples: int
    def __init__(self, round: _Optional[int] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., total_samples: _Optional[int] = ...) -> None: ...

class WatchRoundsRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class WatchRoundsResponse(_message.Message):
    __slots__ = ("started", "closed")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    started: RoundStarted
    closed: RoundClosed
    def __init__(self, started: _Optional[_Union[RoundStarted, _Mapping]] = ..., closed: _Optional[_Union[RoundClosed, _Mapping]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class GetPatchRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class PatchHeader(_message.Message):
    __slots__ = ("round", "participants", "total_samples", "tensors", "size_bytes")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: int
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    total_samples: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    size_bytes: int
    def __init__(self, round: _Optional[int] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., total_samples: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class GetPatchResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PatchHeader
    chunk: _common_pb2.Chunk
    def __init__(self, header: _Optional[_Union[PatchHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "num_samples", "epsilon_spent", "tensors", "size_bytes", "digest")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_samples: int
    epsilon_spent: float
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    size_bytes: int
    digest: bytes
    def __init__(self, round: _Optional[int] = ..., num_samples: _Optional[int] = ..., epsilon_spent: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., size_bytes: _Optional[int] = ..., digest: _Optional[bytes] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: _common_pb2.Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("round", "accepted")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted: bool
    def __init__(self, round: _Optional[int] = ..., accepted: _Optional[bool] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "connected", "last_round", "epsilon")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    connected: bool
    last_round: int
    epsilon: float
    def __init__(self, worker_id: _Optional[str] = ..., connected: _Optional[bool] = ..., last_round: _Optional[int] = ..., epsilon: _Optional[float] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round", "state", "participants", "buffer_bytes")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    buffer_bytes: int
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., buffer_bytes: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("federation_id", "current_round", "workers", "rounds", "buffer_bytes_total")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    current_round: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    buffer_bytes_total: int
    def __init__(self, federation_id: _Optional[str] = ..., current_round: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., buffer_bytes_total: _Optional[int] = ...) -> None: ...
