from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ParamSet(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARAM_SET_UNSPECIFIED: _ClassVar[ParamSet]
    PARAM_SET_EXACT: _ClassVar[ParamSet]
    PARAM_SET_COMPACT: _ClassVar[ParamSet]
PARAM_SET_UNSPECIFIED: ParamSet
PARAM_SET_EXACT: ParamSet
PARAM_SET_COMPACT: ParamSet

class Chunk(_message.Message):
    __slots__ = ("index", "count", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    count: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., count: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
