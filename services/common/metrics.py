"""Prometheus metrics: each service owns a registry (no global default registry),
served over HTTP on its own port at /metrics (every other path: 404, so an HTTP probe of
a wrong path fails as it should)."""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

PATH = "/metrics"
NOT_FOUND = f"not found: metrics are served at {PATH}\n".encode()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
        """No line per scrape."""


def app(registry: CollectorRegistry):
    """A WSGI app: the registry at /metrics (with or without a trailing slash), 404 else."""
    metrics = make_wsgi_app(registry)

    def serve(environ, start_response):
        if environ.get("PATH_INFO", "").rstrip("/") == PATH:
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(NOT_FOUND)))])
        return [NOT_FOUND]

    return serve


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> int | None:
    """Serves /metrics on port (0: an ephemeral port, -1: disabled) in a daemon thread.
    Returns the bound port."""
    if port < 0:
        return None
    family, _, _, _, sockaddr = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    server = make_server(sockaddr[0], port, app(registry), server_class, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d%s", addr, bound, PATH)
    return bound
