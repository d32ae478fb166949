"""``dbpool.dbapi``: a PEP 249 (DB-API 2.0) module over dbpool.

::

    from dbpool import dbapi
    from dbpool.pool import Pool

    pool = Pool.start("host=127.0.0.1 user=postgres")
    conn = dbapi.connect(pool=pool)      # borrows a connection until close()
    cur = conn.cursor()
    cur.execute("SELECT %s::int AS answer", [42])
    cur.fetchone()                       # (42,)
    conn.commit()
    conn.close()

``connect(pool=...)`` checks a connection out of an in-process
:class:`~dbpool.pool.Pool` and holds it until :meth:`Connection.close`.
Transactions are as PEP 249 says: the first statement begins one unless
``autocommit`` is on, and ``commit()`` / ``rollback()`` end it; closing a
connection with a transaction open rolls it back.

The module attributes, the exceptions and the type objects and
constructors are psycopg's own (they are PEP 249's), so an error is the
same class whichever way it came.

- ``apilevel`` is ``"2.0"``;
- ``threadsafety`` is 1: threads may share the module, not a connection (a
  connection is a checkout, lent to one caller at a time);
- ``paramstyle`` is ``"pyformat"``: psycopg's ``%s`` and ``%(name)s``.

``Binary`` returns ``bytes``, not psycopg's wrapper: bytes is what both the
pool and the service's wire format carry.
"""

from __future__ import annotations

from psycopg import (
    BINARY,
    DATETIME,
    NUMBER,
    ROWID,
    STRING,
    DatabaseError,
    DataError,
    Date,
    DateFromTicks,
    Error,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    Time,
    TimeFromTicks,
    Timestamp,
    TimestampFromTicks,
    Warning,
)

from .connection import Connection, connect
from .cursor import Cursor

__all__ = [
    "BINARY",
    "DATETIME",
    "NUMBER",
    "ROWID",
    "STRING",
    "Binary",
    "Connection",
    "Cursor",
    "DataError",
    "DatabaseError",
    "Date",
    "DateFromTicks",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "NotSupportedError",
    "OperationalError",
    "ProgrammingError",
    "Time",
    "TimeFromTicks",
    "Timestamp",
    "TimestampFromTicks",
    "Warning",
    "apilevel",
    "connect",
    "paramstyle",
    "threadsafety",
]



def Binary(data: bytes | bytearray | memoryview | str) -> bytes:
    """A binary value, as ``bytes`` (which psycopg adapts to ``bytea`` and the
    service's wire format carries); a str is encoded as UTF-8."""
    return data.encode() if isinstance(data, str) else bytes(data)


apilevel = "2.0"
threadsafety = 1
paramstyle = "pyformat"
