"""The driver behaviour: what a database driver must do for dbpool.

This mirrors DBConnection's callbacks.  The pool owns *when* a callback runs;
the driver owns *how* it talks to the database.  A driver keeps its
per-connection state in an object of its own type ``S`` (for psycopg, the
``psycopg.Connection`` and a little bookkeeping) and is otherwise stateless,
so one driver instance serves every connection of a pool.

Every callback except :meth:`Driver.connect` and :meth:`Driver.disconnect`
returns an :data:`Outcome`:

- :class:`Ok` carries the value; the connection stays in service.
- :class:`Error` carries an exception for the caller; the connection stays
  in service (a SQL error, for example).
- :class:`Disconnect` carries an exception for the caller; the connection is
  dropped, then reconnected by its actor.

The transaction callbacks may also return :class:`WrongStatus`, meaning
"this cannot run while the connection is in that status" (``begin`` while a
transaction is open, say); the pool turns it into a
:class:`~dbpool.errors.TransactionError`.

Callbacks run in whichever thread holds the connection: the connection's
actor while it connects or pings, the caller's thread while it is lent.
They are never called concurrently for one connection.

A driver may also offer three calls that the pool makes from *other*
threads, while the holder may be blocked in a callback (the psycopg driver
has all three):

- ``cancel(state)``: ask the server to stop the running statement; blocks;
- ``prepare_cancel(state) -> send``: make that cancel now, without I/O, for
  ``send()`` to send later, even after the connection was closed;
- ``interrupt(state)``: wake the holder at once (the psycopg driver shuts
  the socket down), leaving the connection unusable.  A revoke at a
  deadline uses it so that the holder raises at its deadline even when the
  network has stopped answering.

And three for the pool's LISTEN/NOTIFY relay (:mod:`dbpool.actors.relay`),
which it calls on its own connection only, from the relay's thread (the
psycopg driver has all three; a driver without them cannot relay):

- ``listen(state, channel)`` and ``unlisten(state, channel)``: start or stop
  receiving ``channel``'s notifications; each returns an :data:`Outcome`;
- ``notifications(state, timeout, wake)``: wait up to ``timeout`` seconds,
  or until the descriptor ``wake`` is readable, for notifications; return
  ``Ok`` of a list of :class:`Notification`, in the order received (empty
  if none came), or ``Disconnect`` if the connection was lost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeAlias, TypeVar

from .errors import TransactionStatus

__all__ = [
    "Column",
    "CopyDirection",
    "Disconnect",
    "DisconnectAndRetry",
    "Driver",
    "Error",
    "FetchStatus",
    "Notification",
    "Ok",
    "Outcome",
    "Query",
    "Result",
    "TxOutcome",
    "WrongStatus",
]

T = TypeVar("T")
S = TypeVar("S")
Params: TypeAlias = Sequence[Any] | Mapping[str, Any] | None
Options: TypeAlias = Mapping[str, Any]


@dataclass(slots=True)  # not frozen: every query makes one, and frozen costs 2x
class Ok(Generic[T]):
    """The callback succeeded with :attr:`value`.  Treat it as immutable."""

    value: T


@dataclass(frozen=True, slots=True)
class Error:
    """The callback failed with :attr:`error`; the connection is still good."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The callback failed with :attr:`error`; the connection must be dropped."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class DisconnectAndRetry:
    """The connection is gone and the call had no effect: a pool may retry it elsewhere.

    DBConnection's ``{:disconnect_and_retry, err, state}``.  A one-shot call
    on the pool checks out another connection and runs again, up to the
    ``checkout_retries`` option; on an explicitly held connection it is a
    :class:`Disconnect`.
    """

    error: BaseException


@dataclass(frozen=True, slots=True)
class WrongStatus:
    """A transaction callback cannot run while the connection is in :attr:`status`."""

    status: TransactionStatus


Outcome: TypeAlias = Ok[T] | Error | Disconnect | DisconnectAndRetry
TxOutcome: TypeAlias = Ok[T] | WrongStatus | Error | Disconnect | DisconnectAndRetry

#: What :meth:`Driver.handle_fetch` says of the cursor after a batch.
FetchStatus = Literal["cont", "halt"]
#: Which way a COPY moves data: ``"out"`` (``COPY ... TO STDOUT``) or ``"in"``
#: (``COPY ... FROM STDIN``).
CopyDirection = Literal["out", "in"]


@dataclass(frozen=True, slots=True)
class Column:
    """A result column: its name and PostgreSQL type OID."""

    name: str
    type_oid: int


class Result:
    """The result of one statement.

    ``columns`` describes the result's columns (read lazily, as is
    ``command``: most callers never look, and reading them costs more than
    the rest of the result);
    ``rows`` holds its rows as tuples; ``command`` is the server's command
    tag (``"SELECT 1"``, ``"INSERT 0 3"``); ``rowcount`` is the number of
    rows returned or affected (-1 if unknown).
    """

    __slots__ = ("_columns", "_command", "decode_time", "rowcount", "rows")

    def __init__(
        self, columns: list[Column] | Callable[[], list[Column]], rows: list[tuple[Any, ...]],
        rowcount: int, command: str | Callable[[], str | None] | None,
    ) -> None:
        # A driver may pass callables for columns and command: read on first use.
        self._columns = columns
        self.rows = rows
        self.rowcount = rowcount
        self._command = command
        #: Seconds spent decoding the rows, when the driver was asked to time it.
        self.decode_time: float | None = None

    @property
    def columns(self) -> list[Column]:
        if callable(self._columns):
            self._columns = self._columns()
        return self._columns

    @property
    def command(self) -> str | None:
        if callable(self._command):
            self._command = self._command()
        return self._command

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return (self.columns, self.rows, self.rowcount, self.command) == (
            other.columns, other.rows, other.rowcount, other.command)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Result(columns={self.columns!r}, rows={self.rows!r}, "
                f"rowcount={self.rowcount!r}, command={self.command!r})")


@dataclass(frozen=True, slots=True)
class Notification:
    """One ``NOTIFY`` as a listening connection received it."""

    channel: str
    payload: str
    #: The server process of the session that sent it.
    backend_pid: int


@dataclass(slots=True)
class Query:
    """A statement, optionally named for use as a prepared statement.

    Unnamed queries use psycopg's placeholders (``%s``, ``%(name)s``).  A
    named query is prepared on the server, so it uses PostgreSQL's own
    placeholders (``$1``, ``$2``).
    """

    sql: str
    name: str | None = None


class Driver(Protocol[S]):
    """The callbacks a database driver implements (DBConnection's behaviour)."""

    def connect(self, opts: Options) -> S:
        """Open a connection with ``opts`` and return its state.

        Raise to fail; the connection actor backs off and tries again.
        """
        ...

    def disconnect(self, err: BaseException | None, state: S) -> None:
        """Close the connection; ``err`` is why, or None for a clean close.

        Must not raise and must not block for long.
        """
        ...

    def checkout(self, state: S) -> Outcome[None]:
        """Prepare an idle connection to be lent to a caller."""
        ...

    def ping(self, state: S) -> Outcome[None]:
        """Check an idle connection is alive."""
        ...

    def handle_begin(self, opts: Options, state: S) -> TxOutcome[Result]:
        """Begin a transaction."""
        ...

    def handle_commit(self, opts: Options, state: S) -> TxOutcome[Result]:
        """Commit the open transaction."""
        ...

    def handle_rollback(self, opts: Options, state: S) -> TxOutcome[Result]:
        """Roll back the open (or failed) transaction."""
        ...

    def handle_status(self, opts: Options, state: S) -> Outcome[TransactionStatus]:
        """Return the connection's transaction status."""
        ...

    def handle_prepare(self, query: Query, opts: Options, state: S) -> Outcome[Query]:
        """Prepare ``query`` on the server and return it ready to execute."""
        ...

    def handle_execute(
        self, query: Query | str, params: Params, opts: Options, state: S
    ) -> Outcome[Result]:
        """Execute ``query`` (prepared if it has a name) with ``params``.

        A plain string is an unnamed query: ``query()`` passes its SQL as it
        is, so that the hot path builds no :class:`Query`.
        """
        ...

    def handle_close(self, query: Query, opts: Options, state: S) -> Outcome[None]:
        """Release the prepared statement ``query`` on the server."""
        ...

    def handle_declare(self, query: Query, params: Params, opts: Options, state: S) -> Outcome[Any]:
        """Declare a server-side cursor for ``query`` and return it."""
        ...

    def handle_fetch(
        self, query: Query, cursor: Any, opts: Options, state: S
    ) -> Outcome[tuple[FetchStatus, Result]]:
        """Fetch the next batch (``opts["max_rows"]`` rows) from ``cursor``."""
        ...

    def handle_deallocate(
        self, query: Query, cursor: Any, opts: Options, state: S
    ) -> Outcome[None]:
        """Close ``cursor`` on the server."""
        ...

    def handle_copy(
        self, query: Query, params: Params, direction: CopyDirection, opts: Options, state: S
    ) -> Outcome[Any]:
        """Start a ``COPY`` that moves data ``direction``; return a handle for the calls below.

        A statement that is not a COPY in that direction is an :class:`Error`
        (the connection left as it was), never a copy half begun.
        """
        ...

    def handle_copy_read(self, copy: Any, opts: Options, state: S) -> Outcome[bytes | None]:
        """The next block of a ``COPY ... TO STDOUT``'s data, or None once it is all read."""
        ...

    def handle_copy_write(self, copy: Any, data: bytes, opts: Options, state: S) -> Outcome[None]:
        """Send a block of a ``COPY ... FROM STDIN``'s data."""
        ...

    def handle_copy_end(
        self, copy: Any, error: BaseException | None, opts: Options, state: S
    ) -> Outcome[Result]:
        """End a COPY and return its result (``command`` ``"COPY n"``, ``rowcount`` n).

        With ``error``, abort it: a COPY FROM fails with that message and
        takes no row; a COPY TO not read to its end is cancelled.
        """
        ...
