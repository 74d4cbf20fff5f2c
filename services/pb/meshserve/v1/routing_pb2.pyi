from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionWeight(_message.Message):
    __slots__ = ("version", "weight")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight: float
    def __init__(self, version: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class RouteTarget(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class AliasPolicy(_message.Message):
    __slots__ = ("preferred", "cheaper", "high_queue_us", "low_queue_us", "high_latency_us", "low_latency_us", "min_dwell_s")
    PREFERRED_FIELD_NUMBER: _ClassVar[int]
    CHEAPER_FIELD_NUMBER: _ClassVar[int]
    HIGH_QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    LOW_QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    HIGH_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    LOW_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    MIN_DWELL_S_FIELD_NUMBER: _ClassVar[int]
    preferred: RouteTarget
    cheaper: RouteTarget
    high_queue_us: int
    low_queue_us: int
    high_latency_us: int
    low_latency_us: int
    min_dwell_s: float
    def __init__(self, preferred: _Optional[_Union[RouteTarget, _Mapping]] = ..., cheaper: _Optional[_Union[RouteTarget, _Mapping]] = ..., high_queue_us: _Optional[int] = ..., low_queue_us: _Optional[int] = ..., high_latency_us: _Optional[int] = ..., low_latency_us: _Optional[int] = ..., min_dwell_s: _Optional[float] = ...) -> None: ...

class RoutingPolicy(_message.Message):
    __slots__ = ("model", "split", "shadow", "fallback", "fallback_queue_us", "alias", "max_shadow_in_flight", "source", "revision", "updated_unix_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    MAX_SHADOW_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    split: _containers.RepeatedCompositeFieldContainer[VersionWeight]
    shadow: _containers.RepeatedCompositeFieldContainer[VersionWeight]
    fallback: _containers.RepeatedCompositeFieldContainer[RouteTarget]
    fallback_queue_us: int
    alias: AliasPolicy
    max_shadow_in_flight: int
    source: str
    revision: int
    updated_unix_ms: int
    def __init__(self, model: _Optional[str] = ..., split: _Optional[_Iterable[_Union[VersionWeight, _Mapping]]] = ..., shadow: _Optional[_Iterable[_Union[VersionWeight, _Mapping]]] = ..., fallback: _Optional[_Iterable[_Union[RouteTarget, _Mapping]]] = ..., fallback_queue_us: _Optional[int] = ..., alias: _Optional[_Union[AliasPolicy, _Mapping]] = ..., max_shadow_in_flight: _Optional[int] = ..., source: _Optional[str] = ..., revision: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("policy", "clear")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    policy: RoutingPolicy
    clear: bool
    def __init__(self, policy: _Optional[_Union[RoutingPolicy, _Mapping]] = ..., clear: _Optional[bool] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class WatchPoliciesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class PolicyChange(_message.Message):
    __slots__ = ("model", "policy", "deleted", "snapshot_done")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_DONE_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: RoutingPolicy
    deleted: bool
    snapshot_done: bool
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[_Union[RoutingPolicy, _Mapping]] = ..., deleted: _Optional[bool] = ..., snapshot_done: _Optional[bool] = ...) -> None: ...

class RouteStats(_message.Message):
    __slots__ = ("model", "version", "route", "requests", "errors", "agree", "disagree")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    AGREE_FIELD_NUMBER: _ClassVar[int]
    DISAGREE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    route: str
    requests: int
    errors: int
    agree: int
    disagree: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., route: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., agree: _Optional[int] = ..., disagree: _Optional[int] = ...) -> None: ...

class PolicyStatus(_message.Message):
    __slots__ = ("policy", "has_policy", "alias_target", "stats")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    HAS_POLICY_FIELD_NUMBER: _ClassVar[int]
    ALIAS_TARGET_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    policy: RoutingPolicy
    has_policy: bool
    alias_target: str
    stats: _containers.RepeatedCompositeFieldContainer[RouteStats]
    def __init__(self, policy: _Optional[_Union[RoutingPolicy, _Mapping]] = ..., has_policy: _Optional[bool] = ..., alias_target: _Optional[str] = ..., stats: _Optional[_Iterable[_Union[RouteStats, _Mapping]]] = ...) -> None: ...
