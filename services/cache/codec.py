"""How a backend holds an entry: a serialized meshserve.v1.CacheRecord (protobuf, never pickle)."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from meshserve.pb.meshserve.v1 import cache_pb2


def encode_record(generation: int, value: bytes) -> bytes:
    return cache_pb2.CacheRecord(generation=generation, value=value).SerializeToString()


def decode_record(data: bytes) -> tuple[int, bytes] | None:
    """(generation, value), or None for bytes that are not a record (read as a miss)."""
    record = cache_pb2.CacheRecord()
    try:
        record.ParseFromString(data)
    except DecodeError:
        return None
    return record.generation, record.value
