"""Cluster model control: per model, whether the mesh serves it, which versions, and the
default version (what RepositoryModelLoad/Unload decide). One record per model, kept like
routing policies (common.shared_state): in Redis when the mesh has Redis, else on the
batcher's board. Every batcher and gateway watches it and converges: a batcher wants the
versions of a loaded model and refuses an unloaded one; a gateway serves the default version.
No grpc here: the stores are in common.control_store."""

from __future__ import annotations

import time
from dataclasses import dataclass

from meshserve.pb.meshserve.v1 import model_control_pb2 as mpb


@dataclass(frozen=True, slots=True)
class Control:
    model: str
    loaded: bool
    versions: tuple[str, ...] = ()  # wanted when loaded
    default_version: str = ""  # "" = the model config's
    revision: int = 0
    updated_unix_ms: int = 0

    def then(self, loaded: bool, versions: tuple[str, ...], default_version: str) -> Control:
        """The next record of this model."""
        return Control(self.model, loaded, versions, default_version, self.revision + 1,
                       time.time_ns() // 1_000_000)


def to_pb(c: Control) -> mpb.ModelControl:
    return mpb.ModelControl(model=c.model, loaded=c.loaded, versions=c.versions,
                            default_version=c.default_version, revision=c.revision,
                            updated_unix_ms=c.updated_unix_ms)


def from_pb(m: mpb.ModelControl) -> Control:
    return Control(m.model, m.loaded, tuple(m.versions), m.default_version, m.revision,
                   m.updated_unix_ms)


def parse(data: bytes) -> Control:
    """A stored record (a serialized meshserve.v1.ModelControl)."""
    return from_pb(mpb.ModelControl.FromString(data))
