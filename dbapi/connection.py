"""A PEP 249 connection, over an in-process pool or through ``dbpool serve``.

:class:`Connection` holds what PEP 249 asks of a connection (transactions
begun by the first statement, commit, rollback, close); a *transport* does
the I/O:

- :class:`PoolTransport`: a connection checked out of an in-process
  :class:`~dbpool.pool.Pool`, held until close;
- :class:`RemoteTransport`: a :class:`~dbpool.client.Client` of ``dbpool
  serve``; a transaction is a lease on one server connection, with what a
  lease guarantees (a client that dies has its transaction rolled back),
  and statements outside one (autocommit) run on any connection.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

import psycopg

from dbpool.driver import Params, Result
from dbpool.errors import DBPoolError, ProtocolError, TransactionError

from .cursor import Cursor
from .lending import roll_back

if TYPE_CHECKING:
    from dbpool.client import Client, Transaction
    from dbpool.pool import Checkout, Pool
    from dbpool.pool import Connection as PoolConnection
    from dbpool.pool.transaction import Transaction as PoolTransaction

__all__ = ["Connection", "PoolTransport", "RemoteTransport", "connect"]

#: ``connect(readonly=...)``: False, True (a replica if one can serve) or ``"replica"``.
ReadOnly: TypeAlias = "bool | Literal['replica']"


class Transport(Protocol):
    """How a :class:`Connection` runs statements and transactions."""

    def begin(self, characteristics: str) -> None: ...
    def end(self, commit: bool) -> None: ...
    def execute(self, sql: str, params: Params) -> Result: ...
    def execute_many(self, sql: str, params_seq: Sequence[Params]) -> list[Result]: ...
    def close(self) -> None: ...


class PoolTransport:
    """A connection of an in-process pool, checked out until :meth:`close`.

    A transaction is a dbpool transaction on it, so that on a sandboxed
    connection of the SQL sandbox it is a savepoint, and a DB-API ``commit()``
    keeps the test's transaction open.
    """

    def __init__(self, checkout: Checkout, hold_timeout: float | None) -> None:
        self._checkout = checkout
        conn: PoolConnection = checkout.__enter__()
        try:
            conn.set_deadline(hold_timeout)
        except BaseException:
            checkout.__exit__(None, None, None)
            raise
        self._conn = conn
        self._tx: PoolTransaction | None = None

    def begin(self, characteristics: str) -> None:
        tx = self._conn.transaction()
        tx.__enter__()
        self._tx = tx
        if characteristics:  # before the transaction's first statement, as PostgreSQL wants
            self._conn.query(f"SET TRANSACTION {characteristics}")

    def end(self, commit: bool) -> None:
        tx, self._tx = self._tx, None
        if tx is None:
            return
        if commit and self._conn.status() != "error":
            tx.__exit__(None, None, None)
        else:  # as PostgreSQL's COMMIT, that of a failed transaction rolls back
            roll_back(tx)

    def execute(self, sql: str, params: Params) -> Result:
        return self._conn.query(sql, params)

    def execute_many(self, sql: str, params_seq: Sequence[Params]) -> list[Result]:
        return [self._conn.query(sql, params) for params in params_seq]

    def close(self) -> None:
        self._checkout.__exit__(None, None, None)  # a transaction left: the pool cleans


class RemoteTransport:
    """A client of ``dbpool serve``: a transaction is a lease (``client.transaction()``)."""

    def __init__(self, client: Client, readonly: ReadOnly = False) -> None:
        self._client = client
        self._readonly = readonly
        self._tx: Transaction | None = None

    def begin(self, characteristics: str) -> None:
        with _as_dbapi_errors():
            tx = self._client.transaction(readonly=self._readonly)
            self._tx = tx
            if characteristics:  # before the lease's first statement, as PostgreSQL wants
                tx.query(f"SET TRANSACTION {characteristics}")

    def end(self, commit: bool) -> None:
        tx, self._tx = self._tx, None
        if tx is not None:
            with _as_dbapi_errors():
                if commit:
                    tx.commit()
                else:
                    tx.rollback()

    def execute(self, sql: str, params: Params) -> Result:
        with _as_dbapi_errors():
            if self._tx is not None:
                return self._tx.query(sql, params)
            return self._client.query(sql, params, readonly=self._readonly)

    def execute_many(self, sql: str, params_seq: Sequence[Params]) -> list[Result]:
        if not params_seq:
            return []
        with _as_dbapi_errors():  # one round trip
            if self._tx is not None:
                return self._tx.batch(sql, list(params_seq))
            return self._client.batch(sql, list(params_seq), readonly=self._readonly)

    def close(self) -> None:
        self._client.close()


@contextmanager
def _as_dbapi_errors() -> Iterator[None]:
    """Raise what the client raises as one of PEP 249's classes.

    SQL errors and lost connections already are (``psycopg.errors`` classes,
    :class:`dbpool.errors.ConnectionError` is an ``OperationalError``); the
    service's own refusals are ``OperationalError`` (a permission, a pool
    limit) or ``InterfaceError`` (a protocol error), and a parameter the wire
    cannot carry is a ``ProgrammingError``, as psycopg's "cannot adapt" is.
    The original is the new error's ``__cause__``.
    """
    try:
        yield
    except psycopg.Error:
        raise
    except (ProtocolError, TransactionError) as error:
        raise psycopg.InterfaceError(str(error)) from error
    except DBPoolError as error:
        raise psycopg.OperationalError(str(error)) from error
    except TypeError as error:
        raise psycopg.ProgrammingError(str(error)) from error


class Connection:
    """A DB-API connection (see the module docstring).

    The exceptions are also attributes, as PEP 249's optional extension
    asks (``conn.Error``...).
    """

    Warning = psycopg.Warning
    Error = psycopg.Error
    InterfaceError = psycopg.InterfaceError
    DatabaseError = psycopg.DatabaseError
    DataError = psycopg.DataError
    OperationalError = psycopg.OperationalError
    IntegrityError = psycopg.IntegrityError
    InternalError = psycopg.InternalError
    ProgrammingError = psycopg.ProgrammingError
    NotSupportedError = psycopg.NotSupportedError

    def __init__(self, transport: Transport, autocommit: bool) -> None:
        self._transport: Transport | None = transport
        self._autocommit = autocommit
        self._in_transaction = False
        #: The isolation level of the transactions begun from now on (``"SERIALIZABLE"``,
        #: ``"REPEATABLE READ"``, ``"READ COMMITTED"``, ``"READ UNCOMMITTED"``), or None
        #: for the server's default.
        self.isolation_level: str | None = None
        #: Whether the transactions begun from now on are ``READ ONLY`` (None: the default).
        self.read_only: bool | None = None
        #: Whether they are ``DEFERRABLE`` (None: the default).
        self.deferrable: bool | None = None

    @property
    def autocommit(self) -> bool:
        """Whether each statement commits by itself (no transaction is begun).

        Changing it inside a transaction raises ``ProgrammingError``, as psycopg does.
        """
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if self._in_transaction and bool(value) != self._autocommit:
            raise psycopg.ProgrammingError(
                "can't change autocommit inside a transaction: commit or roll back first")
        self._autocommit = bool(value)

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (begun by a statement, not yet ended)."""
        return self._in_transaction

    # -- PEP 249 ---------------------------------------------------------------

    def cursor(self) -> Cursor:
        self._live()
        return Cursor(self)

    def commit(self) -> None:
        transport = self._live()
        if self._in_transaction:
            self._in_transaction = False
            transport.end(commit=True)

    def rollback(self) -> None:
        transport = self._live()
        if self._in_transaction:
            self._in_transaction = False
            transport.end(commit=False)

    def close(self) -> None:
        """Roll back a transaction left open and let the connection go.

        Closing twice raises :class:`InterfaceError`, as the DB-API test suite
        expects.
        """
        transport = self._transport
        if transport is None:
            raise psycopg.InterfaceError("the connection is already closed")
        try:
            if self._in_transaction:
                self._in_transaction = False
                transport.end(commit=False)
        finally:
            self._transport = None
            transport.close()

    @property
    def closed(self) -> bool:
        return self._transport is None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.closed:
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        self.close()

    # -- for the cursors --------------------------------------------------------

    def _live(self) -> Transport:
        transport = self._transport
        if transport is None:
            raise psycopg.InterfaceError("the connection is closed")
        return transport

    def _begun(self) -> Transport:
        """The transport, with the transaction begun first unless autocommit."""
        transport = self._live()
        if not self._autocommit and not self._in_transaction:
            transport.begin(self._characteristics())
            self._in_transaction = True
        return transport

    def _characteristics(self) -> str:
        """The ``BEGIN`` / ``SET TRANSACTION`` modes from the attributes, checked."""
        modes = []
        level = self.isolation_level
        if level is not None:
            level = str(level).upper().replace("_", " ")
            if level not in _ISOLATION_LEVELS:
                raise psycopg.ProgrammingError(
                    f"unknown isolation level {self.isolation_level!r}: one of "
                    + ", ".join(_ISOLATION_LEVELS))
            modes.append(f"ISOLATION LEVEL {level}")
        if self.read_only is not None:
            modes.append("READ ONLY" if self.read_only else "READ WRITE")
        if self.deferrable is not None:
            modes.append("DEFERRABLE" if self.deferrable else "NOT DEFERRABLE")
        return " ".join(modes)

    def _run(self, sql: str, params: Params) -> Result:
        return self._begun().execute(sql, params)

    def _run_many(self, sql: str, params_seq: Sequence[Params]) -> list[Result]:
        return self._begun().execute_many(sql, params_seq)


