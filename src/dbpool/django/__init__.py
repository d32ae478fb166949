"""Django's database backend on dbpool (ENGINE ``"dbpool.django"``).

Django's own PostgreSQL backend (``django.db.backends.postgresql``), whose
connections a dbpool :class:`~dbpool.pool.Pool` in the same process lends::

    DATABASES = {
        "default": {
            "ENGINE": "dbpool.django",
            "NAME": "shop", "USER": "shop", "HOST": "db.internal", "PORT": 5432,
            "OPTIONS": {
                # dbpool's options: Pool.start's, and hold_timeout.
                "dbpool": {"pool_size": 10, "timeout": 5.0},
                # The rest of OPTIONS is as for django.db.backends.postgresql.
                "application_name": "shop",
            },
        },
    }

Options.  ``OPTIONS["dbpool"]`` takes any option of
:meth:`dbpool.pool.Pool.start` (see :class:`~dbpool.pool.options.PoolOptions`:
``pool_size``, ``timeout``, ``queue_target``, ``max_lifetime``,
``after_connect``, ``connection_listeners``, ``name``...), plus
``hold_timeout``: how long Django may hold a connection it borrowed; None
(the default) for as long as it likes, since Django holds one for a whole
request, or a whole ``TestCase``.  ``timeout`` bounds the wait for a
connection.  ``pool`` and ``connect_kwargs`` are the backend's to set: libpq
parameters come from NAME, USER, PASSWORD, HOST, PORT and the other OPTIONS
keys, which mean what they mean for Django's PostgreSQL backend.  A misspelt
name or a bad value raises ``ImproperlyConfigured`` where the alias is first
used.  None of it reaches psycopg.  Django's own ``OPTIONS["pool"]``
(psycopg_pool) is refused: it would be a second pool.

Pools.  One per distinct set of connection parameters and dbpool options,
started by the first connection that needs it and shared by every thread
(and alias) with the same: a test database, whose NAME differs, gets a pool
of its own.  ``connection.dbpool_pool`` is the pool of a connection's current
settings (for its ``metrics()``); ``connection.close_pool()`` stops it, as
Django does before it drops or clones a test database;
:func:`dbpool.django.pools.close_pools` stops them all, and runs at
interpreter exit.  Django's "no database" connections, to the ``postgres``
database for ``CREATE``/``DROP DATABASE``, are direct and unpooled.

Connections.  Django's connect is a dbpool checkout (it waits in dbpool's
queue, under its circuit breaker, and counts in its metrics) and its close
gives the connection back: at the end of each request with the default
``CONN_MAX_AGE = 0``.  A transaction left open is rolled back.  An
unavailable database raises Django's ``OperationalError``.

Session state.  While Django holds a connection it has what Django's own
connect would give it: Django's cursor class, its adapters (time zone aware
``timestamptz``, ``jsonb`` as text...), its ``prepare_threshold`` and
isolation level.  On the way back the pool's own are restored, and what
Django changed in the session is undone: its ``SET TIME ZONE``, its ``SET
ROLE`` (``assume_role``) and its ``WITH HOLD`` cursors.  Session state your
own SQL sets (``SET`` outside a transaction, temporary tables) is not undone,
as with any pool: prefer ``SET LOCAL``.  When the server's ``TimeZone``
differs from Django's (``Etc/UTC`` is not ``UTC``), each checkout costs a
``SET TIME ZONE`` and a restore; ``"options": "-c TimeZone=UTC"`` in OPTIONS
starts the pool's sessions in Django's zone and saves both.

No remote mode.  The backend lends in-process connections only, not those of
``dbpool serve`` (``dbpool.dbapi.connect("tcp://...")``).  Django's
PostgreSQL backend needs a psycopg connection itself, not a DB-API one: it
builds psycopg cursor subclasses on it (``ClientCursor``, ``ServerCursor``),
registers adapters on ``connection.adapters``, and reads ``connection.info``
and the server's parameter statuses.  On the service's connection that would
be a different backend, with its own operations and introspection, not a mode
of this one.
"""
