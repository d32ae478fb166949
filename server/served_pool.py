"""One pool behind the front end, and its queue of requests that wait for a connection.

``dbpool serve`` may serve several pools (``[pools.NAME]`` in its
configuration); a request names one (``"pool"``), else it goes to the
``default`` pool.  Each :class:`ServedPool` has what the front end keeps per
pool: the pool's non-blocking lender, the connections it holds that serve
any client, the requests waiting for a connection, and its place in the
pool's own queue.  So one pool's pause, drain or dead database never holds
up another's requests.

The requests waiting for a connection are served **in turn by client**
(:class:`FairQueue`), not first come first served: a client with 200
requests queued makes a client with one wait behind one of them, not all
200.  PgBouncer serves waiting clients strictly in arrival order.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbpool.pool import Pool
    from dbpool.pool.lender import Lender

    from .pipeline import Job, Pipe

__all__ = ["DEFAULT_POOL", "FairQueue", "ServedPool"]

#: The name of the pool a request that names none goes to.
DEFAULT_POOL = "default"


class FairQueue:
    """Jobs waiting for a connection, taken in turn by client (round robin).

    Each client's jobs keep their order; :meth:`popleft` takes the oldest job
    of the client whose turn it is, and that client's turn comes again after
    every other waiting client's.  A job's client is ``job.client``.
    """

    __slots__ = ("_by_client", "_count")

    def __init__(self) -> None:
        self._by_client: OrderedDict[Hashable, deque[Job]] = OrderedDict()
        self._count = 0

    def append(self, job: Job) -> None:
        jobs = self._by_client.get(job.client)
        if jobs is None:
            jobs = self._by_client[job.client] = deque()
        jobs.append(job)
        self._count += 1

    def peek(self) -> Job:
        """The job :meth:`popleft` would take (IndexError if none waits)."""
        for jobs in self._by_client.values():
            return jobs[0]
        raise IndexError("no job waits")

    def popleft(self) -> Job:
        for client, jobs in self._by_client.items():
            job = jobs.popleft()
            if jobs:
                self._by_client.move_to_end(client)  # its next job waits its turn
            else:
                del self._by_client[client]
            self._count -= 1
            return job
        raise IndexError("no job waits")

    def remove(self, job: Job) -> None:
        jobs = self._by_client[job.client]
        jobs.remove(job)
        if not jobs:
            del self._by_client[job.client]
        self._count -= 1

    def __iter__(self) -> Iterator[Job]:
        for jobs in list(self._by_client.values()):
            yield from list(jobs)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0


class ServedPool:
    """What the front end keeps for one pool (see the module docstring)."""

    def __init__(self, name: str, pool: Pool) -> None:
        #: The name requests use for it.
        self.name = name
        self.pool = pool
        #: The pool's queue, for a loop that never blocks (see dbpool.pool.lender).
        self.lender: Lender = pool.lender()
        #: Connections held that serve any client.
        self.shared: list[Pipe] = []
        #: Requests waiting for a connection.
        self.queued = FairQueue()
        #: Our place in the pool's queue, while we wait there (one waiter at a time).
        self.waiter: Any = None

    def status(self) -> dict[str, Any]:
        """The pool's metrics and health, for the status map."""
        pool = self.pool
        return {**pool.metrics(), "health": pool.health if pool.alive else "stopped",
                "name": pool.name, "queued": len(self.queued)}
