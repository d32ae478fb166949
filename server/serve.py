"""``dbpool serve``: a pool, its ZeroMQ front end, events, and a graceful stop.

:func:`serve` starts a pool from a :class:`~dbpool.server.config.ServeConfig`
(on the embedded PostgreSQL when it has no DSN), serves it with a
:class:`~dbpool.server.frontend.FrontEnd` on the calling thread, and
publishes events:

- ``connection``: each connection's connected and disconnected events
  (from the pool's connection listeners);
- ``pool``: ``started``, ``stopping``, ``stopped``, and ``health`` for every
  change of the circuit breaker's state (and pause, resume, drain);
- ``telemetry``: ``connection_error`` (a failed connect or checkout).

SIGTERM and SIGINT stop it gracefully: new requests are refused, in-flight
ones and open leases get ``grace`` seconds to finish, what remains is rolled
back, the connections are closed, and :func:`serve` returns 0.  SIGHUP
re-reads the authorized client keys (see :mod:`dbpool.server.auth`).
"""

from __future__ import annotations

import logging
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from dbpool import telemetry
from dbpool.actors.listeners import ConnectionEvent, HealthEvent
from dbpool.pool import Pool

from .auth import Authority
from .config import ServeConfig
from .frontend import FrontEnd

__all__ = ["serve"]

logger = logging.getLogger("dbpool.server")


def serve(config: ServeConfig, *, ready: threading.Event | None = None) -> int:
    """Run the server until SIGTERM/SIGINT (or :meth:`FrontEnd.stop`); return 0.

    Prints one line to stdout when it serves: ``dbpool serve: ready on
    <endpoint> (events on <endpoint>)``.  ``ready`` is set at the same moment.
    """
    _raise_file_limit()
    box: list[FrontEnd] = []

    def on_connection(event: ConnectionEvent | HealthEvent) -> None:
        if box and isinstance(event, ConnectionEvent):  # health goes out from telemetry
            box[0].publish("connection", {
                "event": event.kind, "pool": event.pool, "time": time.time(),
                "index": event.index, "backend_pid": event.backend_pid,
                "tag": _plain(event.tag), "reason": event.reason})

    def on_telemetry(name: str, measurements: Mapping[str, float],
                     metadata: Mapping[str, Any]) -> None:
        pool = metadata.get("pool")
        if not box or pool not in names:
            return
        if name == "health":
            box[0].publish("pool", {
                "event": "health", "pool": pool, "time": time.time(),
                "state": metadata.get("state"), "previous": metadata.get("previous"),
                "reason": metadata.get("reason")})
        else:
            error = metadata.get("error")
            box[0].publish("telemetry", {
                "event": name, "pool": pool, "time": time.time(),
                "message": str(error) if error is not None else None,
                "reason": getattr(error, "reason", None), "index": metadata.get("index")})

    # The keys first: a bad key file fails the start before the database is touched.
    authority = (Authority(str(config.curve_secret_key), str(config.authorized_keys))
                 if config.curve else None)
    metrics = None
    if config.metrics_bind is not None:
        from .metrics import MetricsServer  # the metrics extra

        try:
            metrics = MetricsServer(config.metrics_bind)
        except BaseException:
            if authority is not None:
                authority.stop()
            raise
    exposed = config.exposed_endpoints()
    if exposed and authority is None:
        logger.warning("serving %s with no authentication (insecure): anyone who reaches it "
                       "runs any SQL as the pool's user", ", ".join(exposed))
    logger.info("starting %s", config.describe())
    pools: dict[str, Pool] = {}
    #: The pools' own names (in their events and telemetry).
    names: set[str] = set()
    handler_id = f"dbpool-serve-{id(pools)}"
    telemetry.attach(handler_id, ["connection_error", "health"], on_telemetry)
    try:
        for route, dsn, options in config.pool_specs():
            options["connection_listeners"] = [*options.get("connection_listeners", ()),
                                               on_connection]
            pool = pools[route] = Pool.start(dsn, **options)
            names.add(pool.name)
        front = FrontEnd(pools, config, authority=authority)
    except Exception:
        telemetry.detach(handler_id)
        if authority is not None:
            authority.stop()
        if metrics is not None:
            metrics.stop()
        for pool in pools.values():
            pool.stop()
        raise
    box.append(front)
    if metrics is not None:
        metrics.start(front)
    previous = {sig: signal.signal(sig, lambda *_: front.stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: front.reload_keys())
    for pool in pools.values():
        pool.add_monitor(_on_stopped(front, pool.name))
        front.publish("pool", {"event": "started", "pool": pool.name, "time": time.time(),
                               "state": "closed", "reason": None})
    shown = "" if metrics is None else f" (metrics and health on http://{metrics.address}/)"
    print(f"dbpool serve: ready on {front.endpoint} (events on {front.events_endpoint})"
          f"{shown}", flush=True)
    logger.info("serving on %s, events on %s", front.endpoint, front.events_endpoint)
    if ready is not None:
        ready.set()
    try:
        front.run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        telemetry.detach(handler_id)
        if metrics is not None:
            metrics.stop()
        for pool in pools.values():
            pool.stop()
    logger.info("stopped")
    return 0


def _on_stopped(front: FrontEnd, name: str) -> Callable[[BaseException | None], None]:
    def stopped(error: BaseException | None) -> None:
        front.publish("pool", {"event": "stopped", "pool": name, "time": time.time(),
                               "state": "stopped",
                               "reason": None if error is None else str(error)})

    return stopped


def _plain(tag: Any) -> Any:
    """A listener tag as the wire can carry it (tags are arbitrary Python values)."""
    return tag if tag is None or isinstance(tag, str | int | float | bool | bytes) else repr(tag)


def _raise_file_limit() -> None:
    """Let the process hold as many client connections as the hard limit allows."""
    if sys.platform == "win32":  # pragma: no cover
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 65536
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            logger.debug("could not raise the file limit", exc_info=True)
