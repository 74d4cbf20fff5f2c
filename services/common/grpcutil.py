"""gRPC plumbing shared by every service: the one error-to-status table, server set-up
with health and reflection, channels, and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshserve.common import errors
from meshserve.common.errors import ConfigError
from meshserve.common.logs import clip
from meshserve.common.transport import PLAINTEXT, Transport

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# A status message at most this long (it quotes client strings; see grpc_errors).
STATUS_MESSAGE_CHARS = 1000

# The one table from domain errors to gRPC status codes (by the error's code_name, so a
# subclass such as ConfigError answers its own code).
STATUS_BY_NAME: dict[str, grpc.StatusCode] = {c.name: c for c in grpc.StatusCode}
_CODE_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def status_code(code: int) -> grpc.StatusCode:
    return _CODE_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status a domain error answers; INTERNAL for anything else."""
    if isinstance(exc, errors.MeshError):
        return STATUS_BY_NAME.get(exc.code_name, grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


def code_value(exc: BaseException) -> int:
    """The grpc.StatusCode value of a domain error (for results carried inside a stream)."""
    return status_of(exc).value[0]


def error_from_code(code: int, message: str) -> errors.MeshError:
    """Rebuilds the domain error a peer reported as (code, message)."""
    cls = errors.ERRORS_BY_CODE_NAME.get(status_code(code).name, errors.Internal)
    return cls(message)


def error_from_rpc(e: grpc.aio.AioRpcError, peer: str) -> errors.MeshError:
    """Turns a failed call to one of our own services into a domain error."""
    code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return errors.Unavailable(f"{peer} is unavailable: {e.details()}")
    return error_from_code(code.value[0], e.details() or f"{peer} failed")


def grpc_errors(method: Callable) -> Callable:
    """Servicer decorator: domain errors become their status, anything else INTERNAL."""

    async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, name: str):
        if isinstance(exc, errors.MeshError):
            # The message may quote what the client sent (a 1 MB model name): bounded, as
            # it travels in a trailer (clients refuse metadata over 16 KiB).
            await context.abort(status_of(exc), clip(str(exc), STATUS_MESSAGE_CHARS))
        log.exception("unexpected error in %s", name)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}")

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await _abort(context, exc, method.__name__)

        return stream_wrapper

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await _abort(context, exc, method.__name__)

    return wrapper


def channel_options(max_message_bytes: int = 64 * MiB) -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # dns:/// targets resolve to every pod behind a headless Service; spread calls over all.
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def split_targets(target: str) -> list[str]:
    """A client's target flag as a list of channel targets: "a:1,b:2" -> ["a:1", "b:2"]
    (one channel each); a gRPC URI ("dns:///name:port", "ipv4:a:1,b:2") stays one
    target, balanced by the channel's round_robin policy."""
    target = target.strip()
    if target.split(":", 1)[0] in _URI_SCHEMES:
        return [target]
    return [t.strip() for t in target.split(",") if t.strip()]


_URI_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds")


def dns_host(entry: str) -> str:
    """dns:///name:port (or dns://authority/name:port) -> name."""
    target = entry.split("/", 3)[-1] if entry.startswith("dns://") else entry[len("dns:"):]
    return target.rpartition(":")[0].strip("[]")


async def resolve_dns(entry: str) -> set[str] | None:
    """dns:///name:port (or dns://authority/name:port) -> {"ip:port", "[ipv6]:port"};
    None when the lookup fails (logged)."""
    target = entry.split("/", 3)[-1] if entry.startswith("dns://") else entry[len("dns:"):]
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as e:
        log.warning("cannot resolve %s: %s", entry, e)
        return None
    out = set()
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        out.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return out


