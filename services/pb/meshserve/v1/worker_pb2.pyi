from meshserve.pb.meshserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Batch(_message.Message):
    __slots__ = ("batch_id", "model", "version", "inputs", "outputs", "traceparents")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENTS_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    model: str
    version: str
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    traceparents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, batch_id: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ..., traceparents: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[Batch]
    def __init__(self, batches: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("batch_id", "code", "message", "outputs", "compute_ns", "executed_batch_size")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    EXECUTED_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    code: int
    message: str
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    compute_ns: int
    executed_batch_size: int
    def __init__(self, batch_id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., compute_ns: _Optional[int] = ..., executed_batch_size: _Optional[int] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model", "version", "reload")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RELOAD_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    reload: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., reload: _Optional[bool] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: LoadedModel
    def __init__(self, model: _Optional[_Union[LoadedModel, _Mapping]] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class UnloadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BucketWarmup(_message.Message):
    __slots__ = ("batch_size", "warmup_ns")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_NS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    warmup_ns: int
    def __init__(self, batch_size: _Optional[int] = ..., warmup_ns: _Optional[int] = ...) -> None: ...

class LoadedModel(_message.Message):
    __slots__ = ("model", "version", "state", "byte_size", "warmup", "cuda_graphs", "load_ns", "format", "precision", "compile_mode", "compiled", "compile_ns", "compile_error", "graph_buckets", "eager_buckets")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    LOAD_NS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    COMPILE_MODE_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    COMPILE_NS_FIELD_NUMBER: _ClassVar[int]
    COMPILE_ERROR_FIELD_NUMBER: _ClassVar[int]
    GRAPH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    EAGER_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    state: str
    byte_size: int
    warmup: _containers.RepeatedCompositeFieldContainer[BucketWarmup]
    cuda_graphs: bool
    load_ns: int
    format: str
    precision: str
    compile_mode: str
    compiled: bool
    compile_ns: int
    compile_error: str
    graph_buckets: _containers.RepeatedScalarFieldContainer[int]
    eager_buckets: _containers.RepeatedCompositeFieldContainer[EagerBucket]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., byte_size: _Optional[int] = ..., warmup: _Optional[_Iterable[_Union[BucketWarmup, _Mapping]]] = ..., cuda_graphs: _Optional[bool] = ..., load_ns: _Optional[int] = ..., format: _Optional[str] = ..., precision: _Optional[str] = ..., compile_mode: _Optional[str] = ..., compiled: _Optional[bool] = ..., compile_ns: _Optional[int] = ..., compile_error: _Optional[str] = ..., graph_buckets: _Optional[_Iterable[int]] = ..., eager_buckets: _Optional[_Iterable[_Union[EagerBucket, _Mapping]]] = ...) -> None: ...

class EagerBucket(_message.Message):
    __slots__ = ("batch_size", "reason")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    reason: str
    def __init__(self, batch_size: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "device", "models", "memory_used_bytes", "memory_limit_bytes", "max_models", "in_flight", "draining")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    device: str
    models: _containers.RepeatedCompositeFieldContainer[LoadedModel]
    memory_used_bytes: int
    memory_limit_bytes: int
    max_models: int
    in_flight: int
    draining: bool
    def __init__(self, worker_id: _Optional[str] = ..., device: _Optional[str] = ..., models: _Optional[_Iterable[_Union[LoadedModel, _Mapping]]] = ..., memory_used_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., max_models: _Optional[int] = ..., in_flight: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...
