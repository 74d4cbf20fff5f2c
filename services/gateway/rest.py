"""The Open Inference Protocol v2 over HTTP/1.1 (aiohttp), on the gateway's event loop.

One more transport onto the gRPC servicer, not a second implementation: each route builds
the gRPC request message (gateway/rest_codec.py) and awaits the very handler the gRPC
server runs, wrapped by the same protection interceptor (API keys from `Authorization:
Bearer`, rate limits, load shedding) over the same Protection object. Validation, routing,
cache, batcher, metrics and tracing are therefore shared. The handlers see a small
stand-in for grpc's ServicerContext (HttpContext); an abort becomes the HTTP status of
its gRPC code (STATUS_HTTP, the one table) with `{"error": "..."}`.

Health (/v2/health/live and /ready) stays open, as grpc.health.v1 does on the gRPC port.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import namedtuple
from pathlib import Path

import grpc
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestPayloadError

from meshserve.common import errors
from meshserve.common.grpcutil import STATUS_MESSAGE_CHARS, status_of
from meshserve.common.logs import clip
from meshserve.common.transport import Transport
from meshserve.gateway import rest_codec as codec
from meshserve.gateway.protection import INFERENCE, Protection, ProtectionInterceptor
from meshserve.pb.inference import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

OPENAPI = Path(__file__).with_name("openapi.json")

# The one table from gRPC status codes to HTTP statuses (anything else: 500).
STATUS_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# HTTP headers that carry what gRPC clients send as metadata.
METADATA_HEADERS = ("authorization", "x-route-key", "traceparent", "tracestate")
# Servicer methods reached over HTTP through the protection interceptor.
GUARDED = ("ServerMetadata", "ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics",
           "ModelInfer", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
JSON = "application/json"

MAX_BODY = web.AppKey("max_body", int)
BODY_ENCODINGS = ("identity", "gzip", "deflate")  # request bodies aiohttp decodes for us
_CallDetails = namedtuple("_CallDetails", "method invocation_metadata")


class Abort(grpc.aio.AbortError):
    """HttpContext.abort: the status a handler (or the interceptor) ended the call with."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata=()):
        super().__init__(details)
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


class HttpContext:
    """What the servicer and the protection interceptor use of grpc.aio.ServicerContext,
    over one HTTP request. HTTP has no deadline: Triton's `timeout` parameter sets one."""

    __slots__ = ("_metadata", "trailing_metadata")

    def __init__(self, headers):
        self._metadata = tuple((k, headers[k]) for k in METADATA_HEADERS if k in headers)
        self.trailing_metadata = ()

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing_metadata = tuple(metadata)

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self):
        return None

    async def abort(self, code, details="", trailing_metadata=()):
        raise Abort(code, details, trailing_metadata)


def error(status: int, message: str, retry_after_s: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.json_response({"error": message}, status=status, headers=headers)


def _aborted(e: Abort) -> web.Response:
    retry = None
    for key, value in e.trailing_metadata or ():
        if key == "retry-after-ms":
            retry = max(1, math.ceil(int(value) / 1000))
    return error(STATUS_HTTP.get(e.code, 500), e.details, retry)


class UnsupportedEncoding(Exception):
    """A request body in an encoding we cannot read: 415."""


@web.middleware
async def _errors(request: web.Request, handler):
    """Every failure as {"error": ...} with its status; responses compressed on request."""
    try:
        response = await handler(request)
    except Abort as e:
        return _aborted(e)
    except errors.MeshError as e:  # a malformed body, found before the servicer
        return error(STATUS_HTTP.get(status_of(e), 500), clip(str(e), STATUS_MESSAGE_CHARS))
    except UnsupportedEncoding as e:
        return error(415, str(e))
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"request body over the limit of {request.app[MAX_BODY]} bytes "
                     "(--max-message-mb)")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        text = {404: "no such route", 405: f"method {request.method} is not allowed here"}
        return error(e.status, text.get(e.status, e.reason))
    except Exception:
        log.exception("HTTP %s %s failed", request.method, clip(request.path))
        return error(500, "internal error")
    if "Accept-Encoding" in request.headers and len(response.body or b"") > 256:
        response.enable_compression()
    return response


