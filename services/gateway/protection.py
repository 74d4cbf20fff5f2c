"""The gateway's protection: API keys, per-model permissions, rate limits and a concurrency
limit, applied by ONE server interceptor on the gateway's port.

- Authentication: gRPC metadata `authorization: Bearer <key>`, looked up by its SHA-256 in
  the keys file (common.auth.KeyStore): missing, malformed or unknown -> UNAUTHENTICATED,
  decided (with the method's scope below) from the metadata alone, before the request
  message is read or parsed.
- Permission: the method needs a scope of the key (SCOPE_OF below: "infer" for inference,
  metadata and async tasks, "admin" for load/unload, routing, statistics and settings; a
  method not listed needs "admin"), and the model comes from the request message, per method
  (MODEL_OF below; each message of a ModelStreamInfer; every target of a routing policy):
  a missing scope or a model the key may not use -> PERMISSION_DENIED.
- Requests the router serves from another model (alias and fallback targets) or makes up
  (shadow copies) take that model's token (`charge`); shadows also a concurrency slot.
- The caller's key is visible to the servicer through common.auth.CALLER (async tasks are
  bound to the key that submitted them).
- Inference (ModelInfer, each ModelStreamInfer message, AsyncInference Submit/SubmitBatch):
  the key's priority when the request sets none, and as a floor (a request cannot ask for a
  higher one than its key's); then a token from the key's and the
  model's buckets (common.ratelimit), refused with RESOURCE_EXHAUSTED and `retry-after-ms`
  in the trailing metadata (and the message); ModelInfer and stream messages also count
  against --max-concurrent-requests (shed at once past it).
- grpc.health.v1 stays open (probes): a caller without a valid key is answered about the
  whole server without its message being read; reflection needs a key (any scope).
A refused stream message is answered on the stream (error_message, plus the parameter
`retry_after_ms`); the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshserve.common import grpcutil
from meshserve.common.auth import ADMIN, CALLER, INFER, ApiKey, KeyStore
from meshserve.common.ratelimit import Bucket, LocalLimiter, RateLimit, RedisLimiter
from meshserve.gateway.convert import MAX_ID_CHARS, MAX_NAME_CHARS
from meshserve.pb.inference import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

INFERENCE = "/inference.GRPCInferenceService/"
ASYNC = "/meshserve.v1.AsyncInference/"
ROUTING = "/meshserve.v1.Routing/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REFLECTION = "/grpc.reflection."
# Responses and refusals of one ModelStreamInfer waiting to be written, at most.
STREAM_BUFFER = 64

MODEL_INFER = INFERENCE + "ModelInfer"
MODEL_STREAM_INFER = INFERENCE + "ModelStreamInfer"
SUBMIT = ASYNC + "Submit"
SUBMIT_BATCH = ASYNC + "SubmitBatch"

# Model-scoped management calls: the models a request names ("" = every model: needs "*").
MODEL_OF: dict[str, Callable[[object], list[str]]] = {
    INFERENCE + "ModelReady": lambda r: [r.name],
    INFERENCE + "ModelMetadata": lambda r: [r.name],
    INFERENCE + "ModelConfig": lambda r: [r.name],
    INFERENCE + "ModelStatistics": lambda r: [r.name],
    INFERENCE + "RepositoryModelLoad": lambda r: [r.model_name],
    INFERENCE + "RepositoryModelUnload": lambda r: [r.model_name],
    ROUTING + "Get": lambda r: [r.model],
    # A policy's targets too: a key may route only between models it may use itself.
    ROUTING + "Set": lambda r: _policy_models(r),
    ROUTING + "Promote": lambda r: [r.model],
    ROUTING + "Watch": lambda r: [r.model],
}


# The scope each method needs; any other method (settings, shared memory...) needs ADMIN.
SCOPE_OF: dict[str, str] = {
    **{INFERENCE + m: INFER for m in (
        "ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata",
        "ModelConfig", "ModelInfer", "ModelStreamInfer", "RepositoryIndex")},
    **{ASYNC + m: INFER for m in ("Submit", "SubmitBatch", "Get", "Cancel", "Watch")},
}


def scope_of(method: str) -> str:
    if method.startswith(REFLECTION):
        return INFER  # any valid key may read the API's description
    return SCOPE_OF.get(method, ADMIN)


def _policy_models(request) -> list[str]:
    policy = request.policy
    if request.clear:
        return [policy.model]
    targets = [t.model for t in policy.fallback]
    if policy.HasField("alias"):
        targets += [policy.alias.preferred.model, policy.alias.cheaper.model]
    return list(dict.fromkeys([policy.model, *(t for t in targets if t)]))


class ProtectionMetrics:
    def __init__(self, registry: CollectorRegistry, inflight: Callable[[], float]):
        self.auth_failures = Counter(
            "meshserve_gateway_auth_failures", "Requests refused by authentication or permission",
            ["reason"], registry=registry)
        self.rate_limited = Counter(
            "meshserve_gateway_rate_limited", "Requests refused by a rate or concurrency limit",
            ["scope"], registry=registry)
        self.inflight = Gauge("meshserve_gateway_inflight_requests",
                              "Inferences in progress at this gateway", registry=registry)
        self.inflight.set_function(inflight)


@dataclass(frozen=True, slots=True)
class Denied:
    code: grpc.StatusCode
    message: str
    retry_after_ms: int | None = None

    def trailing_metadata(self) -> tuple:
        if self.retry_after_ms is None:
            return ()
        return (("retry-after-ms", str(self.retry_after_ms)),)


class Protection:
    """The checks themselves (the interceptor below applies them to calls)."""

    def __init__(self, keys: KeyStore | None, model_limits: dict[str, RateLimit],
                 max_concurrent: int, registry: CollectorRegistry, redis_url: str = ""):
        self.keys = keys
        self.model_buckets = {m: Bucket(f"model:{m}", lim, "model")
                              for m, lim in model_limits.items()}
        self.max_concurrent = max_concurrent
        self.inflight = 0
        self.metrics = ProtectionMetrics(registry, lambda: self.inflight)
        # Limits may exist (per model, or per key: keys files reload), so a limiter too.
        self.limiting = bool(model_limits) or keys is not None
        self.limiter = (RedisLimiter(redis_url) if redis_url else LocalLimiter()) \
            if self.limiting else None

    @property
    def auth(self) -> bool:
        return self.keys is not None

    async def close(self) -> None:
        if self.limiter is not None:
            await self.limiter.close()

    # ------------------------------------------------------------------ the checks

    def authenticate(self, metadata) -> ApiKey | Denied | None:
        """The caller's key (None when auth is off) or why it is refused."""
        if self.keys is None:
            return None
        value = None
        for k, v in metadata or ():
            if k == "authorization":
                value = v if isinstance(v, str) else v.decode(errors="replace")
                break
        if value is None:
            return self._unauthenticated("missing", "missing 'authorization: Bearer <key>' metadata")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return self._unauthenticated("malformed", "malformed authorization metadata: "
                                         "expected 'Bearer <key>'")
        key = self.keys.current().lookup(token)
        if key is None:
            return self._unauthenticated("unknown_key", "unknown API key")
        return key

    def _unauthenticated(self, reason: str, message: str) -> Denied:
        self.metrics.auth_failures.labels(reason).inc()
        return Denied(grpc.StatusCode.UNAUTHENTICATED, message)

    def authorize(self, key: ApiKey | None, models: list[str],
                  scope: str = INFER) -> Denied | None:
        if key is None:
            return None
        if not key.has(scope):
            self.metrics.auth_failures.labels("missing_scope").inc()
            return Denied(grpc.StatusCode.PERMISSION_DENIED,
                          f"API key '{key.name}' lacks the '{scope}' scope "
                          f"(it has: {', '.join(sorted(key.scopes))})")
        for model in models:
            if not key.allows(model):
                self.metrics.auth_failures.labels("forbidden_model").inc()
                what = f"model '{model}'" if model else "every model (no model named)"
                return Denied(grpc.StatusCode.PERMISSION_DENIED,
                              f"API key '{key.name}' may not use {what}")
        return None

    def acquire(self) -> Denied | None:
        """One concurrency slot (release() it after the inference) or a refusal."""
        if self.inflight >= self.max_concurrent:
            self.metrics.rate_limited.labels("concurrency").inc()
            return Denied(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"gateway overloaded: {self.max_concurrent} requests in progress")
        self.inflight += 1
        return None

    def release(self) -> None:
        self.inflight -= 1

    async def admit(self, key: ApiKey | None, requests: list[pb.ModelInferRequest]) -> Denied | None:
        """Permission, the key's priority (the default, and a floor: 1 is the highest, so
        a request asking for a higher one than its key's gets the key's), then one token
        per request."""
        models = [r.model_name for r in requests]
        denied = self.authorize(key, models)
        if denied is not None:
            return denied
        if key is not None and key.priority:
            for r in requests:
                asked = r.parameters.get("priority")
                if asked is None or (asked.WhichOneof("parameter_choice") == "int64_param"
                                     and asked.int64_param < key.priority):
                    r.parameters["priority"].int64_param = key.priority
        if self.limiter is None:
            return None
        buckets = []
        if key is not None and key.limit is not None:
            buckets.append(Bucket(f"key:{key.name}", key.limit, "key"))
        for model in dict.fromkeys(models):
            bucket = self.model_buckets.get(model)
            if bucket is not None:
                buckets.append(bucket)
        return await self._take(buckets, len(requests), key)

    async def charge(self, model: str) -> Denied | None:
        """One token of `model`'s bucket for a request it serves that named another model
        (an alias or fallback target) or that no client sent (a shadow copy)."""
        bucket = self.model_buckets.get(model)
        if bucket is None or self.limiter is None:
            return None
        return await self._take([bucket], 1, None)

    async def _take(self, buckets: list[Bucket], n: int, key: ApiKey | None) -> Denied | None:
        if not buckets:
            return None
        refusal = await self.limiter.take(buckets, n)
        if refusal is None:
            return None
        self.metrics.rate_limited.labels(refusal.scope).inc()
        who = f"API key '{key.name}'" if refusal.scope == "key" and key else "the model"
        if math.isinf(refusal.retry_after_s):
            return Denied(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"rate limit of {who}: {n} requests at once exceed its burst")
        retry_ms = max(1, math.ceil(refusal.retry_after_s * 1000))
        return Denied(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"rate limit of {who} exceeded: retry after {retry_ms} ms", retry_ms)


