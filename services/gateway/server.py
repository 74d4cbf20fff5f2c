"""The gateway process: the public gRPC API on one port, Prometheus on another."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial

import grpc
from prometheus_client import CollectorRegistry

from meshserve.batcher.client import BatcherClient
from meshserve.cache.client import CacheClient
from meshserve.common import grpcutil, hops, metrics, tracing
from meshserve.common.backoff import Backoff
from meshserve.common.control_store import GatewayControlStore, RedisControlStore
from meshserve.common.grpcutil import MiB
from meshserve.common.repository import ModelRepository
from meshserve.common.settings import write_port_file
from meshserve.gateway import protection, rest, routing_servicer, wire
from meshserve.gateway.config import Settings
from meshserve.gateway.core import Gateway
from meshserve.gateway.l1 import L1Cache, L1Collector
from meshserve.gateway.servicer import GatewayMetrics, InferenceServicer
from meshserve.gateway.tasks_path import GatewayPath
from meshserve.gateway.traffic import Router
from meshserve.pb.inference import grpc_service_pb2, grpc_service_pb2_grpc
from meshserve.tasks import server as tasks_server

log = logging.getLogger(__name__)

SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# + meshserve.v1.AsyncInference, meshserve.v1.Routing
SERVICES = [SERVICE, tasks_server.SERVICE, routing_servicer.SERVICE]


@dataclass(frozen=True, slots=True)
class GatewayProcess:
    """Everything create_server wires; serve starts and stops it in order."""

    server: grpc.aio.Server
    port: int
    health: object  # grpc_health's servicer
    gateway: Gateway
    http: rest.RestServer | None
    protection: protection.Protection
    tasks: tasks_server.AsyncService
    router: Router


async def create_server(settings: Settings, registry: CollectorRegistry | None = None
                        ) -> GatewayProcess:
    """The gateway's parts, wired; the caller starts and stops them. The HTTP listener
    calls the same servicer, through the same protection."""
    registry = registry or CollectorRegistry()
    transport = settings.transport  # TLS / mTLS and compression of the port and the channels
    batcher = BatcherClient(settings.batcher, transport=transport)
    cache = (CacheClient(settings.cache, settings.cache_timeout_ms / 1000, transport=transport)
             if settings.cache else None)
    l1 = L1Cache(settings.l1_cache_mb * MiB) if cache is not None and settings.l1_cache_mb else None
    if l1 is not None:
        registry.register(L1Collector(l1))
    # The cluster's model control: in Redis with --redis-url, else on every batcher.
    control = (RedisControlStore(settings.redis_url) if settings.redis_url
               else GatewayControlStore(settings.batcher, batcher.each, transport))
    # API keys, rate limits, load shedding: one interceptor (gateway/protection.py), only
    # when there are keys or limits; else the servicer sheds load past the concurrency
    # limit itself (an interceptor costs every call).
    p = protection.create(settings, registry)
    intercept = p.auth or p.limiting
    # Traffic management: the gateway builds its router, which charges alias targets,
    # fallbacks and shadows to `p` and shares runtime policies through the store.
    store = routing_servicer.policy_store(settings.redis_url, settings.batcher, transport)
    gateway = Gateway(
        ModelRepository(settings.model_repository), batcher, cache,
        cache_timeout_s=settings.cache_timeout_ms / 1000, control=control, l1=l1,
        routing=partial(Router, registry=registry, store=store, protection=p),
    )
    hops.register(registry, lambda: [*batcher.hop_counts(),
                                     *(cache.hop_counts() if cache is not None else [])])
    server, port, health = grpcutil.new_server(
        f"{settings.host}:{settings.port}", SERVICES, settings.max_message_mb * MiB,
        reuse_port=settings.reuse_port, transport=transport,
        interceptors=[protection.ProtectionInterceptor(p)] if intercept else [],
        limits=settings.connection_limits(),
        prechecks=wire.PRECHECKS,  # counts of a large request, before it is parsed
    )
    servicer = InferenceServicer(gateway, GatewayMetrics(registry),
                                 settings.max_stream_concurrency, settings.trace_sample_ratio,
                                 shed=None if intercept else p)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    http = None
    if settings.http_port >= 0:
        # The same protection as the gRPC port: the interceptor, or the servicer's shedding.
        app, api = rest.create_app(servicer, p if intercept else None,
                                   settings.max_message_mb * MiB)
        http = rest.RestServer(app, api, settings.host, settings.http_port, settings.reuse_port,
                               transport, settings.grace_s)
    # Async inference on the same port.
    tasks = tasks_server.attach(server, GatewayPath(gateway), registry,
                                        settings.redis_url, settings.async_runners,
                                        settings.queue_settings())
    # Traffic management on the same port.
    routing_servicer.attach(server, gateway.router)
    return GatewayProcess(server, port, health, gateway, http, p, tasks, gateway.router)


async def _wait_for_batcher(gateway: Gateway) -> None:
    """Blocks until the batcher answers (backoff between tries: it may start after us)."""
    backoff = Backoff(max_s=2.0)
    while not await gateway.server_ready():
        log.info("waiting for the batcher at %s", gateway.batcher.target)
        await backoff.wait()


async def serve(settings: Settings) -> None:
    registry = CollectorRegistry()
    tracing.setup("meshserve-gateway", settings.transport.otlp_endpoint)
    parts = await create_server(settings, registry)
    server, port, health, gateway, http = (parts.server, parts.port, parts.health,
                                           parts.gateway, parts.http)
    await gateway.batcher.start()
    if gateway.cache is not None:
        await gateway.cache.start()
    metrics_port = metrics.serve(registry, settings.metrics_port, settings.host)
    await server.start()
    http_port = await http.start() if http is not None else -1
    log.info("gateway listening on %s:%d (HTTP %s)", settings.host, port,
             http_port if http is not None else "off")
    await _wait_for_batcher(gateway)
    await gateway.control.start(gateway.apply_control)
    await parts.tasks.start()
    await parts.router.start()
    await grpcutil.set_serving(health, SERVICES, True)
    if http is not None:
        http.api.serving = True
    write_port_file(settings.port_file, grpc=port, http=http_port, metrics=metrics_port)
    log.info("gateway serving (batcher %s, cache %s)", settings.batcher, settings.cache or "off")
    await grpcutil.wait_for_signal()
    log.info("draining for up to %.1fs", settings.grace_s)
    await grpcutil.set_serving(health, SERVICES, False)
    await asyncio.gather(server.stop(settings.grace_s), parts.tasks.stop(settings.grace_s),
                         *([http.stop()] if http is not None else []))
    await parts.router.close()
    await gateway.control.close()
    await parts.protection.close()
    await gateway.batcher.close()
    if gateway.cache is not None:
        await gateway.cache.close()
