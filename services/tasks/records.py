"""Task records and the task state machine. Pure: no grpc, no protobuf (requests and
responses are serialized protobuf, held here as opaque bytes).

    PENDING --run--> RUNNING --> SUCCEEDED | FAILED
       |                |  \\--transient error (UNAVAILABLE)--> PENDING (retried later)
       |                +--cancel--> CANCELLED (a late result is dropped)
       +--cancel--> CANCELLED
       +--deadline passes before a runner starts it--> EXPIRED

A finished task keeps its outcome for `result_ttl_s`; after that Get answers EXPIRED for
another `result_ttl_s` (a tombstone), then the id is unknown (NOT_FOUND).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from enum import IntEnum

from meshserve.common.errors import ConfigError, InvalidInput, NotFound

# grpc.StatusCode values (kept here as numbers: no grpc in the domain).
CODE_CANCELLED = 1
CODE_DEADLINE_EXCEEDED = 4
CODE_INTERNAL = 13
CODE_UNAVAILABLE = 14

_TASK_ID = re.compile(r"^[0-9a-f]{32}$")


class State(IntEnum):
    """Values equal meshserve.v1.Task.State's."""

    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    EXPIRED = 6

    @property
    def done(self) -> bool:
        return self >= State.SUCCEEDED


@dataclass(frozen=True, slots=True)
class QueueSettings:
    max_queue: int = 100_000  # tasks waiting or running, at most
    task_ttl_s: float = 3600.0  # a task not started within this is EXPIRED
    result_ttl_s: float = 3600.0  # how long a finished task's outcome is kept
    claim_idle_s: float = 30.0  # a delivery unacknowledged this long is claimed by another runner
    max_deliveries: int = 3  # deliveries of one task before it is dead-lettered (FAILED)
    key_prefix: str = "meshserve:tasks"
    # The in-process store (tasks kept until twice their result TTL, finished or not): at
    # most this many, this many bytes of requests and responses.
    max_stored: int = 200_000
    max_stored_bytes: int = 512 * 1024 * 1024
    max_per_key: int = 10_000  # tasks kept per API key, in process and in Redis

    def __post_init__(self) -> None:
        for name in ("max_queue", "task_ttl_s", "result_ttl_s", "claim_idle_s", "max_deliveries",
                     "max_stored", "max_stored_bytes", "max_per_key"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--async-{name.replace('_', '-')} must be > 0, "
                                  f"got {getattr(self, name)}")
        if not self.key_prefix or set("*?[] ") & set(self.key_prefix):
            raise ConfigError(f"task key prefix {self.key_prefix!r} is empty or has *?[] or spaces")


@dataclass(frozen=True, slots=True)
class NewTask:
    request: bytes  # a serialized inference.ModelInferRequest
    idempotency_key: str = ""
    timeout_s: float | None = None  # the request's own `timeout`, counted from submission
    owner: str = ""  # who submitted it (the API key's hash; "" without auth): only it sees it


@dataclass(frozen=True, slots=True)
class TaskView:
    task_id: str
    state: State
    response: bytes = b""  # a serialized inference.ModelInferResponse when SUCCEEDED
    error_code: int = 0  # a grpc.StatusCode value when FAILED (also set for CANCELLED, EXPIRED)
    error_message: str = ""
    submitted_ms: int = 0
    finished_ms: int = 0
    owner: str = ""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One task handed to one runner (a Redis Streams entry)."""

    entry_id: str
    task_id: str
    deliveries: int  # 1 the first time; more after claims of a dead runner's entries
    owner: str = ""  # the submitting key's hash (its quota is kept in Redis)


@dataclass(frozen=True, slots=True)
class Started:
    request: bytes
    deadline_ms: int
    submitted_ms: int


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_task_id() -> str:
    return uuid.uuid4().hex


def check_task_id(task_id: str) -> str:
    if not task_id:
        raise InvalidInput("task_id is required")
    if not _TASK_ID.match(task_id):
        raise NotFound(f"unknown task '{task_id[:64]}'")
    return task_id


def deadline_ms(submitted_ms: int, settings: QueueSettings, timeout_s: float | None) -> int:
    wait_s = settings.task_ttl_s if timeout_s is None else min(timeout_s, settings.task_ttl_s)
    return submitted_ms + int(wait_s * 1000)


def view_at(task_id: str, fields: dict[str, str], response: bytes | None, at_ms: int) -> TaskView:
    """What Get answers, from the stored fields: a PENDING task past its deadline and a
    finished task past its result TTL read as EXPIRED."""
    state = State(int(fields["state"]))
    submitted = int(fields.get("submitted_ms") or 0)
    finished = int(fields.get("finished_ms") or 0)
    code = int(fields.get("error_code") or 0)
    message = fields.get("error_message") or ""
    owner = fields.get("owner") or ""
    if state == State.PENDING and at_ms >= int(fields.get("deadline_ms") or 0):
        return TaskView(task_id, State.EXPIRED, b"", CODE_DEADLINE_EXCEEDED,
                        "the task waited past its deadline", submitted, finished, owner)
    if state.done and (at_ms >= int(fields.get("expires_ms") or 0)
                       or (state == State.SUCCEEDED and response is None)):
        return TaskView(task_id, State.EXPIRED, b"", code,
                        "the task's result expired", submitted, finished, owner)
    return TaskView(task_id, state, response or b"", code, message, submitted, finished, owner)
