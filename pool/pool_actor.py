"""The pool actor: supervises connection actors and runs the pool's timers.

Contract:

- On start it starts ``pool_size`` connection actors, one per slot index.
- A connection actor that crashes is restarted with a fresh slot, unless
  that would exceed ``max_restarts`` within ``max_seconds``; then the pool
  stops with a :class:`~dbpool.errors.PoolStoppedError` whose ``cause`` is
  the crash.  A connection that gives up (``backoff_type="stop"``) stops the
  pool the same way.
- It delivers connection events to listeners and telemetry, in order.
- Every ``idle_interval`` it takes connections idle for a whole interval,
  oldest first, at most ``idle_limit`` of them, and has their actors replace
  them if ``disconnect_all`` or ``max_lifetime`` says so, else ping them.
- Every ``queue_interval`` it polls the checkout queue (CoDel load
  shedding); every ``disconnect_all_every`` it calls ``disconnect_all``.
- An elastic pool (``min_size < max_size``): every ``queue_target`` it
  grows or shrinks as :mod:`dbpool.pool.elastic` decides.
- It passes :class:`~dbpool.actors.messages.Listen` and ``Unlisten`` to its
  LISTEN/NOTIFY relay (:mod:`dbpool.actors.relay`), which it starts at the
  first ``Listen``.
- It runs :class:`~dbpool.pool.messages.RunQuery` messages from other actors
  on worker threads, never on its own (see :mod:`dbpool.pool.messages`).
- On stop it refuses new checkouts, fails the waiters, stops its connection
  actors (closing idle connections; lent ones close at checkin) and then
  tells the monitors why it stopped.
"""

from __future__ import annotations

import atexit
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import pykka

from dbpool import telemetry
from dbpool.actors.connection import ConnectionActor, ConnectionConfig
from dbpool.actors.listeners import ResizeEvent, deliver
from dbpool.actors.messages import (
    ConnectFailed,
    ConnectionCrashed,
    ConnectionGaveUp,
    Listen,
    Notify,
    Parked,
    Ping,
    Probe,
    Retire,
    Unlisten,
)
from dbpool.actors.relay import NotifyRelay, Waker
from dbpool.actors.slot import Slot
from dbpool.actors.supervisor import RestartIntensity
from dbpool.errors import PoolStoppedError

from .core import PoolCore
from .elastic import IdleWindow, Sizing, next_size
from .messages import QueryReply, RunQuery

__all__ = ["PoolActor"]

logger = logging.getLogger("dbpool.pool")


@dataclass(frozen=True, slots=True)
class _IdleSweep:
    """Timer tick: ping what has been idle since ``since``."""

    since: float


class _QueuePoll:
    """Timer tick: CoDel's periodic queue check."""


class _PeriodicDisconnectAll:
    """Timer tick: the ``disconnect_all_every`` option."""


class _SizeCheck:
    """Timer tick: an elastic pool's look at its load (see pool/elastic.py)."""


@dataclass(frozen=True, slots=True)
class _ProbeDue:
    """Timer tick: the circuit breaker's backoff step passed (see pool/breaker.py)."""

    token: int


@dataclass(frozen=True, slots=True)
class Resize:
    """From :meth:`~dbpool.pool.Pool.resize`: keep ``size`` connections open from now on;
    answered once started (growing) or once the idle ones beyond it are closing."""

    size: int


@dataclass(frozen=True, slots=True)
class Availability:
    """From :class:`~dbpool.pool.Pool`: ``open``, ``close``, ``pause``, ``resume`` or
    ``drain`` (see :mod:`dbpool.pool.breaker`); answered once done."""

    action: str


