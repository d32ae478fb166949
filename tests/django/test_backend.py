"""ENGINE "dbpool.django" itself: Django's connections are dbpool checkouts, its
OPTIONS reach the pool and not psycopg, and nothing Django sets on a pooled
connection stays on it for the pool's next borrower.

The wrappers are made from settings dicts here (Django's ConnectionHandler
fills in the defaults) on the session's PostgreSQL; each test's pools are
stopped at its teardown.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.db import OperationalError, connections, transaction  # noqa: E402
from django.db.backends.postgresql.base import Cursor as DjangoCursor  # noqa: E402
from django.db.backends.postgresql.psycopg_any import IsolationLevel  # noqa: E402
from django.db.utils import ConnectionHandler  # noqa: E402

from dbpool.django import pools  # noqa: E402
from dbpool.django.base import DatabaseWrapper  # noqa: E402
from tests.support.events import Recorder, kind  # noqa: E402

MakeWrapper = Callable[..., DatabaseWrapper]


@pytest.fixture(scope="module", autouse=True)
def django_settings() -> None:
    """Django configured once per process (each xdist worker is one), with no
    database of its own: the tests make theirs."""
    if not settings.configured:
        settings.configure(USE_TZ=True, TIME_ZONE="UTC", INSTALLED_APPS=[], DATABASES={})
    django.setup()


@pytest.fixture
def server(pg_dsn: str) -> dict[str, Any]:
    """The session server's libpq parameters."""
    return conninfo_to_dict(pg_dsn)


@pytest.fixture
def make_wrapper(server: dict[str, Any]) -> Iterator[MakeWrapper]:
    """``make(alias="dj", options={...}, **settings)``: a DatabaseWrapper of ENGINE
    "dbpool.django" on the session's server; closed, and its pool stopped, at teardown."""
    made: list[DatabaseWrapper] = []

    def make(alias: str = "dj", *, options: dict[str, Any] | None = None,
             **overrides: Any) -> DatabaseWrapper:
        # ConnectionHandler wants a "default"; these tests never use it.
        handler = ConnectionHandler({"default": {"ENGINE": "django.db.backends.dummy"}, alias: {
            "ENGINE": "dbpool.django", "NAME": server.get("dbname", "postgres"),
            "USER": server.get("user", ""), "PASSWORD": server.get("password", ""),
            "HOST": server.get("host", ""), "PORT": server.get("port", ""),
            "OPTIONS": options or {}, **overrides}})
        wrapper: DatabaseWrapper = handler[alias]
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        if wrapper.connection is not None:
            wrapper.inc_thread_sharing()  # one a thread left open
            wrapper.close()
        wrapper.close_pool()


def pool_options(**options: Any) -> dict[str, Any]:
    """OPTIONS["dbpool"] with a pool name of this test's (so no two tests share a pool)."""
    return {"name": f"dj-{uuid.uuid4().hex[:8]}", **options}


@pytest.fixture
def role(pg_dsn: str) -> Iterator[str]:
    """A role of this test's, for Django's OPTIONS["assume_role"]; dropped afterwards."""
    name = f"dbpool_dj_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
        try:
            yield name
        finally:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_what_django_sets_on_a_connection_does_not_reach_the_pools_next_borrower(
    pg_dsn: str, role: str, make_wrapper: MakeWrapper,
) -> None:
    with psycopg.connect(pg_dsn) as plain:
        server_tz, login = plain.execute("SELECT current_setting('TimeZone'), current_user"
                                         ).fetchone() or ("", "")
    assert server_tz != "America/Chicago"

    def pool_setting(conn: Any) -> None:  # the pool's own session setting
        conn.query("SET statement_timeout = '12345ms'")

    wrapper = make_wrapper(
        TIME_ZONE="America/Chicago",  # Django sets it: SET TIME ZONE
        options={"dbpool": pool_options(pool_size=1, after_connect=pool_setting),
                 "assume_role": role,  # SET ROLE
                 "isolation_level": IsolationLevel.SERIALIZABLE})
    wrapper.ensure_connection()
    raw = wrapper.connection
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT current_setting('TimeZone'), current_user, "
                       "'{\"a\": 1}'::jsonb, now()")
        tz, user, doc, now = cursor.fetchone()
    # While Django holds it, the connection is as Django's own connect makes them.
    assert (tz, user) == ("America/Chicago", role)
    assert doc == '{"a": 1}'  # Django's jsonb loader: JSONField parses the text itself
    assert now.tzinfo == ZoneInfo("America/Chicago")  # Django's timestamptz loader
    assert raw.cursor_factory is DjangoCursor
    assert raw.prepare_threshold is None
    assert raw.isolation_level == IsolationLevel.SERIALIZABLE
    # .iterator() outside a transaction: a WITH HOLD cursor, left unread.
    chunked = wrapper.chunked_cursor()
    chunked.execute("SELECT generate_series(1, 1000)")
    assert chunked.fetchone() == (1,)
    wrapper.close()

    # The pool's next borrower (pool_size=1: the same session) is plain dbpool code.
    pool = wrapper.dbpool_pool
    assert pool is not None
    with pool.checkout() as conn:
        pooled = conn.driver_state.conn
        assert pooled is raw
        row = conn.query("SELECT current_setting('TimeZone'), current_user, "
                         "current_setting('statement_timeout'), "
                         "(SELECT count(*) FROM pg_cursors)").rows[0]
        assert tuple(row) == (server_tz, login, "12345ms", 0)
        assert pooled.cursor_factory is psycopg.Cursor
        assert pooled.prepare_threshold == 5  # psycopg's default, as the pool made it
        assert pooled.isolation_level is None
        assert pooled.execute("SELECT '{\"a\": 1}'::jsonb").fetchone() == ({"a": 1},)
        assert pooled.execute("SELECT now()").fetchone()[0].tzinfo != ZoneInfo(
            "America/Chicago")
    assert pool.metrics()["connects"] == 1  # restored, not replaced


