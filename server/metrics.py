"""``dbpool serve``'s metrics and health over HTTP (``metrics_bind``, e.g. ``127.0.0.1:9187``).

- ``/metrics``: Prometheus' text format (``prometheus_client``, the
  ``metrics`` extra).  The pools' series are those of
  :mod:`dbpool.pool.prometheus`, one ``pool`` label each; the server adds:

  - ``dbpool_server_requests_total{op, outcome}``: answers, ``outcome`` being
    ``ok`` or the error's kind (``sql``, ``connection``, ``protocol``,
    ``statement``, ``transaction``, ``permission``);
  - ``dbpool_server_request_seconds``: from a request's arrival to its answer;
  - ``dbpool_server_clients``: connected client sockets;
  - ``dbpool_server_open{kind="lease"|"stream"|"copy"}``;
  - ``dbpool_server_received_bytes_total``, ``dbpool_server_sent_bytes_total``;
  - ``dbpool_server_client_inflight{client}`` and
    ``dbpool_server_client_leases{client}``: each named client's requests in
    flight and leases open.

- ``/health/live``: 200 while the request loop goes round (it does at least
  every 50 ms), else 503.
- ``/health/ready``: 200 while every pool can serve (alive, not paused, its
  circuit closed, at least one connection up), else 503 naming the pools
  that cannot.  ``dbpool healthcheck`` asks it.

Scrapes run on the HTTP server's own threads and read the front end's
counters without stopping its loop: nothing is added to the request path
but a few counters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from dbpool.errors import ConfigurationError
from dbpool.pool.prometheus import histogram_buckets, pool_metric_families

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("metrics_bind needs prometheus_client: pip install 'dbpool[metrics]'") \
        from exc

if TYPE_CHECKING:
    from .frontend import FrontEnd

__all__ = ["MetricsServer", "ServerCollector", "parse_bind", "readiness"]

logger = logging.getLogger("dbpool.server.metrics")

#: The loop is not live if it has not gone round for this long (seconds).
LIVE_WITHIN = 5.0


def parse_bind(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9187`` for IPv6) as a (host, port) pair."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigurationError(f"metrics_bind: expected host:port such as "
                                 f"127.0.0.1:9187, got {text!r}")
    return host, int(port)


class ServerCollector(Collector):
    """The server's series and its pools' (see the module docstring)."""

    def __init__(self, front: FrontEnd) -> None:
        self.front = front

    def collect(self) -> Iterator[Metric]:
        front = self.front
        rows = [(served.pool.name, served.pool.metrics())
                for served in list(front.served.values()) if served.pool.alive]
        yield from pool_metric_families(rows)
        requests = CounterMetricFamily("dbpool_server_requests", "requests answered",
                                       labels=["op", "outcome"])
        for (op, outcome), count in sorted(front.outcomes.copy().items()):
            requests.add_metric([op, outcome], count)
        yield requests
        latency = front.latency.snapshot()
        histogram = HistogramMetricFamily("dbpool_server_request_seconds",
                                          "seconds from a request's arrival to its answer")
        histogram.add_metric([], histogram_buckets(latency["buckets"]), latency["sum"])
        yield histogram
        yield GaugeMetricFamily("dbpool_server_clients", "connected client sockets",
                                value=front.clients)
        kinds = [lease.kind for lease in list(front.leases.values())]
        open_now = GaugeMetricFamily("dbpool_server_open", "leases, streams and copies open",
                                     labels=["kind"])
        for kind in ("lease", "stream", "copy"):
            open_now.add_metric([kind], kinds.count(kind))
        yield open_now
        counters = front.counters.copy()
        yield CounterMetricFamily("dbpool_server_received_bytes", "request bytes received",
                                  value=counters["bytes_in"])
        yield CounterMetricFamily("dbpool_server_sent_bytes", "reply bytes sent",
                                  value=counters["bytes_out"])
        inflight = GaugeMetricFamily("dbpool_server_client_inflight",
                                     "a client's requests in flight", labels=["client"])
        leases = GaugeMetricFamily("dbpool_server_client_leases",
                                   "a client's leases, streams and copies open",
                                   labels=["client"])
        for state in list(front.client_states.values()):
            inflight.add_metric([state.name], state.inflight)
            leases.add_metric([state.name], len(state.leases))
        yield inflight
        yield leases


def readiness(front: FrontEnd) -> list[str]:
    """Why the server is not ready: one line per pool that cannot serve (none: ready)."""
    problems = []
    for served in list(front.served.values()):
        pool = served.pool
        if not pool.alive:
            problems.append(f"{served.name}: stopped")
            continue
        metrics = pool.metrics()
        up = metrics["connections"]["idle"] + metrics["connections"]["in_use"]
        if metrics["paused"]:
            problems.append(f"{served.name}: paused")
        elif metrics["health"] != "closed":
            problems.append(f"{served.name}: circuit {metrics['health']}")
        elif up == 0:
            problems.append(f"{served.name}: no connection up")
    return problems


class MetricsServer:
    """The HTTP endpoint: ``/metrics``, ``/health/live``, ``/health/ready``.

    It binds when made (so that a bad address fails the start before any
    database is touched) and serves from :meth:`start`.
    """

    front: FrontEnd

    def __init__(self, bind: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        host, port = parse_bind(bind)
        try:
            self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as error:
            raise ConfigurationError(f"cannot bind metrics_bind {bind}: "
                                     f"{error.strerror or error}") from None
        self.httpd.daemon_threads = True
        #: The address actually bound (a port of 0 resolved).
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        name="dbpool-metrics", daemon=True)

    def start(self, front: FrontEnd) -> MetricsServer:
        """Serve ``front``'s metrics and health from now on."""
        self.front = front
        self.registry.register(ServerCollector(front))
        self._thread.start()
        logger.info("metrics and health on http://%s/", self.address)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """The status, content type and body for ``path``."""
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/health/live":
            live = time.monotonic() - self.front.last_loop < LIVE_WITHIN
            return (200, "text/plain", b"live\n") if live else \
                (503, "text/plain", b"the request loop is stuck\n")
        if path == "/health/ready":
            problems = readiness(self.front)
            if not problems:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", ("\n".join(problems) + "\n").encode()
        return 404, "text/plain", b"not found: /metrics, /health/live, /health/ready\n"


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                status, content_type, body = server.answer(self.path.split("?", 1)[0])
            except Exception:
                logger.exception("metrics: %s failed", self.path)
                status, content_type, body = 500, "text/plain", b"internal error\n"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("metrics: %s", format % args)

    return Handler
