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

import contextlib
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
from dbpool.compiled import build_name
from dbpool.pool import Pool

from .auth import Authority
from .config import ServeConfig, mask_dsn
from .frontend import FrontEnd
from .reload import DsnHolder, Reloader

__all__ = ["serve"]

#: How often the start says what it waits for (seconds).
WAITING_LOG_INTERVAL = 5.0

logger = logging.getLogger("dbpool.server")


def serve(config: ServeConfig, *, ready: threading.Event | None = None,
          reload: Callable[[], ServeConfig] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT (or :meth:`FrontEnd.stop`); return 0.

    Prints ``dbpool serve: listening on <endpoint> (events on <endpoint>)``
    once its sockets are bound and its pools started, and ``dbpool serve:
    ready on ...`` once every pool has a connection up (``ready`` is set at
    that moment).  With ``wait_for_database``, if that takes longer, it stops
    and returns 1.  ``reload`` reads the configuration again for SIGHUP and the
    admin ``reload`` (see :mod:`dbpool.server.reload`); without it they re-read
    the authorized keys only.
    """
    _raise_file_limit()
    box: list[FrontEnd] = []
    #: The last connect error of each pool, for the log while the start waits for it.
    last_errors: dict[str, str] = {}

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
        elif name == "resize":
            box[0].publish("pool", {
                "event": "resize", "pool": pool, "time": time.time(),
                "size": metadata.get("size"), "previous": metadata.get("previous"),
                "reason": metadata.get("reason")})
        else:
            error = metadata.get("error")
            if error is not None:
                last_errors[pool] = " ".join(str(error).split())
            box[0].publish("telemetry", {
                "event": name, "pool": pool, "time": time.time(),
                "message": str(error) if error is not None else None,
                "reason": getattr(error, "reason", None), "index": metadata.get("index")})

    # The keys first: a bad key file fails the start before the database is touched.
    authority = (Authority(str(config.curve_secret_key), str(config.authorized_keys))
                 if config.curve else None)
    exposed = config.exposed_endpoints()
    if exposed and authority is None:
        logger.warning("serving %s with no authentication (insecure): anyone who reaches it "
                       "runs any SQL as the pool's user", ", ".join(exposed))
    with contextlib.ExitStack() as cleanup:
        if authority is not None:
            cleanup.callback(authority.stop)
        # Every socket is bound before a pool starts: a bad endpoint fails the
        # start with one line, and no database connection is ever made.
        metrics = None
        if config.metrics_bind is not None:
            from .metrics import MetricsServer  # the metrics extra

            metrics = MetricsServer(config.metrics_bind)
            cleanup.callback(metrics.stop)
        front = FrontEnd({}, config, authority=authority)
        cleanup.pop_all()
    logger.info("starting %s; %s", config.describe(), build_name())
    pools: dict[str, Pool] = {}
    #: The pools' own names (in their events and telemetry).
    names: set[str] = set()
    handler_id = f"dbpool-serve-{id(pools)}"
    telemetry.attach(handler_id, ["connection_error", "health", "resize"], on_telemetry)
    box.append(front)
    holders: dict[str, DsnHolder] = {}

    def start_pool(route: str, dsn: str | None, options: dict[str, Any]) -> Pool:
        holder = holders[route] = DsnHolder(dsn, options.get("configure"))
        options = {**options, "configure": holder,
                   "connection_listeners": [*options.get("connection_listeners", ()),
                                            on_connection]}
        pool: Pool = Pool.start(dsn, **options)
        pools[route] = pool
        names.add(pool.name)
        pool.add_monitor(_on_stopped(front, pool.name))
        front.publish("pool", {"event": "started", "pool": pool.name, "time": time.time(),
                               "state": "closed", "reason": None})
        return pool

    for route, dsn, options in config.pool_specs():
        front.add_pool(route, start_pool(route, dsn, options))
    reloader = Reloader(front, config, reload or (lambda: config), start_pool, holders)
    front.on_reload = reloader.reload
    if metrics is not None:
        metrics.start(front)
    previous = {sig: signal.signal(sig, lambda *_: front.stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP,
                                            lambda *_: front.post(reloader.reload))
    shown = "" if metrics is None else f" (metrics and health on http://{metrics.address}/)"
    where = f"{front.endpoint} (events on {front.events_endpoint}){shown}"
    print(f"dbpool serve: listening on {where}", flush=True)
    logger.info("listening on %s, events on %s", front.endpoint, front.events_endpoint)
    waiter = _ReadyWhenConnected(front, config, where, ready, last_errors)
    waiter.start()
    try:
        front.run()
    finally:
        waiter.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)
        telemetry.detach(handler_id)
        if metrics is not None:
            metrics.stop()
        for pool in pools.values():
            pool.stop()
    logger.info("stopped")
    return 1 if waiter.gave_up else 0


class _ReadyWhenConnected(threading.Thread):
    """Says ``ready`` once every pool has a connection up; until then, says what it waits
    for, at most every :data:`WAITING_LOG_INTERVAL` seconds; with
    ``wait_for_database``, gives up after that long and stops the server."""

    def __init__(self, front: FrontEnd, config: ServeConfig, where: str,
                 ready: threading.Event | None, last_errors: dict[str, str]) -> None:
        super().__init__(name="dbpool-ready", daemon=True)
        self.front = front
        self.config = config
        self.where = where
        self.ready = ready
        self.last_errors = last_errors
        self.gave_up = False
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        started = time.monotonic()
        logged = started - WAITING_LOG_INTERVAL + 1.0  # the first line after a second
        limit = self.config.wait_for_database
        dsns = {route: dsn for route, dsn, _ in self.config.pool_specs()}
        while not self._stop_event.wait(0.02):
            waiting = [served for served in list(self.front.served.values())
                       if not _connected(served.pool)]
            if not waiting:
                print(f"dbpool serve: ready on {self.where}", flush=True)
                logger.info("ready: every pool has a connection up (%.1f s)",
                            time.monotonic() - started)
                if self.ready is not None:
                    self.ready.set()
                return
            now = time.monotonic()
            if limit is not None and now - started >= limit:
                self.gave_up = True
                logger.error("no database within --wait-for-database %g s: %s; stopping",
                             limit, _describe(waiting, dsns, self.last_errors),
                             extra={"pool": [served.name for served in waiting],
                                    "duration": round(now - started, 3)})
                self.front.stop()
                return
            if now - logged >= WAITING_LOG_INTERVAL:
                logged = now
                logger.warning("waiting for the database (%.0f s): %s", now - started,
                               _describe(waiting, dsns, self.last_errors),
                               extra={"pool": [served.name for served in waiting],
                                      "duration": round(now - started, 3)})


def _connected(pool: Pool) -> bool:
    if not pool.alive:
        return False
    connections = pool.metrics()["connections"]
    return bool(connections["idle"] + connections["in_use"])


def _describe(waiting: list[Any], dsns: dict[str, str | None],
              last_errors: dict[str, str]) -> str:
    """Each waiting pool, the database it waits for (no password) and the last error."""
    parts = []
    for served in waiting:
        dsn = dsns.get(served.name)
        database = "the embedded PostgreSQL" if dsn is None else mask_dsn(dsn, drop=True)
        error = last_errors.get(served.pool.name, "no answer yet")
        parts.append(f"pool {served.name} at {database}: {error}")
    return "; ".join(parts)


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
