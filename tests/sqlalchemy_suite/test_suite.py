"""SQLAlchemy's third-party dialect compliance suite, as external dialects run it."""

from sqlalchemy.testing.suite import *  # noqa: F403
