"""One pooled connection lent to Django, and how it goes back as it came.

Django makes its own connections with ``psycopg.connect(cursor_factory=...,
context=..., prepare_threshold=...)``, then may ``SET TIME ZONE`` and
``SET ROLE`` on them.  A connection lent by the pool already exists, so
:class:`Loan` applies the same psycopg settings to it for the length of
the loan and, when Django is done with it, restores the pool's own: the
psycopg attributes, and whatever session settings Django changed.  The
next borrower, Django or not, finds the connection as the pool made it.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import AdaptersMap

from dbpool.dbapi.lending import Lender

__all__ = ["Loan"]

logger = logging.getLogger("dbpool.django")


class Loan:
    """A psycopg connection ``lender`` lent, configured for Django; :meth:`end` gives it back.

    Not thread-safe: it belongs to one Django ``DatabaseWrapper``, which
    belongs to one thread.
    """

    __slots__ = ("_saved", "lender", "named_cursors", "raw", "role", "timezone")

    def __init__(self, raw: psycopg.Connection[Any], lender: Lender) -> None:
        self.raw = raw
        self.lender = lender
        #: The session's TimeZone when lent; restored if Django changes it.
        self.timezone: str | None = raw.info.parameter_status("TimeZone")
        #: The session's role before Django's ``SET ROLE`` (``"none"`` for none);
        #: None while Django has not set one.
        self.role: str | None = None
        #: Whether Django declared a named (server-side, maybe WITH HOLD) cursor.
        self.named_cursors = False
        self._saved: dict[str, Any] = {}

    def apply(self, *, cursor_factory: type[psycopg.Cursor[Any]], context: Any,
              prepare_threshold: int | None, isolation_level: Any) -> None:
        """Give the connection what ``psycopg.connect(**Django's params)`` would have.

        ``context`` is Django's adapters template (timezone-aware timestamptz
        loader, jsonb as text...).  psycopg's ``connect`` installs a context
        as a fresh ``AdaptersMap`` on ``_adapters``; there is no public setter,
        so this does the same, and :meth:`end` puts the pool's map back.  The
        new map is a copy on write: adapters Django registers during the loan
        (``django.contrib.postgres`` registers hstore and citext on
        ``connection.adapters``) stay in it and go when it goes.
        """
        raw = self.raw
        if not hasattr(raw, "_adapters"):  # a psycopg we do not know: say so, plainly
            raise RuntimeError(
                f"psycopg {psycopg.__version__}: connections have no _adapters; "
                "dbpool.django cannot install Django's adapters on a pooled connection")
        self._saved = {
            "cursor_factory": raw.cursor_factory,
            "prepare_threshold": raw.prepare_threshold,
            "isolation_level": raw.isolation_level,
            "_adapters": raw._adapters,
        }
        raw.cursor_factory = cursor_factory
        raw._adapters = AdaptersMap(context.adapters)
        raw.prepare_threshold = prepare_threshold
        if isolation_level is not None:
            raw.isolation_level = isolation_level

    def end(self) -> None:
        """Restore what Django changed and give the connection back to the pool.

        What is open is rolled back first (the pool would, but the restoring
        statements must not run inside Django's transaction).  A connection
        that cannot be restored is closed, so that the pool replaces it
        instead of lending it on with Django's session settings.  Never raises
        for the connection's state: the pool's checkin judges what comes back.
        """
        raw = self.raw
        try:
            if not raw.closed:
                raw.rollback()
                for name, value in self._saved.items():
                    setattr(raw, name, value)
                raw.autocommit = True
                undo = self._undo_statements()
                if undo:
                    # One round trip, on the simple query protocol (no
                    # parameters, never prepared: it holds several statements).
                    raw.execute(sql.SQL("; ").join(undo), prepare=False)
        except Exception:
            logger.warning("could not restore a connection Django gave back; closing it "
                           "so that the pool replaces it", exc_info=True)
            try:
                raw.close()
            except Exception:
                pass
        finally:
            self.lender.give_back(raw)

    def _undo_statements(self) -> list[sql.Composable]:
        """The statements that put the session back as it was lent (none, usually)."""
        undo: list[sql.Composable] = []
        if self.named_cursors:
            # Outside a transaction Django declares its .iterator() cursors
            # WITH HOLD: they outlive the loan unless read to their end.
            undo.append(sql.SQL("CLOSE ALL"))
        timezone = self.raw.info.parameter_status("TimeZone")
        if self.timezone is not None and timezone != self.timezone:
            undo.append(sql.SQL("SET TIME ZONE {}").format(sql.Literal(self.timezone)))
        if self.role is not None:  # not reported by the server: restore it unasked
            undo.append(sql.SQL("SET ROLE NONE") if self.role == "none"
                        else sql.SQL("SET ROLE {}").format(sql.Identifier(self.role)))
        return undo
