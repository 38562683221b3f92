from fedfhe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_QKV: _ClassVar[Stage]
    STAGE_O: _ClassVar[Stage]
    STAGE_GATE_UP: _ClassVar[Stage]
    STAGE_DOWN: _ClassVar[Stage]

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_FORWARD: _ClassVar[Direction]
    DIRECTION_BACKWARD: _ClassVar[Direction]
STAGE_UNSPECIFIED: Stage
STAGE_QKV: Stage
STAGE_O: Stage
STAGE_GATE_UP: Stage
STAGE_DOWN: Stage
DIRECTION_UNSPECIFIED: Direction
DIRECTION_FORWARD: Direction
DIRECTION_BACKWARD: Direction

class WeightKey(_message.Message):
    __slots__ = ("layer", "stage", "direction")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    layer: int
    stage: Stage
    direction: Direction
    def __init__(self, layer: _Optional[int] = ..., stage: _Optional[_Union[Stage, str]] = ..., direction: _Optional[_Union[Direction, str]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("seed", "param_set", "model_id")
    SEED_FIELD_NUMBER: _ClassVar[int]
    PARAM_SET_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    seed: bytes
    param_set: _common_pb2.ParamSet
    model_id: str
    def __init__(self, seed: _Optional[bytes] = ..., param_set: _Optional[_Union[_common_pb2.ParamSet, str]] = ..., model_id: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "weights_digest", "num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    weights_digest: bytes
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    def __init__(self, model_id: _Optional[str] = ..., weights_digest: _Optional[bytes] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., intermediate_size: _Optional[int] = ..., num_heads: _Optional[int] = ..., num_kv_heads: _Optional[int] = ...) -> None: ...

class PassRequest(_message.Message):
    __slots__ = ("request_id", "key", "ciphertext")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    key: WeightKey
    ciphertext: _common_pb2.Chunk
    def __init__(self, request_id: _Optional[int] = ..., key: _Optional[_Union[WeightKey, _Mapping]] = ..., ciphertext: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("open", "pass_request")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    PASS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    pass_request: PassRequest
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., pass_request: _Optional[_Union[PassRequest, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "model")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: ModelInfo
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class PassResult(_message.Message):
    __slots__ = ("request_id", "result")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    result: _common_pb2.Chunk
    def __init__(self, request_id: _Optional[int] = ..., result: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("opened", "result")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    result: PassResult
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., result: _Optional[_Union[PassResult, _Mapping]] = ...) -> None: ...

class GetHintRequest(_message.Message):
    __slots__ = ("seed", "param_set", "model_id", "keys")
    SEED_FIELD_NUMBER: _ClassVar[int]
    PARAM_SET_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    seed: bytes
    param_set: _common_pb2.ParamSet
    model_id: str
    keys: _containers.RepeatedCompositeFieldContainer[WeightKey]
    def __init__(self, seed: _Optional[bytes] = ..., param_set: _Optional[_Union[_common_pb2.ParamSet, str]] = ..., model_id: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[WeightKey, _Mapping]]] = ...) -> None: ...

class HintHeader(_message.Message):
    __slots__ = ("key", "rows", "cols", "act_bits", "delta_bits", "row_scales")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    ACT_BITS_FIELD_NUMBER: _ClassVar[int]
    DELTA_BITS_FIELD_NUMBER: _ClassVar[int]
    ROW_SCALES_FIELD_NUMBER: _ClassVar[int]
    key: WeightKey
    rows: int
    cols: int
    act_bits: int
    delta_bits: int
    row_scales: bytes
    def __init__(self, key: _Optional[_Union[WeightKey, _Mapping]] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., act_bits: _Optional[int] = ..., delta_bits: _Optional[int] = ..., row_scales: _Optional[bytes] = ...) -> None: ...

class GetHintResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: HintHeader
    chunk: _common_pb2.Chunk
    def __init__(self, header: _Optional[_Union[HintHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...
