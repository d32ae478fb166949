"""Shared pytest fixtures: real PostgreSQL servers and a fault-injecting proxy.

Fixtures
--------
``pg_binaries`` (session)
    Directory with initdb/pg_ctl/postgres (see :func:`find_pg_bindir`).
``pg_template`` (session)
    The once-per-session ``initdb`` that every private cluster is copied from.
``pg_cluster`` (function)
    A fresh, started :class:`PgCluster` of its own; tests may stop, kill or
    restart it freely. Deleted at teardown.
``pg_password_cluster`` (function)
    Like ``pg_cluster``, but TCP logins need the password
    :data:`PG_TEST_PASSWORD` (``scram-sha-256``); its ``conninfo()`` carries
    it, ``conninfo(password="wrong")`` does not.
``pg_cluster_factory`` (function)
    ``make(**settings) -> PgCluster`` for tests that need several clusters or
    custom ``postgresql.conf`` settings; all are started and cleaned up.
``pg_dsn`` (session)
    A conninfo string for a server that tests must *not* break: the machine's
    service at 127.0.0.1:5432 if it answers within 2 s, else a private cluster
    shared by the session.
``fault_proxy`` (function)
    ``make(host, port) -> FaultProxy``; every proxy made is closed at teardown.
``pools`` (function)
    A list (:class:`~tests.support.pools.Pools`) to append started
    :class:`~dbpool.pool.Pool` handles to; all are stopped at teardown.  Its
    ``kind`` is ``pool_kind``'s.
``pool_kind`` (function)
    None, or the pool kind a module parametrizes its tests over
    (``pytest.mark.parametrize("pool_kind", POOL_KINDS, indirect=True)``; see
    :mod:`tests.support.pools`), applying the ``pool_kind_xfail`` and
    ``pool_kind_skip`` marks of that kind.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.support.faultproxy import FaultProxy, ProxyFactory
from tests.support.ownership import Gate, Peer, PeerFactory
from tests.support.pgcluster import (
    PG_TEST_PASSWORD,
    ClusterFactory,
    PgCluster,
    PgTemplate,
    SettingValue,
    cleanup_shared_templates,
    find_pg_bindir,
    shared_template,
)
from tests.support.pools import POOL_KINDS, Pools

#: SQLAlchemy's compliance suite runs under SQLAlchemy's own pytest plugin, in a
#: pytest of its own (tests/dbapi/test_sqlalchemy_suite.py): never collected here.
collect_ignore = ["sqlalchemy_suite"]

log = logging.getLogger("tests.conftest")

_SYSTEM_DSN = make_conninfo("", host="127.0.0.1", port=5432, user="postgres", dbname="postgres")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: soak tests, run separately with `-m slow`")
    config.addinivalue_line(
        "markers", "pool_kind_xfail(kind, reason): a strict xfail when run against that pool kind")
    config.addinivalue_line(
        "markers", "pool_kind_skip(kind, reason): skipped when run against that pool kind")


@pytest.fixture(scope="session")
def pg_binaries() -> Path:
    """Directory holding the PostgreSQL server binaries (errors clearly if none)."""
    return find_pg_bindir()


@pytest.fixture(scope="session")
def pg_template(pg_binaries: Path) -> Iterator[PgTemplate]:
    """Session-wide initdb template (shared with any direct ``PgCluster()`` use)."""
    template = shared_template(pg_binaries)
    yield template
    cleanup_shared_templates()


@pytest.fixture
def pg_cluster(pg_template: PgTemplate) -> Iterator[PgCluster]:
    """A fresh private cluster, started; stopped and deleted after the test."""
    cluster = PgCluster(template=pg_template)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def pg_password_cluster(pg_template: PgTemplate) -> Iterator[PgCluster]:
    """A fresh private cluster whose TCP logins need :data:`PG_TEST_PASSWORD`; started,
    stopped and deleted after the test."""
    cluster = PgCluster(template=pg_template, password=PG_TEST_PASSWORD)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def pg_cluster_factory(pg_template: PgTemplate) -> Iterator[ClusterFactory]:
    """Factory ``make(**settings)`` of started private clusters, all cleaned up after the test."""
    clusters: list[PgCluster] = []

    def make(**settings: SettingValue) -> PgCluster:
        cluster = PgCluster(template=pg_template, settings=settings)
        clusters.append(cluster)
        cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.cleanup()


def _system_server_available() -> bool:
    try:
        # libpq's connect_timeout has a 2 s floor, which is the budget we want.
        with psycopg.connect(_SYSTEM_DSN, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        log.info("no usable server at 127.0.0.1:5432 (%s); using a private cluster", exc)
        return False
    return True


@pytest.fixture(scope="session")
def pg_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """Conninfo for a long-lived server; do not stop or kill it from tests."""
    if _system_server_available():
        yield _SYSTEM_DSN
        return
    # Only now pay for initdb: the system server is the common case.
    template: PgTemplate = request.getfixturevalue("pg_template")
    with PgCluster(template=template) as cluster:
        yield cluster.conninfo()


@pytest.fixture
def fault_proxy() -> Iterator[ProxyFactory]:
    """Factory ``make(host, port) -> FaultProxy``; all proxies are closed at teardown."""
    proxies: list[FaultProxy] = []

    def make(host: str, port: int) -> FaultProxy:
        proxy = FaultProxy(host, port)
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


@pytest.fixture
def pool_kind(request: pytest.FixtureRequest) -> str | None:
    """The pool kind the test runs against, when its module parametrizes it (else None).

    A case marked ``pool_kind_xfail(kind, reason=...)`` is a strict xfail on
    that kind, and one marked ``pool_kind_skip(kind, reason=...)`` is skipped.
    """
    kind: str | None = getattr(request, "param", None)
    if kind is None:
        return None
    assert kind in POOL_KINDS, kind
    for mark in request.node.iter_markers("pool_kind_skip"):
        if mark.args[0] == kind:
            pytest.skip(f"{kind} pool: {mark.kwargs['reason']}")
    for mark in request.node.iter_markers("pool_kind_xfail"):
        if mark.args[0] == kind:
            request.node.add_marker(pytest.mark.xfail(
                strict=True, reason=f"{kind} pool: {mark.kwargs['reason']}"))
    return kind


@pytest.fixture
def pools(pool_kind: str | None) -> Iterator[Pools]:
    """A list to append started pools to; each is stopped at teardown."""
    started = Pools(pool_kind)
    yield started
    for pool in started:
        pool.stop()


@pytest.fixture
def table(pg_dsn: str) -> Iterator[str]:
    """A fresh table ``(x int)`` on the machine's PostgreSQL, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {name} (x int)")
        yield name
        admin.execute(f"DROP TABLE {name}")


@pytest.fixture
def peers() -> Iterator[PeerFactory]:
    """``make(name, callers=False) -> Peer`` (the ownership tests' stand-in for an Elixir
    process); every peer still running exits at teardown."""
    started: list[Peer] = []

    def make(name: str, *, callers: bool = False) -> Peer:
        peer = Peer(name, callers=callers)
        started.append(peer)
        return peer

    yield make
    for peer in started:
        if peer.thread.is_alive():
            peer.exit()


@pytest.fixture
def gate(pg_dsn: str) -> Iterator[Gate]:
    """A closed gate: pooled statements running ``gate.sql`` wait until it opens."""
    g = Gate(pg_dsn)
    try:
        yield g
    finally:
        g.close()
