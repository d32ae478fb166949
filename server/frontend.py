"""The ZeroMQ front end: one thread and one poll loop serve every remote client.

:class:`FrontEnd` owns a ROUTER socket for requests and a PUB socket for
events (``docs/protocol.md`` is the protocol).  Its loop waits on the ROUTER,
on the connections it holds and on a wake-up pipe, and never blocks on
anything else:

- a request is decoded and validated, then its statements are sent on a
  connection borrowed from the pool, through libpq's pipeline
  (:class:`~dbpool.server.pipeline.Pipe`); the reply goes out when the
  results arrive;
- it joins the requests that arrived with it, on their connection, when
  their statements are known to be short (:data:`~dbpool.server.pipeline.SHORT_REQUEST`):
  they leave in one write; else it takes an idle connection from the pool
  when one is free, else queues the request on a connection it holds
  already (at most ``pipeline_depth`` requests each), else waits in the
  pool's queue like any caller, so remote and in-process callers share the
  pool fairly;
- a request past its deadline is cancelled; a request behind it that the
  cancel hits instead (the first ended as it was sent) runs again;
- a connection with nothing in flight goes back to the pool at once;
- a ``begin`` or ``stream`` holds a connection for one client session
  (a lease) until it ends, by request or because the session fell silent
  for ``heartbeat_timeout`` or the lease outlived ``lease_max``: then the
  transaction is rolled back and the connection returned;
- other threads (the pool's listeners, telemetry, a signal handler) reach
  the loop only through :meth:`FrontEnd.post`, which queues a call and wakes
  the loop.

Why one thread: a pykka message or a thread hop costs as much as a whole
``SELECT 1`` here, and the GIL would serialize worker threads anyway.  The
loop spends its time in libzmq and libpq, and pipelining lets one round trip
to PostgreSQL carry several clients' statements.  For the same reason, while
traffic is steady the loop polls for up to ``spin`` seconds before it sleeps,
while what it waits for is due soon (:meth:`FrontEnd._spin`).
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import psycopg
import zmq
from psycopg import pq
from zmq.utils.monitor import recv_monitor_message

from dbpool import curve, wire
from dbpool.driver import CopyDirection
from dbpool.errors import (
    ConfigurationError,
    ConnectionError,
    PermissionDenied,
    PoolStoppedError,
    ProtocolError,
    StatementNotAllowed,
)
from dbpool.pgdriver import PgDriver
from dbpool.pool.copy import not_a_copy
from dbpool.pool.metrics import Histogram
from dbpool.pool.queue import drop_error
from dbpool.protocol import VERSION, check_channel, error_map, protocol_error
from dbpool.statement_scope import copy_refused, explain, scope_of

from .clients import ANONYMOUS, ANONYMOUS_POLICY, ClientState
from .copy import Copy
from .direct_router import DirectRouter, Origin, bindable
from .events import EventSocket
from .memory import Trimmer
from .notify import RemoteListens
from .peers import Peers
from .pipeline import (
    AT_ONCE,
    NEVER,
    PREPARE_THRESHOLD,
    Job,
    Outcome,
    Pipe,
    Statement,
    cancelled,
    first_error,
)
from .poller import Poller
from .served_pool import DEFAULT_POOL, ServedPool

if TYPE_CHECKING:
    from dbpool.pool import Connection, Pool
    from dbpool.pool.lender import Offer

    from .auth import Authority
    from .config import ServeConfig

__all__ = ["FrontEnd"]

logger = logging.getLogger("dbpool.server.frontend")

_INF = float("inf")
#: A SELECT's status: the one answer that needs no look for a failure.
_TUPLES_OK = int(pq.ExecStatus.TUPLES_OK)
_NOBLOCK = int(zmq.NOBLOCK)
_SRCFD = int(zmq.SRCFD)
#: Operations that make a lease (or a stream or copy) for their session.
_HOLDING_OPS = frozenset({"begin", "stream", "copy_out", "copy_in"})
#: Operations a ``readonly`` request may send to a replica.
_READ_OPS = frozenset({"query", "execute", "batch", "stream", "begin", "copy_out"})
_SNDMORE = int(zmq.SNDMORE)
_ZMQ_EVENTS = int(zmq.EVENTS)
_ZMQ_POLLIN = int(zmq.POLLIN)
_ZMQ_RCVMORE = int(zmq.RCVMORE)
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
#: How long a connection with nothing in flight stays with the front end (seconds).
_LINGER = 0.002
#: The loop spins (see FrontEnd._spin) only if it had work this recently (seconds).
_SPIN_AFTER = 0.001
#: How often the loop checks deadlines, heartbeats and lease ages (seconds).
_TICK = 0.05
#: A connection whose first request has not answered this long after a cancel was
#: sent for it (past its deadline) is dropped: nothing comes back through a partition.
_STUCK_AFTER = 2.0
#: How long after it was sent a cancel may still land, on the request it was meant
#: for or, if that one ended first, on the next (seconds; the pool's cancel threads
#: send it within milliseconds).
_CANCEL_LANDS = 1.0
#: Ended lease and stream ids remembered, to answer "expired" rather than "unknown".
_ENDED_MEMORY = 10_000
_MAX_ROWS = 500
#: The status counter of each kind of lease.
_COUNTERS = {"lease": "leases", "stream": "streams", "copy": "copies"}
#: Bytes of COPY data per copy_out page unless the request says otherwise.
_PAGE_BYTES = 1 << 20
#: The longest request timeout accepted (a year): beyond it is a mistake.
_MAX_TIMEOUT = 365 * 86400.0
#: Seconds the event socket may take to bind its port again (see rebind_events).
_REBIND_WITHIN = 2.0
#: The longest ``nonce`` of a ``listen`` request.
_MAX_NONCE = 64


class RequestError(Exception):
    """Raised by a handler to answer its request with an error map."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.error = error


def _stopping() -> RequestError:
    return RequestError({"kind": "connection", "reason": "stopped",
                         "message": "the server is shutting down"})


def _bad(message: str) -> RequestError:
    return RequestError(protocol_error("bad_request", message))


class Lease:
    """A connection held for one client session: a transaction, a stream or a copy."""

    __slots__ = ("client", "copy", "cursor", "dirty", "expires_at", "finished", "id", "kind",
                 "last_seen", "lease", "max_rows", "pipe", "session", "waiting")

    def __init__(self, kind: str, session: str, pipe: Pipe, now: float, lease_max: float,
                 lease: Lease | None = None) -> None:
        self.kind = kind  # "lease", "stream" or "copy"
        self.id = secrets.token_urlsafe(16)
        self.session = session
        self.pipe = pipe
        self.last_seen = now
        self.expires_at = now + lease_max
        #: For a stream: the lease it runs in (None: its own transaction).
        self.lease = lease
        self.cursor = b""
        self.max_rows = _MAX_ROWS
        #: It ran a statement whose effects outlive the transaction (see
        #: dbpool.statement_scope): its connection is replaced when it ends.
        self.dirty = False
        #: For a copy: the COPY, and the request waiting on it (one at a time).
        self.copy: Copy | None = None
        self.waiting: Job | None = None
        #: The COPY ended and its connection went on; its outcome may still be owed.
        self.finished = False
        #: The client that holds it, for its max_leases.
        self.client: ClientState | None = None

    def holder(self) -> Lease:
        """The lease that holds the connection: the transaction a stream runs in, or itself."""
        return self.lease or self


def _answer_due(pipes: Iterable[Pipe], spin: float, now: float) -> bool:
    """Whether what the loop waits for should come within ``spin``: a client's next
    request (no request in flight), or the answer to the one request in flight,
    while it has run for less than ``spin``.

    With more requests in flight there is work to wake up for anyway, and the CPU
    is better left to others.  A long statement, or a large result that arrives in
    many reads, would be spun for after every read: a 100,000-row result cost the
    server 2.4 times the CPU with the spin (114 ms against 48, measured) and came
    no sooner.
    """
    waiting = 0
    for pipe in pipes:
        requests = len(pipe.requests)
        if requests:
            waiting += requests
            if waiting > 1 or now - pipe.progress > spin:
                return False
    return True


