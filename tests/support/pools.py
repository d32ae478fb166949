"""Start pools for tests and wait until they are ready.

The ``pools`` fixture (tests/conftest.py) gives a :class:`Pools` list.  A module
whose tests should run against every pool kind, as DBConnection runs its
integration cases against both DBConnection.ConnectionPool and
DBConnection.Ownership, says so once::

    pytestmark = pytest.mark.parametrize("pool_kind", POOL_KINDS, indirect=True)

and starts its pools with :func:`kind_options` (``start_named`` does already).
A case that cannot hold on one kind is marked
``@pytest.mark.pool_kind_xfail("ownership", reason=...)`` (a strict xfail for
that kind only) or ``@pytest.mark.pool_kind_skip("ownership", reason=...)``.
"""

from __future__ import annotations

from typing import Any

from dbpool.actors.listeners import ConnectionEvent
from dbpool.pool import Pool

from .events import Recorder, kind

#: The pool kinds and the ``Pool.start`` options that make each: the plain pool
#: (DBConnection.ConnectionPool) and the ownership pool in auto mode
#: (DBConnection.Ownership as its integration tests run it: a caller that owns
#: nothing gets a connection checked out for it on its first call).
POOL_KINDS: dict[str, dict[str, Any]] = {
    "queue": {"pool": "queue"},
    "ownership": {"pool": "ownership", "ownership_mode": "auto"},
}


class Pools(list[Pool]):
    """The ``pools`` fixture's list: the started pools it stops at teardown, and the
    kind of pool the test runs against (None: whatever each test starts)."""

    def __init__(self, kind: str | None = None) -> None:
        super().__init__()
        self.kind = kind


def kind_options(pools: list[Pool]) -> dict[str, Any]:
    """The ``Pool.start`` options of the pool kind the test runs against, if any."""
    kind_ = getattr(pools, "kind", None)
    return dict(POOL_KINDS[kind_]) if kind_ is not None else {}


def start_named(
    dsn: str, pools: list[Pool], app: str, size: int = 1, **options: Any
) -> tuple[Pool, Recorder[ConnectionEvent]]:
    """A pool whose sessions carry ``application_name=app``, once all ``size`` connected.

    The pool is appended to ``pools`` (the fixture that stops them) and is of
    the kind that fixture says (see :func:`kind_options`); the recorder has
    every connection event from the start.
    """
    events: Recorder[ConnectionEvent] = Recorder()
    pool = Pool.start(dsn, pool_size=size, connection_listeners=[events],
                      connect_kwargs={"application_name": app},
                      **{**kind_options(pools), **options})
    pools.append(pool)
    events.wait_count(kind("connected"), size)
    return pool, events