class RestApi:
    """The routes. Each guarded call goes through the protection interceptor per request,
    exactly as on the gRPC port (ProtectionInterceptor.intercept_service, then the handler
    it returns), onto the servicer's own method."""

    def __init__(self, servicer, protection: Protection | None, max_body: int):
        self.servicer = servicer
        self.interceptor = ProtectionInterceptor(protection) if protection is not None else None
        self.continuations = {name: _continuation(servicer, name) for name in GUARDED} \
            if servicer is not None else {}
        self.max_body = max_body
        self.serving = False  # /v2/health/ready: set once the gateway serves, cleared to drain

    async def call(self, method: str, request: web.Request, message):
        """`message` through the servicer's `method` for this caller. The interceptor first
        sees the headers alone: a refused caller is answered before its body is read (when
        `message` is a coroutine function, it reads the body, and runs only once admitted)."""
        context = HttpContext(request.headers)
        if self.interceptor is None:  # no keys, no limits: the servicer sheds load itself
            handler = await self.continuations[method](None)
        else:
            handler = await self.interceptor.intercept_service(
                self.continuations[method],
                _CallDetails(INFERENCE + method, context.invocation_metadata()))
        if handler.unary_unary is None:  # a refusal: it answers without reading a request
            refuse = handler.stream_unary or handler.unary_stream or handler.stream_stream
            await refuse(None, context)
            raise errors.Internal(f"{method}: refused without a status")
        if callable(message):
            message = await message()
        return await handler.unary_unary(message, context)

    async def body(self, request: web.Request) -> bytes:
        """The request body (decompressed), refused with 413 past the limit before it is
        read whole: at once by its Content-Length, else as soon as it grows past it."""
        if request.content_length is not None and request.content_length > self.max_body:
            raise web.HTTPRequestEntityTooLarge(self.max_body, request.content_length)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in BODY_ENCODINGS:
            raise UnsupportedEncoding(f"Content-Encoding {codec.shown(encoding)} is not supported "
                                      f"(use {', '.join(BODY_ENCODINGS)})")
        try:
            return await request.read()
        except (RequestPayloadError, http_exceptions.HttpProcessingError) as e:
            # a body that is not what its Content-Encoding or Transfer-Encoding says
            reason = " ".join(str(getattr(e, "message", "") or e).split())
            raise errors.InvalidInput(f"the request body cannot be read: {clip(reason, 200)}") \
                from None

    # ------------------------------------------------------------------- health

    async def live(self, request):
        return web.json_response({"live": True})

    async def ready(self, request):
        ready = self.serving and (await self.servicer.ServerReady(
            pb.ServerReadyRequest(), HttpContext(request.headers))).ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    # ----------------------------------------------------------------- metadata

    async def server_metadata(self, request):
        response = await self.call("ServerMetadata", request, pb.ServerMetadataRequest())
        return web.json_response(codec.message_json(response))

    def _model(self, request, message_type):
        return message_type(name=request.match_info["model"],
                            version=request.match_info.get("version", ""))

    async def model_metadata(self, request):
        response = await self.call("ModelMetadata", request,
                                   self._model(request, pb.ModelMetadataRequest))
        return web.json_response(codec.message_json(response))

    async def model_ready(self, request):
        message = self._model(request, pb.ModelReadyRequest)
        response = await self.call("ModelReady", request, message)
        return web.json_response({"name": message.name, "ready": response.ready},
                                 status=200 if response.ready else 503)

    async def model_config(self, request):
        response = await self.call("ModelConfig", request,
                                   self._model(request, pb.ModelConfigRequest))
        return web.json_response(codec.message_json(response.config))

    async def model_stats(self, request):
        message = pb.ModelStatisticsRequest(name=request.match_info.get("model", ""),
                                            version=request.match_info.get("version", ""))
        response = await self.call("ModelStatistics", request, message)
        return web.json_response(codec.message_json(response))

    # --------------------------------------------------------------- repository

    async def index(self, request):
        async def message():
            ready = codec.parse_json(await self.body(request)).get("ready", False)
            if not isinstance(ready, bool):
                raise errors.InvalidInput("ready: expected a bool")
            return pb.RepositoryIndexRequest(ready=ready)

        response = await self.call("RepositoryIndex", request, message)
        return web.json_response([
            {k: v for k, v in codec.message_json(m).items() if v != ""} for m in response.models])

    async def _repository(self, request, method: str, message_type):
        async def message():
            body = codec.parse_json(await self.body(request))
            m = message_type(model_name=request.match_info["model"])
            codec.repository_parameters(body, m.parameters)
            return m

        await self.call(method, request, message)
        return web.Response(status=200)

    async def load(self, request):
        return await self._repository(request, "RepositoryModelLoad", pb.RepositoryModelLoadRequest)

    async def unload(self, request):
        return await self._repository(request, "RepositoryModelUnload",
                                      pb.RepositoryModelUnloadRequest)

    # ---------------------------------------------------------------- inference

    async def infer(self, request):
        answer_as = {}  # how the outputs are to be answered (binary or JSON)

        async def message():
            raw = await self.body(request)
            header, binary = codec.parse_body(raw, request.headers.get(codec.HEADER_LENGTH))
            m, answer_as["outputs"], answer_as["default"] = codec.infer_request(
                request.match_info["model"], request.match_info.get("version", ""), header,
                binary)
            return m

        response = await self.call("ModelInfer", request, message)
        body, header_length = codec.infer_response(response, answer_as["outputs"],
                                                   answer_as["default"])
        if header_length is None:
            return web.Response(body=body, content_type=JSON)
        return web.Response(body=body, content_type="application/octet-stream",
                            headers={codec.HEADER_LENGTH: str(header_length)})

    async def openapi(self, request):
        return web.Response(body=OPENAPI.read_bytes(), content_type=JSON)


