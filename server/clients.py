"""Named clients: what each may do, and what each is doing now.

With CURVE (see :mod:`dbpool.server.auth`) a client is named by its key
file's stem, and a ``[clients.NAME]`` table in the configuration gives it a
:class:`ClientPolicy`:

- ``pools``: the pools it may use (default: all of them);
- ``admin``: whether it may run the admin operations (default: false);
- ``max_inflight``: how many of its requests may be in flight at once;
- ``max_leases``: how many transactions, streams and copies it may hold open.

A client without a table has the defaults (every pool, no admin, no
limits).  Without CURVE every client is one anonymous client, ``anonymous``,
with every pool and admin (only loopback can reach such a server, and anyone
there could run any SQL anyway), unless a ``[clients.anonymous]`` table says
otherwise.

A request beyond a limit is refused at once with
``connection``/``client_limit``; one for a pool the client may not use, or
an admin operation by a non-admin, with ``permission``.  Other clients see
no difference.  :class:`ClientState` counts what a client has in flight and
holds, for the limits and for the admin ``clients`` operation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ANONYMOUS", "ClientPolicy", "ClientState"]

#: The name of every client of a server without CURVE.
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class ClientPolicy:
    """What one client may do (see the module docstring); None is no limit."""

    pools: frozenset[str] | None = None
    admin: bool = False
    max_inflight: int | None = None
    max_leases: int | None = None

    def may_use(self, pool: str) -> bool:
        return self.pools is None or pool in self.pools

    def describe(self) -> dict[str, Any]:
        return {"pools": None if self.pools is None else sorted(self.pools),
                "admin": self.admin, "max_inflight": self.max_inflight,
                "max_leases": self.max_leases}


#: The anonymous client of a server without CURVE.
ANONYMOUS_POLICY = ClientPolicy(admin=True)


@dataclass
class ClientState:
    """One client's requests in flight and leases held, now."""

    name: str
    policy: ClientPolicy
    #: Requests received and not yet answered.
    inflight: int = 0
    #: Open leases, streams and copies, by id.
    leases: set[str] = field(default_factory=set)
    #: Requests in flight that open one.
    opening: int = 0
    #: When it was first seen (wall clock), for the admin ``clients`` operation.
    since: float = field(default_factory=time.time)
    #: Requests answered, ever.
    requests: int = 0
    #: Why its requests are refused until the next reload (the admin ``kick``), if so.
    kicked: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "inflight": self.inflight, "leases": len(self.leases),
                "requests": self.requests, "since": self.since, "kicked": self.kicked,
                **self.policy.describe()}