def stream_error(request: pb.ModelInferRequest, denied: Denied) -> pb.ModelStreamInferResponse:
    response = pb.ModelStreamInferResponse(
        error_message=denied.message,
        infer_response=pb.ModelInferResponse(model_name=request.model_name[:MAX_NAME_CHARS],
                                             id=request.id[:MAX_ID_CHARS]))
    if denied.retry_after_ms is not None:
        response.infer_response.parameters["retry_after_ms"].int64_param = denied.retry_after_ms
    return response


async def abort(context, denied: Denied):
    await context.abort(denied.code, denied.message, trailing_metadata=denied.trailing_metadata())


class ProtectionInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once (cached per method); the wrapper authenticates
    from the call's metadata and applies the method's checks to its request message."""

    def __init__(self, protection: Protection):
        self.protection = protection
        self._handlers: dict[str, tuple[object, object]] = {}
        self._unread: dict[str, tuple[object, object]] = {}  # open methods, keyless callers

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if self.protection.auth and method.startswith(OPEN_PREFIXES):
            return self._open(method, await continuation(handler_call_details),
                              handler_call_details.invocation_metadata)
        if self.protection.auth:
            # Authentication before the body: a caller without a valid key is refused from
            # its metadata alone; its message is never read nor parsed.
            p = self.protection
            key = p.authenticate(handler_call_details.invocation_metadata)
            denied = key if isinstance(key, Denied) else p.authorize(key, [], scope_of(method))
            if denied is not None:
                return _refusal(denied)
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        cached = self._handlers.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(method, handler))
            self._handlers[method] = cached
        return cached[1]

    def _open(self, method: str, handler, metadata):
        """grpc.health.v1 with keys configured: a caller with a valid key is served as
        usual; any other is answered about the whole server (service "") without its
        message being read, so a caller without a key never makes the gateway buffer a
        body (up to --max-message-mb): Kubernetes probes ask about "" anyway."""
        if handler is None or (any(k == "authorization" for k, _v in metadata or ())
                               and isinstance(self.protection.authenticate(metadata), ApiKey)):
            return handler
        cached = self._unread.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, grpcutil.unread(handler))
            self._unread[method] = cached
        return cached[1]

    def _wrap(self, method: str, handler):
        p = self.protection
        if method == MODEL_INFER:
            return _unary(handler, self._infer(handler.unary_unary))
        if method == MODEL_STREAM_INFER:
            return _stream_stream(handler, self._stream_infer(handler.stream_stream))
        if method in (SUBMIT, SUBMIT_BATCH) and (p.auth or p.limiting):
            if method == SUBMIT:
                def requests(r):
                    return [r.request]
            else:
                def requests(r):
                    return [s.request for s in r.requests]
            return _unary(handler, self._submit(handler.unary_unary, requests))
        if not p.auth:
            return handler  # management calls: nothing to check without keys
        model_of = MODEL_OF.get(method)
        return _any(handler, self._authenticated(handler, model_of, scope_of(method)))

    def _infer(self, inner):
        p = self.protection

        async def infer(request, context):
            key = p.authenticate(context.invocation_metadata())
            if isinstance(key, Denied):
                return await abort(context, key)
            CALLER.set(key)
            denied = p.acquire()
            if denied is not None:
                return await abort(context, denied)
            try:
                if key is not None or p.limiting:
                    denied = await p.admit(key, [request])
                    if denied is not None:
                        return await abort(context, denied)
                return await inner(request, context)
            finally:
                p.release()

        return infer

    def _submit(self, inner, requests):
        p = self.protection

        async def submit(request, context):
            key = p.authenticate(context.invocation_metadata())
            if isinstance(key, Denied):
                return await abort(context, key)
            CALLER.set(key)
            denied = await p.admit(key, requests(request))
            if denied is not None:
                return await abort(context, denied)
            return await inner(request, context)

        return submit

    def _stream_infer(self, inner):
        """Each message: admitted (then counted until its response is written) or answered
        at once with its refusal; responses of the servicer and refusals merge into one
        stream through a small buffer: a client that does not read stops the reading of
        its requests, and holds its concurrency slots, instead of growing memory."""
        p = self.protection
        done = (None, False)

        async def stream(request_iterator, context):
            key = p.authenticate(context.invocation_metadata())
            if isinstance(key, Denied):
                await abort(context, key)
                return
            CALLER.set(key)
            out: asyncio.Queue = asyncio.Queue(STREAM_BUFFER)  # (response, admitted)
            pending = 0  # admitted, response not written yet

            async def admitted():
                nonlocal pending
                async for request in request_iterator:
                    denied = p.acquire()
                    if denied is None:
                        denied = await p.admit(key, [request])
                        if denied is not None:
                            p.release()
                    if denied is not None:
                        await out.put((stream_error(request, denied), False))
                        continue
                    pending += 1
                    yield request

            async def pump():
                try:
                    async for response in inner(admitted(), context):
                        await out.put((response, True))
                except asyncio.CancelledError:
                    raise  # the stream is gone: nobody reads `out` any more
                except Exception:
                    await out.put(done)
                    raise
                await out.put(done)

            task = asyncio.create_task(pump())
            try:
                while (item := await out.get()) is not done:
                    yield item[0]
                    if item[1]:
                        pending -= 1
                        p.release()
                await task
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                for _ in range(pending):
                    p.release()
                pending = 0

        return stream

    def _authenticated(self, handler, model_of, scope: str):
        """Any other call: a valid key with the method's scope, and permission for the
        models it names."""
        p = self.protection
        inner = _behavior(handler)
        streaming = handler.response_streaming

        async def check(request, context) -> bool:
            key = p.authenticate(context.invocation_metadata())
            if isinstance(key, Denied):
                await abort(context, key)
            models = model_of(request) if model_of is not None \
                and not handler.request_streaming else []
            denied = p.authorize(key, models, scope)
            if denied is not None:
                await abort(context, denied)
            CALLER.set(key)
            return True

        if streaming:
            async def gen(request, context):
                await check(request, context)
                async for item in inner(request, context):
                    yield item
            return gen

        async def unary(request, context):
            await check(request, context)
            return await inner(request, context)
        return unary


def _refusal(denied: Denied):
    """A handler that answers `denied` without reading the request: a request-streaming
    handler is never handed a message it does not ask for (the wire is the same for every
    kind of call, so it answers a unary call as well)."""

    async def refuse(_request_iterator, context):
        await abort(context, denied)

    return grpc.stream_unary_rpc_method_handler(refuse)


def _behavior(handler):
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)


def _unary(handler, behavior):
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


def _stream_stream(handler, behavior):
    return grpc.stream_stream_rpc_method_handler(
        behavior, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


def _any(handler, behavior):
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def create(settings, registry: CollectorRegistry) -> Protection:
    """The gateway's Protection from its settings; a bad keys file fails here (at start)
    with a ConfigError naming the file and the field."""
    keys = KeyStore(settings.api_keys_file) if settings.api_keys_file else None
    p = Protection(keys, settings.model_limits(), settings.max_concurrent_requests, registry,
                   settings.redis_url)
    log.info("protection: auth %s, model limits %s, max %d concurrent inferences, limits %s",
             f"on ({settings.api_keys_file})" if keys else "off",
             settings.model_rate_limits or "none", settings.max_concurrent_requests,
             "shared through Redis" if settings.redis_url and p.limiting else "in memory")
    return p