def test_a_connection_given_back_inside_a_transaction_is_rolled_back(
    make_wrapper: MakeWrapper, table: str,
) -> None:
    wrapper = make_wrapper("dj_atomic", options={"dbpool": pool_options(pool_size=1)})
    connections[wrapper.alias] = wrapper  # for transaction.atomic(using=...)
    try:
        with transaction.atomic(using=wrapper.alias):
            with wrapper.cursor() as cursor:
                cursor.execute(f"INSERT INTO {table} VALUES (1)")
            raw = wrapper.connection
            assert raw.info.transaction_status == pq.TransactionStatus.INTRANS
            wrapper.close()  # e.g. a request that ends in the middle of a block
            assert wrapper.connection is None  # the pool's again: not to be used here
    finally:
        del connections[wrapper.alias]
    pool = wrapper.dbpool_pool
    assert pool is not None
    assert pool.metrics()["connections"]["in_use"] == 0
    with pool.checkout() as conn:
        assert conn.driver_state.conn is raw
        assert raw.info.transaction_status == pq.TransactionStatus.IDLE
        assert conn.query(f"SELECT count(*) FROM {table}").rows == [(0,)]
    with wrapper.cursor() as cursor:  # and Django borrows again afterwards
        cursor.execute(f"SELECT count(*) FROM {table}")
        assert cursor.fetchone() == (0,)


def test_djangos_connections_are_dbpool_checkouts(make_wrapper: MakeWrapper) -> None:
    options = {"dbpool": pool_options(pool_size=2)}
    wrapper = make_wrapper(options=options)
    assert wrapper.dbpool_pool is None  # started by the first connection, not before
    wrapper.ensure_connection()
    pool = wrapper.dbpool_pool
    assert pool is not None
    assert pool.metrics()["checkouts"] == 1
    assert pool.metrics()["connections"]["in_use"] == 1
    assert wrapper.ensure_timezone() is False  # Django's, without stopping the pool
    assert pool.alive
    wrapper.close()
    assert pool.metrics()["connections"]["in_use"] == 0
    for _ in range(3):  # a request each: connect, query, close
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
        wrapper.close()
    assert pool.metrics()["checkouts"] == 4

    # Threads have wrappers of their own; the same settings share the one pool.
    start = threading.Barrier(4)
    seen: list[Any] = []

    def request() -> None:
        mine = make_wrapper(options=options)
        start.wait(5)
        with mine.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
        seen.append(mine.dbpool_pool)
        mine.close()

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == [pool] * 4
    assert pool.metrics()["checkouts"] == 8
    assert pool.metrics()["connections"]["in_use"] == 0