def routes(api: RestApi) -> list[web.RouteDef]:
    """Every route (tests check them against openapi.json)."""
    model = "/v2/models/{model}"
    versioned = [model, model + "/versions/{version}"]
    out = [
        web.get("/v2/health/live", api.live),
        web.get("/v2/health/ready", api.ready),
        web.get("/v2", api.server_metadata),
        web.get("/v2/openapi.json", api.openapi),
        web.get("/v2/models/stats", api.model_stats),
        web.post("/v2/repository/index", api.index),
        web.post("/v2/repository/models/{model}/load", api.load),
        web.post("/v2/repository/models/{model}/unload", api.unload),
    ]
    for base in versioned:
        out += [
            web.get(base, api.model_metadata),
            web.get(base + "/ready", api.model_ready),
            web.get(base + "/config", api.model_config),
            web.get(base + "/stats", api.model_stats),
            web.post(base + "/infer", api.infer),
        ]
    return out


def _continuation(servicer, name: str):
    """The servicer's method as the gRPC server's handler lookup would return it."""
    handler = grpc.unary_unary_rpc_method_handler(getattr(servicer, name))

    async def continuation(_details):
        return handler

    return continuation


def create_app(servicer, protection: Protection, max_body: int) -> tuple[web.Application,
                                                                          RestApi]:
    api = RestApi(servicer, protection, max_body)
    app = web.Application(middlewares=[_errors], client_max_size=max_body)
    app[MAX_BODY] = max_body
    app.add_routes(routes(api))
    return app, api


def ssl_context(transport: Transport) -> ssl.SSLContext | None:
    """The gateway's TLS (and client-certificate policy) on the HTTP port too."""
    if not transport.server_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(transport.tls_cert, transport.tls_key)
    if transport.tls_ca and transport.tls_client_auth != "none":
        context.load_verify_locations(transport.tls_ca)
        context.verify_mode = (ssl.CERT_REQUIRED if transport.tls_client_auth == "require"
                               else ssl.CERT_OPTIONAL)
    return context


class _ClientFaults(logging.Filter):
    """aiohttp logs every malformed HTTP message with its traceback at ERROR: the client's
    fault (it was answered 400), so not logged; anything else is."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (http_exceptions.HttpProcessingError, RequestPayloadError))


protocol_log = logging.getLogger(__name__ + ".protocol")
protocol_log.addFilter(_ClientFaults())


class RestServer:
    """The listener: start() binds (port 0: any free port), stop(grace) drains."""

    def __init__(self, app: web.Application, api: RestApi, host: str, port: int,
                 reuse_port: bool = False, transport: Transport | None = None,
                 grace_s: float = 5.0):
        self.app, self.api = app, api
        self.host, self.port, self.reuse_port = host, port, reuse_port
        self.transport = transport
        self.grace_s = grace_s
        self.runner: web.AppRunner | None = None

    async def start(self) -> int:
        # No access log: a line per request costs CPU, and would copy client strings.
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    shutdown_timeout=self.grace_s, logger=protocol_log)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_port=self.reuse_port or None,
                           ssl_context=ssl_context(self.transport) if self.transport else None)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Not ready at once; closes the port, then waits up to grace_s for requests."""
        self.api.serving = False
        if self.runner is not None:
            await self.runner.cleanup()
