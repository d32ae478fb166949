"""A fault-injecting TCP proxy for network-failure tests.

:class:`FaultProxy` listens on ``127.0.0.1:<ephemeral>`` and forwards each
accepted connection to a target ``(host, port)``. While running, a test can:

* add latency to every forwarded chunk (:meth:`FaultProxy.set_latency`);
* partition the network (:meth:`FaultProxy.blackhole`);
* reset every open connection (:meth:`FaultProxy.reset_all`);
* reset new connections as soon as they arrive (:meth:`FaultProxy.refuse`);
* make the open connections silent for ever while new ones are forwarded, as a
  NAT or firewall that lost its state does (:meth:`FaultProxy.silence_all`),
  and later close them, as its state finally times out
  (:meth:`FaultProxy.drop_silenced`).

Design: a single I/O thread runs a ``selectors`` loop over the listener and
every socket, so the thread count is bounded (one per proxy) no matter how
many connections a pool opens. Public methods that change state are executed
*on* that thread and return only once applied, so e.g. after ``reset_all()``
returns the RSTs have been sent and a test can assert on the consequences
without sleeping.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Type of the ``fault_proxy`` fixture: ``make(host, port) -> FaultProxy``.
ProxyFactory = Callable[[str, int], "FaultProxy"]
Side = Literal["client", "upstream"]

_CHUNK = 64 * 1024
# Per-direction cap on bytes held by the proxy (latency queue): beyond it we
# stop reading, so TCP flow control pushes back on the sender instead of the
# proxy buffering without bound.
_MAX_BUFFERED = 1 << 20
_COMMAND_TIMEOUT = 10.0
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


@dataclass(slots=True)
class _Chunk:
    deliver_at: float  # time.monotonic() at which it may be sent on
    data: memoryview | None  # None: a queued EOF (FIN)


@dataclass
class _Direction:
    """Bytes flowing one way through a connection pair."""

    pending: collections.deque[_Chunk] = field(default_factory=collections.deque)
    buffered: int = 0
    eof_read: bool = False  # source sent FIN (an EOF marker is queued)
    shut: bool = False  # FIN forwarded to the destination
    want_write: bool = False  # destination's send buffer is full


@dataclass(eq=False)
class _Conn:
    """One proxied connection: accepted client socket + upstream socket."""

    id: int
    client: socket.socket
    upstream: socket.socket | None = None
    connecting: bool = False
    closed: bool = False
    silent: bool = False  # by silence_all(): never read or forwarded again
    c2s: _Direction = field(default_factory=_Direction)
    s2c: _Direction = field(default_factory=_Direction)


class _Marker:
    """Selector key data for the non-connection sockets."""

    def __init__(self, name: str) -> None:
        self.name = name


_LISTENER = _Marker("listener")
_WAKEUP = _Marker("wakeup")


def _rst_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already dead: close() is all we can do
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class FaultProxy:
    """Threaded TCP proxy from ``(host, port)`` to a target, with fault injection.

    Use as a context manager or call :meth:`close`; the I/O thread is joined on close.
    """

    def __init__(
        self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1"
    ) -> None:
        """Start listening on ``listen_host`` (ephemeral port) and forwarding to the target.

        ``target_host`` is resolved once, here, and only its first address is
        used: pass an IP address (``"127.0.0.1"``) rather than ``"localhost"``,
        which may resolve to ``::1`` first.
        """
        # Resolve once here so the I/O loop never blocks on DNS.
        family, _, _, _, sockaddr = socket.getaddrinfo(
            target_host, target_port, type=socket.SOCK_STREAM
        )[0]
        self.target: tuple[str, int] = (target_host, target_port)
        self._target_family = family
        self._target_addr = sockaddr

        self._listener = socket.create_server((listen_host, 0), backlog=128)
        self._listener.setblocking(False)
        self.host: str = self._listener.getsockname()[0]
        self.port: int = self._listener.getsockname()[1]

        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKEUP)
        self._interest: dict[socket.socket, int] = {}

        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stats_lock = threading.Lock()
        self._accepted = 0
        self._refused = 0
        self._active = 0
        self._silenced = 0
        self._ids = itertools.count(1)
        self._conns: dict[int, _Conn] = {}

        # Loop-thread state; changed only through _call() except _latency,
        # which is a single float read per chunk.
        self._latency = 0.0
        self._blackholed = False
        self._refusing = False
        self._stopping = False
        self._closed = False

        self._thread = threading.Thread(
            target=self._run, name=f"faultproxy-{self.port}->{target_port}", daemon=True
        )
        self._thread.start()
        log.debug("proxy %s:%d -> %s:%d started", self.host, self.port, target_host, target_port)

    # -- public API --------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        """Connections accepted so far (including ones reset by :meth:`refuse`)."""
        with self._stats_lock:
            return self._accepted

    @property
    def refused_count(self) -> int:
        """Connections reset on arrival because :meth:`refuse` was on."""
        with self._stats_lock:
            return self._refused

    @property
    def active_count(self) -> int:
        """Connections currently open through the proxy."""
        with self._stats_lock:
            return self._active

    @property
    def silenced_count(self) -> int:
        """Connections made silent by :meth:`silence_all` and still open."""
        with self._stats_lock:
            return self._silenced

    @property
    def latency(self) -> float:
        """Current one-way delay in seconds added to each forwarded chunk."""
        return self._latency

    @property
    def blackholed(self) -> bool:
        """Whether the proxy is currently partitioning traffic."""
        return self._blackholed

    @property
    def refusing(self) -> bool:
        """Whether new connections are currently reset on arrival."""
        return self._refusing

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk by ``seconds`` in each direction (a round trip gains ``2 * seconds``).

        Applies to bytes received after the call; ordering is preserved.
        """
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency = float(seconds)

    def blackhole(self, on: bool) -> None:
        """Partition (``True``) or heal (``False``) the network.

        While on, nothing is read or forwarded in either direction and no
        socket is closed: peers see silence, as with dropped packets. New
        connections are accepted but not connected upstream. Like a real TCP
        partition, bytes are not lost: what the kernel or the proxy holds is
        delivered after healing, so a connection whose peers did not give up
        resumes intact.
        """
        self._call(lambda: self._set_blackhole(on))

    def reset_all(self) -> int:
        """Abort every open connection with RST to both peers; return how many."""
        return self._call(self._reset_all)

    def silence_all(self) -> int:
        """Make every open connection silent for ever; return how many were made so.

        As a NAT or firewall that lost its state: nothing more is read or
        forwarded on those connections, in either direction, and none is
        closed, so each peer sees a flow that never answers again (healing a
        :meth:`blackhole` does not revive them).  Connections accepted
        afterwards are forwarded normally.  As with :meth:`blackhole`, the
        proxy's own sockets still acknowledge what reaches them, keepalive
        probes included, so TCP on its own never notices: only the peers' own
        deadlines can.  :meth:`drop_silenced` closes them.
        """
        return self._call(self._silence_all)

    def drop_silenced(self) -> int:
        """Close the connections :meth:`silence_all` made silent, with RST to both
        peers, as the device's state finally times out; return how many."""
        return self._call(self._drop_silenced)

    def refuse(self, on: bool) -> None:
        """While on, new connections are reset (RST) as soon as they are accepted."""

        def apply() -> None:
            self._refusing = on

        self._call(apply)

    def wrap_conninfo(self, conninfo: str) -> str:
        """Return ``conninfo`` with host/port pointing at this proxy (psycopg needed)."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(conninfo)
        params.pop("hostaddr", None)  # would bypass host
        params.update(host=self.host, port=self.port)
        return make_conninfo("", **params)

    def close(self) -> None:
        """Stop the proxy: reset all connections, close the listener, join the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():

            def stop() -> None:
                self._stopping = True

            try:
                self._call(stop, _allow_closed=True)
            except RuntimeError:
                log.warning("proxy %d: stop command not acknowledged", self.port)
            self._thread.join(_COMMAND_TIMEOUT)
            if self._thread.is_alive():
                log.error("proxy %d: I/O thread did not exit", self.port)
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.host}:{self.port} -> {self.target[0]}:{self.target[1]}, "
            f"active={self.active_count}, latency={self._latency}, "
            f"blackholed={self._blackholed}, refusing={self._refusing})"
        )

    # -- command plumbing ------------------------------------------------------------

    def _call(self, fn: Callable[[], T], *, _allow_closed: bool = False) -> T:
        """Run ``fn`` on the I/O thread and return its result once it has run."""
        if self._closed and not _allow_closed:
            raise RuntimeError("FaultProxy is closed")
        done = threading.Event()
        result: list[T] = []
        error: list[BaseException] = []

        def command() -> None:
            try:
                result.append(fn())
            except BaseException as exc:  # re-raised in the caller's thread
                error.append(exc)
            finally:
                done.set()

        self._commands.put(command)
        self._wake()
        deadline = time.monotonic() + _COMMAND_TIMEOUT
        # Short waits so a crashed loop thread is noticed instead of hanging.
        while not done.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("FaultProxy I/O thread is not running")
        if error:
            raise error[0]
        return result[0]

    def _wake(self) -> None:
        # A full buffer means a wakeup is already pending.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- I/O loop ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._sel.select(self._next_timeout()):
                    data = key.data
                    if data is _LISTENER:
                        self._accept()
                    elif data is _WAKEUP:
                        self._run_commands()
                    else:
                        conn, side = data
                        if not conn.closed:
                            self._on_event(conn, side, mask)
                self._pump_all()
                self._update_interest()
        except Exception:
            log.exception("proxy %d: I/O loop crashed", self.port)
        finally:
            for conn in list(self._conns.values()):
                self._close_conn(conn, rst=True)
            # Commands queued after the loop stopped must not block their callers.
            self._run_commands()

    def _run_commands(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _next_timeout(self) -> float | None:
        if self._blackholed:
            return None
        now = time.monotonic()
        soonest: float | None = None
        for conn in self._conns.values():
            if conn.upstream is None or conn.connecting or conn.silent:
                continue  # nowhere to deliver yet (the connect event wakes us), or never
            for d in (conn.c2s, conn.s2c):
                if d.pending and not d.want_write:
                    deliver_at = d.pending[0].deliver_at
                    if soonest is None or deliver_at < soonest:
                        soonest = deliver_at
        if soonest is None:
            return None
        return max(0.0, soonest - now)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave it in the backlog
                log.warning("proxy %d: accept failed: %s", self.port, exc)
                return
            with self._stats_lock:
                self._accepted += 1
            if self._refusing:
                with self._stats_lock:
                    self._refused += 1
                _rst_close(client)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(id=next(self._ids), client=client)
            self._conns[conn.id] = conn
            with self._stats_lock:
                self._active += 1
            # In a partition the SYN would not reach the server either.
            if not self._blackholed:
                self._connect_upstream(conn)

    def _connect_upstream(self, conn: _Conn) -> None:
        up = socket.socket(self._target_family, socket.SOCK_STREAM)
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.upstream = up
        err = up.connect_ex(self._target_addr)
        if err in (0, errno.EISCONN):
            conn.connecting = False
        elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            conn.connecting = True
        else:
            log.debug("proxy %d: upstream connect failed: %s", self.port, errno.errorcode.get(err))
            self._close_conn(conn, rst=True)

    def _on_event(self, conn: _Conn, side: Side, mask: int) -> None:
        if side == "upstream" and conn.connecting:
            assert conn.upstream is not None
            err = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                # Target down: the client sees a reset, the closest a proxy
                # can get to "connection refused".
                log.debug(
                    "proxy %d: upstream connect failed: %s", self.port, errno.errorcode.get(err)
                )
                self._close_conn(conn, rst=True)
            else:
                conn.connecting = False
            return
        if conn.silent:  # silenced by a command earlier in this loop iteration
            return
        if mask & selectors.EVENT_WRITE:
            # Room in the send buffer again; _pump_all() does the sending.
            (conn.s2c if side == "client" else conn.c2s).want_write = False
        if mask & selectors.EVENT_READ:
            self._read(conn, side)

    def _read(self, conn: _Conn, side: Side) -> None:
        sock = conn.client if side == "client" else conn.upstream
        d = conn.c2s if side == "client" else conn.s2c
        assert sock is not None
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # RST from a peer: pass the reset on
            log.debug("proxy %d: conn %d %s recv: %s", self.port, conn.id, side, exc)
            self._close_conn(conn, rst=True)
            return
        deliver_at = time.monotonic() + self._latency
        if not data:
            d.eof_read = True
            d.pending.append(_Chunk(deliver_at, None))
            return
        d.pending.append(_Chunk(deliver_at, memoryview(data)))
        d.buffered += len(data)

    def _pump_all(self) -> None:
        if self._blackholed:
            return
        for conn in list(self._conns.values()):
            if conn.silent:
                continue
            if conn.upstream is not None and not conn.connecting:
                self._flush(conn, conn.c2s, conn.upstream)
            if not conn.closed and conn.upstream is not None:
                self._flush(conn, conn.s2c, conn.client)
            if not conn.closed and conn.c2s.shut and conn.s2c.shut:
                self._close_conn(conn, rst=False)

    def _flush(self, conn: _Conn, d: _Direction, dst: socket.socket) -> None:
        now = time.monotonic()
        while d.pending and not d.want_write:
            head = d.pending[0]
            data = head.data
            if head.deliver_at > now:
                return
            if data is None:
                d.pending.popleft()
                d.shut = True
                with contextlib.suppress(OSError):  # peer gone: the read side will notice
                    dst.shutdown(socket.SHUT_WR)
                return
            try:
                sent = dst.send(data)
            except (BlockingIOError, InterruptedError):
                d.want_write = True
                return
            except OSError as exc:
                log.debug("proxy %d: conn %d send: %s", self.port, conn.id, exc)
                self._close_conn(conn, rst=True)
                return
            d.buffered -= sent
            if sent < len(data):
                head.data = data[sent:]
                d.want_write = True
            else:
                d.pending.popleft()

    def _update_interest(self) -> None:
        for conn in self._conns.values():
            stalled = self._blackholed or conn.silent
            read = 0 if stalled else selectors.EVENT_READ
            write = 0 if stalled else selectors.EVENT_WRITE
            c2s, s2c = conn.c2s, conn.s2c
            client_ev = 0
            if not c2s.eof_read and c2s.buffered < _MAX_BUFFERED:
                client_ev |= read
            if s2c.want_write:
                client_ev |= write
            self._set_interest(conn.client, client_ev, (conn, "client"))
            if conn.upstream is None:
                continue
            if conn.connecting:
                # Completion of the connect is a kernel matter: watch it even
                # while blackholed so the state stays consistent.
                up_ev = selectors.EVENT_WRITE
            else:
                up_ev = 0
                if not s2c.eof_read and s2c.buffered < _MAX_BUFFERED:
                    up_ev |= read
                if c2s.want_write:
                    up_ev |= write
            self._set_interest(conn.upstream, up_ev, (conn, "upstream"))

    def _set_interest(self, sock: socket.socket, events: int, data: tuple[_Conn, Side]) -> None:
        current = self._interest.get(sock, 0)
        if events == current:
            return
        if current == 0:
            self._sel.register(sock, events, data)
        elif events == 0:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, events, data)
        if events:
            self._interest[sock] = events
        else:
            self._interest.pop(sock, None)

    def _close_conn(self, conn: _Conn, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.silent:
            with self._stats_lock:
                self._silenced -= 1
        for sock in (conn.client, conn.upstream):
            if sock is None:
                continue
            if self._interest.pop(sock, 0):
                self._sel.unregister(sock)
            if rst:
                _rst_close(sock)
            else:
                sock.close()
        del self._conns[conn.id]
        with self._stats_lock:
            self._active -= 1
        log.debug("proxy %d: conn %d closed (%s)", self.port, conn.id, "rst" if rst else "fin")

    # -- commands (run on the I/O thread) ------------------------------------------

    def _set_blackhole(self, on: bool) -> None:
        self._blackholed = on
        if not on:
            for conn in list(self._conns.values()):
                if conn.upstream is None and not conn.silent:
                    self._connect_upstream(conn)
        log.debug("proxy %d: blackhole %s", self.port, "on" if on else "off")

    def _reset_all(self) -> int:
        conns = list(self._conns.values())
        for conn in conns:
            self._close_conn(conn, rst=True)
        log.debug("proxy %d: reset %d connections", self.port, len(conns))
        return len(conns)

    def _silence_all(self) -> int:
        conns = [conn for conn in self._conns.values() if not conn.silent]
        for conn in conns:
            conn.silent = True
        with self._stats_lock:
            self._silenced += len(conns)
        log.debug("proxy %d: silenced %d connections", self.port, len(conns))
        return len(conns)

    def _drop_silenced(self) -> int:
        conns = [conn for conn in self._conns.values() if conn.silent]
        for conn in conns:
            self._close_conn(conn, rst=True)
        log.debug("proxy %d: dropped %d silenced connections", self.port, len(conns))
        return len(conns)

    def _release(self) -> None:
        # Runs after the loop thread has exited (or given up on it).
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._sel.close()