def test_one_pool_per_set_of_connection_parameters(make_wrapper: MakeWrapper) -> None:
    dbpool_options = pool_options(pool_size=1)
    one = make_wrapper("one", options={"dbpool": dbpool_options, "application_name": "one"})
    same = make_wrapper("same", options={"dbpool": dbpool_options, "application_name": "one"})
    other = make_wrapper("other", options={"dbpool": dbpool_options, "application_name": "two"})
    for wrapper in (one, same, other):
        wrapper.ensure_connection()
        wrapper.close()
    assert one.dbpool_pool is same.dbpool_pool
    pool, other_pool = one.dbpool_pool, other.dbpool_pool
    assert pool is not None and other_pool is not None and other_pool is not pool
    assert (pool.metrics()["checkouts"], other_pool.metrics()["checkouts"]) == (2, 1)

    other.close_pool()  # as Django does before dropping a test database
    assert not other_pool.alive and other.dbpool_pool is None
    assert pool.alive

    # Django's "no database" connection (CREATE/DROP DATABASE) is direct, unpooled.
    running = pools.running_pools()
    with one._nodb_cursor() as cursor:
        cursor.execute("SELECT current_database()")
        assert cursor.fetchone() == ("postgres",)
    assert pools.running_pools() == running
    assert pool.metrics()["checkouts"] == 2


def test_pool_options_reach_dbpool_and_not_psycopg(make_wrapper: MakeWrapper) -> None:
    events: Recorder[Any] = Recorder()
    dbpool_options = pool_options(pool_size=2, timeout=7.5, hold_timeout=0.3,
                                  connection_listeners=[events])
    wrapper = make_wrapper(options={"dbpool": dbpool_options,
                                    "application_name": "dbpool-django-test"})
    params = wrapper.get_connection_params()
    assert "dbpool" not in params and "pool" not in params
    wrapper.ensure_connection()
    pool = wrapper.dbpool_pool
    assert pool is not None
    assert (pool.name, pool.options.pool_size, pool.options.timeout) == (
        dbpool_options["name"], 2, 7.5)
    raw = wrapper.connection
    # libpq had Django's OPTIONS and none of dbpool's.
    assert raw.info.parameter_status("application_name") == "dbpool-django-test"
    sent = raw.info.get_parameters()
    assert not {"dbpool", "pool_size", "timeout", "hold_timeout", "name"} & set(sent)

    # hold_timeout reached the lender: held past it, the connection is taken
    # back and replaced, and Django's next statement fails as on a lost one.
    events.wait_count(kind("disconnected"), 1, timeout=10)
    with pytest.raises(OperationalError), wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
    wrapper.close()
    assert pool.metrics()["deadlines"] == 1
    with wrapper.cursor() as cursor:  # a new loan, on a healthy connection
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


@pytest.mark.parametrize(("options", "message"), [
    ({"dbpool": {"size": 4}},
     r"DATABASES\['bad'\]\['OPTIONS'\]\['dbpool'\]: unknown pool option\(s\): size; known: .*"
     r"pool_size"),
    ({"dbpool": {"pool_size": 0}}, r"\['dbpool'\]: pool_size must be an integer >= 1, got 0"),
    ({"dbpool": {"hold_timeout": "soon"}}, r"hold_timeout must be a positive number"),
    ({"dbpool": 10}, r"\['dbpool'\] must be a dict of dbpool pool options, got 10"),
    ({"dbpool": {"pool": "ownership"}}, r"'pool' cannot be set here"),
    ({"dbpool": {"connect_kwargs": {"sslmode": "require"}}}, r"'connect_kwargs' cannot be set"),
    ({"pool": True}, r"\['OPTIONS'\]\['pool'\] asks for Django's psycopg_pool.*"
                     r"OPTIONS\['dbpool'\]"),
])
def test_a_bad_option_fails_clearly_when_the_alias_is_first_used(
    make_wrapper: MakeWrapper, options: dict[str, Any], message: str,
) -> None:
    running = pools.running_pools()
    with pytest.raises(ImproperlyConfigured, match=message):
        make_wrapper("bad", options=options)
    assert pools.running_pools() == running


def test_an_option_libpq_does_not_know_fails_clearly_at_connect(
    make_wrapper: MakeWrapper,
) -> None:
    wrapper = make_wrapper("typo", options={"dbpool": pool_options(), "sslmod": "require"})
    running = pools.running_pools()
    with pytest.raises(ImproperlyConfigured,
                       match=r"DATABASES\['typo'\].*sslmod.*libpq connection parameters"):
        wrapper.ensure_connection()
    assert pools.running_pools() == running


def test_an_unreachable_database_raises_djangos_operational_error(
    make_wrapper: MakeWrapper,
) -> None:
    missing = f"dbpool_missing_{uuid.uuid4().hex[:8]}"
    wrapper = make_wrapper(NAME=missing, options={"dbpool": pool_options(pool_size=1)})
    with pytest.raises(OperationalError, match=f'database "{missing}" does not exist'):
        wrapper.ensure_connection()
    assert wrapper.connection is None
