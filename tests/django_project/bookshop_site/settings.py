"""Settings of the bookshop test project: one database, on ENGINE "dbpool.django".

The server comes from ``DBPOOL_TEST_DSN`` (a libpq conninfo; default
127.0.0.1:5432, user postgres), the database name from ``DBPOOL_DJANGO_DB``.
``manage.py test`` creates and drops ``test_<name>``, so a driving test
gives each run a name of its own (parallel runs and xdist workers then never
share a test database).
"""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict

_server = conninfo_to_dict(
    os.environ.get("DBPOOL_TEST_DSN", "host=127.0.0.1 port=5432 user=postgres"))

SECRET_KEY = "dbpool-django-test-project"  # a test project's: nothing to protect
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["bookshop"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "dbpool.django",
        "NAME": os.environ.get("DBPOOL_DJANGO_DB", "dbpool_django_bookshop"),
        "USER": str(_server.get("user", "postgres")),
        "PASSWORD": str(_server.get("password", "")),
        "HOST": str(_server.get("host", "127.0.0.1")),
        "PORT": str(_server.get("port", "5432")),
        "OPTIONS": {
            # Django's test thread, a second thread of the locking test, spare.
            "dbpool": {"pool_size": 3, "timeout": 10.0},
            "application_name": "dbpool-django-bookshop",
        },
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # Warnings only: a restore that failed, a pool that stopped by itself.
    "loggers": {"dbpool.django": {"handlers": ["console"], "level": "WARNING"}},
}
