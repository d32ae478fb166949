"""SQLAlchemy's pytest plugin, which runs its dialect compliance suite (see setup.cfg)."""

from sqlalchemy.dialects import registry

registry.register("postgresql.dbpool", "dbpool.dbapi.sqlalchemy.dialect", "DbpoolDialect")

from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402, F403
