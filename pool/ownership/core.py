"""The ownership pool: connections owned explicitly by threads and tasks.

This is DBConnection.Ownership for Python.  Start it with
``Pool.start(..., pool="ownership")``; the pool's calls (``query``,
``checkout``, ``transaction``, ...) then run on the connection owned by the
caller.  Applications' test suites use it to give every test its own
connection inside a transaction that is rolled back at the end (see
:mod:`dbpool.pool.ownership.pytest_plugin`).

Owners are threads and asyncio tasks (:mod:`dbpool.pool.ownership.owners`).

Modes (the ``ownership_mode`` option, or :meth:`Pool.ownership_mode`):

- ``"auto"``: a caller with no connection gets one of its own on first use,
  and keeps it until it checks it in or ends.
- ``"manual"``: a caller must own a connection (``ownership_checkout``) or
  be allowed on one (``ownership_allow``), or else
  :class:`~dbpool.errors.OwnershipError` says what to do.
- ``("shared", owner)``: every caller uses ``owner``'s connection.  It
  reverts to manual when that owner ends.

Setting a mode checks in every connection (but the new shared owner's).

How a call finds its connection:

1. the ``caller=`` option, if given;
2. the current owner (the running task, else the thread);
3. in manual mode, the callers chain (work started by owners: see
   :mod:`dbpool.pool.ownership.owners`), and last, for a task, the thread running
   its event loop.

Only the first of these counts in auto and shared modes, as in DBConnection.

The calls and their answers:

- ``pool.ownership_checkout(owner=None, ...)``: ``"ok"``, ``"already_owner"``
  or ``"already_allowed"``;
- ``pool.ownership_checkin(owner=None)``: ``"ok"``, ``"not_owner"`` or
  ``"not_found"``;
- ``pool.ownership_allow(owner_or_allowed, allowed, unallow_existing=False)``:
  ``"ok"``, ``"already_owner"``, ``"already_allowed"`` or ``"not_found"``;
- ``pool.ownership_mode(mode)``: ``"ok"``, ``"already_shared"``,
  ``"not_owner"`` or ``"not_found"``.

An owner that ends (its thread finished, its task done) releases its
connection; if a client was still using it, it is disconnected rather than
reused.  ``ownership_timeout`` disconnects a connection owned for too long
and logs where it was checked out.  ``disconnect_all`` reaches an owned
connection once it is checked in.

``post_checkout(driver, state) -> (driver, state)`` runs when an owner's
connection is taken from the pool and may replace both (the sandbox wraps
them: :mod:`dbpool.pool.ownership.sandbox`); raising drops the connection and the
error reaches the caller.  ``pre_checkin(reason, driver, state) ->
(driver, state)`` runs when it goes back, with ``reason`` ``"checkin"`` or
``("disconnect", error)``, and must return the pool's own driver; raising
drops the connection.  dbpool has no ``{:stop, err}`` reason: a connection
whose driver failed is replaced, not its actor stopped.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Literal, cast

import pykka

from dbpool.actors.slot import Slot
from dbpool.driver import Driver
from dbpool.errors import ConnectionError, OwnershipError, PoolStoppedError

from ..checkin import Checkin as PoolCheckin
from ..core import PoolCore
from ..loans import Location
from ..options import PoolOptions
from ._async.lending import alend as _alend
from ._sync.lending import lend as _lend
from ._sync.lending import lend_from
from .manager import (
    Allow,
    Checkin,
    Checkout,
    End,
    OwnerDown,
    OwnershipManager,
    SetMode,
)
from .owners import Owner, callers, current_owner, describe_owner, join_chain, on_owner_exit
from .proxy import Proxy

__all__ = ["AllowAnswer", "CheckinAnswer", "CheckoutAnswer", "ModeAnswer", "OwnershipCore"]

CheckoutAnswer = Literal["ok", "already_owner", "already_allowed"]
CheckinAnswer = Literal["ok", "not_owner", "not_found"]
AllowAnswer = Literal["ok", "already_owner", "already_allowed", "not_found"]
ModeAnswer = Literal["ok", "already_shared", "not_owner", "not_found"]

_OVERRIDES = frozenset({"post_checkout", "pre_checkin", "ownership_timeout"})


class OwnershipCheckin(PoolCheckin):
    """The checkin of an ownership pool: a slot an owner's proxy holds goes back to
    the proxy (its owner's next client takes it), not to the pool's queue."""

    def __init__(self, core: OwnershipCore, *args: Any) -> None:
        super().__init__(*args)
        self._core = core  # its registry of holders and its manager

    def place(self, slot: Slot) -> None:
        proxy = self._core.holders.get(slot.index)
        if proxy is not None and proxy.slot is slot:
            proxy.checkin(slot)
        else:
            super().place(slot)

    def reconnect(self, slot: Slot, error: BaseException, taken: bool = False) -> None:
        core = self._core
        proxy = core.holders.pop(slot.index, None)
        if proxy is not None:  # taken from its client (a deadline, or the ownership ended)
            proxy.forget(slot)
            if getattr(error, "reason", None) == "deadline":
                # As DBConnection's proxy does: a client past its deadline ends the ownership.
                try:
                    core.manager.tell(End(proxy, f"a client of {describe_owner(proxy.owner)}'s "
                                                 "connection timed out"))
                except pykka.ActorDeadError:
                    pass  # the pool is stopping: every ownership ends anyway
        super().reconnect(slot, error, taken)


class OwnershipCore(PoolCore):
    """A pool core whose connections are lent through their owners' proxies."""

    def __init__(self, driver: Driver[Any], options: PoolOptions) -> None:
        super().__init__(driver, options)
        #: ``"auto"``, ``"manual"`` or ``("shared", owner)``; written by the manager only.
        self.mode: Any = options.ownership_mode
        #: owner -> ("owner" | "allowed", proxy); written by the manager only.
        self.checkouts: dict[Owner, tuple[str, Proxy]] = {}
        #: Live proxies by number; written by the manager only.
        self.proxies: dict[int, Proxy] = {}
        #: Slot index -> the proxy holding that slot.
        self.holders: dict[int, Proxy] = {}
        self.manager: pykka.ActorRef[Any] = OwnershipManager.start(self)

    # -- lending ---------------------------------------------------------

    #: Check out the caller's connection: :func:`dbpool.pool.ownership._sync.lending.lend`.
    lend = _lend
    #: The same for an asyncio task: :func:`dbpool.pool.ownership._async.lending.alend`.
    alend = _alend

    def check_time_left(self, started: float, timeout: float) -> None:
        if time.monotonic() >= started + timeout:
            raise ConnectionError(
                f"{self.name}: no owned connection within the {timeout:g}s checkout timeout "
                "(the ownership kept ending)", reason="queue_timeout")

    def proxy_for(self, caller: Owner | None, where: Location | None = None) -> Proxy:
        """The proxy whose connection serves this call (see the module docstring).

        In auto mode it asks the manager for a new one if the caller has none.
        """
        me = current_owner()
        first = me if caller is None else caller
        checkouts = self.checkouts
        entry = checkouts.get(first)
        if entry is not None:
            if first is me:
                join_chain(me)
            return entry[1]
        mode = self.mode
        if mode == "manual":
            candidates = [*([me] if caller is not None else []), *callers()]
            if isinstance(me, asyncio.Task):
                candidates.append(threading.current_thread())
            for candidate in candidates:
                entry = checkouts.get(candidate)
                if entry is not None:
                    join_chain(me, candidate)
                    return entry[1]
            raise OwnershipError(self._not_found(first))
        if mode == "auto":
            answer = self._ask(Checkout(first, where))
            if isinstance(answer, str):  # it raced with another checkout for this owner
                return self.proxy_for(caller, where)
            proxy: Proxy = answer[0]
            if answer[1]:
                self._watch(first)
            return proxy
        entry = checkouts.get(mode[1])
        if entry is None:  # the shared owner just ended
            raise OwnershipError(self._not_found(first))
        return entry[1]

    def _make_checkin(self) -> PoolCheckin:
        return OwnershipCheckin(self, self.name, self.driver, self.queue, self.loans,
                                self.breaker, self.recycler, self.metrics, self.canceller,
                                self.deliver)

    def before_stop(self) -> None:
        try:
            self.manager.stop(block=True, timeout=10)
        except (pykka.ActorDeadError, pykka.Timeout):
            pass

    # -- the public calls (see Pool) ---------------------------------------

    def ownership_checkout(
        self, owner: Owner | None, timeout: float, queue: bool, where: Location | None,
        overrides: dict[str, Any],
    ) -> CheckoutAnswer:
        unknown = set(overrides) - _OVERRIDES
        if unknown:
            raise TypeError(f"unexpected option(s): {', '.join(sorted(unknown))}")
        me = current_owner()
        owner = me if owner is None else owner
        answer = self._ask(Checkout(owner, where, overrides))
        if isinstance(answer, str):
            return answer  # type: ignore[return-value]
        proxy, watch = answer
        if watch:
            self._watch(owner)
        if owner is me:
            join_chain(me)
        # Take the connection now, as DBConnection does, so that errors show here.
        try:
            conn = lend_from(proxy, time.monotonic(), timeout, queue, where)
        except BaseException:
            self._ask(End(proxy, f"the checkout by {describe_owner(owner)} failed"))
            raise
        self.checkin.take_back(conn)
        return "ok"

    def ownership_checkin(self, owner: Owner | None) -> CheckinAnswer:
        me = current_owner()
        answer: CheckinAnswer = self._ask(Checkin(me if owner is None else owner, me))
        return answer

    def ownership_allow(
        self, owner_or_allowed: Owner, allowed: Owner, unallow_existing: bool
    ) -> AllowAnswer:
        answer: AllowAnswer = self._ask(
            Allow(owner_or_allowed, allowed, unallow_existing))
        return answer

    def ownership_mode(self, mode: Any) -> ModeAnswer:
        valid = mode in ("auto", "manual") or (
            isinstance(mode, tuple) and len(mode) == 2 and mode[0] == "shared"
            and isinstance(mode[1], threading.Thread | asyncio.Task))
        if not valid:
            raise ValueError(
                f"mode must be 'auto', 'manual' or ('shared', owner), got {mode!r}")
        answer: ModeAnswer = self._ask(SetMode(mode, current_owner()))
        return answer

    def proxy_metrics(self) -> list[dict[str, Any]]:
        """One entry per owned connection, in order of checkout."""
        return [proxy.metrics() for proxy in sorted(
            list(self.proxies.values()), key=lambda p: p.number)]

    # -- helpers ---------------------------------------------------------

    def _ask(self, message: object) -> Any:
        """Ask the manager and wait for its answer (pykka's ask, typed for a blocking call)."""
        try:
            return cast(Any, self.manager.ask(message))
        except pykka.ActorDeadError:
            raise PoolStoppedError(f"{self.name}: the pool is stopped") from None

    def _watch(self, owner: Owner) -> None:
        manager = self.manager

        def down(ended: Owner) -> None:
            try:
                manager.tell(OwnerDown(ended))
            except pykka.ActorDeadError:
                pass  # the pool has stopped

        on_owner_exit(owner, down)

    def _not_found(self, caller: Owner) -> str:
        mode = self.mode
        shown = f"('shared', {describe_owner(mode[1])})" if isinstance(mode, tuple) else repr(mode)
        return (
            f"{self.name}: cannot find an owned connection for {describe_owner(caller)} "
            f"using ownership mode {shown}.  (Note that a shared mode reverts to 'manual' "
            "when its owner ends.)\n\n"
            "When using ownership, a caller gets a connection in one of four ways:\n\n"
            "  * by checking one out explicitly: pool.ownership_checkout()\n"
            "  * by being allowed on another owner's: pool.ownership_allow(owner, allowed)\n"
            "  * by running the pool in shared mode: pool.ownership_mode(('shared', owner));\n"
            "    if you do this in tests, do not run them concurrently on one pool\n"
            "  * by passing caller=owner to the call, where owner already has or is allowed\n"
            "    a connection\n\n"
            "Work started by an owner finds its connection through the callers chain: asyncio "
            "tasks inherit it; for threads and executors use "
            "dbpool.pool.ownership.owners.propagate_callers or CallersThreadPoolExecutor.\n\n"
            "If you are reading this error, you have done none of the above, or the owner "
            "has ended.")
