"""The ``postgresql+dbpool://`` dialect: SQLAlchemy through ``dbpool serve``.

::

    engine = sqlalchemy.create_engine(
        "postgresql+dbpool://127.0.0.1:7432/app"
        "?server_key=keys/server.key&client_key=keys/web.key_secret")

The URL names the server (host and port of its request endpoint; more
endpoints, tried in turn, as ``endpoint=tcp://...`` query entries), the
server's pool (the path; none for the server's default pool) and the CURVE
key files (``server_key``, ``client_key``; ``$DBPOOL_SERVER_KEY`` and
``$DBPOOL_CLIENT_KEY`` by default).  ``timeout`` sets the client's request
timeout in seconds.  There is no user name or password: the service knows
its clients by their keys.

It is SQLAlchemy's PostgreSQL dialect over :mod:`dbpool.dbapi`: the SQL, the
reflection and the types are PostgreSQL's, the values are what psycopg gives
on the server, carried by dbpool's wire format.  A transaction is a lease on
one server connection (a client that dies has it rolled back); outside one
(``AUTOCOMMIT``) each statement runs on any connection.  The isolation
level, ``READ ONLY`` and ``DEFERRABLE`` apply to each transaction as it
begins (``SET TRANSACTION``), never to a shared session.

What the service does not carry, this dialect does not claim
(:mod:`dbpool.dbapi.sqlalchemy.requirements` lists each with its reason):
range types (the wire format has no range value), server-side cursors,
two-phase transactions, and session state that outlives a transaction
(temporary tables, ``SET``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, cast

from psycopg.types.json import Json, Jsonb
from sqlalchemy import exc, util
from sqlalchemy.dialects.postgresql import ranges
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import URL
from sqlalchemy.engine.interfaces import IsolationLevel

from dbpool.errors import ConnectionError

from ..connection import Connection

__all__ = ["DbpoolDialect"]

_ISOLATION_LEVELS: tuple[IsolationLevel, ...] = (
    "AUTOCOMMIT", "READ COMMITTED", "READ UNCOMMITTED", "REPEATABLE READ", "SERIALIZABLE")
_QUERY_KEYS = ("server_key", "client_key", "timeout", "endpoint", "readonly")


def _psycopg_type_impls() -> dict[Any, Any]:
    """The psycopg dialect's type implementations, but for the range types.

    The values are psycopg's on the server, so the psycopg dialect's types are
    the right ones here (bind casts, JSON wrapped in ``Json``/``Jsonb``, numeric
    results by column type); ranges are not, as the wire format has no range.
    """
    return {type_: impl for type_, impl in PGDialect_psycopg.colspecs.items()
            if type_ not in (ranges.AbstractSingleRange, ranges.AbstractMultiRange)}


class DbpoolDialect(PGDialect):
    """SQLAlchemy's PostgreSQL dialect on :mod:`dbpool.dbapi` (see the module docstring)."""

    driver = "dbpool"
    supports_statement_cache = True
    default_paramstyle = "pyformat"
    supports_server_side_cursors = False
    supports_sane_multi_rowcount = True
    # executemany is one batch request: one round trip, its rowcount the total.
    supports_native_json_serialization = True
    supports_native_json_deserialization = True
    # Without the server's hstore OID at hand, hstore travels as text.
    _has_native_hstore = False
    colspecs = _psycopg_type_impls()

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("json_deserializer") is not None:
            raise exc.ArgumentError(
                "postgresql+dbpool:// takes no json_deserializer: JSON values arrive "
                "decoded by psycopg on the server (json_serializer is taken)")
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    @classmethod
    def import_dbapi(cls) -> ModuleType:
        from dbpool import dbapi

        return dbapi

    def create_connect_args(self, url: URL) -> tuple[Sequence[Any], dict[str, Any]]:
        if url.username or url.password:
            raise exc.ArgumentError(
                "postgresql+dbpool:// takes no user name or password: dbpool serve knows "
                "its clients by their CURVE keys (client_key=...)")
        unknown = sorted(set(url.query) - set(_QUERY_KEYS))
        if unknown:
            raise exc.ArgumentError(
                f"postgresql+dbpool:// does not know {', '.join(unknown)}; it takes "
                + ", ".join(_QUERY_KEYS))
        endpoints = [f"tcp://{url.host or '127.0.0.1'}:{url.port or 7432}"]
        extra = url.query.get("endpoint", ())
        endpoints += [extra] if isinstance(extra, str) else list(extra)
        kwargs: dict[str, Any] = {"pool": url.database or None}
        for key in ("server_key", "client_key"):
            if key in url.query:
                kwargs[key] = _single(url, key)
        if "readonly" in url.query:  # ?readonly=true|replica: a read-only engine
            value = _single(url, "readonly").lower()
            if value not in ("true", "false", "replica"):
                raise exc.ArgumentError(
                    f"readonly= must be true, false or replica, got {value!r}")
            kwargs["readonly"] = "replica" if value == "replica" else value == "true"
        if "timeout" in url.query:
            try:
                kwargs["timeout"] = float(_single(url, "timeout"))
            except ValueError:
                raise exc.ArgumentError(
                    f"timeout= must be seconds, got {url.query['timeout']!r}") from None
        return [endpoints if len(endpoints) > 1 else endpoints[0]], kwargs

    # -- transactions --------------------------------------------------------------------

    def get_isolation_level_values(self, dbapi_connection: Any) -> Sequence[IsolationLevel]:
        return _ISOLATION_LEVELS

    def set_isolation_level(self, dbapi_connection: Any, level: IsolationLevel) -> None:
        conn: Connection = dbapi_connection
        if level == "AUTOCOMMIT":
            conn.autocommit = True
            conn.isolation_level = None
        else:
            conn.autocommit = False
            conn.isolation_level = level

    def get_isolation_level(self, dbapi_connection: Any) -> IsolationLevel:
        conn: Connection = dbapi_connection
        level = conn.isolation_level
        if level is None:
            level = str(self._autocommit_scalar(conn, "SHOW default_transaction_isolation"))
        return cast(IsolationLevel, level.upper())

    def detect_autocommit_setting(self, dbapi_conn: Any) -> bool:
        return bool(dbapi_conn.autocommit)

    def set_readonly(self, connection: Any, value: bool) -> None:
        connection.read_only = value

    def get_readonly(self, connection: Any) -> bool:
        return bool(connection.read_only)

    def set_deferrable(self, connection: Any, value: bool) -> None:
        connection.deferrable = value

    def get_deferrable(self, connection: Any) -> bool:
        return bool(connection.deferrable)

    # -- connections ---------------------------------------------------------------------

    def do_ping(self, dbapi_connection: Any) -> bool:
        self._autocommit_scalar(dbapi_connection, "SELECT 1")
        return True

    def is_disconnect(self, e: Exception, connection: Any, cursor: Any) -> bool:
        """A lost server (or lease) makes SQLAlchemy drop the connection: its next
        one is a new client, on whatever server answers."""
        if connection is not None and connection.closed:
            return True
        return isinstance(e, ConnectionError) or isinstance(e.__cause__, ConnectionError)

    def _autocommit_scalar(self, conn: Connection, sql: str) -> Any:
        """Run ``sql`` outside any transaction (it begins no lease), unless one is open."""
        before = conn.autocommit
        if not conn.in_transaction:
            conn.autocommit = True
        try:
            cursor = conn.cursor()
            cursor.execute(sql)
            row = cursor.fetchone()
        finally:
            if not conn.closed and not conn.in_transaction:
                conn.autocommit = before
        return None if row is None else row[0]

    # -- what the psycopg dialect's types ask of their dialect ----------------------------

    @util.memoized_property
    def _psycopg_Json(self) -> Callable[[Any], Json]:
        dumps = self._json_serializer
        return Json if dumps is None else functools.partial(Json, dumps=dumps)

    @util.memoized_property
    def _psycopg_Jsonb(self) -> Callable[[Any], Jsonb]:
        dumps = self._json_serializer
        return Jsonb if dumps is None else functools.partial(Jsonb, dumps=dumps)


def _single(url: URL, key: str) -> str:
    value = url.query[key]
    if not isinstance(value, str):
        raise exc.ArgumentError(f"{key}= is given more than once")
    return value


dialect = DbpoolDialect
