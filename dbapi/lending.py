"""Lending a pool's psycopg connections to a framework that drives them itself.

SQLAlchemy's ``postgresql+psycopg`` dialect and Django's PostgreSQL backend
each want a psycopg connection of their own, not dbpool's
:class:`~dbpool.pool.Connection`.  A :class:`Lender` checks one out of a
dbpool :class:`~dbpool.pool.Pool` and lends the psycopg connection under it
as it is, in dbpool's mode: autocommit on, a transaction begun explicitly
(:meth:`Lender.begin` sends ``BEGIN`` with the connection's isolation level,
read-only and deferrable modes, as psycopg would); a framework that prefers
psycopg's own transactional mode turns autocommit off itself, as Django does.
:meth:`Lender.give_back` takes the connection back: it rolls back what is
open, restores dbpool's mode and checks it in.  The pool cleans what it gets
back (a broken connection is replaced, and one abandoned by its thread too,
as nobody knows what its holder changed).

So each framework checkout is a dbpool checkout: it waits in dbpool's queue
(CoDel), under its circuit breaker, and counts in its metrics.

**The SQL sandbox.**  On an ownership pool whose caller holds a sandboxed
connection (:mod:`dbpool.pool.ownership.sandbox`), the connection lent sits
inside the sandbox's transaction, which the framework must neither commit
nor end.  It is lent as it is, in dbpool's mode, and the framework's
transactions go through :meth:`Lender.begin`, :meth:`Lender.commit` and
:meth:`Lender.rollback`: each is a dbpool transaction on the lent
connection, which the sandbox makes a savepoint.  So the application's
commits and rollbacks keep their meaning inside the test, and nothing is
committed.  On a plain pool, commit and rollback are psycopg's own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg.pq import TransactionStatus as PgTransactionStatus

from dbpool.errors import RolledBack
from dbpool.pgconnection import PgConnection
from dbpool.pool.lender import Lender as PoolLender
from dbpool.pool.ownership.pool import OwnershipPool
from dbpool.pool.ownership.sandbox import SandboxState
from dbpool.pool.transaction import RollbackSignal, Transaction

if TYPE_CHECKING:
    from dbpool.pool import Checkout, Connection, Pool

__all__ = ["Lender", "roll_back", "set_autocommit"]

logger = logging.getLogger("dbpool.dbapi")


@dataclass(eq=False, slots=True)
class _Lent:
    """One lent connection: its dbpool checkout, and, in a sandbox, the framework's
    open transaction."""

    #: How it goes back: its checkout's exit, or the pool's non-blocking give_back.
    back: Callable[[], object]
    conn: Connection
    raw: psycopg.Connection[Any]
    sandboxed: bool
    #: The framework's transaction on a sandboxed connection (a savepoint), if open.
    tx: Transaction | None = None


class Lender:
    """Lends ``pool``'s psycopg connections, and takes them back.

    ``timeout`` bounds the wait for a connection (the pool's ``timeout`` by
    default).  ``hold_timeout`` bounds how long one may then be held: None (the
    default) holds it until :meth:`give_back`, as psycopg_pool and
    SQLAlchemy's own pools do, since a framework holds a connection for as
    long as its session or request lasts.  A connection whose thread ends while
    it is lent is reclaimed all the same.  Thread-safe.
    """

    def __init__(self, pool: Pool, timeout: float | None = None,
                 hold_timeout: float | None = None,
                 readonly: bool | Literal["replica"] = False) -> None:
        self.pool = pool
        self.timeout = timeout
        self.hold_timeout = hold_timeout
        #: Lend a read replica's connections (see dbpool.pool.replicas): True when
        #: one can serve, ``"replica"`` only theirs.
        self.readonly = readonly
        self._lent: dict[int, _Lent] = {}
        # An idle connection is taken without a checkout's waiting machinery: the
        # queue's own try (its rules, metrics and breaker), as dbpool serve takes
        # them.  Not on an ownership pool, whose connections are its owners'.
        self._idle = None if isinstance(pool, OwnershipPool) else pool.lender()
        self._replica_idle: dict[int, PoolLender] = {}

    def _source(self) -> tuple[Pool, PoolLender | None]:
        """The pool to lend from now (a replica, for a read-only lender), and its
        non-blocking lender."""
        if not self.readonly:
            return self.pool, self._idle
        replica = self.pool.replica_for_read(self.readonly == "replica")
        if replica is None:
            return self.pool, self._idle
        idle = self._replica_idle.get(id(replica))
        if idle is None:
            idle = self._replica_idle.setdefault(id(replica), replica.lender())
        return replica, idle

    def lend(self) -> psycopg.Connection[Any]:
        """Check a connection out and lend its psycopg connection, in dbpool's mode
        (autocommit on; see the module docstring)."""
        source, idle = self._source()
        conn = idle.try_borrow() if idle is not None else None
        back: Callable[[], object]
        if conn is not None:
            back = functools.partial(idle.give_back, conn)  # type: ignore[union-attr]
            reset_deadline = self.hold_timeout is not None  # its loan has none to lift
        else:
            checkout: Checkout = source.checkout(timeout=self.timeout)
            conn = checkout.__enter__()
            back = functools.partial(checkout.__exit__, None, None, None)
            reset_deadline = True  # the checkout's: lifted (None) or moved
        try:
            if reset_deadline:
                conn.set_deadline(self.hold_timeout)
            state = conn.driver_state
            sandboxed = isinstance(state, SandboxState)
            raw: psycopg.Connection[Any] = (state.inner if sandboxed else state).conn
        except BaseException:
            back()
            raise
        self._lent[id(raw)] = _Lent(back, conn, raw, sandboxed)
        if sandboxed:
            logger.debug("%s: lent connection %d from the SQL sandbox: its transactions "
                         "are savepoints", self.pool.name, conn.index)
        return raw

    def sandboxed(self, raw: Any) -> bool:
        """Whether ``raw`` is lent by this lender from inside the SQL sandbox."""
        return self._sandbox_loan(raw) is not None

    def begin(self, raw: Any) -> None:
        """Begin the framework's transaction on ``raw``.

        On a plain connection, send ``BEGIN`` with the connection's modes now,
        in either autocommit mode (with autocommit off psycopg would send the
        same at the first statement, through a costlier path).  A sandboxed
        connection opens a savepoint.  A transaction already open is kept, as
        psycopg keeps it.
        """
        lent = self._sandbox_loan(raw)
        if lent is None:
            if getattr(raw, "rollback_pending", False):  # rolled back, and begun again
                raw.settle()
            if raw.pgconn.transaction_status == _IDLE:
                _begin(raw)
            return
        if lent.tx is not None:
            return
        tx = lent.conn.transaction()
        tx.__enter__()
        lent.tx = tx

    def commit(self, raw: Any) -> None:
        """Commit the framework's transaction: a sandboxed one is released into the sandbox.

        As PostgreSQL's ``COMMIT``, it rolls back a transaction in which a
        statement failed, without an error; and with no transaction open it
        does nothing.
        """
        lent = self._sandbox_loan(raw)
        if lent is None:
            raw.commit()
            return
        tx, lent.tx = lent.tx, None
        if tx is None:
            return
        if lent.raw.info.transaction_status == PgTransactionStatus.INERROR:
            logger.debug("%s: commit of a failed transaction in the SQL sandbox: rolled back",
                         self.pool.name)
            roll_back(tx)
            return
        tx.__exit__(None, None, None)

    def rollback(self, raw: Any) -> None:
        """Roll back the framework's transaction (to its savepoint, in the sandbox);
        with none open, do nothing."""
        lent = self._sandbox_loan(raw)
        if lent is None:
            raw.rollback()
            return
        tx, lent.tx = lent.tx, None
        if tx is not None:
            roll_back(tx)

    def rollback_unawaited(self, raw: Any) -> None:
        """:meth:`rollback`, without waiting for the server's answer where that is safe:
        on a connection lent from a plain pool, whose next use reads the answer
        (:mod:`dbpool.pgconnection`).  A framework that ends each checkout with a
        rollback (SQLAlchemy) then gives the connection back a round trip sooner;
        one that goes on with it first reads the answer, through psycopg."""
        lent = self._lent.get(id(raw))
        if (self._idle is None or lent is None or lent.raw is not raw or lent.sandboxed
                or not isinstance(raw, PgConnection)):
            self.rollback(raw)
            return
        raw.rollback_unawaited()

    def give_back(self, raw: Any) -> None:
        """Roll back what is open and give the connection back to the pool.

        A sandboxed connection goes back as it came, inside the sandbox's
        transaction: the pool's checkin rolls back the framework's savepoint
        if it is open, as it would an application's transaction.  A
        connection this lender did not lend is closed.
        """
        lent = self._lent.pop(id(raw), None)
        if lent is None or lent.raw is not raw:  # not one of ours
            raw.close()
            return
        try:
            if not lent.sandboxed and not raw.closed:
                if getattr(raw, "rollback_pending", False):
                    # Its next borrower reads the answer (the pool's checkout settles it).
                    raw._autocommit = True  # as set_autocommit() would, once idle
                else:
                    if raw.pgconn.transaction_status != _IDLE:
                        raw.rollback()
                    set_autocommit(raw, True)  # dbpool's own mode, with explicit BEGIN
        except Exception:  # broken: the pool's checkin finds it so and replaces it
            pass
        finally:
            lent.back()

    def _sandbox_loan(self, raw: Any) -> _Lent | None:
        lent = self._lent.get(id(raw))
        if lent is None or lent.raw is not raw or not lent.sandboxed:
            return None
        return lent


_IDLE = PgTransactionStatus.IDLE
_COMMAND_OK = psycopg.pq.ExecStatus.COMMAND_OK


def _begin(raw: psycopg.Connection[Any]) -> None:
    """``BEGIN`` on ``raw``, with its isolation level, read-only and deferrable modes,
    as psycopg begins a transaction outside autocommit (straight through libpq:
    psycopg's own path costs a cursor more, at every transaction)."""
    modes = b""
    if raw.isolation_level is not None:
        modes += b" ISOLATION LEVEL " + raw.isolation_level.name.replace("_", " ").encode()
    if raw.read_only is not None:
        modes += b" READ ONLY" if raw.read_only else b" READ WRITE"
    if raw.deferrable is not None:
        modes += b" DEFERRABLE" if raw.deferrable else b" NOT DEFERRABLE"
    result = raw.pgconn.exec_(b"BEGIN" + modes)
    if result.status != _COMMAND_OK:
        raise psycopg.errors.error_from_result(result, encoding=raw.info.encoding)


def set_autocommit(raw: psycopg.Connection[Any], value: bool) -> None:
    """``raw.autocommit = value`` for a connection in no transaction, at the cost of an
    assignment: psycopg's setter checks just that, under its lock and through a
    generator, about 1 µs, which a framework's checkout pays twice (the
    attribute is psycopg's own, in the psycopg versions ``pyproject.toml``
    pins; tests/dbapi/test_lending_internals.py holds it to that).  In a
    transaction the setter runs, and raises as psycopg does."""
    if raw.pgconn.transaction_status == _IDLE:
        raw._autocommit = value
    else:
        raw.autocommit = value


def roll_back(tx: Transaction) -> None:
    """End a dbpool transaction by rolling it back, as ``conn.rollback()`` inside it would.

    A rollback that finds the connection lost has it replaced at checkin
    (see :mod:`dbpool.pool.transaction`); another failure is raised.
    """
    try:
        tx.__exit__(RollbackSignal, RollbackSignal("rollback"), None)
    except RolledBack:  # how a transaction block reports the rollback asked of it
        pass
