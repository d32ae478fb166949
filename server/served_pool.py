"""One pool behind the front end, and its queue of requests that wait for a connection.

``dbpool serve`` may serve several pools (``[pools.NAME]`` in its
configuration); a request names one (``"pool"``), else it goes to the
``default`` pool.  Each :class:`ServedPool` has what the front end keeps per
pool: the pool's non-blocking lender, the connections it holds that serve
any client, the requests waiting for a connection, and its place in the
pool's own queue.  So one pool's pause, drain or dead database never holds
up another's requests.

The requests waiting for a connection are served **in turn by client**
(:class:`FairQueue`), not first come first served, and while several
clients are active each client's requests spread over only its share of
the connections (:meth:`ServedPool.pipes_each`): a client with 200
requests queued does not make a client with one wait behind them, and the
clients get the connections in proportion.  PgBouncer serves waiting
clients strictly in arrival order.

The queue sheds load as the pool's own queue does, with DBConnection's
CoDel (:mod:`dbpool.pool.codel`, the pool's ``queue_target`` and
``queue_interval``): once waits have stayed above the target for an
interval, a request that waited more than twice the target is answered
``ConnectionError(reason="queue_timeout")`` at once instead of being served
late, so that under overload the requests served are served in time, and
the others learn it early.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

from dbpool.pool.codel import Codel

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

    def popleft_where(self, may_take: Callable[[Job], bool]) -> Job | None:
        """Take the first job, in turn order, that ``may_take`` accepts (each client's
        oldest is asked; None if it refuses them all)."""
        for client, jobs in self._by_client.items():
            job = jobs[0]
            if may_take(job):
                jobs.popleft()
                if jobs:
                    self._by_client.move_to_end(client)
                else:
                    del self._by_client[client]
                self._count -= 1
                return job
        return None

    def holds(self, client: Hashable) -> bool:
        """Whether a job of ``client`` waits."""
        return client in self._by_client

    def oldest(self) -> float | None:
        """When the longest-waiting job arrived (None if none waits; the front end's
        own jobs, which have no arrival time, do not count)."""
        return min((jobs[0].started for jobs in self._by_client.values()
                    if jobs[0].started), default=None)

    def take_before(self, cutoff: float) -> list[Job]:
        """Take every job that arrived before ``cutoff`` (the front end's own jobs,
        which have no arrival time, stay)."""
        taken: list[Job] = []
        for client in list(self._by_client):
            jobs = self._by_client[client]
            while jobs and 0 < jobs[0].started < cutoff:
                taken.append(jobs.popleft())
            if not jobs:
                del self._by_client[client]
        self._count -= len(taken)
        return taken

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

    def __init__(self, name: str, pool: Pool, owner: str | None = None) -> None:
        #: The name requests use for it.
        self.name = name
        #: The pool whose permission it needs: its own name, or its primary's for a
        #: replica (served as ``NAME/replica-N``).
        self.owner = owner or name
        self.pool = pool
        #: Its replicas' served pools (read-only requests may go there).
        self.replicas: list[ServedPool] = []
        #: The pool's queue, for a loop that never blocks (see dbpool.pool.lender).
        self.lender: Lender = pool.lender()
        #: Connections held that serve any client.
        self.shared: list[Pipe] = []
        #: Requests waiting for a connection.
        self.queued = FairQueue()
        options = pool.options
        #: The queue's load shedding (see the module docstring).
        self.codel = Codel(options.queue_target, options.queue_interval, time.monotonic())
        #: Requests the queue shed, ever.
        self.shed = 0
        #: Our place in the pool's queue, while we wait there (one waiter at a time).
        self.waiter: Any = None
        #: The clients whose requests came for a connection in this tick and the last.
        self.seen: set[Hashable] = set()
        self._seen_before: set[Hashable] = set()
        #: How many clients were active lately (see pipes_each).
        self.active = 1
        #: Taken out of service by a reload: its connections go back as they come free.
        self.removed = False
        #: Counts the DDL (DROP, ALTER) seen through this pool, done and committed:
        #: a connection that prepared statements before the latest count forgets
        #: them before its next request, as their plans may have gone stale.
        self.schema_epoch = 0
        #: How long each statement run alone in a request took at its last timed run
        #: (seconds, by its SQL text), for pipeline.SHORT_REQUEST.
        self.statement_times: dict[str, float] = {}

    def reader(self, readonly: object) -> ServedPool | None:
        """The replica a read-only request goes to: the pool's choice (see
        :mod:`dbpool.pool.replicas`), or None for this pool itself.  With
        ``readonly="replica"`` and no replica to serve, ConnectionError."""
        chosen = self.pool.replica_for_read(readonly == "replica")
        return next((served for served in self.replicas if served.pool is chosen), None)

    def tick(self) -> None:
        """Count the clients active lately (the front end calls it every tick)."""
        self.active = max(1, len(self.seen | self._seen_before))
        self._seen_before, self.seen = self.seen, set()

    def pipes_each(self) -> int:
        """How many connections one client's requests may spread over, while other
        clients are active: its share of the pool's connections (at least one).

        Alone, a client may use every connection.  With others active, its
        requests go only to the connections it already uses (pipelined behind
        its own, never ahead of another client's) until it has its share, so
        a client that keeps hundreds of requests queued leaves the other
        connections to the clients that send one at a time.  Many clients
        with one request each still share every connection's pipeline.
        """
        if self.active <= 1:
            return 1 << 30
        return max(1, self.pool.options.pool_size // self.active)

    def status(self) -> dict[str, Any]:
        """The pool's metrics and health, for the status map."""
        pool = self.pool
        return {**pool.metrics(), "health": pool.health if pool.alive else "stopped",
                "name": pool.name, "queued": len(self.queued), "shed": self.shed}
