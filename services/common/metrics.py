"""Prometheus metrics: each service owns a registry (no global default registry),
served over HTTP on its own port."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> int | None:
    """Serves /metrics on port (0: an ephemeral port, -1: disabled). Returns the port."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound
