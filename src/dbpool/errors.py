"""The errors dbpool raises.

The hierarchy is small on purpose::

    DBPoolError
     ├── ConnectionError      no usable connection: reason says why (also a
     │    │                   psycopg.OperationalError and a builtin ConnectionError)
     │    └── PoolStoppedError the pool was stopped (or stopped itself)
     ├── TransactionError     begin/commit/rollback met the wrong status
     ├── RolledBack           a transaction ended by rollback(reason)
     ├── OwnershipError       an ownership pool found no connection for the caller
     ├── ProtocolError        a request broke the wire protocol: code says how
     ├── StatementNotAllowed  a statement the service will not run where it was
     │                        sent: scope says why (also a psycopg.ProgrammingError)
     ├── PermissionDenied     the service does not let this client do that (a pool it
     │                        may not use, an admin operation; also a PermissionError)
     └── ConfigurationError   an option is invalid (also a ValueError)

SQL errors are not wrapped: a statement that fails raises the
``psycopg.errors`` class the server reported (``UniqueViolation``,
``SyntaxError``, ...), which keeps the SQLSTATE (``err.sqlstate``), the
message (``err.diag.message_primary``) and the detail
(``err.diag.message_detail``).  :func:`sql_error_fields` reads them into a
plain dict, the form the wire protocol and log entries use.

:class:`ConnectionError` is a pool's way of saying "no connection": a queue
timeout, an open circuit, a lost connection, a deadline.  So code written
for psycopg or for the standard library catches it as it would theirs: it is
a ``psycopg.OperationalError`` (as psycopg_pool's ``PoolTimeout`` is) and a
subclass of the builtin ``ConnectionError`` of the same name, so a bare
``except ConnectionError`` catches it too.
"""

from __future__ import annotations

import builtins
from typing import Any, Literal

import psycopg

__all__ = [
    "ConfigurationError",
    "ConnectionError",
    "DBPoolError",
    "OwnershipError",
    "PermissionDenied",
    "PoolStoppedError",
    "ProtocolError",
    "Reason",
    "RolledBack",
    "StatementNotAllowed",
    "TransactionError",
    "TransactionStatus",
    "sql_error_fields",
]

#: Why a connection could not be had or was lost.
#:
#: - ``error``: connecting failed or the connection was dropped.
#: - ``queue_timeout``: the checkout waited past its deadline or was shed by
#:   the CoDel queue.
#: - ``queue_disabled``: ``queue=False`` and no connection was idle.
#: - ``queue_full``: ``max_waiting`` callers were already queued.
#: - ``deadline``: the holder's deadline passed while it held the connection.
#: - ``stopped``: the pool is stopped.
#: - ``unavailable``: the database is known to be down (circuit open).
#: - ``lease_expired``: a remote transaction lease ended (silent client,
#:   ``lease_max``, server shutdown) before this request.
#: - ``timeout``: the remote client got no reply within its timeout.
#: - ``unauthorized``: the server refused the client's CURVE key (or the
#:   handshake failed: no keys, or not the server's public key), or an admin
#:   kicked the client.
#: - ``client_limit``: the request would take the client past its
#:   ``max_inflight`` or ``max_leases`` on the server.
#: - ``no_server``: the remote client reached no server within its
#:   ``connect_timeout`` (nothing listening, unreachable, or a host name that
#:   does not resolve); ``timeout`` is for a live server that did not answer.
Reason = Literal[
    "error", "queue_timeout", "queue_disabled", "queue_full", "deadline", "stopped",
    "unavailable", "lease_expired", "timeout", "unauthorized", "client_limit", "no_server",
]

#: A connection's transaction status, as DBConnection names it.
TransactionStatus = Literal["idle", "transaction", "error"]


class DBPoolError(Exception):
    """Base class of every error dbpool raises itself."""


