"""Prometheus metrics of one server, on a port of their own: latency histogram, requests by status."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

log = logging.getLogger(__name__)
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
STOP_POLL_S = 0.1  # how often the /metrics server looks for a stop: what a stop waits at most (0.5 s by default)


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress holds up no exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not logged (to stderr, as the base class does)."""


class ServerMetrics:
    """One registry per server, so that several servers can live in one process (as in tests)."""

    def __init__(self, role: str):
        self.registry = CollectorRegistry()
        self.latency = Histogram("retriever_request_seconds", "Request latency", ["method"],
                                 buckets=_BUCKETS, registry=self.registry)
        self.requests = Counter("retriever_requests", "Requests by method and status", ["method", "status"],
                                registry=self.registry)
        self.queries = Counter("retriever_queries", "Query vectors searched", registry=self.registry)
        self.inflight = Gauge("retriever_inflight_requests", "Requests being served", registry=self.registry)
        self.role = role
        self._http = None
        self._latency_of: dict[str, object] = {}  # the labelled children, looked up once each
        self._count_of: dict[tuple[str, str], object] = {}

    def count_inflight(self, inflight: Callable[[], int]) -> None:
        """Exports the requests being served as `inflight()` says when scraped (nothing per request)."""
        self.inflight.set_function(inflight)

    def watch_hedge_delays(self, delays: dict[str, Callable[[], float]]) -> None:
        """Exports each shard's current hedge delay (seconds; NaN with hedging off), read when scraped."""
        gauge = Gauge("retriever_hedge_delay_seconds", "How long an attempt on a shard waits before a hedged "
                      "second one to another replica", ["shard"], registry=self.registry)
        for shard, delay in delays.items():
            gauge.labels(shard).set_function(delay)

    def observe(self, method: str, status: str, seconds: float, nq: int = 0) -> None:
        latency = self._latency_of.get(method)
        if latency is None:
            latency = self._latency_of[method] = self.latency.labels(method)
        count = self._count_of.get((method, status))
        if count is None:
            count = self._count_of[method, status] = self.requests.labels(method, status)
        latency.observe(seconds)
        count.inc()
        if nq:
            self.queries.inc(nq)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint; returns its port (useful with port 0)."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv6 hosts too
        server = type("MetricsServer", (_MetricsServer,), {"address_family": family})
        self._http = make_server(host, port, make_wsgi_app(self.registry), server, handler_class=_QuietHandler)
        threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": STOP_POLL_S},
                         name="metrics", daemon=True).start()
        bound = self._http.server_address[1]
        log.info("%s metrics on http://%s:%d/metrics", self.role, host, bound)
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
