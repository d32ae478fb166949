"""SQLAlchemy on an in-process dbpool pool: :func:`create_engine`.

SQLAlchemy runs its own ``postgresql+psycopg`` dialect on connections that
a dbpool :class:`~dbpool.pool.Pool` lends (:class:`~dbpool.dbapi.lending.Lender`):
SQLAlchemy's own pooling is off (``NullPool``), so each SQLAlchemy checkout
is a dbpool checkout, under dbpool's queue (CoDel), circuit breaker and
metrics.  When SQLAlchemy closes a connection it goes back to dbpool, which
cleans what it gets: a transaction left open is rolled back, a broken
connection replaced.

It is psycopg_pool's recipe for SQLAlchemy (``creator`` and ``NullPool``)
with dbpool as the pool, and two things more, for speed: SQLAlchemy's pool is
:class:`LendingPool`, which keeps one connection record per dbpool connection
(``NullPool`` makes a new one, and runs the dialect's connect events, at every
checkout), and each SQLAlchemy transaction begins with an explicit ``BEGIN``
(with the isolation level and modes SQLAlchemy set), cheaper than psycopg's
own.

**Under the SQL sandbox** (an ownership pool, and
:mod:`dbpool.pool.ownership.pytest_plugin` or
:mod:`~dbpool.pool.ownership.sandbox`), the same engine joins the test's
transaction, with no change to the application: SQLAlchemy's transactions
on a sandboxed connection become savepoints in it (the lender's
``begin``/``commit``/``rollback``), so a ``Session.commit()`` is seen by the
test and by the threads it allows, a ``rollback()`` returns to where the
transaction began, ``begin_nested()`` nests a savepoint inside, and nothing
is committed.  The sandbox's transaction fixes the isolation level,
read-only and deferrable modes: the engine's settings of them are ignored
there, and ``isolation_level="AUTOCOMMIT"`` is refused, since its writes
could not be kept without a transaction to commit.  A thread's connections
are one in the sandbox, lent in turn: a thread that holds one (a session in a
transaction) and waits for another waits for itself, until its ``timeout``.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import psycopg
import sqlalchemy
from sqlalchemy.pool import Pool as SQLAlchemyPool
from sqlalchemy.pool.base import _ConnectionRecord

from dbpool.pool.ownership.pool import OwnershipPool

from ..lending import Lender, set_autocommit

if TYPE_CHECKING:
    from dbpool.pool import Pool

__all__ = ["LendingPool", "create_engine"]

logger = logging.getLogger("dbpool.dbapi")


def create_engine(pool: Pool, *, timeout: float | None = None,
                  hold_timeout: float | None = None, readonly: bool | Literal["replica"] = False,
                  **kwargs: Any) -> sqlalchemy.Engine:
    """An SQLAlchemy engine whose connections are ``pool``'s (see the module docstring).

    ``timeout`` bounds each checkout's wait for a connection (the pool's
    ``timeout`` by default); ``hold_timeout`` how long SQLAlchemy may then hold
    it (None: until it closes it, as with SQLAlchemy's own pools); ``readonly``
    makes a read-only engine, whose connections are the pool's read replicas'
    (True: when one can serve, else the primary's; ``"replica"``: only
    theirs; see :mod:`dbpool.pool.replicas`); ``kwargs`` go to
    ``sqlalchemy.create_engine``.
    """
    lender = Lender(pool, timeout, hold_timeout, readonly)
    #: The connections SQLAlchemy set to AUTOCOMMIT (see _begin_explicitly).
    autocommit: weakref.WeakSet[Any] = weakref.WeakSet()
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg://", creator=functools.partial(_lend, lender, autocommit),
        poolclass=LendingPool, **kwargs)
    dialect = engine.dialect
    # The dialect closes a DB-API connection through do_close: ours goes back instead.
    dialect.do_close = lender.give_back  # type: ignore[method-assign, assignment]
    _begin_explicitly(dialect, lender, autocommit)
    if isinstance(pool, OwnershipPool):  # only an ownership pool lends from a sandbox
        _join_sandboxes(dialect, lender)
    return engine


class LendingPool(SQLAlchemyPool):
    """SQLAlchemy's pool over connections a dbpool pool lends: one record per connection.

    Its creator lends a connection and the dialect's ``do_close`` gives it
    back, at every checkout and checkin, as with ``NullPool``.  But NullPool
    builds a new connection record each time, and so runs SQLAlchemy's connect
    events each time (the psycopg dialect's adds a notice handler to the
    connection: one more at every checkout, for ever).  This pool keeps the
    record of each connection it is lent, as QueuePool keeps its records, and
    the connect events run once per connection.  A record SQLAlchemy
    invalidated has given its connection back (to be replaced); a new one is
    made for the next.

    It uses SQLAlchemy's ``_ConnectionRecord``, the record every pool of
    SQLAlchemy's makes (the ``sqlalchemy`` extra pins the versions it is
    tested with).
    """

    def __init__(self, creator: Any, **kwargs: Any) -> None:
        super().__init__(creator, **kwargs)
        self._lend: Callable[[], Any] = creator
        self._records: dict[int, _ConnectionRecord] = {}
        self._records_lock = threading.Lock()
        self._just_lent = threading.local()
        # A new record connects to the connection _do_get was just lent.
        self._invoke_creator = lambda record: self._just_lent.__dict__.pop("raw")

    def _do_get(self) -> _ConnectionRecord:
        raw = self._lend()
        record = self._records.get(id(raw))
        if record is not None and record.dbapi_connection is raw:
            return record
        self._just_lent.raw = raw
        try:
            record = _ConnectionRecord(self)  # the connect events, once per connection
        except BaseException:
            self._just_lent.__dict__.pop("raw", None)
            self._close_connection(raw)
            raise
        with self._records_lock:
            # Forget the records of connections since closed (replaced by dbpool);
            # a record keeps its connection, so an id here is never a new one's.
            if len(self._records) >= 16:
                self._records = {key: kept for key, kept in self._records.items()
                                 if kept.dbapi_connection is not None
                                 and not kept.dbapi_connection.closed}
            self._records[id(raw)] = record
        return record

    def _do_return_conn(self, record: Any) -> None:
        raw = record.dbapi_connection
        if raw is not None:  # None: invalidated, given back as it was closed
            self._close_connection(raw)  # the dialect's do_close: back to dbpool

    def status(self) -> str:
        return f"LendingPool: records of {len(self._records)} dbpool connections"

    def dispose(self) -> None:
        with self._records_lock:
            self._records = {}

    def recreate(self) -> LendingPool:
        return self.__class__(self._creator, recycle=self._recycle, echo=self.echo,
                              logging_name=self._orig_logging_name,
                              reset_on_return=self._reset_on_return,
                              pre_ping=self._pre_ping, _dispatch=self.dispatch,
                              dialect=self._dialect)


def _lend(lender: Lender, autocommit: weakref.WeakSet[Any]) -> Any:
    """The engine's creator: a lent connection in the DB-API's mode, autocommit off
    (for code that uses ``engine.raw_connection()`` as a DB-API connection), unless
    SQLAlchemy set it to ``AUTOCOMMIT`` (see :func:`_begin_explicitly`)."""
    raw = lender.lend()
    wanted = raw in autocommit
    if raw.autocommit != wanted and not lender.sandboxed(raw):  # the sandbox's: as lent
        try:
            set_autocommit(raw, wanted)
        except BaseException:
            lender.give_back(raw)
            raise
    return raw


def _begin_explicitly(dialect: Any, lender: Lender, autocommit: weakref.WeakSet[Any]) -> None:
    """Begin SQLAlchemy's transactions with an explicit ``BEGIN``.

    SQLAlchemy applies an engine's isolation level once per connection, so the
    level it set is remembered across the connection's loans: ``AUTOCOMMIT`` in
    ``autocommit`` (which :func:`_lend` reads), the other modes on the psycopg
    connection.  ``do_begin`` has the lender send ``BEGIN`` with those modes,
    cheaper than psycopg's own first-statement ``BEGIN``, unless the
    connection is in ``AUTOCOMMIT``.
    """
    set_level = dialect.set_isolation_level

    def set_isolation_level(dbapi_connection: Any, level: str) -> None:
        set_level(dbapi_connection, level)
        raw = _unwrap(dbapi_connection)
        if level == "AUTOCOMMIT":
            autocommit.add(raw)
        else:
            autocommit.discard(raw)

    def do_begin(dbapi_connection: Any) -> None:
        raw = _unwrap(dbapi_connection)
        if raw not in autocommit:
            lender.begin(raw)

    def do_rollback(dbapi_connection: Any) -> None:
        lender.rollback_unawaited(_unwrap(dbapi_connection))

    dialect.set_isolation_level = set_isolation_level
    dialect.do_begin = do_begin
    dialect.do_rollback = do_rollback


def _unwrap(dbapi_connection: Any) -> Any:
    """The DB-API connection itself: SQLAlchemy hands the dialect either it or its
    pool's proxy of it (which has no identity of ours)."""
    return getattr(dbapi_connection, "dbapi_connection", dbapi_connection)