class ConnectionError(DBPoolError, psycopg.OperationalError, builtins.ConnectionError):
    """No usable connection, for the reason in :attr:`reason`.

    Also a ``psycopg.OperationalError`` and a builtin ``ConnectionError``
    (see the module docstring).  The message never contains a password
    unless the pool was started with ``show_sensitive_data_on_connection_error=True``.
    """

    def __init__(self, message: str, *, reason: Reason = "error") -> None:
        super().__init__(message)
        self.reason: Reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_connection_error, (type(self), str(self), self.reason))


def _rebuild_connection_error(
    cls: type[ConnectionError], message: str, reason: Reason
) -> ConnectionError:
    return cls(message, reason=reason)


class PoolStoppedError(ConnectionError):
    """The pool is stopped; :attr:`cause` is the error that stopped it, if any."""

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message, reason="stopped")
        self.cause = cause


class TransactionError(DBPoolError):
    """A transaction call met a connection whose status did not allow it.

    :attr:`status` is the status the connection actually had, for example
    ``"transaction"`` when ``begin`` finds a transaction already open.
    """

    def __init__(self, message: str, *, status: TransactionStatus) -> None:
        super().__init__(message)
        self.status: TransactionStatus = status


class RolledBack(DBPoolError):
    """A transaction was rolled back by ``conn.rollback(reason)``, not by an error.

    ``transaction()`` raises it, carrying :attr:`reason`: the value given to
    ``rollback()``, or ``"rollback"`` when an inner transaction or a failed
    statement forced the rollback (DBConnection's ``{:error, :rollback}``).
    """

    def __init__(self, reason: object) -> None:
        super().__init__(f"transaction rolled back: {reason!r}")
        self.reason = reason


class OwnershipError(DBPoolError):
    """An ownership pool in manual mode found no connection for the caller.

    The message names the caller and the ways to give it one (see
    :mod:`dbpool.pool.ownership`).
    """


class ProtocolError(DBPoolError):
    """A request to ``dbpool serve`` broke the wire protocol (see ``docs/protocol.md``).

    :attr:`code` names the rule: ``malformed``, ``bad_request``,
    ``unknown_op``, ``too_large``, ``lease_not_owned``, ``unsupported_type``...
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_protocol_error, (str(self), self.code))


def _rebuild_protocol_error(message: str, code: str) -> ProtocolError:
    return ProtocolError(message, code=code)


class StatementNotAllowed(DBPoolError, psycopg.ProgrammingError):
    """A statement refused where it was sent, before anything ran.

    :attr:`scope` is what it would have reached (see
    :mod:`dbpool.statement_scope`): ``"transaction"`` or ``"session"`` for a
    statement sent to ``dbpool serve`` outside a transaction, whose effects
    would reach other clients' statements on the shared connection, or
    ``"copy"`` for a ``COPY`` sent through anything but the copy calls.  It
    is also a ``psycopg.ProgrammingError``, the DB-API's class for a program
    that asked for something it may not, as psycopg's own refusal of
    ``COPY`` in ``execute()`` is.
    """

    def __init__(self, message: str, *, scope: str) -> None:
        super().__init__(message)
        self.scope = scope

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_statement_not_allowed, (str(self), self.scope))


def _rebuild_statement_not_allowed(message: str, scope: str) -> StatementNotAllowed:
    return StatementNotAllowed(message, scope=scope)


class PermissionDenied(DBPoolError, builtins.PermissionError):
    """``dbpool serve`` does not let this client do that: use a pool its
    ``[clients.NAME]`` table does not list, or run an admin operation without
    ``admin = true``.  Also the builtin ``PermissionError``."""


class ConfigurationError(DBPoolError, ValueError):
    """An option has a value dbpool cannot use."""


def sql_error_fields(err: psycopg.Error) -> dict[str, str | None]:
    """Return the fields of a PostgreSQL error as a plain dict.

    Keys: ``class`` (the psycopg class name), ``sqlstate``, ``message``,
    ``detail`` and ``hint``.
    """
    diag = err.diag
    return {
        "class": type(err).__name__,
        "sqlstate": err.sqlstate,
        "message": diag.message_primary or str(err),
        "detail": diag.message_detail,
        "hint": diag.message_hint,
    }