async def every_address(target: str) -> list[tuple[str, str]]:
    """Every server a client target stands for, as (address, the name its certificate
    carries, "" = the address's host): a comma list, each address of an ipv4:/ipv6: URI,
    and each address a dns:/// name resolves to now (Unavailable when it does not
    resolve). Used for calls that must reach every replica."""
    out: list[tuple[str, str]] = []
    for t in split_targets(target):
        scheme = t.split(":", 1)[0]
        if scheme == "dns":
            found = await resolve_dns(t)
            if found is None:
                raise errors.Unavailable(f"cannot resolve {t}")
            out += [(a, dns_host(t)) for a in sorted(found)]
        elif scheme in ("ipv4", "ipv6"):
            out += [(a.strip(), "") for a in t.split(":", 1)[1].split(",") if a.strip()]
        else:
            out.append((t, ""))
    return out


def insecure_channel(target: str, max_message_bytes: int = 64 * MiB) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes))


def _compression(name: str) -> grpc.Compression:
    return grpc.Compression.Gzip if name == "gzip" else grpc.Compression.NoCompression


def channel(target: str, transport: Transport | None = None, max_message_bytes: int = 64 * MiB,
            server_name: str = "") -> grpc.aio.Channel:
    """A channel to another of our services: TLS (mTLS with our own certificate) when the
    transport has TLS files, plaintext otherwise; compressed as --channel-compression says.
    server_name: the name the server's certificate must carry when the target is an IP
    (a worker resolved from dns:///name:port), else the target's host is checked."""
    t = transport or PLAINTEXT
    options = channel_options(max_message_bytes)
    compression = _compression(t.channel_compression)
    if not t.client_tls:
        return grpc.aio.insecure_channel(target, options=options, compression=compression)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, channel_credentials(t), options=options,
                                   compression=compression)


def channel_credentials(transport: Transport) -> grpc.ChannelCredentials:
    """Trusts --tls-ca (the system roots without it) and shows --tls-cert when given."""
    return grpc.ssl_channel_credentials(
        root_certificates=transport.read(transport.tls_ca),
        private_key=transport.read(transport.tls_key),
        certificate_chain=transport.read(transport.tls_cert),
    )


def server_credentials(transport: Transport) -> grpc.ServerCredentials | None:
    """None: plaintext. With --tls-ca, clients' certificates are checked against it:
    required (mTLS), optional (checked when shown), or not asked for (none)."""
    if not transport.server_tls:
        return None
    pair = [(transport.read(transport.tls_key), transport.read(transport.tls_cert))]
    if not transport.client_ca or transport.tls_client_auth == "none":
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=transport.read(transport.client_ca),
        require_client_auth=transport.tls_client_auth == "require")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one client connection may hold on a server: streams (calls) open at once,
    how long it may sit without a call, and how old it may grow (then it is asked to go
    away: its calls get max_age_grace_s to finish, the client reconnects). 0: no limit."""

    max_concurrent_streams: int = 1024
    max_idle_s: float = 600.0
    max_age_s: float = 0.0
    max_age_grace_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_concurrent_streams < 1:
            raise ConfigError(f"--max-concurrent-streams: must be >= 1, "
                              f"got {self.max_concurrent_streams}")
        for name, value in (("idle", self.max_idle_s), ("age", self.max_age_s),
                            ("age grace", self.max_age_grace_s)):
            if not value >= 0:
                raise ConfigError(f"connection {name} limit must be >= 0 s, got {value}")

    def options(self) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = [
            ("grpc.max_concurrent_streams", self.max_concurrent_streams)]
        if self.max_idle_s:
            out.append(("grpc.max_connection_idle_ms", int(self.max_idle_s * 1000)))
        if self.max_age_s:
            out += [("grpc.max_connection_age_ms", int(self.max_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(self.max_age_grace_s * 1000))]
        return out


# Internal services: their clients are our own long-lived streams, never aged out.
INTERNAL_LIMITS = ConnectionLimits()


def server_options(max_message_bytes: int = 64 * MiB, reuse_port: bool = False,
                   limits: ConnectionLimits = INTERNAL_LIMITS) -> list[tuple[str, object]]:
    """reuse_port: SO_REUSEPORT, so several processes can share one listening port (the
    kernel spreads new connections over them); off by default, so a taken port fails."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        *limits.options(),
    ]


