from meshserve.pb.meshserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheKey(_message.Message):
    __slots__ = ("model", "version", "digest")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    digest: bytes
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("id", "keys", "traceparents", "stores")
    ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENTS_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    id: int
    keys: _containers.RepeatedCompositeFieldContainer[CacheKey]
    traceparents: _containers.RepeatedScalarFieldContainer[str]
    stores: _containers.RepeatedCompositeFieldContainer[StoreEntry]
    def __init__(self, id: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[CacheKey, _Mapping]]] = ..., traceparents: _Optional[_Iterable[str]] = ..., stores: _Optional[_Iterable[_Union[StoreEntry, _Mapping]]] = ...) -> None: ...

class LookupResult(_message.Message):
    __slots__ = ("hit", "value", "generation")
    HIT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    hit: bool
    value: bytes
    generation: int
    def __init__(self, hit: _Optional[bool] = ..., value: _Optional[bytes] = ..., generation: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("id", "results", "invalidated", "stored", "skipped", "dropped")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INVALIDATED_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    id: int
    results: _containers.RepeatedCompositeFieldContainer[LookupResult]
    invalidated: _containers.RepeatedCompositeFieldContainer[Invalidated]
    stored: int
    skipped: int
    dropped: int
    def __init__(self, id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[LookupResult, _Mapping]]] = ..., invalidated: _Optional[_Iterable[_Union[Invalidated, _Mapping]]] = ..., stored: _Optional[int] = ..., skipped: _Optional[int] = ..., dropped: _Optional[int] = ...) -> None: ...

class Invalidated(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class StoreEntry(_message.Message):
    __slots__ = ("key", "value", "generation", "ttl_s")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    key: CacheKey
    value: bytes
    generation: int
    ttl_s: int
    def __init__(self, key: _Optional[_Union[CacheKey, _Mapping]] = ..., value: _Optional[bytes] = ..., generation: _Optional[int] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("id", "entries")
    ID_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    id: int
    entries: _containers.RepeatedCompositeFieldContainer[StoreEntry]
    def __init__(self, id: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[StoreEntry, _Mapping]]] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("id", "stored", "skipped", "dropped")
    ID_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    id: int
    stored: int
    skipped: int
    dropped: int
    def __init__(self, id: _Optional[int] = ..., stored: _Optional[int] = ..., skipped: _Optional[int] = ..., dropped: _Optional[int] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("backend", "hits", "misses", "errors", "stores", "too_large", "entries", "bytes")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    TOO_LARGE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    backend: str
    hits: int
    misses: int
    errors: int
    stores: int
    too_large: int
    entries: int
    bytes: int
    def __init__(self, backend: _Optional[str] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., errors: _Optional[int] = ..., stores: _Optional[int] = ..., too_large: _Optional[int] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class CachedOutputs(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, outputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class CacheRecord(_message.Message):
    __slots__ = ("generation", "value")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    generation: int
    value: bytes
    def __init__(self, generation: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