def _join_sandboxes(dialect: Any, lender: Lender) -> None:
    """Give ``dialect``'s transaction calls on a sandboxed connection to ``lender``.

    The engine's dialect is the one instance its pool and connections call
    (as for ``do_close`` above), so setting these on it covers them all.
    Other connections keep the dialect's own calls.
    """
    hooks: dict[str, Callable[..., None]] = {
        "do_begin": lambda raw: lender.begin(raw),
        "do_commit": lambda raw: lender.commit(raw),
        "do_rollback": lambda raw: lender.rollback(raw),
        "set_isolation_level": _keep_isolation_level,
        "set_readonly": _keep_characteristic("read-only"),
        "set_deferrable": _keep_characteristic("deferrable"),
    }
    for name, in_sandbox in hooks.items():
        setattr(dialect, name, _when_sandboxed(lender, getattr(dialect, name), in_sandbox))


def _when_sandboxed(lender: Lender, plain: Callable[..., None],
                    in_sandbox: Callable[..., None]) -> Callable[..., None]:
    def call(dbapi_connection: Any, *args: Any) -> None:
        raw = _unwrap(dbapi_connection)
        if lender.sandboxed(raw):
            in_sandbox(raw, *args)
        else:
            plain(dbapi_connection, *args)

    return call


def _keep_isolation_level(raw: Any, level: str) -> None:
    if level == "AUTOCOMMIT":
        raise psycopg.NotSupportedError(
            "isolation_level='AUTOCOMMIT' does not work in dbpool's SQL sandbox: the "
            "sandbox's transaction is never committed, so there is no committing "
            "each statement; leave the isolation level to the engine's default there")
    logger.debug("SQL sandbox: isolation level %s ignored: the sandbox's transaction has "
                 "begun with its own", level)


def _keep_characteristic(name: str) -> Callable[[Any, bool], None]:
    def keep(raw: Any, value: bool) -> None:
        logger.debug("SQL sandbox: %s=%s ignored: the sandbox's transaction has begun "
                     "with its own", name, value)

    return keep