_ISOLATION_LEVELS = ("SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED")


def connect(endpoint: str | Sequence[str] | None = None, *, pool: Pool | str | None = None,
            autocommit: bool = False, timeout: float | None = None,
            hold_timeout: float | None = None, server_key: str | None = None,
            client_key: str | None = None, readonly: ReadOnly = False) -> Connection:
    """A DB-API connection.

    - ``connect(pool=<Pool>)``: borrow a connection of an in-process pool
      until :meth:`Connection.close`.  ``timeout`` bounds the wait for it (the
      pool's ``timeout`` by default); ``hold_timeout`` how long it may then be
      held (None: until ``close()``, as a DB-API connection is held; one whose
      thread ends is reclaimed all the same).
    - ``connect("tcp://host:7432", pool="app", server_key=..., client_key=...)``:
      through ``dbpool serve`` (``endpoint`` may be a list: the client moves to
      the next when one does not answer); ``pool`` names the server's pool (default: its
      default pool), ``timeout`` is the client's request timeout, the keys are
      CURVE's (see :class:`dbpool.client.Client`).

    ``readonly=True`` puts the connection on a read replica of the pool if
    one can serve (else the primary), ``"replica"`` only on a replica (see
    :mod:`dbpool.pool.replicas`): in-process for the whole connection,
    through the service for each transaction and statement.
    """
    if endpoint is None:
        from dbpool.pool import Pool

        if not isinstance(pool, Pool):
            raise psycopg.InterfaceError(
                "connect() needs pool=<a dbpool Pool>, or an endpoint of dbpool serve")
        return Connection(PoolTransport(pool.checkout(timeout=timeout, readonly=readonly),
                                        hold_timeout), autocommit)
    if pool is not None and not isinstance(pool, str):
        raise psycopg.InterfaceError("through dbpool serve, pool= is the server's pool name")
    from dbpool.client import Client

    client = Client(endpoint, 15.0 if timeout is None else timeout, pool=pool,
                    server_key=server_key, client_key=client_key)
    return Connection(RemoteTransport(client, readonly), autocommit)
