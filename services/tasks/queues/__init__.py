"""The task queues: the contract (contract.py), durable on Redis Streams
(redis_backend.py, its Lua scripts in lua/), or in process (memory_backend.py, the embedded
default). No grpc and no pickle here; payloads are opaque bytes."""

from meshserve.tasks.queues.contract import (
    DEAD_LETTER_MAXLEN,
    GROUP,
    DeadLetter,
    TaskQueue,
    Watchers,
    consumer_name,
    full_message,
    quota_message,
)
from meshserve.tasks.queues.memory_backend import MemoryQueue
from meshserve.tasks.queues.redis_backend import RedisQueue

__all__ = ["DEAD_LETTER_MAXLEN", "GROUP", "DeadLetter", "MemoryQueue", "RedisQueue",
           "TaskQueue", "Watchers", "consumer_name", "full_message", "quota_message"]
