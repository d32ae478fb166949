"""``DatabaseWrapper`` of ENGINE ``"dbpool.django"``: Django's PostgreSQL backend on dbpool.

Everything is Django's own ``django.db.backends.postgresql`` backend but
where connections come from and go to: see the package docstring
(:mod:`dbpool.django`) for the settings and the behaviour.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql.base import DatabaseWrapper as PostgresDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import IsolationLevel
from django.db.utils import DEFAULT_DB_ALIAS
from django.utils.asyncio import async_unsafe

from dbpool.pool import Pool

from . import pools
from .pools import OPTIONS_KEY, PoolConfig
from .session import Loan

__all__ = ["DatabaseWrapper"]

logger = logging.getLogger("dbpool.django")

#: What Django's ``get_connection_params`` gives that psycopg, not libpq, takes:
#: applied to each lent connection (:class:`~dbpool.django.session.Loan`).
_PSYCOPG_PARAMS = ("cursor_factory", "context", "prepare_threshold")

_F = TypeVar("_F", bound=Callable[..., Any])


def _async_unsafe(method: _F) -> _F:
    """Django's ``async_unsafe`` (refuse to run inside an event loop), typed: Django's
    own decorators have no type hints."""
    return cast(_F, async_unsafe(method))


class DatabaseWrapper(PostgresDatabaseWrapper):  # type: ignore[misc]  # Django has no types
    """Django's PostgreSQL ``DatabaseWrapper`` whose connections a dbpool pool lends.

    Connecting checks a connection out of the pool for this database's
    parameters (starting the pool first if need be); closing gives it back.
    ``dbpool_pool`` is that pool; ``close_pool()`` stops it.
    """

    def __init__(self, settings_dict: dict[str, Any], alias: str = DEFAULT_DB_ALIAS) -> None:
        super().__init__(settings_dict, alias)
        self._dbpool_loan: Loan | None = None
        # Check OPTIONS now: a typo fails where the alias is first used.
        self._dbpool_config()

    # -- configuration ---------------------------------------------------

    def _dbpool_config(self) -> PoolConfig:
        options = self.settings_dict["OPTIONS"]
        if options.get("pool"):
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['pool'] asks for Django's psycopg_pool; "
                f"ENGINE 'dbpool.django' pools with dbpool: put pool options in "
                f"OPTIONS[{OPTIONS_KEY!r}] (e.g. {{'pool_size': 10}}) instead")
        return pools.parse_options(options.get(OPTIONS_KEY), self.alias)

    def get_connection_params(self) -> dict[str, Any]:
        """Django's parameters, without ``OPTIONS["dbpool"]``: those are the pool's."""
        params: dict[str, Any] = super().get_connection_params()
        params.pop(OPTIONS_KEY, None)
        return params

    def _dbpool_target(self, conn_params: dict[str, Any]) -> tuple[str, str]:
        """The pool's conninfo (the libpq part of ``conn_params``), and a description
        of it without the password, for logs."""
        libpq = {k: v for k, v in conn_params.items() if k not in _PSYCOPG_PARAMS}
        try:
            conninfo = pools.conninfo(libpq)
        except psycopg.ProgrammingError as exc:
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]: {str(exc).strip()}; with ENGINE 'dbpool.django' "
                f"the OPTIONS besides {OPTIONS_KEY!r}, 'isolation_level', 'assume_role', "
                "'server_side_binding' and 'prepare_threshold' must be libpq connection "
                "parameters") from exc
        described = "{user}@{host}:{port}/{dbname}".format(
            **{k: libpq.get(k) or "" for k in ("user", "host", "port", "dbname")})
        return conninfo, described

    @property
    def pool(self) -> None:
        """Django's psycopg_pool: never, this backend lends from ``dbpool_pool``.

        (Django's code reads ``self.pool`` to choose between its pool and
        plain connections; None keeps it on the plain path, which is the one
        that configures each connection it gets.)
        """
        return None

    @property
    def dbpool_pool(self) -> Pool | None:
        """The dbpool pool this database's connections come from, if it has started."""
        conninfo, _ = self._dbpool_target(self.get_connection_params())
        return pools.running_pool(conninfo, self._dbpool_config())

    def close_pool(self) -> None:
        """Stop the pool of this database's current settings: its idle connections
        close now, lent ones when they are given back.  Django calls it (after
        closing its own connection) before it drops or clones a test database,
        which no session may be connected to.  The next connection starts a new pool.
        """
        if self.alias == NO_DB_ALIAS:
            return
        try:
            conninfo, described = self._dbpool_target(self.get_connection_params())
            config = self._dbpool_config()
        except ImproperlyConfigured:  # settings no pool could have been started for
            return
        if pools.close_pool(conninfo, config):
            logger.debug("%s: closed the pool for %s", self.alias, described)

    # -- connections -----------------------------------------------------

    @_async_unsafe
    def get_new_connection(self, conn_params: dict[str, Any]) -> psycopg.Connection[Any]:
        """Borrow a connection from the pool and set it up as Django's own connect would."""
        if self.alias == NO_DB_ALIAS:
            # Django's "no database" connections (to the 'postgres' database, to
            # CREATE and DROP test databases) are one-off and short: a pool
            # would keep pool_size sessions open on the maintenance database for
            # the life of the process.  Django's own pooling skips them too.
            connection: psycopg.Connection[Any] = super().get_new_connection(conn_params)
            return connection
        if self._dbpool_loan is not None:  # Django dropped one without closing it
            logger.warning("%s: a pooled connection was still lent; giving it back", self.alias)
            self._give_back()
        self._set_isolation_level()
        conninfo, described = self._dbpool_target(conn_params)
        name = f"django-{self.alias}"
        lender = pools.lender_for(conninfo, self._dbpool_config(), name, described)
        raw = lender.lend()
        loan = Loan(raw, lender)
        try:
            loan.apply(
                cursor_factory=conn_params["cursor_factory"],
                context=conn_params["context"],
                prepare_threshold=conn_params.get("prepare_threshold"),
                isolation_level=(self.isolation_level
                                 if "isolation_level" in self.settings_dict["OPTIONS"] else None),
            )
        except BaseException:
            loan.end()
            raise
        self._dbpool_loan = loan
        logger.debug("%s: borrowed backend %d from %s", self.alias, raw.info.backend_pid,
                     described)
        return raw

    def _set_isolation_level(self) -> None:
        """``self.isolation_level`` from OPTIONS, as Django's ``get_new_connection`` sets it
        (it is read before the connection exists, so it is set here first)."""
        options = self.settings_dict["OPTIONS"]
        if "isolation_level" not in options:
            self.isolation_level = IsolationLevel.READ_COMMITTED
            return
        try:
            self.isolation_level = IsolationLevel(options["isolation_level"])
        except ValueError:
            raise ImproperlyConfigured(
                f"Invalid transaction isolation level {options['isolation_level']} "
                "specified. Use one of the psycopg.IsolationLevel values.") from None

    def _close(self) -> None:
        """Give the connection back to the pool (Django's close, CONN_MAX_AGE, request end).

        A transaction still open is rolled back; Django's session settings are
        undone (see :class:`~dbpool.django.session.Loan`).
        """
        if self._dbpool_loan is None:  # a direct connection (see get_new_connection)
            super()._close()
            return
        # Even inside an atomic block (Django then marks the transaction
        # closed): the connection is the pool's again and must not be used here.
        self.connection = None
        with self.wrap_database_errors:
            self._give_back()

    def _give_back(self) -> None:
        loan, self._dbpool_loan = self._dbpool_loan, None
        if loan is not None:
            loan.end()
            logger.debug("%s: gave a connection back", self.alias)

    # -- what Django does to a connection, recorded so it can be undone ---

    def _configure_role(self, connection: psycopg.Connection[Any]) -> bool:
        """Django's ``SET ROLE`` for OPTIONS["assume_role"], after noting the role to
        restore when the connection goes back."""
        loan = self._dbpool_loan
        if (loan is not None and loan.role is None
                and self.settings_dict["OPTIONS"].get("assume_role")):
            row = connection.execute("SELECT current_setting('role')").fetchone()
            loan.role = str(row[0]) if row is not None else "none"
        changed: bool = super()._configure_role(connection)
        return changed

    def ensure_timezone(self) -> bool:
        """Django's, without closing the pool: each loan sets Django's time zone and
        gives the pool's back, so pooled connections never keep a stale one."""
        if self.connection is None:
            return False
        changed: bool = self._configure_timezone(self.connection)
        return changed

    @_async_unsafe
    def create_cursor(self, name: str | None = None) -> Any:
        """Django's cursor; a named one is noted, to be closed when the connection goes
        back (outside a transaction Django declares it WITH HOLD)."""
        if name and self._dbpool_loan is not None:
            self._dbpool_loan.named_cursors = True
        return super().create_cursor(name)
