"""SQLAlchemy on dbpool, in-process and through ``dbpool serve``.

- **In-process**: :func:`create_engine` builds an engine whose connections
  an in-process :class:`~dbpool.pool.Pool` lends::

      from dbpool.dbapi.sqlalchemy import create_engine

      engine = create_engine(pool)      # SQLAlchemy's own postgresql+psycopg dialect
      with engine.begin() as conn:
          conn.execute(text("SELECT 1"))

- **Remote**: the ``postgresql+dbpool://`` dialect
  (:mod:`dbpool.dbapi.sqlalchemy.dialect`) runs SQLAlchemy through ``dbpool
  serve`` over :mod:`dbpool.dbapi`::

      engine = sqlalchemy.create_engine(
          "postgresql+dbpool://127.0.0.1:7432/app"
          "?server_key=server.key&client_key=app.key_secret")

Both need the ``sqlalchemy`` extra.
"""

from __future__ import annotations

try:
    import sqlalchemy  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("dbpool's SQLAlchemy support needs SQLAlchemy: "
                      "pip install 'dbpool[sqlalchemy]'") from exc

from .engine import create_engine

__all__ = ["create_engine"]