class PoolActor(pykka.ThreadingActor):
    """One per pool.  See the module docstring for its contract."""

    # A program that forgets pool.stop() must still exit: daemon threads let
    # the interpreter reach its atexit hooks, one of which stops every pool.
    use_daemon_thread = True

    def __init__(self, core: PoolCore, config: ConnectionConfig) -> None:
        super().__init__()
        self.core = core
        # The parts it works with, named once.
        self.name = core.name
        self.options = core.options
        self.breaker = core.breaker
        self.queue = core.queue
        self.watcher = core.watcher
        self.scheduler = core.scheduler
        self.checkin = core.checkin
        self.recycler = core.recycler
        self.metrics = core.metrics
        self.config = config
        self.connections: dict[int, pykka.ActorRef[Any]] = {}
        self.restarts = RestartIntensity(core.options.max_restarts, core.options.max_seconds)
        self._stop_error: BaseException | None = None
        self._workers: ThreadPoolExecutor | None = None
        #: What an elastic pool saw of its idle connections lately.
        self._idle_window = IdleWindow(core.options.max_idle, time.monotonic())
        #: The LISTEN/NOTIFY relay, once anyone listens, and what wakes it.
        self._relay: tuple[pykka.ActorRef[Any], Waker] | None = None

    def on_start(self) -> None:
        self.breaker.attach(
            probe=self._probe, schedule=lambda delay, token: self._tick_later(
                delay, _ProbeDue(token)))
        for index in range(self.options.pool_size):
            self._start_connection(index)
        self.watcher.start()
        self._schedule_idle_sweep()
        self._tick_later(self.options.queue_interval, _QueuePoll())
        if self.options.disconnect_all_every is not None:
            self._tick_later(self.options.disconnect_all_every, _PeriodicDisconnectAll())
        if self.options.elastic:
            self._tick_later(self.options.queue_target, _SizeCheck())

    def on_receive(self, message: Any) -> Any:
        match message:
            case Notify(event):
                self.core.deliver(event)
                if event.kind == "connected":
                    self.breaker.connected(event.index)
                else:
                    self.breaker.disconnected(event.index)
            case Parked(index) if index in self.checkin.retired:
                self._stop_retired(index)
            case Parked(index):
                self.breaker.parked_connection(index)
            case Resize(size):
                self._resize(size, "resize")
            case _ProbeDue(token):
                self.breaker.probe_due(token)
            case Availability(action):
                self._availability(action)
            case RunQuery():
                return self._run_query(message)
            case Listen() | Unlisten():
                self._to_relay(message)
            case ConnectFailed(index, error):
                self.metrics.add("connect_errors")
                telemetry.emit("connection_error", {"count": 1},
                               {"pool": self.name, "error": error, "index": index})
                self.breaker.connect_failed(index, error)
            case ConnectionGaveUp(index, error):
                self._fail(PoolStoppedError(
                    f"{self.name}: connection {index} failed and backoff_type is 'stop', "
                    f"so the pool stopped: {error}", cause=error))
            case ConnectionCrashed(index, error, actor):
                self._restart(index, error, actor)
                self.breaker.crashed(index, error)
            case _IdleSweep(since):
                self._idle_sweep(since)
            case _QueuePoll():
                self.queue.poll()
                self._tick_later(self.options.queue_interval, message)
            case _SizeCheck() if self.options.elastic:
                self._size_check()
                self._tick_later(self.options.queue_target, message)
            case _SizeCheck():
                pass  # resized by hand since: fixed
            case _PeriodicDisconnectAll():
                self.recycler.disconnect_all(self.options.disconnect_all_interval)
                every = self.options.disconnect_all_every
                assert every is not None
                self._tick_later(every, message)
            case _:
                logger.warning("%s: pool actor ignored unknown message %r", self.name, message)

    def on_stop(self) -> None:
        self.core.before_stop()
        error = self._stop_error
        closed = PoolStoppedError(
            f"{self.name}: the pool is stopped" + (f": {error}" if error else ""), cause=error)
        for slot in self.queue.close(closed):
            slot.lent_at = None  # back in its actor's hands, which close it
        refs = list(self.connections.values())
        if self._relay is not None:
            relay, waker = self._relay
            relay.stop(block=False)
            waker.wake()  # out of its wait on the connection, to stop now
            refs.append(relay)
        for ref in refs:
            try:
                ref.stop(block=True, timeout=10)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        if self._workers is not None:
            self._workers.shutdown(wait=False)  # queued ones fail fast: the queue is closed
        self.watcher.stop()
        self.scheduler.stop()
        self.core.mark_stopped(error)

    def on_failure(self, *exc_info: Any) -> None:
        # A bug in the pool actor itself: fail closed, never leave callers hanging.
        self._stop_error = exc_info[1]
        self.on_stop()

    # -- supervision -----------------------------------------------------

    def _to_relay(self, message: Listen | Unlisten) -> None:
        if self._relay is None or not self._relay[0].is_alive():
            if isinstance(message, Unlisten):
                if message.done is not None:  # nobody listens: nothing to stop
                    message.done.set_result(None)
                return
            waker = Waker()
            ref = NotifyRelay.start(self.config, waker, self.options.idle_interval)
            self._relay = ref, waker
        ref, waker = self._relay
        ref.tell(message)
        waker.wake()

    def _start_connection(self, index: int) -> None:
        slot = Slot(index, self.core.driver)
        ref = ConnectionActor.start(slot, self.config, self.actor_ref)
        self.connections[index] = ref

    def _size_check(self) -> None:
        options, now = self.options, time.monotonic()
        assert options.min_size is not None and options.max_size is not None
        window = self._idle_window
        window.sample(now, self.queue.counts()[0])
        size = next_size(Sizing(
            size=options.pool_size, min_size=options.min_size, max_size=options.max_size,
            up=len(self.breaker.up),
            healthy=self.breaker.state == "closed" and not self.queue.paused,
            longest_wait=self.queue.longest_wait(now), queue_target=options.queue_target,
            unused=window.low(now)))
        if size != options.pool_size:
            window.restart(now)
            grown = size > options.pool_size
            self.metrics.add("grown" if grown else "shrunk", abs(size - options.pool_size))
            self._resize(size, "grow" if grown else "shrink")

    def _resize(self, size: int, reason: str) -> None:
        """Grow by starting connection actors; shrink by retiring the highest indexes:
        idle connections close now, lent ones when they come back, and their actors
        stop.  Nothing in flight is touched."""
        old = self.options.pool_size
        retired = self.checkin.retired
        if size > old:
            for index in range(old, size):
                if index in retired:  # still closing from a shrink: it stays instead
                    retired.discard(index)
                    if index in self.connections:
                        continue
                self._start_connection(index)
        elif size < old:
            going = set(range(size, old))
            retired.update(going)
            for slot in self.queue.take_slots(going):
                slot.actor.tell(Retire(slot))
            for index in [index for index in self.breaker.parked if index in going]:
                self._stop_retired(index)
        options = self.core.options
        if reason == "resize":  # a size set by hand is fixed: elastic sizing stops
            self.core.options = replace(options, pool_size=size, min_size=size, max_size=size)
        else:
            self.core.options = replace(options, pool_size=size)
        self.options = self.core.options
        logger.info("%s: pool size %d -> %d (%s)", self.name, old, size, reason)
        if size != old:
            event = ResizeEvent(self.name, size, old, reason)
            deliver(self.core.listeners, event)
            telemetry.emit("resize", {"count": 1}, {"pool": self.name, "size": size,
                                                    "previous": old, "reason": reason})

    def _stop_retired(self, index: int) -> None:
        """A retired connection has closed: stop its actor, forget its index."""
        self.checkin.retired.discard(index)
        self.breaker.forget(index)
        if self.core.budget is not None:
            self.core.budget.forget(index)
        ref = self.connections.pop(index, None)
        if ref is not None:
            ref.stop(block=False)

    def _restart(self, index: int, error: BaseException, actor: Any) -> None:
        current = self.connections.get(index)
        if current is None or current.actor_urn != actor.actor_urn:
            return  # a crash report from an actor already replaced
        if index in self.checkin.retired:
            self._stop_retired(index)
            return
        if not self.restarts.allow():
            self._fail(PoolStoppedError(
                f"{self.name}: connection actors crashed more than "
                f"{self.restarts.max_restarts} times within {self.restarts.max_seconds:g}s, "
                f"so the pool stopped; last crash (connection {index}): "
                f"{type(error).__name__}: {error}", cause=error))
            return
        logger.error("%s: connection %d crashed (%s: %s); restarting it",
                     self.name, index, type(error).__name__, error)
        self._start_connection(index)

    def _fail(self, error: BaseException) -> None:
        if self._stop_error is None:
            logger.error("%s", error)
            self._stop_error = error
            self.stop()

    # -- availability ----------------------------------------------------

    def _probe(self, index: int) -> None:
        ref = self.connections.get(index)
        if ref is not None:
            try:
                ref.tell(Probe())
            except pykka.ActorDeadError:
                pass

    def _availability(self, action: str) -> None:
        breaker, queue = self.breaker, self.queue
        if action == "open":
            breaker.open()
        elif action == "close":
            breaker.close()
        elif action == "pause":
            queue.pause()
            breaker.emit(breaker.state, "paused")
        elif action == "resume":
            queue.resume()
            breaker.resume()
        elif action == "drain":
            queue.pause()
            breaker.drain()
            # Idle connections close now; lent ones as they come back (the recycler).
            for slot in queue.take_idle(float("inf"), self.options.pool_size):
                self.checkin.recycle(slot, "the pool was drained")

    # -- timers ----------------------------------------------------------

    def _tick_later(self, delay: float, message: Any) -> None:
        self.scheduler.tell_later(delay, self.actor_ref, message)

    def _schedule_idle_sweep(self) -> None:
        self._tick_later(self.options.idle_interval, _IdleSweep(time.monotonic()))

    def _idle_sweep(self, since: float) -> None:
        for slot in self.queue.take_idle(since, self.options.effective_idle_limit):
            reason = self.recycler.reason(slot)
            if reason is not None:
                self.checkin.recycle(slot, reason)
                continue
            try:
                slot.actor.tell(Ping(slot))
            except pykka.ActorDeadError:
                pass
        self._schedule_idle_sweep()

    # -- queries from other actors ---------------------------------------

    def _run_query(self, request: RunQuery) -> pykka.Future[Any] | None:
        future: pykka.Future[Any] | None = None if request.reply_to is not None else (
            pykka.ThreadingFuture())
        if self._workers is None:
            self._workers = ThreadPoolExecutor(
                max_workers=self.options.pool_size,
                thread_name_prefix=f"{self.name}-query")
        self._workers.submit(_answer, self.core, request, future)
        return future



def _answer(core: PoolCore, request: RunQuery, future: pykka.Future[Any] | None) -> None:
    """Run a RunQuery on a worker thread and deliver its result or error."""
    timeout = core.options.timeout if request.timeout is None else request.timeout
    result, error = None, None
    try:
        conn = core.lend(timeout, core.options.queue, None)
        try:
            result = conn.query(request.sql, request.params)
        finally:
            core.checkin.take_back(conn)
    except Exception as exc:
        error = exc
    if future is not None:
        if error is None:
            future.set(result)
        else:
            future.set_exception((type(error), error, error.__traceback__))
        return
    try:
        request.reply_to.tell(QueryReply(request.tag, result, error))
    except pykka.ActorDeadError:
        logger.info("%s: the actor that sent %r is gone; reply dropped", core.name, request)


@atexit.register
def _stop_pools_at_exit() -> None:
    """Stop the pools still running as the interpreter exits, closing their connections."""
    for ref in pykka.ActorRegistry.get_by_class(PoolActor):
        try:
            ref.stop(block=True, timeout=10)
        except Exception:  # already stopping, or too slow: exit anyway
            logger.debug("pool %r did not stop at exit", ref, exc_info=True)