class _Undecodable:
    """What a guarded deserializer returns for bytes that are not the method's message."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


# A check of a request's bytes before they are parsed: why it is refused, or None.
Precheck = Callable[[bytes], str | None]


def _guarded_deserializer(method: str, deserializer: Callable,
                          precheck: Precheck | None = None) -> Callable:
    def deserialize(data: bytes):
        if precheck is not None:
            why = precheck(data)
            if why:
                return _Undecodable(f"{method}: {why} (refused before parsing)")
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's input
            return _Undecodable(f"{method}: the request is not a valid protobuf message "
                                f"({len(data)} bytes): {e}")
    return deserialize


async def _checked(requests, context):
    """A request stream that ends the call INVALID_ARGUMENT at its first undecodable message."""
    async for request in requests:
        if type(request) is _Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


def _guard_behavior(behavior: Callable, streaming_requests: bool) -> Callable:
    """`behavior` answering undecodable requests INVALID_ARGUMENT before it runs. An async
    generator stays one; anything else becomes a coroutine (a synchronous behavior, such as
    a generated base class's UNIMPLEMENTED method, is called inline, as grpc.aio does)."""

    async def check(request, context):
        if streaming_requests:
            return _checked(request, context)
        if type(request) is _Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return request

    if inspect.isasyncgenfunction(behavior):
        async def stream_behavior(request, context):
            async for response in behavior(await check(request, context), context):
                yield response
        return stream_behavior

    async def unary_behavior(request, context):
        result = behavior(await check(request, context), context)
        return (await result) if inspect.isawaitable(result) else result
    return unary_behavior


def guard_decoding(method: str, handler: grpc.RpcMethodHandler,
                   precheck: Precheck | None = None) -> grpc.RpcMethodHandler:
    """The handler with a deserializer that never raises: bytes that do not parse as the
    method's request answer INVALID_ARGUMENT with a clear message. (grpc.aio deserializes
    before the servicer runs, so without this they end UNKNOWN "Unexpected DecodeError".)
    precheck: refuses bytes before they are parsed (the same INVALID_ARGUMENT)."""
    if handler.request_deserializer is None:
        return handler
    kind = ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary")
    return handler._replace(
        request_deserializer=_guarded_deserializer(method, handler.request_deserializer,
                                                   precheck),
        **{kind: _guard_behavior(getattr(handler, kind), handler.request_streaming)},
    )


class DecodeGuard(grpc.aio.ServerInterceptor):
    """First interceptor of every server (so it also covers what later interceptors read):
    guard_decoding on each method's handler, built once per method.
    prechecks: method -> a check of its request bytes before they are parsed."""

    def __init__(self, prechecks: Mapping[str, Precheck] | None = None):
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self.prechecks = dict(prechecks or {})

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # e.g. a refusal that never reads the request
        method = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, guard_decoding(method, handler, self.prechecks.get(method)))
            self._handlers[method] = cached
        return cached[1]


HEALTH_PREFIX = "/grpc.health.v1.Health/"


