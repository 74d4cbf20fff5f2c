from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelControl(_message.Message):
    __slots__ = ("model", "loaded", "versions", "default_version", "revision", "updated_unix_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    loaded: bool
    versions: _containers.RepeatedScalarFieldContainer[str]
    default_version: str
    revision: int
    updated_unix_ms: int
    def __init__(self, model: _Optional[str] = ..., loaded: _Optional[bool] = ..., versions: _Optional[_Iterable[str]] = ..., default_version: _Optional[str] = ..., revision: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class WatchModelControlRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelControlChange(_message.Message):
    __slots__ = ("model", "control", "deleted", "snapshot_done")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_DONE_FIELD_NUMBER: _ClassVar[int]
    model: str
    control: ModelControl
    deleted: bool
    snapshot_done: bool
    def __init__(self, model: _Optional[str] = ..., control: _Optional[_Union[ModelControl, _Mapping]] = ..., deleted: _Optional[bool] = ..., snapshot_done: _Optional[bool] = ...) -> None: ...
