"""W3C trace context (`traceparent`) across the mesh, per-request log lines, and optional
OpenTelemetry spans.

A request's traceparent comes from the client's gRPC metadata (or is made up at the
gateway), travels inside the messages of every hop (our hops are multiplexed streams, so
per request, not per call), and shows up as `trace=<32 hex>` in every log line about that
request, in every service: `grep trace=<id>` follows it. Per-request lines are written only
for sampled requests (flags `-01`) and for errors, so busy services do not flood their logs.

With an OTLP endpoint set (and opentelemetry-sdk plus its OTLP exporter installed: they are
not dependencies of meshserve) each hop also records a span, a child of the traceparent.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from meshserve.common.logs import clip

log = logging.getLogger(__name__)

METADATA_KEY = "traceparent"

_HEX = re.compile(r"[0-9a-f]+\Z")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str  # 32 lowercase hex, not all zero
    span_id: str  # 16 lowercase hex, not all zero: the caller's span (the parent-id)
    flags: int = 0  # bit 0: sampled

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def child(self, span_id: str | None = None) -> TraceContext:
        """The same trace with another span id (a new one when not given)."""
        return TraceContext(self.trace_id, span_id or _random_hex(8), self.flags)


def _random_hex(n_bytes: int) -> str:
    while True:
        value = os.urandom(n_bytes).hex()
        if value.strip("0"):
            return value


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and bool(_HEX.match(value))


def parse(header: str | bytes | None) -> TraceContext | None:
    """A W3C traceparent ("00-<trace id>-<parent id>-<flags>"), or None when it is invalid
    (then a new trace starts, as the spec says). Versions above 00 are read by their first
    four fields; version ff and all-zero ids are invalid."""
    if not header:
        return None
    if isinstance(header, bytes):
        header = header.decode("ascii", "replace")
    value = header.strip()
    if len(value) < 55:
        return None
    version = value[:2]
    if not _is_hex(version, 2) or version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    parts = value[:55].split("-")
    if len(parts) != 4:
        return None
    _, trace_id, span_id, flags = parts
    if not (_is_hex(trace_id, 32) and _is_hex(span_id, 16) and _is_hex(flags, 2)):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16))


def new_context(sampled: bool) -> TraceContext:
    return TraceContext(_random_hex(16), _random_hex(8), 1 if sampled else 0)


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> TraceContext | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return parse(value)
    return None


def incoming(metadata, sample_ratio: float = 0.0, rng: random.Random | None = None) -> TraceContext:
    """The client's trace context, else a new one, sampled with probability sample_ratio."""
    ctx = from_metadata(metadata)
    if ctx is not None:
        return ctx
    sampled = sample_ratio > 0 and (rng or random).random() < sample_ratio
    return new_context(sampled)


# The request being handled by this task (the gateway sets it; the batcher and cache
# clients read it to put the traceparent into their messages).
current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar(
    "meshserve_trace", default=None)


@contextlib.contextmanager
def use(ctx: TraceContext | None) -> Iterator[TraceContext | None]:
    token = current.set(ctx)
    try:
        yield ctx
    finally:
        current.reset(token)


def current_traceparent() -> str:
    ctx = current.get()
    return ctx.traceparent if ctx is not None else ""


def log_request(logger: logging.Logger, ctx: TraceContext | None, msg: str, *args,
                error: bool = False) -> None:
    """One line about one request, as `trace=<id> <msg>`: written for sampled requests,
    and for errors (at WARNING) whatever the sampling."""
    if ctx is None or not (ctx.sampled or error):
        return
    # Model names, versions, shapes and errors quoting them come from clients: clipped.
    safe = [a if isinstance(a, (int, float)) else clip(a) for a in args]
    logger.log(logging.WARNING if error else logging.INFO, "trace=%s " + msg, ctx.trace_id,
               *safe)


# ---------------------------------------------------------------- OpenTelemetry spans

_tracer = None


def setup(service_name: str, otlp_endpoint: str) -> bool:
    """Exports spans over OTLP/gRPC when an endpoint is given and the OpenTelemetry SDK is
    installed. Returns whether spans are on."""
    if not otlp_endpoint:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("--otlp-endpoint %s: opentelemetry-sdk and "
                    "opentelemetry-exporter-otlp-proto-grpc are not installed; no spans "
                    "(trace ids still go to the logs)", otlp_endpoint)
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    use_tracer(provider.get_tracer("meshserve"))
    log.info("OpenTelemetry spans go to %s", otlp_endpoint)
    return True


def use_tracer(tracer) -> None:
    """Sets the OpenTelemetry tracer spans go to (None: off); setup() calls it, tests too."""
    global _tracer
    _tracer = tracer


def _parent(ctx: TraceContext):
    from opentelemetry import trace

    parent = trace.SpanContext(int(ctx.trace_id, 16), int(ctx.span_id, 16), is_remote=True,
                               trace_flags=trace.TraceFlags(ctx.flags & 0xFF))
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


@contextlib.contextmanager
def span(name: str, ctx: TraceContext | None, **attributes) -> Iterator[TraceContext | None]:
    """A live span around the block, a child of ctx; yields the context to send to the next
    hop (its parent-id is this span). Without spans, yields ctx unchanged."""
    if _tracer is None or ctx is None:
        yield ctx
        return
    with _tracer.start_as_current_span(name, context=_parent(ctx), attributes=attributes,
                                       record_exception=True) as s:
        sc = s.get_span_context()
        yield ctx.child(f"{sc.span_id:016x}") if sc.is_valid else ctx


def record_span(name: str, ctx: TraceContext | None, start_ns: int, end_ns: int,
                error: str = "", **attributes) -> None:
    """A span measured after the fact (queue wait, compute), with time.time_ns() bounds."""
    if _tracer is None or ctx is None:
        return
    s = _tracer.start_span(name, context=_parent(ctx), start_time=start_ns,
                           attributes=attributes)
    if error:
        from opentelemetry.trace import Status, StatusCode

        s.set_status(Status(StatusCode.ERROR, error))
    s.end(end_time=end_ns)