def unread(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler answering as if its request were empty, without reading it: a request-
    streaming handler is handed no message it does not ask for (the wire is the same for
    every kind of call). For grpc.health.v1: the whole server's status (service "")."""
    blank = handler.request_deserializer(b"") if handler.request_deserializer else b""
    behavior = handler.unary_unary or handler.unary_stream
    if handler.unary_stream is not None and inspect.isasyncgenfunction(behavior):
        async def stream(_requests, context):
            async for response in behavior(blank, context):
                yield response
        return grpc.stream_stream_rpc_method_handler(
            stream, response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:  # writes with context.write (the health servicer)
        async def written(_requests, context):
            await behavior(blank, context)
        return grpc.stream_stream_rpc_method_handler(
            written, response_serializer=handler.response_serializer)

    async def unary(_requests, context):
        return await behavior(blank, context)
    return grpc.stream_unary_rpc_method_handler(
        unary, response_serializer=handler.response_serializer)


async def _one(requests, context):
    """The single message of a unary call served by a request-streaming handler."""
    async for request in requests:
        return request
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")


class PeerCheck(grpc.aio.ServerInterceptor):
    """Serves only clients whose (verified) certificate's common name is allowed: a worker
    only the batcher, the cache only gateways; a request is read only once its caller is
    (a unary method is served by a request-streaming handler). grpc.health.v1 stays open to
    any client the CA signed (probes run with the pod's own certificate), answered about the
    whole server without its message being read. Installed by new_server only when
    --tls-allowed-clients names someone."""

    def __init__(self, allowed: Iterable[str]):
        self.allowed = frozenset(allowed)
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        cached = self._handlers.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, unread(handler) if method.startswith(HEALTH_PREFIX)
                      else self._checked(handler))
            self._handlers[method] = cached
        return cached[1]

    def _checked(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_streaming:  # nothing is read before the behavior iterates
            kind = "stream_stream" if handler.response_streaming else "stream_unary"
            return handler._replace(**{kind: self._wrap(getattr(handler, kind))})
        behavior = handler.unary_unary or handler.unary_stream
        check = self._check
        if handler.unary_unary is not None:
            async def unary(requests, context):
                await check(context)
                return await behavior(await _one(requests, context), context)
            return grpc.stream_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if inspect.isasyncgenfunction(behavior):
            async def stream(requests, context):
                await check(context)
                async for response in behavior(await _one(requests, context), context):
                    yield response
        else:
            async def stream(requests, context):  # writes with context.write
                await check(context)
                await behavior(await _one(requests, context), context)
        return grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    async def _check(self, context) -> None:
        names = [n.decode(errors="replace") if isinstance(n, bytes) else n
                 for n in context.auth_context().get("x509_common_name", ())]
        if not self.allowed.intersection(names):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this port serves only {', '.join(sorted(self.allowed))}; the client "
                f"certificate is {clip(', '.join(names)) or 'absent'}")

    def _wrap(self, behavior):
        if inspect.isasyncgenfunction(behavior):
            async def stream(request, context):
                await self._check(context)
                async for item in behavior(request, context):
                    yield item
            return stream

        async def unary(request, context):
            await self._check(context)
            return await behavior(request, context)
        return unary


@functools.cache
def _reflection_pool():
    """Our descriptor pool (meshserve.pb.POOL) with the health and reflection protos added,
    so reflection describes every service a server exposes."""
    from grpc_reflection.v1alpha import reflection_pb2

    from meshserve.pb import POOL

    for module in (health_pb2, reflection_pb2):
        try:
            POOL.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return POOL


def new_server(
    address: str,
    service_names: Iterable[str],
    max_message_bytes: int = 64 * MiB,
    reuse_port: bool = False,
    transport: Transport | None = None,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    limits: ConnectionLimits = INTERNAL_LIMITS,
    prechecks: Mapping[str, Precheck] | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """An aio server with grpc.health.v1 (NOT_SERVING until the caller says so) and
    reflection for the given services. Returns (server, bound port, health servicer).
    transport: TLS / mTLS (--tls-allowed-clients: PeerCheck) and the default compression
    of responses (plaintext without).
    limits: streams, idle time and age of each client connection.
    Every method answers undecodable request bytes INVALID_ARGUMENT (DecodeGuard), and
    bytes a precheck refuses (method -> check) before they are parsed."""
    t = transport or PLAINTEXT
    peer_check = [PeerCheck(t.tls_allowed_clients)] if t.tls_allowed_clients else []
    server = grpc.aio.server(options=server_options(max_message_bytes, reuse_port, limits),
                             compression=_compression(t.compression),
                             interceptors=[DecodeGuard(prechecks), *peer_check, *interceptors])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
        pool=_reflection_pool(),
    )
    credentials = server_credentials(t)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return server, port, health_servicer


async def set_serving(health_servicer, service_names: Iterable[str], serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


async def wait_for_signal() -> None:
    """Returns on SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