class FrontEnd:
    """The request loop of ``dbpool serve`` (see the module docstring).

    Create it (it binds its sockets at once: a bad endpoint raises
    :class:`~dbpool.errors.ConfigurationError` before any pool is touched),
    give it its pools (:meth:`add_pool`), then call :meth:`run` on the thread
    that is to serve; call :meth:`stop` (or :meth:`post`) from anywhere.
    ``run`` returns once a stop has drained or the grace period ended.
    """

    def __init__(self, pools: Pool | Mapping[str, Pool], config: ServeConfig,
                 context: zmq.Context[Any] | None = None,
                 authority: Authority | None = None) -> None:
        #: The pools served, by the name requests use (see served_pool.py).
        self.served: dict[str, ServedPool] = {}
        #: Where a request that names no pool goes (None: it must name one).
        self.default: ServedPool | None = None
        self.config = config
        #: What the admin ``reload`` runs (serve.py sets it: see reload.py).
        self.on_reload: Callable[[], None] | None = None
        self.depth = config.pipeline_depth
        self.context = context or zmq.Context()
        self._own_context = context is None
        #: Who may connect (CURVE through ZAP), or None: anyone who reaches the port.
        self.authority = authority
        if authority is not None:
            authority.start(self.context)
        self._poller = Poller()
        #: The request socket: the front end's own ROUTER (direct_router.py) on a
        #: plain TCP endpoint, else libzmq's (ipc, interface names, and CURVE
        #: without PyNaCl).
        self._direct: DirectRouter | None = None
        self.router: zmq.Socket[Any] | None = None
        address = bindable(config.bind) if authority is None or curve.AVAILABLE else None
        try:
            if address is not None:
                try:
                    self._direct = DirectRouter(
                        *address, self._poller, 4 * config.max_message_size, self._serve,
                        self._client_connected, self._client_disconnected,
                        handshake=None if authority is None else authority.handshake)
                except OSError as error:
                    raise _bind_failed("bind", config.bind, error.strerror or error) from None
                self.endpoint = self._direct.endpoint
            else:
                self.router = self.context.socket(zmq.ROUTER)
                self.router.setsockopt(zmq.LINGER, 0)
                self.router.setsockopt(zmq.MAXMSGSIZE, 4 * config.max_message_size)
                if authority is not None:
                    authority.secure(self.router)
                _bind(self.router, config.bind, "bind")
                #: The endpoints actually bound (a ``:0`` port resolved).
                self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.events = self._bind_events(config.events_bind)
        except BaseException:
            if self._direct is not None:
                self._direct.close()
            if self.router is not None:
                self.router.close(linger=0)
            if authority is not None:
                authority.stop()
            if self._own_context:
                self.context.term()
            self._poller.close()
            raise
        self.events_endpoint = self.events.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.packer = wire.make_packer()
        #: The channels remote clients listen to (see notify.py).
        self.listens = RemoteListens(self.post, self._publish, lambda: self.events_endpoint)
        #: The largest COPY page or block: half the largest message, to leave room.
        self._block_bytes = max(config.max_message_size // 2, 1)
        # Cross-thread calls into the loop, and the pipe that wakes it.
        self._inbox: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, _POLLIN)
        self._events_fd = -1
        self._watch_events()
        self._monitor: zmq.Socket[Any] | None = None
        self._monitor_fd = -1
        if self.router is not None:
            self._poller.register(cast(int, self.router.getsockopt(zmq.FD)), _POLLIN)
            # Connects and disconnects of clients, for the status map's "clients".
            self._monitor = self.router.get_monitor_socket(
                zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            self._monitor_fd = cast(int, self._monitor.getsockopt(zmq.FD))
            self._poller.register(self._monitor_fd, _POLLIN)
        self.clients = 0
        self._departures = 0  # clients that left, ever
        #: The connections of lease-holding sessions, to release a dead client's leases.
        self._peers = Peers()
        self._trimmer = Trimmer()  # gives back the memory they leave behind
        self._count_clients()  # asking ZMQ_EVENTS arms the (edge-triggered) descriptor
        self._pipes: dict[int, Pipe] = {}  # by socket
        self._dirty: set[Pipe] = set()  # pipes to flush before the loop sleeps
        #: Of those, the ones a request may join (Pipe.joinable) as their first unsent
        #: request went out; asked again before use, since that may have changed.
        self._joinable: list[Pipe] = []
        self.leases: dict[str, Lease] = {}
        #: What each client is doing now, by name (see clients.py).
        self.client_states: dict[str, ClientState] = {}
        self._sessions: dict[str, set[str]] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._next_tick = 0.0
        #: When idle connections are next due back to their pools (_release_idle).
        self._idle_due = 0.0
        self._last_work = 0.0
        self._draining = False
        self._drain_until = _INF
        self.counters = {"requests": 0, "errors": 0, "leases": 0, "streams": 0, "copies": 0,
                         "bytes_in": 0, "bytes_out": 0}
        #: Answers by (op, outcome): ``ok``, or the error map's kind (see server/metrics.py).
        self.outcomes: dict[tuple[str, str], int] = {}
        #: Seconds from a request's arrival to its answer.
        self.latency = Histogram()
        #: When the loop last went round (monotonic), for /health/live.
        self.last_loop = time.monotonic()
        for name, pool in (pools if isinstance(pools, Mapping)
                           else {DEFAULT_POOL: pools}).items():
            self.add_pool(name, pool)
        self._handlers: dict[str, Callable[[Job], None]] = {
            "ping": self._op_ping, "status": self._op_status, "query": self._op_query,
            "execute": self._op_execute, "batch": self._op_batch, "begin": self._op_begin,
            "commit": self._op_commit, "rollback": self._op_rollback,
            "heartbeat": self._op_heartbeat, "stream": self._op_stream,
            "fetch": self._op_fetch, "close": self._op_close,
            "copy_out": self._op_copy_out, "copy_read": self._op_copy_read,
            "copy_in": self._op_copy_in, "copy_write": self._op_copy_write,
            "copy_end": self._op_copy_end, "admin": self._op_admin,
            "listen": self._op_listen,
        }
        self._admin: dict[str, Callable[[Job, list[ServedPool]], None]] = {
            "pause": self._admin_pause, "resume": self._admin_resume,
            "drain": self._admin_drain, "disconnect_all": self._admin_disconnect_all,
            "status": self._admin_status, "clients": self._admin_clients,
            "reload": self._admin_reload, "kick": self._admin_kick,
        }

    def _bind_events(self, endpoint: str) -> EventSocket:
        pub = self.context.socket(zmq.XPUB)
        EventSocket.configure(pub)
        if self.authority is not None:
            self.authority.secure(pub)
        try:
            _bind(pub, endpoint, "events_bind")
        except BaseException:
            pub.close(linger=0)
            raise
        return EventSocket(pub, lambda: (name for name in self.served if "/" not in name),
                           self._may_use)

    def _watch_events(self) -> None:
        """Poll the event socket for subscriptions (and arm its descriptor)."""
        self._events_fd = self.events.fd
        self._poller.register(self._events_fd, _POLLIN)
        self.events.read()

    def _may_use(self, user: str | None) -> Callable[[str], bool]:
        """Which pools the events subscriber with CURVE User-Id ``user`` may hear of."""
        if self.authority is None:
            return self._state_of(ANONYMOUS).policy.may_use
        name = self.authority.name_of(user)
        if name is None:
            return lambda pool: False
        return self._state_of(name).policy.may_use

    def add_pool(self, name: str, pool: Pool) -> None:
        """Serve ``pool`` under ``name`` (before :meth:`run`)."""
        served = ServedPool(name, pool)
        if not isinstance(served.lender.driver, PgDriver):
            raise ConfigurationError(
                f"dbpool serve drives its connections through libpq's pipeline: pool "
                f"{name!r} needs the psycopg driver (PgDriver), not "
                f"{type(served.lender.driver).__name__}")
        self.served[name] = served
        if name == DEFAULT_POOL:
            self.default = served
        # Each replica is served too, as NAME/replica-N ("/" is in no pool's name),
        # under the primary's permission; read-only requests go there.
        for index, replica in enumerate(pool.replicas):
            route = f"{name}/replica-{index}"
            reader = self.served[route] = ServedPool(route, replica, owner=name)
            served.replicas.append(reader)

    def remove_pool(self, name: str) -> None:
        """Serve pool ``name`` no more (on the loop): new requests for it are
        ``unknown_pool``, its queued ones fail, and its connections go back to it as
        their work in flight ends (the caller drains and stops the pool)."""
        served = self.served.pop(name)
        for reader in served.replicas:
            self.remove_pool(reader.name)
        if self.default is served:
            self.default = None
        served.removed = True
        for pipe in [pipe for pipe in served.shared if not pipe.requests]:
            self._release(pipe)
        if served.waiter is not None:
            served.lender.cancel_wait(served.waiter)
            served.waiter = None
        self._fail_queued(served, PoolStoppedError(f"pool {name!r} was removed by a reload"),
                          all_of_them=True)

    # -- other threads -------------------------------------------------------

    def post(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the loop's thread soon.  Safe from any thread and signal handler."""
        self._inbox.append(call)
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # the pipe is full: the loop is awake anyway
            pass

    def stop(self) -> None:
        """Begin a graceful stop (see :meth:`run`)."""
        self.post(self._begin_drain)

    def reload_keys(self) -> None:
        """Read the authorized keys again (``SIGHUP``; from any thread).

        A removed key's next request is refused.  Its event subscription, which
        ZeroMQ cannot end alone, ends with everyone's: the event socket is bound
        anew and the authorized subscribers reconnect by themselves (events in
        that moment are lost to them).
        """
        self.post(self.reread_keys)

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        """Publish an event to subscribers (from any thread)."""
        self.post(lambda: self._publish(topic, event))

    # -- the loop ------------------------------------------------------------

    def run(self) -> None:
        """Serve until stopped.

        On :meth:`stop`, new requests get ``connection``/``stopped`` errors
        while in-flight requests, leases and streams may finish, for up to
        ``grace`` seconds; then what remains is rolled back and ``run``
        returns.
        """
        poll, pipes, spin = self._poller.poll, self._pipes, self.config.spin
        direct = self._direct
        monotonic = time.monotonic
        # Only libzmq's ROUTER needs reading outside poll (see _read_requests).
        read_requests = self._read_requests if self.router is not None else None
        try:
            while True:
                now = self.last_loop = monotonic()
                if read_requests is not None:
                    read_requests()
                self._flush()
                if now >= self._next_tick:
                    self._tick(now)
                    self._flush()
                    if self._draining and self._drained(now):
                        return
                    if self._has_request():  # the tick's replies may hide new ones
                        continue
                if self.events.pending:
                    self.events.read()
                if now >= self._idle_due:
                    self._idle_due = self._release_idle(now)
                if direct is not None:
                    direct.end_round()
                wake_at = min(self._next_tick, self._idle_due)
                timeout = 0.0 if self.events.pending else max(0.0, wake_at - monotonic())
                ready = poll(0)
                if (not ready and spin and now - self._last_work < _SPIN_AFTER
                        and _answer_due(pipes.values(), spin, now)):
                    ready = self._spin(poll, spin)
                if not ready:
                    ready = poll(timeout)
                if ready:
                    self._last_work = monotonic()
                for fd, mask in ready:
                    pipe = pipes.get(fd)
                    if pipe is None:
                        if direct is not None and direct.owns(fd):
                            direct.event(fd, mask)
                        elif fd == self._wake_r:
                            self._drain_inbox()
                        elif fd == self._monitor_fd:
                            self._count_clients()
                        elif fd == self._events_fd:
                            self.events.read()
                        continue
                    if mask & _POLLOUT:
                        pipe.flush()
                        if not pipe.wants_write and pipe.broken is None:
                            self._poller.modify(fd, pipe.events())
                    if mask & ~_POLLOUT:
                        pipe.read()
                    if pipe.broken is not None:
                        self._watch(pipe)
        finally:
            self._close()

    @staticmethod
    def _spin(poll: Callable[[float], list[tuple[int, int]]],
              seconds: float) -> list[tuple[int, int]]:
        """Poll without sleeping for up to ``seconds``, yielding the CPU between polls.

        Waking a sleeping thread costs this VM about as much as a query: a
        request from a client that sends request after request, or the
        server's reply, would pay it twice per round trip.  So while traffic
        is steady (work within the last ``_SPIN_AFTER``), the loop keeps
        polling for a moment before it sleeps.  ``sched_yield`` between
        polls gives the core to any other runnable thread.  It spins only at
        low concurrency, while what it waits for is due soon (see
        :func:`_answer_due`).  An idle server never spins.
        """
        until = time.monotonic() + seconds
        ready: list[tuple[int, int]] = []
        while not ready and time.monotonic() < until:
            os.sched_yield()
            ready = poll(0)
        return ready

    def _has_request(self) -> bool:
        """Whether libzmq's ROUTER holds a request (the direct one's are polled for)."""
        router = self.router
        return router is not None and bool(
            cast(int, router.getsockopt(_ZMQ_EVENTS)) & _ZMQ_POLLIN)

    def _read_requests(self) -> None:
        """Serve every request waiting in libzmq's ROUTER socket.

        Asking ``ZMQ_EVENTS`` (rather than reading until ``EAGAIN``) also
        re-arms the socket's file descriptor, which signals only changes.
        The direct router's requests are read as its sockets poll ready.
        """
        router = self.router
        if router is None:
            return
        recv, option, serve = router.recv, router.getsockopt, self._serve
        while cast(int, option(_ZMQ_EVENTS)) & _ZMQ_POLLIN:
            # The routing id as a Frame: it says which connection the request came
            # through (SRCFD), for the sessions that hold leases (see peers.py).
            origin = recv(_NOBLOCK, copy=False)
            frames = [origin.bytes, recv(_NOBLOCK)]  # a message arrives whole
            while option(_ZMQ_RCVMORE):
                frames.append(recv(_NOBLOCK))
            serve(frames, origin)

    def _serve(self, frames: list[bytes], origin: zmq.Frame | Origin) -> None:
        """Handle one request as it came off either router."""
        try:
            self._handle(frames, origin)
        except Exception:  # a bug outside any handler: this request only, never the loop
            logger.exception("front end: a request could not be handled")

    def _flush(self) -> None:
        """Send the statements queued on connections this iteration, one write each."""
        dirty = self._dirty
        while dirty:
            pipe = dirty.pop()
            if pipe.broken is None:
                pipe.flush()
                if pipe.wants_write:
                    self._poller.modify(pipe.fd, pipe.events())
            if pipe.broken is not None and not pipe.inflight:
                self._settle(pipe)
        self._joinable.clear()  # nothing is left unsent

    def _count_clients(self) -> None:
        """Read libzmq's monitor of the ROUTER's connections."""
        monitor = self._monitor
        if monitor is None:
            return
        while cast(int, monitor.getsockopt(_ZMQ_EVENTS)) & _ZMQ_POLLIN:
            message = recv_monitor_message(monitor, _NOBLOCK)
            if message["event"] == zmq.EVENT_ACCEPTED:
                self._client_connected(int(message["value"]))
            else:
                self._client_disconnected(int(message["value"]))

    def _client_connected(self, fd: int) -> None:
        self.clients += 1

    def _client_disconnected(self, fd: int) -> None:
        """A client connection closed: a session whose connections are all gone has
        its leases rolled back now."""
        self.clients -= 1
        self._departures += 1
        now = time.monotonic()
        self._peers.disconnected(fd, now)
        if self._peers.watching:
            self._release_the_dead(now)

    def _release_the_dead(self, now: float) -> None:
        """Roll back at once the leases of sessions whose connections have all closed."""
        for session in self._peers.dead(now):
            self._release_session(session)

    def _release_if_gone(self, session: str) -> None:
        if not self._peers.alive(session):
            self._release_session(session)

    def _release_session(self, session: str) -> None:
        for lease_id in list(self._sessions.get(session, ())):
            lease = self.leases.get(lease_id)
            if lease is not None and lease.lease is None:  # a stream in a lease goes with it
                self._expire(lease, "its client's connections closed")

    def reread_keys(self) -> None:
        """Read the authorized keys again and serve kicked clients again (on the loop)."""
        for state in self.client_states.values():
            if state.kicked is not None:
                logger.info("front end: client %r is served again (reload)", state.name)
                state.kicked = None
        authority = self.authority
        if authority is None:
            logger.info("front end: no CURVE keys to reload")
            return
        try:
            _, removed = authority.reload()
        except ConfigurationError as error:
            logger.error("front end: the authorized keys were not reloaded; the old ones "
                         "stay: %s", error)
            return
        if removed:
            self.rebind_events()

    def rebind_events(self) -> None:
        """Bind the event socket afresh (on the loop): its subscribers reconnect and
        subscribe again, and each subscription is judged again, as the policies and
        keys are now (a subscriber that lost a pool no longer hears of it)."""
        endpoint = self.events_endpoint
        self._poller.unregister(self._events_fd)
        self.events.close()
        # libzmq lets the port go in its own I/O thread, a moment after the close.
        deadline = time.monotonic() + _REBIND_WITHIN
        while True:
            try:
                self.events = self._bind_events(endpoint)
                break
            except ConfigurationError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)
        self._watch_events()

    def _drain_inbox(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        inbox = self._inbox
        while inbox:
            call = inbox.popleft()
            try:
                call()
            except Exception:
                logger.exception("front end: a posted call raised")

    # -- requests ------------------------------------------------------------

    def _handle(self, frames: list[bytes], origin: zmq.Frame | Origin) -> None:
        """Decode, validate and start one request; answer errors at once."""
        counters = self.counters
        counters["requests"] += 1
        counters["bytes_in"] += len(frames[-1])
        if len(frames) == 2:
            route, body = frames[:1], frames[1]
        elif len(frames) == 3 and not frames[1]:  # a REQ socket's delimiter
            route, body = frames[:2], frames[2]
        else:
            route = frames[:2] if len(frames) > 2 and not frames[1] else frames[:1]
            self._reply_error(route, None, protocol_error(
                "bad_frames", f"a request is one frame; got {len(frames) - len(route)}"))
            return
        if len(body) > self.config.max_message_size:
            self._reply_error(route, None, protocol_error(
                "too_large", f"request of {len(body)} bytes is over the server's "
                             f"max_message_size of {self.config.max_message_size}"))
            return
        try:
            req = wire.unpackb(body)
        except wire.WireError as malformed:
            self._reply_error(route, None, protocol_error("malformed", str(malformed)))
            return
        if type(req) is not dict:
            self._reply_error(route, None, protocol_error(
                "malformed", f"a request is a map, not {type(req).__name__}"))
            return
        rid = req.get("id")
        if type(rid) is not int or not 0 <= rid < 2**64:
            self._reply_error(route, None, protocol_error(
                "bad_request", "'id' must be an integer from 0 to 2**64-1"))
            return
        version = req.get("v")
        if type(version) is not int or version != VERSION:
            self._reply_error(route, rid, protocol_error(
                "unsupported_version",
                f"protocol version {version!r} is not supported; this server speaks "
                f"version {VERSION}"))
            return
        name = ANONYMOUS if self.authority is None else self.authority.name_of(
            cast("str | None", origin.get("User-Id")))
        if name is None:
            self._reply_error(route, rid, {
                "kind": "connection", "reason": "unauthorized",
                "message": "this client's key is no longer authorized by the server"})
            return
        state = self._state_of(name)
        if state.kicked is not None:
            self._reply_error(route, rid, {"kind": "connection", "reason": "unauthorized",
                                           "message": state.kicked})
            return
        op = req.get("op")
        handler = self._handlers.get(op) if type(op) is str else None
        if handler is None:
            self._reply_error(route, rid, protocol_error(
                "unknown_op", f"unknown operation {op!r}; known: {', '.join(self._handlers)}"))
            return
        timeout = req.get("timeout")
        if timeout is None:
            timeout = self.config.timeout
        elif type(timeout) not in (int, float) or not 0 < timeout <= _MAX_TIMEOUT:
            self._reply_error(route, rid, protocol_error(
                "bad_request", f"'timeout' must be a number of seconds, more than 0 and at "
                               f"most {_MAX_TIMEOUT:g}"))
            return
        pool_name = req.get("pool")
        if pool_name is None:
            served = self.default
        elif type(pool_name) is str and pool_name in self.served:
            served = self.served[pool_name]
        else:
            self._reply_error(route, rid, protocol_error(
                "unknown_pool", f"no pool named {pool_name!r}; this server serves "
                                f"{', '.join(sorted(self.served))}"))
            return
        readonly = req.get("readonly", False)
        if readonly is not False:
            if readonly is not True and readonly != "replica":
                self._reply_error(route, rid, protocol_error(
                    "bad_request", "'readonly' must be true, false or \"replica\""))
                return
            # A replica named outright is a replica already; a lease stays where it is.
            if (served is not None and served.owner == served.name and op in _READ_OPS
                    and req.get("lease") is None and state.policy.may_use(served.owner)):
                try:
                    served = served.reader(readonly) or served
                except ConnectionError as unreachable:
                    self._reply_error(route, rid, error_map(unreachable))
                    return
        policy = state.policy
        holding = (op in _HOLDING_OPS or req.get("begin") is True) and req.get("lease") is None
        refused = None
        if policy.max_inflight is not None and state.inflight >= policy.max_inflight:
            refused = f"{policy.max_inflight} requests in flight"
        elif (holding and policy.max_leases is not None
              and len(state.leases) + state.opening >= policy.max_leases):
            refused = f"{policy.max_leases} transactions, streams and copies open"
        if refused is not None:
            self._reply_error(route, rid, {
                "kind": "connection", "reason": "client_limit",
                "message": f"client {state.name!r} already has {refused}, its limit"})
            return
        now = time.monotonic()
        session = req.get("session")
        if type(session) is str and (holding or op in _HOLDING_OPS or session in self._sessions):
            self._peers.note(session, origin.get(_SRCFD), now)
        job = Job(route, rid, str(op), req, now + timeout)
        job.started = now
        job.served = served
        # Turns in a pool's queue: by client name, or by connection when all are anonymous.
        job.client = route[0] if self.authority is None else state.name
        job.state, job.holding = state, holding
        state.inflight += 1
        if holding:
            state.opening += 1
        try:
            handler(job)
        except RequestError as error:
            self._answer_error(job, error.error)
        except Exception as bug:  # answer it and keep serving everyone else
            logger.exception("front end: %s request %d failed", op, rid)
            self._answer_error(job, error_map(bug))

    def _state_of(self, name: str) -> ClientState:
        state = self.client_states.get(name)
        if state is None:
            policy = (self.config.clients.get(ANONYMOUS, ANONYMOUS_POLICY)
                      if self.authority is None else self.config.policy(name))
            state = self.client_states[name] = ClientState(name, policy)
        return state

    def _answered(self, job: Job, outcome: str) -> None:
        """``job``'s one reply is going out: it is in flight no more."""
        key = (job.op, outcome)
        outcomes = self.outcomes
        outcomes[key] = outcomes.get(key, 0) + 1
        if job.started:
            self.latency.observe(time.monotonic() - job.started)
        state = job.state
        if state is not None:
            job.state = None
            state.inflight -= 1
            state.requests += 1
            if job.holding:
                state.opening -= 1

    def _answer_error(self, job: Job, error: dict[str, Any]) -> None:
        self._answered(job, str(error.get("kind", "protocol")))
        if job.opened is not None:  # the transaction began: its client must end it
            error = {**error, "lease": self._lease_map(job.opened)}
        self._reply_error(job.route, job.rid, error)

    def _reply(self, job: Job, value: Any) -> bool:
        """Answer ``job`` with ``value``; False if it had to answer ``unsupported_type``."""
        if job.opened is not None:
            value = {"lease": self._lease_map(job.opened), "result": value}
        self._answered(job, "ok")
        try:
            body = self.packer.pack({"id": job.rid, "ok": value})
        except (TypeError, ValueError, OverflowError) as error:
            self.packer.reset()
            self._answer_error(job, protocol_error("unsupported_type",
                                                                 str(error)))
            return False
        self._send_reply(job.route, body)
        return True

    def _send_reply(self, route: list[bytes], body: bytes) -> None:
        self.counters["bytes_out"] += len(body)
        if self._direct is not None:
            self._direct.send(route, body)
            return
        assert self.router is not None
        send = self.router.send
        for frame in route:
            send(frame, _SNDMORE)
        send(body)

    def _reply_error(self, route: list[bytes], rid: int | None, error: dict[str, Any]) -> None:
        self.counters["errors"] += 1
        if error.get("code") == "internal":
            logger.error("front end: internal error answering request %s: %s", rid,
                         error.get("message"))
        self._send_reply(route, self.packer.pack({"id": rid, "error": error}))

    def _fail(self, job: Job, error: BaseException) -> None:
        if not isinstance(error, psycopg.Error | ConnectionError | ProtocolError):
            logger.error("front end: %s request failed", job.op, exc_info=error,
                         extra={"op": job.op, "client": job.client})
        self._answer_error(job, error_map(error))

    # -- operations ----------------------------------------------------------

    def _op_ping(self, job: Job) -> None:
        self._reply(job, "pong")

    def _op_status(self, job: Job) -> None:
        self._reply(job, self.status())

    def status(self) -> dict[str, Any]:
        """The status map of the protocol (see ``docs/protocol.md``)."""
        kinds = [lease.kind for lease in self.leases.values()]
        pools = {name: served.status() for name, served in self.served.items()}
        main = pools.get(DEFAULT_POOL) or next(iter(pools.values()), {"health": "stopped"})
        return {
            "version": VERSION,
            "server": {**self.counters, "clients": self.clients,
                       "open_leases": kinds.count("lease"), "open_streams": kinds.count("stream"),
                       "open_copies": kinds.count("copy"),
                       "connections_held": len(self._pipes),
                       "queued": sum(len(served.queued) for served in self.served.values()),
                       "listening": len(self.listens),
                       "draining": self._draining},
            "pools": pools,
            # The default pool (else the first), as before there were several.
            "pool": main,
            "events": self.events_endpoint,
            "health": main["health"],
        }

    # -- notifications (see notify.py) -------------------------------------------

    def _op_listen(self, job: Job) -> None:
        served = self._served(job)
        channel = job.req.get("channel")
        try:
            check_channel(channel)
        except (TypeError, ValueError) as error:
            raise _bad(f"'channel': {error}") from None
        nonce = job.req.get("nonce")
        if nonce is not None and (type(nonce) is not str or len(nonce) > _MAX_NONCE):
            raise _bad(f"'nonce' must be a string of at most {_MAX_NONCE} characters")
        self.listens.listen(served, cast(str, channel), nonce, job.deadline,
                            lambda value: self._reply(job, value),
                            lambda error: self._answer_error(job, error))

    # -- admin -----------------------------------------------------------------

    def _op_admin(self, job: Job) -> None:
        """An admin operation (``docs/protocol.md``, "Admin operations"): admin clients only."""
        state = job.state
        if state is not None and not state.policy.admin:
            raise RequestError(error_map(PermissionDenied(
                f"client {state.name!r} may not run admin operations (admin = false)")))
        command = job.req.get("command")
        run = self._admin.get(command) if type(command) is str else None
        if run is None:
            raise _bad(f"unknown admin command {command!r}; known: {', '.join(self._admin)}")
        target = job.req.get("target")
        if target is None:
            pools = list(self.served.values())
        elif type(target) is str and target in self.served:
            pools = [self.served[target]]
        else:
            raise RequestError(protocol_error(
                "unknown_pool", f"no pool named {target!r}; this server serves "
                                f"{', '.join(sorted(self.served))}"))
        logger.info("front end: admin %s (%s) by client %s", command,
                    "all pools" if target is None else f"pool {target}",
                    state.name if state is not None else "?",
                    extra={"op": f"admin {command}", "pool": target,
                           "client": state.name if state is not None else None})
        run(job, pools)

    def _off_loop(self, job: Job, work: Callable[[], Any]) -> None:
        """Run ``work`` (which may wait on the pools' actors) on a thread of its own,
        and answer ``job`` with its result back on the loop."""

        def run() -> None:
            try:
                result = work()
            except BaseException as error:
                failed = error
                self.post(lambda: self._fail(job, failed))
            else:
                self.post(lambda: self._answer(job, result))

        threading.Thread(target=run, name="dbpool-admin", daemon=True).start()

    def _answer(self, job: Job, value: Any) -> None:
        self._reply(job, value)

    def _admin_pause(self, job: Job, pools: list[ServedPool]) -> None:
        self._off_loop(job, lambda: _each(pools, lambda pool: pool.pause(), "paused"))

    def _admin_resume(self, job: Job, pools: list[ServedPool]) -> None:
        self._off_loop(job, lambda: _each(pools, lambda pool: pool.resume(), "resumed"))

    def _admin_drain(self, job: Job, pools: list[ServedPool]) -> None:
        seconds = job.req.get("seconds", 30.0)
        if type(seconds) not in (int, float) or not 0 <= seconds <= _MAX_TIMEOUT:
            raise _bad("'seconds' must be a number of seconds")
        self._off_loop(job, lambda: {p.name: "drained" if p.pool.drain(seconds)
                                     else "timed out" for p in pools})

    def _admin_disconnect_all(self, job: Job, pools: list[ServedPool]) -> None:
        interval = job.req.get("seconds", 0.0)
        if type(interval) not in (int, float) or not 0 <= interval <= _MAX_TIMEOUT:
            raise _bad("'seconds' must be a number of seconds")
        for served in pools:
            served.pool.disconnect_all(interval)
        self._reply(job, {served.name: "disconnecting" for served in pools})

    def _admin_status(self, job: Job, pools: list[ServedPool]) -> None:
        status = self.status()
        status["pools"] = {served.name: status["pools"][served.name] for served in pools}
        self._reply(job, status)

    def _admin_clients(self, job: Job, pools: list[ServedPool]) -> None:
        self._reply(job, [state.describe() for state in self.client_states.values()])

    def _admin_reload(self, job: Job, pools: list[ServedPool]) -> None:
        if self.on_reload is not None:
            self.on_reload()  # the whole configuration (see reload.py), keys included
        else:
            self.reread_keys()
        self._reply(job, {"clients": self.authority.clients if self.authority else None,
                          "pools": sorted(self.served)})

    def _admin_kick(self, job: Job, pools: list[ServedPool]) -> None:
        name = job.req.get("name")
        if type(name) is not str or not name:
            raise _bad("'name' must be the name of a client")
        state = self.client_states.get(name)
        if state is None:
            state = self._state_of(name)  # not connected yet: refused when it comes
        state.kicked = f"client {name!r} was kicked by an admin; it is refused until a reload"
        ended = 0
        for lease_id in list(state.leases):
            lease = self.leases.get(lease_id)
            if lease is not None and lease.id in self.leases and lease.lease is None:
                self._expire(lease, "its client was kicked by an admin")
                ended += 1
        logger.warning("front end: client %r kicked: %d lease(s) ended", name, ended,
                       extra={"client": name, "op": "admin kick"})
        self._reply(job, {"name": name, "leases_ended": ended})

    def _op_query(self, job: Job) -> None:
        self._statements(job, [(_sql(job.req), _params(job.req.get("params")))],
                         PREPARE_THRESHOLD)

    def _op_execute(self, job: Job) -> None:
        self._statements(job, [(_sql(job.req), _params(job.req.get("params")))], AT_ONCE)

    def _op_batch(self, job: Job) -> None:
        req = job.req
        statements: list[Statement]
        if "statements" in req:
            items = req["statements"]
            if type(items) is not list or not items:
                raise _bad("'statements' must be a non-empty array of [sql, params]")
            statements = []
            for item in items:
                if type(item) is not list or len(item) != 2 or type(item[0]) is not str:
                    raise _bad("each of 'statements' must be [sql, params]")
                statements.append((item[0], _params(item[1])))
        else:
            sql = _sql(req)
            seq = req.get("params_seq")
            if type(seq) is not list or not seq:
                raise _bad("'params_seq' must be a non-empty array of params")
            statements = [(sql, _params(params)) for params in seq]
        job.finish = self._finish_batch
        self._statements(job, statements, PREPARE_THRESHOLD)

    def _statements(self, job: Job, statements: list[Statement], prepare: int) -> None:
        """Run statements on the job's lease, or on any connection."""
        job.statements = statements
        if job.req.get("lease") is not None:
            lease = self._owned(job, "lease", job.req["lease"])
            _check_idle_of_copy(lease)
            if _check_scopes(statements, in_lease=True):
                lease.dirty = True
            self._send(lease.pipe, job, statements, prepare)
            return
        begin = job.req.get("begin")
        if begin is not None:
            if begin is not True:
                raise _bad("'begin' must be true")
            self._begin_with(job, statements, prepare)
            return
        _check_scopes(statements, in_lease=False)
        if self._draining:
            raise _stopping()
        pipe = self._pipe_for(job)
        if pipe is not None:
            self._send(pipe, job, statements, prepare)
        else:
            self._queue_statements(job, statements, prepare)

    def _queue_statements(self, job: Job, statements: list[Statement], prepare: int) -> None:
        """Queue ``job`` to run ``statements`` once a connection is free.

        Kept out of :meth:`_statements`: Python makes a function's closure cells as
        the function is entered, so there they would cost every request, not only
        those that wait."""
        job.start = lambda pipe: self._send(pipe, job, statements, prepare)
        self._queue(job)

    def _begin_with(self, job: Job, statements: list[Statement], prepare: int) -> None:
        """A transaction's first request, sent with its begin (``begin: true``): open a
        lease as ``begin`` does and run the statements on it, its BEGIN in their Sync
        (Pipe.begin_pending).  The reply, or the error, names the lease: a statement
        that fails leaves the transaction open and aborted, as it would have."""
        session = _session(job.req)
        dirty = _check_scopes(statements, in_lease=True)

        def start(pipe: Pipe) -> None:
            if pipe.broken is not None:
                self._fail(job, ConnectionError(f"connection lost: {pipe.broken}"))
                self._settle(pipe)
                return
            lease = Lease("lease", session, pipe, time.monotonic(), self.config.lease_max)
            lease.dirty = dirty
            pipe.owner = lease
            self._add_lease(lease, job)
            job.opened = lease
            pipe.begin_pending = True
            self._send(pipe, job, statements, prepare)

        job.start, job.needs_own = start, True
        self._dispatch(job)

    def _lease_map(self, lease: Lease) -> dict[str, Any]:
        """What a client learns of a transaction it began (op ``begin``)."""
        return {"lease": lease.id, "heartbeat_timeout": self.config.heartbeat_timeout,
                "expires_in": self.config.lease_max}

    def _send(self, pipe: Pipe, job: Job, statements: Sequence[Statement],
              prepare: int = NEVER) -> None:
        if pipe.broken is not None:
            self._fail(job, ConnectionError(f"connection lost: {pipe.broken}"))
            self._settle(pipe)
            return
        try:
            pipe.send(job, statements, prepare)
        except (TypeError, ValueError, psycopg.Error) as error:
            # Nothing was sent: a parameter psycopg cannot adapt, or the connection
            # was found dead (the pipe then fails its other requests itself).
            owner = pipe.owner
            if owner is job or (isinstance(owner, Lease) and owner.id not in self.leases):
                pipe.owner = None  # a begin or stream that never started holds nothing
            if pipe.broken is not None:
                self._fail(job, ConnectionError(f"connection lost: {pipe.broken}"))
            elif isinstance(error, psycopg.Error):
                self._fail(job, error)
            else:  # psycopg's TypeError/ValueError for parameters that do not fit
                self._fail(job, psycopg.ProgrammingError(str(error)))
            self._settle(pipe)
            return
        self._dirty.add(pipe)
        if pipe.unsent == 1 and pipe.joinable():
            self._joinable.append(pipe)

    def _complete(self, pipe: Pipe, job: Job, outcome: Outcome) -> None:
        """A job's results are in (the pipe calls this): answer, then reuse the pipe."""
        hit = False
        if pipe.cancel_sent and cancelled(outcome):  # the cancel landed, here: spent
            hit = (pipe.cancel_for is not job
                   and time.monotonic() - pipe.cancel_sent < _CANCEL_LANDS)
            pipe.cancel_for, pipe.cancel_sent = None, 0.0
        if pipe.cancelling and not pipe.requests:
            pipe.cancelling = False
        try:
            if (job.shared and not job.replanned and job.statements is not None
                    and (job.stale_plan or (hit and job.deadline > time.monotonic()))):
                # Outside a lease the failure rolled the whole request back: run it
                # again, unprepared (a stale plan's statements are prepared afresh
                # later; a cancel meant for the request before it is spent).
                job.replanned = True
                job.results = []
                job.stale_plan = False
                self._send(pipe, job, job.statements, NEVER)
                return
            if (isinstance(outcome, BaseException) and pipe.broken is not None
                    and self._read_again(job, outcome)):
                return
            if job.finish is not None:
                job.finish(job, outcome, pipe)
            elif isinstance(outcome, BaseException):
                self._fail(job, outcome)
            else:
                result = outcome[-1]
                if result.status != _TUPLES_OK:  # it, or its Prepare, may have failed
                    failed = first_error(outcome)
                    if failed is not None:
                        self._answer_error(job,
                                          error_map(pipe.error(outcome[failed])))
                        return
                self._reply(job, _result_map(pipe, result))
        except psycopg.Error as error:  # a value psycopg cannot load (a date past 9999...)
            self._fail(job, error)
        finally:
            self._settle(pipe)

    def _read_again(self, job: Job, error: BaseException) -> bool:
        """A read sent to a replica (``readonly: true``) lost its connection there: run
        it again on the primary, as an in-process read does (what ran on a replica
        wrote nothing), and the replica leaves the rotation for a moment.  Whether it
        was sent again."""
        served = job.served
        if (served is None or served.owner == served.name or job.req.get("readonly") is not True
                or not job.shared or job.statements is None or job.replanned
                or job.deadline <= time.monotonic()):  # its client has given up on it
            return False
        primary = self.served.get(served.owner)
        if primary is None or primary.removed:
            return False
        primary.pool.replica_failed(served.pool, error)
        job.replanned = True
        job.results = []
        job.served = primary
        try:
            self._statements(job, list(job.statements), NEVER)
        except RequestError:  # the server is stopping: it fails as it would have
            job.served = served
            return False
        return True

    def _finish_batch(self, job: Job, outcome: Outcome, pipe: Pipe) -> None:
        if isinstance(outcome, BaseException):
            self._fail(job, outcome)
            return
        failed = first_error(outcome)
        if failed is not None:
            error = error_map(pipe.error(outcome[failed]))
            error["index"] = failed
            self._answer_error(job, error)
        else:
            self._reply(job, {"results": [_result_map(pipe, r) for r in outcome]})

    # -- leases and streams --------------------------------------------------

    def _op_begin(self, job: Job) -> None:
        session = _session(job.req)

        def begun(job: Job, outcome: Outcome, pipe: Pipe) -> None:
            if isinstance(outcome, BaseException) or first_error(outcome) is not None:
                pipe.owner = None  # _settle gives it back
                self._fail(job, outcome if isinstance(outcome, BaseException)
                           else pipe.error(outcome[0]))
                return
            lease = Lease("lease", session, pipe, time.monotonic(), self.config.lease_max)
            pipe.owner = lease
            self._add_lease(lease, job)
            self._reply(job, self._lease_map(lease))

        def start(pipe: Pipe) -> None:
            if pipe.broken is not None:
                self._fail(job, ConnectionError(f"connection lost: {pipe.broken}"))
                self._settle(pipe)
                return
            # No round trip to PostgreSQL: the BEGIN leaves with the lease's first
            # request, in its Sync (Pipe.begin_pending).
            pipe.begin_pending = True
            begun(job, [], pipe)

        job.start, job.needs_own = start, True
        self._dispatch(job)

    def _op_commit(self, job: Job) -> None:
        self._end_transaction(job, "COMMIT")

    def _op_rollback(self, job: Job) -> None:
        self._end_transaction(job, "ROLLBACK")

    def _end_transaction(self, job: Job, command: str) -> None:
        lease = self._owned(job, "lease", job.req.get("lease"))
        _check_idle_of_copy(lease)

        def ended(job: Job, outcome: Outcome, pipe: Pipe) -> None:
            if isinstance(outcome, BaseException):
                self._fail(job, outcome)
            elif first_error(outcome) is not None:
                self._fail(job, pipe.error(outcome[0]))
            else:
                self._reply(job, _result_map(pipe, outcome[-1]))

        for stream in [s for s in self.leases.values() if s.lease is lease]:
            self._forget(stream, "its transaction ended")
        self._forget(lease, "ended")
        self._unhold(lease)  # back to the pool once the command completes
        job.finish = ended
        self._send(lease.pipe, job, [(command, None)])

    def _op_heartbeat(self, job: Job) -> None:
        session = _session(job.req)
        now = time.monotonic()
        ids = self._sessions.get(session, ())
        for lease_id in ids:
            self.leases[lease_id].last_seen = now
        self._reply(job, {"leases": len(ids)})

    def _op_stream(self, job: Job) -> None:
        req = job.req
        session = _session(req)
        sql, params = _sql(req), _params(req.get("params"))
        max_rows = req.get("max_rows", _MAX_ROWS)
        if type(max_rows) is not int or max_rows < 1:
            raise _bad("'max_rows' must be a positive integer")
        lease = self._lease_of(job)
        if lease is not None:
            _check_idle_of_copy(lease)
        scope = scope_of(sql)
        if scope == "copy":
            raise RequestError(error_map(copy_refused()))
        stream_box: list[Lease] = []

        def opened(job: Job, outcome: Outcome, pipe: Pipe) -> None:
            stream = stream_box[0]
            failed = None if isinstance(outcome, BaseException) else first_error(outcome)
            if isinstance(outcome, BaseException) or failed is not None:
                if stream.lease is None:
                    self._unhold(stream)
                    if not isinstance(outcome, BaseException):
                        self._send_quietly(pipe, "ROLLBACK")
                self._fail(job, outcome if isinstance(outcome, BaseException)
                           else pipe.error(outcome[failed or 0]))
                return
            self._add_lease(stream, job)
            self._page(job, stream, pipe, outcome[-1])

        def start(pipe: Pipe) -> None:
            stream = Lease("stream", session, pipe, time.monotonic(), self.config.lease_max,
                           lease)
            stream_box.append(stream)
            stream.cursor = f"dbpool_stream_{stream.id}".replace("-", "_").encode()
            stream.max_rows = max_rows
            if scope == "session":
                stream.holder().dirty = True
            cursor = stream.cursor.decode()
            statements: list[Statement] = [] if lease else [("BEGIN", None)]
            statements += [(f'DECLARE "{cursor}" NO SCROLL CURSOR FOR {sql}', params),
                           (f'FETCH FORWARD {max_rows} FROM "{cursor}"', None)]
            if lease is None:
                pipe.owner = stream
            self._send(pipe, job, statements)

        job.finish = opened
        if lease is not None:
            start(lease.pipe)
            return
        job.start, job.needs_own = start, True
        self._dispatch(job)

    def _op_fetch(self, job: Job) -> None:
        stream = self._owned(job, "stream", job.req.get("stream"))

        def fetched(job: Job, outcome: Outcome, pipe: Pipe) -> None:
            if isinstance(outcome, BaseException) or first_error(outcome) is not None:
                self._end_stream(stream, "failed")
                self._fail(job, outcome if isinstance(outcome, BaseException)
                           else pipe.error(outcome[0]))
                return
            self._page(job, stream, pipe, outcome[-1])

        job.finish = fetched
        self._send(stream.pipe, job,
                   [(f'FETCH FORWARD {stream.max_rows} FROM "{stream.cursor.decode()}"',
                     None)])

    def _op_close(self, job: Job) -> None:
        if "copy" in job.req:
            self._close_copy(job)
            return
        stream = self._owned(job, "stream", job.req.get("stream"))
        self._end_stream(stream, "closed")
        self._reply(job, None)

    def _page(self, job: Job, stream: Lease, pipe: Pipe, result: pq.abc.PGresult) -> None:
        done = result.ntuples < stream.max_rows
        try:
            page = {"stream": stream.id, "result": _result_map(pipe, result), "done": done}
        except psycopg.Error:  # a value psycopg cannot load: the stream is useless
            self._end_stream(stream, "a value could not be loaded")
            raise
        if not self._reply(job, page):  # a value with no wire form: the stream is useless
            done = True
        if done:
            self._end_stream(stream, "done")

    def _end_stream(self, stream: Lease, why: str) -> None:
        """Close the cursor; a stream with its own transaction ends it too."""
        if stream.id not in self.leases:
            return
        self._forget(stream, why)
        pipe = stream.pipe
        if stream.lease is not None:
            if stream.lease.id in self.leases:  # the lease lives on: just close the cursor
                self._send_quietly(pipe, f'CLOSE "{stream.cursor.decode()}"')
            return
        self._unhold(stream)
        self._send_quietly(pipe, "ROLLBACK")

    def _expire(self, lease: Lease, why: str) -> None:
        """End a lease or stream the client left: cancel, roll back, give back."""
        logger.warning("front end: %s %s of session %s...: %s; rolling back", lease.kind,
                       lease.id[:8], lease.session[:8], why,
                       extra={"client": lease.client.name if lease.client else None,
                              "pool": lease.pipe.served.name, "reason": why})
        pipe = lease.pipe
        children = self._forget_with_streams(lease, why)
        if lease.kind == "copy" and lease.finished:
            return  # its COPY ended and the connection went on; only a reply was owed
        if pipe.copy is not None:  # a COPY runs there: no way back but a new connection
            for copying in (lease, *children):
                if copying.waiting is not None:
                    waiting, copying.waiting = copying.waiting, None
                    self._fail(waiting, ConnectionError(f"the copy ended: {why}",
                                                        reason="lease_expired"))
                copying.copy = None
            pipe.copy = None
            # The owner stays: a transaction the COPY ran in loses its connection with
            # it, and ends when the broken connection is given back (_release).
            pipe.break_(ConnectionError(f"a COPY was left unfinished: {why}"))
            self._watch(pipe)
            return
        if lease.kind == "stream" and lease.lease is not None:
            self._send_quietly(pipe, f'CLOSE "{lease.cursor.decode()}"')
            return
        if pipe.inflight:
            self._cancel(pipe, pipe.requests[0])
        self._unhold(lease)
        self._send_quietly(pipe, "ROLLBACK")

    def _unhold(self, lease: Lease) -> None:
        """The lease or stream ``lease``, which holds its connection, lets it go: the
        connection serves others once the command sent next completes, or is
        replaced if the lease left session state on it."""
        pipe = lease.pipe
        pipe.owner = None
        # A transaction that ran nothing never began: what ends it (COMMIT, ROLLBACK)
        # runs outside any, as PostgreSQL allows, with its usual result.
        pipe.begin_pending = False
        if lease.dirty:
            pipe.retire(ConnectionError(
                f"a {lease.kind} ran statements whose effects outlive the transaction "
                "(SET, LISTEN, PREPARE, a temporary table...): the connection is replaced "
                "rather than lent to another client"))

    def _send_quietly(self, pipe: Pipe, sql: str) -> None:
        """Send a statement nobody waits for; a failure breaks the connection."""

        def done(job: Job, outcome: Outcome, pipe: Pipe) -> None:
            if not isinstance(outcome, BaseException) and first_error(outcome) is not None:
                error = pipe.error(outcome[0])
                logger.warning("front end: %s failed (%s); replacing the connection", sql,
                               error)
                pipe.break_(error)

        job = Job([], 0, "internal", {}, _INF)
        job.finish = done
        if pipe.broken is not None:
            self._settle(pipe)
            return
        try:
            pipe.send(job, [(sql, None)])
        except psycopg.Error:
            self._settle(pipe)
            return
        self._dirty.add(pipe)

    def _add_lease(self, lease: Lease, job: Job) -> None:
        self.leases[lease.id] = lease
        state = job.state
        if state is not None:
            lease.client = state
            state.leases.add(lease.id)
        self._sessions.setdefault(lease.session, set()).add(lease.id)
        self.counters[_COUNTERS[lease.kind]] += 1
        if not self._peers.alive(lease.session):  # the client died while it began
            self.post(lambda: self._release_if_gone(lease.session))

    def _forget_with_streams(self, lease: Lease, why: str) -> list[Lease]:
        """Forget ``lease`` and the streams and copies that run in it; return those."""
        children = [s for s in self.leases.values() if s.lease is lease]
        for stream in children:
            self._forget(stream, why)
        self._forget(lease, why)
        return children

    def _forget(self, lease: Lease, why: str) -> None:
        self.leases.pop(lease.id, None)
        if lease.client is not None:
            lease.client.leases.discard(lease.id)
        ids = self._sessions.get(lease.session)
        if ids is not None:
            ids.discard(lease.id)
            if not ids:
                del self._sessions[lease.session]
                self._peers.forget(lease.session)
        self._ended[lease.id] = why
        if len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)

    def _lease_of(self, job: Job) -> Lease | None:
        lease_id = job.req.get("lease")
        if lease_id is None:
            return None
        return self._owned(job, "lease", lease_id)

    def _owned(self, job: Job, kind: str, lease_id: Any) -> Lease:
        """The lease or stream a request names, checked to be its session's."""
        if type(lease_id) is not str:
            raise _bad(f"'{kind}' must be a string")
        session = _session(job.req)
        lease = self.leases.get(lease_id)
        if lease is None or lease.kind != kind:
            why = self._ended.get(lease_id, "or the server restarted since it began")
            raise RequestError({"kind": "connection", "reason": "lease_expired",
                                "message": f"the {kind} has ended ({why})"})
        if lease.session != session:
            raise RequestError(protocol_error(
                "lease_not_owned", f"the {kind} belongs to another client session"))
        lease.last_seen = time.monotonic()
        return lease

    # -- COPY ------------------------------------------------------------------

    def _op_copy_out(self, job: Job) -> None:
        self._start_copy(job, "out")

    def _op_copy_in(self, job: Job) -> None:
        self._start_copy(job, "in")

    def _start_copy(self, job: Job, direction: CopyDirection) -> None:
        """Start a COPY on the job's lease, or on a connection of its own (see copy.py)."""
        req = job.req
        session = _session(req)
        sql, params = _sql(req), _params(req.get("params"))
        if scope_of(sql) != "copy":
            raise RequestError(error_map(not_a_copy(sql, f"copy_{direction}")))
        page_bytes = req.get("page_bytes", _PAGE_BYTES)
        if type(page_bytes) is not int or page_bytes < 1:
            raise _bad("'page_bytes' must be a positive integer")
        # A page must fit in a reply: at most half the largest message.
        page_bytes = min(page_bytes, self._block_bytes)
        lease = self._lease_of(job)
        if lease is not None:
            _check_idle_of_copy(lease)
            if lease.pipe.inflight:
                raise RequestError(protocol_error(
                    "busy", "the transaction has requests in flight; a COPY needs it idle"))

        def start(pipe: Pipe) -> None:
            copying = Lease("copy", session, pipe, time.monotonic(), self.config.lease_max,
                            lease)
            try:
                copy = pipe.start_copy(sql, params, direction, page_bytes,
                                       lambda _: self._copy_progress(copying))
            except (TypeError, ValueError, psycopg.Error) as error:  # nothing was sent
                self._fail(job, error if isinstance(error, psycopg.Error)
                           else psycopg.ProgrammingError(str(error)))
                if lease is None:
                    pipe.owner = None
                self._settle(pipe)
                return
            copying.copy, copying.waiting = copy, job
            if lease is None:
                pipe.owner = copying
            self._add_lease(copying, job)
            copy.start()
            self._repoll(pipe)

        if lease is not None:
            if lease.pipe.begin_pending:
                self._begin_then(lease.pipe, job, start)
                return
            start(lease.pipe)
            return
        job.start, job.needs_own = start, True
        self._dispatch(job)

    def _begin_then(self, pipe: Pipe, job: Job, start: Callable[[Pipe], None]) -> None:
        """Send the lease's deferred BEGIN on its own, then ``start`` what cannot take it
        in its Sync (a COPY leaves pipeline mode)."""

        def begun(job: Job, outcome: Outcome, pipe: Pipe) -> None:
            if isinstance(outcome, BaseException):
                self._fail(job, outcome)
            elif pipe.inflight:  # the client sent more on the lease meanwhile
                self._answer_error(job, protocol_error(
                    "busy", "the transaction has requests in flight; a COPY needs it idle"))
            else:
                start(pipe)

        job.finish = begun
        self._send(pipe, job, [])

    def _op_copy_read(self, job: Job) -> None:
        copying = self._copy_of(job, "out")
        copying.waiting = job
        self._copy_progress(copying)

    def _op_copy_write(self, job: Job) -> None:
        copying = self._copy_of(job, "in")
        data = job.req.get("data")
        if type(data) is str:
            data = data.encode(copying.pipe.encoding)
        elif type(data) is not bytes:
            raise _bad("'data' must be bytes or a string")
        copy = copying.copy
        copying.waiting = job
        if copy is not None and copy.phase == "data" and copy.error is None:
            copy.write(data)  # may answer at once, through _copy_progress
        self._copy_progress(copying)

    def _op_copy_end(self, job: Job) -> None:
        copying = self._copy_of(job, "in")
        copying.waiting = job
        copy = copying.copy
        if copy is not None and copy.phase == "data" and copy.error is None:
            copy.end()
        self._copy_progress(copying)

    def _close_copy(self, job: Job) -> None:
        """``close`` of a copy: an out-COPY is cancelled, an in-COPY takes no row."""
        copying = self._owned(job, "copy", job.req.get("copy"))
        if copying.waiting is not None:
            raise _bad("another request of this copy is still waiting for its answer")
        copying.waiting = job
        copy = copying.copy
        if copy is not None and copy.phase != "done":
            if copy.direction == "out":
                self._cancel(copying.pipe, None)
            copy.abort("the client closed the COPY")
        self._copy_progress(copying)

    def _copy_of(self, job: Job, direction: CopyDirection) -> Lease:
        copying = self._owned(job, "copy", job.req.get("copy"))
        copy = copying.copy
        if copy is not None and copy.direction != direction:
            raise _bad(f"the copy {copying.id} is a copy_{copy.direction}")
        if copying.waiting is not None:
            raise _bad("another request of this copy is still waiting for its answer")
        return copying

    def _copy_progress(self, copying: Lease) -> None:
        """The COPY changed (or a request arrived): answer the one waiting, if it can be."""
        copy, job, pipe = copying.copy, copying.waiting, copying.pipe
        if copy is None:  # expired
            return
        if copy.phase == "done":
            self._copy_done(copying, copy, job, pipe)
            return
        if job is None:
            self._repoll(pipe)
            return
        if copy.direction == "out":
            if job.op != "close" and not copy.reading:  # a page is full
                copying.waiting = None
                self._reply(job, {"copy": copying.id, "data": copy.take_page(), "done": False})
                copy.resume()
        elif copy.phase == "data":
            if job.op == "copy_in":
                copying.waiting = None
                self._reply(job, {"copy": copying.id, "block_bytes": self._block_bytes})
            elif job.op == "copy_write" and copy.acknowledged():
                copying.waiting = None
                self._reply(job, {"written": copy.moved})
        if copying.copy is not None and pipe.copy is copy:
            self._repoll(pipe)

    def _copy_done(self, copying: Lease, copy: Copy, job: Job | None, pipe: Pipe) -> None:
        """The COPY's result is in: the connection goes on; answer, or keep the
        outcome for the client's next request of this copy."""
        if not copying.finished:  # the first news of the end: the connection goes on
            copying.finished = True
            if copying.lease is None and pipe.owner is copying:
                self._unhold(copying)
            if pipe.broken is not None:
                self._watch(pipe)
            else:
                self._repoll(pipe)
                self._settle(pipe)
        if job is None:  # the outcome waits for the client's next request of this copy
            return
        copying.waiting = None
        self._forget(copying, "ended")
        if job.op == "close":
            self._reply(job, None)
        elif copy.error is not None:
            self._fail(job, copy.error)
        elif job.op in ("copy_read", "copy_out"):
            self._reply(job, {"copy": copying.id, "data": copy.take_page(), "done": True,
                              "result": _copy_result(copy)})
        else:
            self._reply(job, _copy_result(copy))

    def _repoll(self, pipe: Pipe) -> None:
        """Poll ``pipe``'s socket for what it wants now (a COPY pauses and resumes)."""
        if self._pipes.get(pipe.fd) is pipe:
            self._poller.modify(pipe.fd, pipe.events())

    # -- connections ---------------------------------------------------------

    def _dispatch(self, job: Job) -> None:
        """Start a job on a connection now, or queue it for one (not while stopping)."""
        if self._draining:
            raise _stopping()
        pipe = self._pipe_for(job)
        if pipe is None:
            self._queue(job)
            return
        assert job.start is not None
        job.start(pipe)

    def _queue(self, job: Job) -> None:
        served = self._served(job)
        served.queued.append(job)
        self._want_connection(served)

    def _served(self, job: Job) -> ServedPool:
        """The pool a job runs on (a RequestError if it named none and there is no default)."""
        served = job.served
        if served is None:
            raise RequestError(protocol_error(
                "unknown_pool", f"name a pool ('pool'): this server serves "
                                f"{', '.join(sorted(self.served))}, and no default"))
        state = job.state
        if state is not None and not state.policy.may_use(served.owner):
            raise RequestError(error_map(PermissionDenied(
                f"client {state.name!r} may not use pool {served.owner!r} (its pools: "
                f"{', '.join(sorted(state.policy.pools or ()))})")))
        return served

    def _pipe_for(self, job: Job) -> Pipe | None:
        """A connection for a job now: one of ours, the pool's, or None (queue it).

        None while the pool holds checkouts (paused, or its circuit open): the
        job then waits in the pool's queue, or fails at once, like any caller.
        """
        served = self._served(job)
        client = job.client
        served.seen.add(client)
        if served.lender.blocked or served.queued.holds(client):
            # Not ahead of its client's own waiting requests: those go first, and CoDel
            # judges the queue by their waits (served_pool.py).
            return None
        shared = served.shared
        each = served.pipes_each()
        held = _pipes_of(shared, client) if served.active > 1 else 0
        if not job.needs_own:
            # Statements still to leave this iteration: joining them shares their write.
            depth = self.depth
            for pipe in self._joinable:
                if (pipe.served is served and len(pipe.requests) < depth and pipe.joinable()
                        and _may_join(pipe, client, held, each) and pipe in shared):
                    return pipe
        for pipe in shared:
            if not pipe.requests and not pipe.cancelling and held < each:
                if job.needs_own:
                    shared.remove(pipe)
                return pipe
        borrowed = self._borrow(served) if held < each else None
        if borrowed is not None:
            if not job.needs_own:
                shared.append(borrowed)
            return borrowed
        if job.needs_own or not shared:
            return None
        # The least busy pipe with room (one pass: this runs for every request).
        best: Pipe | None = None
        fewest = self.depth
        now = time.monotonic()
        for pipe in shared:
            inflight = len(pipe.requests)
            if inflight < fewest and not pipe.cancelling and pipe.takes_more(now) and \
                    _may_join(pipe, client, held, each):
                best, fewest = pipe, inflight
        return best

    def _borrow(self, served: ServedPool) -> Pipe | None:
        """An idle connection from the pool, if one can be had without waiting."""
        conn = served.lender.try_borrow()
        return None if conn is None else self._adopt(conn, served)

    def _adopt(self, conn: Connection, served: ServedPool) -> Pipe:
        """Drive a borrowed connection from the loop."""
        pipe = Pipe(conn, self._complete)
        pipe.served = served
        self._pipes[pipe.fd] = pipe
        self._poller.register(pipe.fd, _POLLIN)
        return pipe

    def _settle(self, pipe: Pipe) -> None:
        """After a request on ``pipe`` completed: give it more work, or give it back."""
        if pipe.owner is not None and pipe.broken is None:
            return
        served = pipe.served
        queued, shared = served.queued, served.shared
        lender = served.lender
        # Paused, open or removed: held connections serve no one new.
        blocked = lender.blocked or served.removed
        if lender.wants_back(pipe.conn):
            # Past a shrink or due for replacement: no new work, so that a busy
            # pipe drains and goes back rather than being kept for ever.
            if pipe in shared:
                shared.remove(pipe)
            if pipe.requests:
                return
        elif pipe.broken is None and pipe.retiring is None:
            now = time.monotonic()
            if queued and self._serve_queued(pipe, served, blocked, now):
                return
            if not queued:
                served.codel.empty(now)
            if pipe.requests:
                if pipe.owner is None and pipe not in shared:
                    shared.append(pipe)
                return
            if not (lender.has_waiters or self._draining or blocked):
                # Idle now, but the next request is likely close behind: keep it
                # for _LINGER (see _release_idle), unless others wait for it.
                pipe.idle_since = now
                self._idle_due = min(self._idle_due, now + _LINGER)
                if pipe not in shared:
                    shared.append(pipe)
                return
        elif pipe.requests:
            return
        self._release(pipe)
        if queued:
            self._want_connection(served)

    def _serve_queued(self, pipe: Pipe, served: ServedPool, blocked: bool,
                      now: float) -> bool:
        """Start what ``served``'s queue may run on ``pipe`` (see :meth:`_settle`);
        whether a job that needs a connection of its own took it."""
        queued, shared = served.queued, served.shared
        each, contended = served.pipes_each(), served.active > 1

        def may_take(job: Job) -> bool:  # a job that needs its own: an empty pipe
            if job.needs_own and pipe.requests:
                return False
            if not contended:
                return True
            # Over its share: none until it drains.
            return _may_join(pipe, job.client, _pipes_of(shared, job.client), each)

        codel = served.codel
        while (queued and len(pipe.requests) < self.depth and not pipe.cancelling
               and not blocked and pipe.takes_more(now)):
            job = queued.popleft_where(may_take)
            if job is None:
                break
            if job.started and not codel.serve(now, job.started,
                                               min(job.started, queued.oldest() or _INF)):
                self._shed(served, job, now)
                continue
            if pipe not in shared and not job.needs_own:
                shared.append(pipe)
            elif job.needs_own and pipe in shared:
                shared.remove(pipe)
            assert job.start is not None
            job.start(pipe)
            if job.needs_own:
                return True
        return False

    def _release_idle(self, now: float) -> float:
        """Give back connections idle for ``_LINGER``; return when to look again.

        Called as the loop goes to sleep.  Keeping an idle connection that
        long saves a pool checkout and checkin per request when one client
        sends request after request; others waiting in the pool's queue get
        it at once (see :meth:`_settle`), in-process callers at most
        ``_LINGER`` later.
        """
        wake_at = _INF
        for served in self.served.values():
            lender = served.lender
            if lender.has_waiters or lender.blocked or self._draining:
                expired = now
            elif served.queued:  # kept for turns: it would only come back to our queue
                continue
            else:
                expired = now - _LINGER
            for pipe in [pipe for pipe in served.shared if not pipe.requests]:
                if pipe.idle_since <= expired:
                    self._release(pipe)
                else:
                    wake_at = min(wake_at, pipe.idle_since + _LINGER)
        return wake_at

    def _release(self, pipe: Pipe) -> None:
        """Give ``pipe``'s connection back to its pool; a second call does nothing."""
        if self._pipes.get(pipe.fd) is not pipe:
            # Released already: its socket's number may now be another connection's,
            # which must stay watched, and the pool must not get it back twice.
            return
        self._dirty.discard(pipe)
        served = pipe.served
        if pipe in served.shared:
            served.shared.remove(pipe)
        del self._pipes[pipe.fd]
        try:
            self._poller.unregister(pipe.fd)
        except KeyError:
            pass
        if pipe.owner is not None:  # a lease whose connection broke
            lease = pipe.owner
            if isinstance(lease, Lease) and lease.id in self.leases:
                # Its streams too: nothing may be sent on this connection once it is
                # back in the pool, where its socket's number may become another's.
                self._forget_with_streams(lease, f"connection lost: {pipe.broken}")
            pipe.owner = None
        served.lender.give_back(pipe.release())

    def _watch(self, pipe: Pipe) -> None:
        """``pipe`` has statements to send (or was read): flush it before sleeping."""
        self._dirty.add(pipe)

    def _want_connection(self, served: ServedPool) -> None:
        """Wait in the pool's queue for the head of ours (one waiter at a time)."""
        if served.waiter is None and served.queued:
            self._wait_for_offer(served)

    def _wait_for_offer(self, served: ServedPool) -> None:
        """Join the pool's queue for ``served``.

        Kept out of :meth:`_want_connection`, which runs for every queued request,
        for the reason :meth:`_queue_statements` gives."""

        def on_offer(offer: Offer | None, error: BaseException | None) -> None:
            # Any thread, under the pool queue's lock: hand over to the loop.
            self.post(lambda: self._offer_arrived(served, offer, error))

        try:
            served.waiter = served.lender.wait(on_offer)
        except ConnectionError as error:
            self._fail_queued(served, error, all_of_them=error.reason != "queue_full")

    def _offer_arrived(self, served: ServedPool, offer: Offer | None,
                       error: BaseException | None) -> None:
        served.waiter = None
        if error is not None:
            self._fail_queued(served, error, all_of_them=not isinstance(error, ConnectionError)
                              or error.reason != "queue_timeout")
            self._want_connection(served)
            return
        conn = served.lender.take(offer) if offer is not None else None
        if conn is not None:
            self._settle(self._adopt(conn, served))
        self._want_connection(served)

    def _fail_queued(self, served: ServedPool, error: BaseException, all_of_them: bool) -> None:
        queued = served.queued
        while queued:
            self._fail(queued.popleft(), error)
            if not all_of_them:
                return

    def _cancel(self, pipe: Pipe, target: Job | None) -> None:
        """Cancel the statement running on ``pipe``, meant for ``target`` (None: a COPY);
        should it land on a request after that one, the request runs again (see
        :meth:`_complete`)."""
        pipe.cancel_for, pipe.cancel_sent = target, time.monotonic()
        self._send_cancel(pipe)

    def _send_cancel(self, pipe: Pipe) -> None:
        """Ask PostgreSQL to cancel what runs on ``pipe`` (the pool's cancel threads send
        it, so it lands a moment later)."""
        pipe.served.lender.cancel(pipe.conn)

    # -- time ----------------------------------------------------------------

    def _tick(self, now: float) -> None:
        """Deadlines of queued and running requests, silent sessions, old leases."""
        self._next_tick = now + _TICK
        # Waiters in the pool, a pause or a drain may want idle connections back sooner.
        self._idle_due = 0.0
        self._trimmer.tick(now, self._departures)
        if self._direct is not None:
            self._direct.expire(now)
        self.listens.expire(now)
        for served in self.served.values():
            served.tick()
            queued = served.queued
            if not queued:
                continue
            # A connection left idle by the turns of clients gone quiet serves again.
            for pipe in [pipe for pipe in served.shared if not pipe.requests]:
                self._settle(pipe)
            for job in [job for job in queued if job.deadline <= now]:
                queued.remove(job)
                self._answer_error(job, {
                    "kind": "connection", "reason": "queue_timeout",
                    "message": f"{served.lender.name}: connection not available within the "
                               "request's timeout"})
            late = served.codel.poll(now, queued.oldest())
            if late is not None:  # stuck, and slow: CoDel drops whoever waited too long
                for job in queued.take_before(late):
                    self._shed(served, job, now)
            if (not queued and served.waiter is not None
                    and served.lender.cancel_wait(served.waiter)):
                served.waiter = None
        stuck = now - _STUCK_AFTER
        for pipe in list(self._pipes.values()):
            requests = pipe.requests
            # The first request runs (the others wait their turn in the pipeline).  A
            # cancel stops whatever runs when it lands: should the first end before,
            # the one after it is hit, and runs again (see _complete).
            if requests and requests[0].deadline <= now and pipe.cancel_for is not requests[0]:
                pipe.cancelling = True
                self._cancel(pipe, requests[0])
            elif (requests and pipe.cancel_for is requests[0] and pipe.cancel_sent <= stuck
                    and pipe.broken is None):
                self._drop_stuck(pipe)
        if self._peers.watching:
            self._release_the_dead(now)
        if len(self._peers) > len(self._sessions):
            self._peers.prune(now, self._sessions)
        if self.leases:
            silent = now - self.config.heartbeat_timeout
            for lease in list(self.leases.values()):
                if lease.id not in self.leases:
                    continue
                if lease.waiting is not None:
                    self._copy_tick(lease, now)
                if lease.last_seen <= silent:
                    self._expire(lease, "no heartbeat from its client within "
                                        f"{self.config.heartbeat_timeout:g}s")
                elif lease.expires_at <= now:
                    self._expire(lease, f"it outlived lease_max ({self.config.lease_max:g}s)")

    def _shed(self, served: ServedPool, job: Job, now: float) -> None:
        """Answer a queued ``job`` that CoDel dropped (see served_pool.py)."""
        served.shed += 1
        self._answer_error(job, error_map(drop_error(served.lender.name, now - job.started)))

    def _drop_stuck(self, pipe: Pipe) -> None:
        """A connection that has not answered for :data:`_STUCK_AFTER` after a cancel
        for its first request (past its deadline): the network is gone, or PostgreSQL
        is.  Fail what waits on it and drop it (its socket shut, so nothing more is
        waited for)."""
        logger.warning("front end: a connection gave no answer %gs after a cancel; "
                       "dropping it", _STUCK_AFTER)
        pipe.served.lender.interrupt(pipe.conn)
        pipe.lose(ConnectionError(
            f"no answer from PostgreSQL within the request's timeout, nor {_STUCK_AFTER:g}s "
            "after a cancel; its connection was dropped", reason="deadline"))
        self._watch(pipe)

    def _copy_tick(self, copying: Lease, now: float) -> None:
        """A request waiting on a COPY: a page that fills slowly goes out partly full
        after a tick; one past its deadline has the COPY cancelled (its error answers)."""
        copy, job = copying.copy, copying.waiting
        if copy is None or job is None or copy.phase == "done":
            return
        if job.op in ("copy_read", "copy_out") and copy.size \
                and now - copying.last_seen >= _TICK:
            copying.waiting = None
            self._reply(job, {"copy": copying.id, "data": copy.take_page(), "done": False})
            copy.resume()
        elif job.deadline <= now - _STUCK_AFTER and copying.pipe.broken is None:
            self._drop_stuck(copying.pipe)
            self._expire(copying, "no answer from PostgreSQL within the request's timeout")
        elif job.deadline <= now and not copy.cancelling:
            copy.cancelling = True
            self._cancel(copying.pipe, None)

    # -- stopping --------------------------------------------------------------

    def _begin_drain(self) -> None:
        if self._draining:
            return
        logger.info("front end: stopping; in-flight requests and leases have %gs to finish",
                    self.config.grace)
        self._draining = True
        self._drain_until = time.monotonic() + self.config.grace
        self._next_tick = 0.0
        for served in self.served.values():
            self._publish("pool", {"event": "stopping", "pool": served.lender.name,
                                   "time": time.time(), "state": "stopping", "reason": None})

    def _drained(self, now: float) -> bool:
        busy = any(pipe.inflight for pipe in self._pipes.values())
        queued = any(served.queued for served in self.served.values())
        if not busy and not self.leases and not queued:
            return not self._pipes
        if now < self._drain_until:
            return False
        if now >= self._drain_until + 5.0:  # rollbacks did not complete: give up on them
            logger.error("front end: %d connection(s) still busy after the grace period",
                         len(self._pipes))
            return True
        for lease in list(self.leases.values()):
            if lease.id in self.leases:
                self._expire(lease, "the server is shutting down")
        for served in self.served.values():
            self._fail_queued(served, ConnectionError("the server is shutting down",
                                                      reason="stopped"), all_of_them=True)
        return False

    def _close(self) -> None:
        self.listens.close()
        for pipe in list(self._pipes.values()):
            self._release(pipe)
        for served in self.served.values():
            if served.waiter is not None:
                served.lender.cancel_wait(served.waiter)
        if self._direct is not None:
            self._direct.close()
        if self.router is not None and self._monitor is not None:
            self.router.disable_monitor()
            self._monitor.close(linger=0)
            self.router.close(linger=0)
        self.events.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._poller.close()
        if self.authority is not None:
            self.authority.stop()
        if self._own_context:
            self.context.term()

    # -- events ----------------------------------------------------------------

    def _publish(self, topic: str | bytes, event: dict[str, Any]) -> None:
        try:
            body = self.packer.pack(event)
        except (TypeError, ValueError, OverflowError):
            self.packer.reset()
            logger.exception("front end: event %r cannot be encoded", event.get("event"))
            return
        self.events.publish(topic if isinstance(topic, bytes) else topic.encode(), body)
        # Sending may have taken the descriptor's signal of a subscription waiting.
        self.events.read()


def _each(pools: list[ServedPool], action: Callable[[Pool], None],
          done: str) -> dict[str, str]:
    """Do ``action`` to each pool; answer ``{pool: done}``."""
    for served in pools:
        action(served.pool)
    return dict.fromkeys((served.name for served in pools), done)


def _pipes_of(pipes: list[Pipe], client: Any) -> int:
    """How many of ``pipes`` have requests of ``client`` in flight."""
    return sum(1 for pipe in pipes if client in pipe.clients)


def _bind(sock: zmq.Socket[Any], endpoint: str, setting: str) -> None:
    """Bind ``sock``; a failure is a ConfigurationError that names the endpoint."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as error:
        raise _bind_failed(setting, endpoint, error) from None


def _bind_failed(setting: str, endpoint: str, why: object) -> ConfigurationError:
    return ConfigurationError(f"cannot bind {setting} {endpoint}: {why}")


def _may_join(pipe: Pipe, client: Any, held: int, each: int) -> bool:
    """Whether ``client``, with requests on ``held`` of the shared connections and a
    fair share of ``each``, may queue one on busy ``pipe``: within its share, or
    on one it is on already."""
    return held < each or (held == each and bool(_count_of(pipe, client)))


def _count_of(pipe: Pipe, client: Any) -> int:
    """How many of ``client``'s requests ``pipe`` has in flight."""
    return pipe.clients.get(client, 0)


# -- request fields --------------------------------------------------------------


def _sql(req: dict[str, Any]) -> str:
    sql = req.get("sql")
    if type(sql) is not str or not sql:
        raise _bad("'sql' must be a non-empty string")
    return sql


def _params(params: Any) -> Any:
    if params is None or type(params) in (list, dict):
        return params
    raise _bad(f"'params' must be an array, a map or nil, not {type(params).__name__}")


def _session(req: dict[str, Any]) -> str:
    session = req.get("session")
    if type(session) is not str or not session:
        raise _bad("'session' must be a non-empty string")
    return session


def _check_scopes(statements: Sequence[Statement], in_lease: bool) -> bool:
    """Refuse what may not run where it was sent; whether it changes the session (then
    the lease it runs in is dirty).

    See :mod:`dbpool.statement_scope` and ``docs/protocol.md`` (Isolation).
    """
    dirty = False
    for index, (sql, _) in enumerate(statements):
        scope = scope_of(sql)
        if scope == "statement":
            continue
        if scope == "copy":
            error = copy_refused()
        elif in_lease:
            dirty = dirty or scope == "session"
            continue
        else:
            error = _refused(sql)
        refusal = error_map(error)
        if len(statements) > 1:
            refusal["index"] = index
        raise RequestError(refusal)
    return dirty


def _refused(sql: str) -> StatementNotAllowed:
    scope, what = explain(sql)
    if scope == "transaction":
        return StatementNotAllowed(
            f"{what} is transaction control: outside a transaction it would reach other "
            "clients' statements on the shared connection. Use client.transaction() "
            "(the begin operation) instead; nothing was run", scope=scope)
    return StatementNotAllowed(
        f"{what} changes the session, which outlives the request and would reach other "
        "clients' statements on the shared connection. Run it inside client.transaction() "
        "(SET LOCAL, or SET there; the connection is then replaced when the transaction "
        "ends), or set it in the server's connection options; nothing was run",
        scope=scope)


def _check_idle_of_copy(lease: Lease) -> None:
    """Refuse a request on a lease whose connection is busy with a COPY."""
    if lease.pipe.copy is not None:
        raise RequestError(protocol_error(
            "busy", "a COPY is running in this transaction: finish or close it first"))


def _copy_result(copy: Copy) -> dict[str, Any]:
    """The result map of a COPY that ended (``COPY n``)."""
    result = copy.result
    tag = result.command_status if result is not None else None
    rows = result.command_tuples if result is not None else None
    return {"columns": [], "rows": [], "rowcount": -1 if rows is None else rows,
            "command": tag.decode() if tag else None}


def _result_map(pipe: Pipe, result: pq.abc.PGresult) -> dict[str, Any]:
    rows = pipe.rows(result)
    tag = result.command_status
    rowcount = len(rows) if rows else result.command_tuples
    return {"columns": pipe.columns(result) if result.nfields else [], "rows": rows,
            "rowcount": -1 if rowcount is None else rowcount,
            "command": tag.decode() if tag else None}
