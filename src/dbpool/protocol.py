"""The wire protocol's messages: versions, operations, and errors as maps.

``docs/protocol.md`` is the specification; this module holds what the server
and the client library share of it.  Values inside messages are encoded by
:mod:`dbpool.wire`.

An error crosses the wire as a map (:func:`error_map` on the server) and is
raised again on the client (:func:`error_from_map`) as the same kind of
exception: a SQL error as the ``psycopg.errors`` class the server saw, with
its SQLSTATE, message, detail and hint in ``err.diag``; a pool error as
:class:`~dbpool.errors.ConnectionError` with its ``reason``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, get_args

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import DiagnosticField

from .errors import (
    ConnectionError,
    DBPoolError,
    PermissionDenied,
    PoolStoppedError,
    ProtocolError,
    Reason,
    StatementNotAllowed,
    TransactionError,
    sql_error_fields,
)

__all__ = [
    "EVENT_TOPICS",
    "LISTEN_TTL",
    "MAX_CHANNEL_BYTES",
    "NOTIFY_TOPIC",
    "OPS",
    "VERSION",
    "check_channel",
    "error_from_map",
    "error_map",
    "notify_topic",
    "protocol_error",
]

logger = logging.getLogger("dbpool.protocol")

#: The protocol version this package speaks.
VERSION = 1

#: Every operation of version 1.
OPS = frozenset({
    "ping", "status", "query", "execute", "batch", "begin", "commit", "rollback",
    "heartbeat", "stream", "fetch", "close",
    "copy_out", "copy_read", "copy_in", "copy_write", "copy_end", "admin", "listen",
})

#: The topics of the server's events other than notifications.
EVENT_TOPICS: tuple[str, ...] = ("connection", "pool", "telemetry")
#: The start of a notification topic: ``notify:POOL:CHANNEL`` and a NUL byte,
#: which ends it so that no channel's topic is the prefix of another's.
NOTIFY_TOPIC = "notify:"
#: Seconds the server keeps listening to a channel for remote subscribers
#: after the last ``listen`` request for it; clients renew well before.
LISTEN_TTL = 60.0
#: PostgreSQL's longest identifier, in bytes (NAMEDATALEN - 1); a longer
#: channel name would be cut short, and its notifications named differently.
MAX_CHANNEL_BYTES = 63


def check_channel(channel: object) -> str:
    """``channel`` if it can name a channel as it is; else TypeError or ValueError."""
    if not isinstance(channel, str):
        raise TypeError(f"a channel name is a str, not {type(channel).__name__}")
    size = len(channel.encode())
    if size == 0 or size > MAX_CHANNEL_BYTES or "\0" in channel:
        raise ValueError(f"a channel name has 1 to {MAX_CHANNEL_BYTES} bytes and no NUL: "
                         f"{channel!r}")
    return channel


def notify_topic(pool: str, channel: str) -> bytes:
    """The events topic of pool ``pool``'s notifications on ``channel``."""
    return f"{NOTIFY_TOPIC}{pool}:{channel}\0".encode()

_REASONS: frozenset[str] = frozenset(get_args(Reason))
_DIAG_KEYS = (
    ("sqlstate", DiagnosticField.SQLSTATE),
    ("message", DiagnosticField.MESSAGE_PRIMARY),
    ("detail", DiagnosticField.MESSAGE_DETAIL),
    ("hint", DiagnosticField.MESSAGE_HINT),
)


def protocol_error(code: str, message: str) -> dict[str, Any]:
    """The error map of a request that broke the protocol."""
    return {"kind": "protocol", "code": code, "message": message}


def error_map(error: BaseException) -> dict[str, Any]:
    """The error map that stands for ``error`` on the wire.

    Errors that are not dbpool's or PostgreSQL's are server bugs: they go
    out as ``protocol``/``internal`` with their type only, and the caller
    should log them.
    """
    if isinstance(error, StatementNotAllowed):
        return {"kind": "statement", "scope": error.scope, "message": str(error)}
    if isinstance(error, PermissionDenied):
        return {"kind": "permission", "message": str(error)}
    if isinstance(error, psycopg.Error) and (
        error.sqlstate or not isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
    ):  # from the server, or psycopg refused it (ProgrammingError, DataError...)
        return {"kind": "sql", **sql_error_fields(error)}
    if isinstance(error, ConnectionError):
        return {"kind": "connection", "reason": error.reason, "message": str(error)}
    if isinstance(error, psycopg.Error):  # no SQLSTATE: the connection failed
        return {"kind": "connection", "reason": "error",
                "message": f"connection lost: {' '.join(str(error).split())}"}
    if isinstance(error, TransactionError):
        return {"kind": "transaction", "status": error.status, "message": str(error)}
    if isinstance(error, ProtocolError):
        return protocol_error(error.code, str(error))
    return protocol_error("internal", f"internal server error ({type(error).__name__}); "
                                      "see the server's log")


def error_from_map(error: Mapping[str, Any]) -> Exception:
    """The exception a client raises for an error map (see the module docstring)."""
    kind = error.get("kind")
    message = str(error.get("message", "")) or "unknown error"
    if kind == "sql":
        return _sql_error(error, message)
    if kind == "connection":
        reason = error.get("reason")
        if reason == "stopped":
            return PoolStoppedError(message)
        return ConnectionError(message, reason=reason if reason in _REASONS else "error")
    if kind == "transaction":
        status = error.get("status")
        return TransactionError(message, status=status if status in (
            "idle", "transaction", "error") else "error")
    if kind == "protocol":
        return ProtocolError(message, code=str(error.get("code", "internal")))
    if kind == "statement":
        return StatementNotAllowed(message, scope=str(error.get("scope", "statement")))
    if kind == "permission":
        return PermissionDenied(message)
    return DBPoolError(message)


def _sql_error(error: Mapping[str, Any], message: str) -> psycopg.Error:
    sqlstate = error.get("sqlstate")
    cls: type[psycopg.Error]
    try:
        cls = pg_errors.lookup(str(sqlstate))
    except KeyError:  # no SQLSTATE: one of psycopg's own classes, by name
        named = getattr(pg_errors, str(error.get("class")), None)
        if isinstance(named, type) and issubclass(named, psycopg.Error):
            cls = named
        else:
            cls = pg_errors.DatabaseError
    info: dict[int, bytes | None] = {}
    for key, field in _DIAG_KEYS:
        value = error.get(key)
        info[field] = value.encode() if isinstance(value, str) else None
    # psycopg keeps the diagnostics of an unpickled error in such a dict.
    return cls(message, info=info)
