"""Pool options: names follow DBConnection's, durations are in seconds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypedDict

from dbpool.actors import backoff
from dbpool.actors.listeners import ListenerSpec
from dbpool.errors import ConfigurationError
from dbpool.spin import DEFAULT_SPIN, checked_spin

__all__ = ["PoolOptions", "PoolStartOptions", "checkout_options"]


@dataclass(frozen=True)
class PoolOptions:
    """Every option :meth:`dbpool.pool.Pool.start` takes besides the conninfo.

    Connection lifecycle:

    - ``pool_size`` (10): connections kept open.
    - ``min_size`` and ``max_size`` (both ``pool_size``): an elastic pool
      (:mod:`dbpool.pool.elastic`) starts with ``min_size`` connections,
      grows one at a time up to ``max_size`` while checkouts wait longer
      than ``queue_target``, and closes the connections that stayed idle
      for ``max_idle`` (600.0) seconds, down to ``min_size``.  ``pool_size``
      is then the current size (it starts at ``min_size`` unless given).
    - ``max_server_connections`` (None) and ``budget_name`` (``"dbpool"``): a
      connection budget shared with every pool, in any process on any host,
      that names the same budget on the same database: together they hold at
      most that many connections (:mod:`dbpool.pool.budget`).
    - ``replicas`` (none): conninfos of read replicas, each with a pool of its
      own (the same options, its own circuit breaker); calls marked
      ``readonly`` go to them, and ``max_replica_lag`` (30.0 seconds; None:
      no limit) takes a replica that far behind out of rotation
      (:mod:`dbpool.pool.replicas`).
    - ``backoff_type`` (``"rand_exp"``), ``backoff_min`` (1.0), ``backoff_max``
      (30.0): reconnect delays, see :mod:`dbpool.actors.backoff`.
      ``"stop"`` makes a failed connect stop the pool.
    - ``configure``: ``fn(opts) -> opts``, called before every connect attempt
      with the connect options plus ``pool_index``; what it returns is used for
      that attempt (rotate credentials, re-resolve DNS).
    - ``after_connect``: ``fn(conn)``, run on each new connection before it
      serves anyone; it may query through ``conn``.  A failure, or running
      past ``after_connect_timeout`` (15.0), drops the connection and
      reconnects after a backoff step.
    - ``ping_timeout`` (5.0): a ping that has no answer by then counts as a
      lost connection (a blackholed network never answers);
    - ``spin`` (0.0003): while a connection's recent round trips to the
      server took less than this many seconds, and no other thread waits on
      a connection or has just done so, a thread waiting for an answer polls
      the socket for up to three times that, yielding the CPU between polls,
      instead of sleeping (see :meth:`dbpool.pgconnection.PgConnection.wait`):
      a lone caller's round trip halves; 0 always sleeps.
    - ``idle_interval`` (1.0): how often idle connections are pinged;
      ``idle_limit`` (pool_size): the most pinged per interval, oldest first.
    - ``connection_listeners``: ActorRefs and callables told of connected and
      disconnected events; see :mod:`dbpool.actors.listeners`.
    - ``max_restarts`` (3) within ``max_seconds`` (5.0): crashes of connection
      actors tolerated before the pool stops.
    - ``show_sensitive_data_on_connection_error`` (False): keep connect
      errors whole, password and all.

    Availability (see :mod:`dbpool.pool.breaker`):

    - ``breaker_threshold`` (5): consecutive failed connect attempts that open
      the circuit (it also opens when no connection is up and one fails).
      While open, checkouts fail at once with
      ``ConnectionError(reason="unavailable")`` and one connection probes the
      database per backoff step.
    - ``reconnect_log_interval`` (10.0): failed connects are logged at most
      once per this many seconds, with a count.

    Checkout:

    - ``timeout`` (15.0): default deadline of a checkout, counted from its
      start: it covers the wait in the queue *and* the use.  A holder past
      its deadline has its statement cancelled and its connection replaced.
    - ``queue`` (True): default for whether a checkout may wait at all.
    - ``queue_target`` (0.05) and ``queue_interval`` (2.0): CoDel load
      shedding, as in DBConnection.  When waits stay above ``queue_target``
      for a whole ``queue_interval``, waiters older than twice the target
      are dropped with ``ConnectionError(reason="queue_timeout")``.
    - ``barge_window`` (None: half of ``queue_target``, 25 ms by default): while
      the longest waiter has waited less than this, a checked-in connection
      stays idle for a caller that is already running instead of waking a
      sleeping waiter (after Go's mutex: waking a thread costs as much as a
      query here, and a fight for the GIL more).  Waiters are still served in
      order, at most this much later; 0 hands every connection straight to
      the longest waiter (strict FIFO, as psycopg_pool).  Half the target
      keeps barging from ever making a served waiter look late to CoDel,
      while it lets threads that hold a connection for a millisecond or more
      (an ORM's checkout) run without a wake-up per checkout.
    - ``max_waiting`` (0, unbounded): past this many waiters a checkout fails
      at once with ``ConnectionError(reason="queue_full")``.

    Recycling:

    - ``max_lifetime`` (None): ``(min, max)`` seconds; each connection is
      replaced after a lifetime drawn uniformly from that range, so that
      connections do not all reconnect at once.
    - ``disconnect_all_every`` (None) and ``disconnect_all_interval`` (15.0):
      call :meth:`~dbpool.pool.Pool.disconnect_all` with that interval
      periodically, so that e.g. a DNS change is picked up.

    Calls:

    - ``log`` (None): a callable given a :class:`~dbpool.pool.logentry.LogEntry`
      for every call on the pool's connections (a call's own ``log=`` wins).
    - ``checkout_retries`` (3): how many times a call that found its
      connection closed by the server (idle timeout, restart) is retried on
      another connection, when that is safe: see :meth:`~dbpool.pool.Pool.query`.

    Ownership (``pool="ownership"``; see :mod:`dbpool.pool.ownership`):

    - ``pool`` (``"queue"``): ``"ownership"`` makes every connection be owned
      explicitly by a thread or task, as DBConnection.Ownership does.
    - ``ownership_mode`` (``"auto"``): ``"auto"`` gives each new owner a
      connection of its own on first use; ``"manual"`` requires
      ``ownership_checkout`` or ``ownership_allow`` first.
    - ``ownership_timeout`` (120.0): an owner holding its connection longer
      has it disconnected, and where it was checked out is logged.
    - ``ownership_log`` (None): a logging level (``"DEBUG"``, ``logging.INFO``)
      at which ownership changes are logged; None logs none.
    - ``post_checkout`` and ``pre_checkin``: hooks run when an owner's
      connection is taken from and given back to the pool.

    ``name`` names the pool in logs, events and threads.  ``connect_kwargs``
    are extra libpq keywords (``password="..."``, ``connect_timeout=5``); the
    psycopg driver's defaults for the network ones are in
    :data:`dbpool.pgdriver.NETWORK_DEFAULTS`.
    """

    pool_size: int = 10
    min_size: int | None = None
    max_size: int | None = None
    max_idle: float = 600.0
    max_server_connections: int | None = None
    budget_name: str = "dbpool"
    replicas: Sequence[str] = ()
    max_replica_lag: float | None = 30.0
    name: str = "dbpool"
    backoff_type: str = "rand_exp"
    backoff_min: float | None = None
    backoff_max: float | None = None
    configure: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None
    after_connect: Callable[[Any], object] | None = None
    after_connect_timeout: float = 15.0
    idle_interval: float = 1.0
    ping_timeout: float = 5.0
    spin: float = DEFAULT_SPIN
    idle_limit: int | None = None
    connection_listeners: Sequence[ListenerSpec] = ()
    max_restarts: int = 3
    max_seconds: float = 5.0
    show_sensitive_data_on_connection_error: bool = False
    breaker_threshold: int = 5
    reconnect_log_interval: float = 10.0
    timeout: float = 15.0
    queue: bool = True
    queue_target: float = 0.05
    queue_interval: float = 2.0
    max_waiting: int = 0
    barge_window: float | None = None
    max_lifetime: tuple[float, float] | None = None
    disconnect_all_every: float | None = None
    disconnect_all_interval: float = 15.0
    log: Callable[[Any], object] | None = None
    checkout_retries: int = 3
    pool: str = "queue"
    ownership_mode: str = "auto"
    ownership_timeout: float | None = 120.0
    ownership_log: int | str | None = None
    post_checkout: Callable[..., Any] | None = None
    pre_checkin: Callable[..., Any] | None = None
    connect_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def barge_seconds(self) -> float:
        """``barge_window`` in seconds, its default (half of ``queue_target``) resolved."""
        return self.queue_target / 2 if self.barge_window is None else self.barge_window

    @property
    def elastic(self) -> bool:
        """Whether the pool grows and shrinks by itself (``min_size < max_size``)."""
        return self.min_size != self.max_size

    def __post_init__(self) -> None:
        for name in ("pool_size", "min_size", "max_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
        # Unset bounds are the size itself: a pool of fixed size (frozen, hence setattr).
        if self.min_size is None:
            object.__setattr__(self, "min_size", self.pool_size)
        if self.max_size is None:
            object.__setattr__(self, "max_size", max(self.pool_size, self.min_size or 0))
        assert self.min_size is not None and self.max_size is not None
        if not self.min_size <= self.pool_size <= self.max_size:
            raise ConfigurationError(
                f"min_size <= pool_size <= max_size must hold, got {self.min_size}, "
                f"{self.pool_size}, {self.max_size}")
        if self.max_server_connections is not None and (
                not isinstance(self.max_server_connections, int)
                or isinstance(self.max_server_connections, bool)
                or self.max_server_connections < 1):
            raise ConfigurationError(f"max_server_connections must be an integer >= 1 or "
                                     f"None, got {self.max_server_connections!r}")
        if not isinstance(self.budget_name, str) or not self.budget_name:
            raise ConfigurationError(f"budget_name must be a non-empty string, "
                                     f"got {self.budget_name!r}")
        if isinstance(self.replicas, str) or not all(
                isinstance(conninfo, str) and conninfo for conninfo in self.replicas):
            raise ConfigurationError("replicas must be a list of conninfo strings")
        if self.max_replica_lag is not None and not (
                isinstance(self.max_replica_lag, int | float) and self.max_replica_lag > 0):
            raise ConfigurationError(f"max_replica_lag must be a positive number or None, "
                                     f"got {self.max_replica_lag!r}")
        if not isinstance(self.max_idle, int | float) or self.max_idle <= 0:
            raise ConfigurationError(f"max_idle must be a positive number, got {self.max_idle!r}")
        backoff.new(self.backoff_type, self.backoff_min, self.backoff_max)  # validates
        for name in ("after_connect_timeout", "idle_interval", "ping_timeout", "max_seconds",
                     "timeout", "queue_target", "queue_interval", "reconnect_log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigurationError(f"{name} must be a positive number, got {value!r}")
        checked_spin(self.spin)
        if not isinstance(self.breaker_threshold, int) or self.breaker_threshold < 1:
            raise ConfigurationError(
                f"breaker_threshold must be an integer >= 1, got {self.breaker_threshold!r}")
        if self.idle_limit is not None and self.idle_limit < 0:
            raise ConfigurationError(f"idle_limit must be >= 0, got {self.idle_limit!r}")
        if self.barge_window is not None and (
            not isinstance(self.barge_window, int | float) or self.barge_window < 0
        ):
            raise ConfigurationError(
                f"barge_window must be None or >= 0, got {self.barge_window!r}")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ConfigurationError(
                f"max_waiting must be an integer >= 0, got {self.max_waiting!r}")
        if self.max_lifetime is not None:
            try:
                low, high = (float(x) for x in self.max_lifetime)
            except (TypeError, ValueError):
                low = high = -1.0
            if not 0 < low <= high:
                raise ConfigurationError(
                    f"max_lifetime must be (min, max) seconds with 0 < min <= max, "
                    f"got {self.max_lifetime!r}")
        if self.disconnect_all_every is not None and not self.disconnect_all_every > 0:
            raise ConfigurationError(
                f"disconnect_all_every must be a positive number or None, "
                f"got {self.disconnect_all_every!r}")
        if not self.disconnect_all_interval >= 0:
            raise ConfigurationError(
                f"disconnect_all_interval must be >= 0, got {self.disconnect_all_interval!r}")
        if self.max_restarts < 0:
            raise ConfigurationError(f"max_restarts must be >= 0, got {self.max_restarts!r}")
        if not isinstance(self.checkout_retries, int) or self.checkout_retries < 0:
            raise ConfigurationError(
                f"checkout_retries must be an integer >= 0, got {self.checkout_retries!r}")
        if self.pool not in ("queue", "ownership"):
            raise ConfigurationError(
                f"pool must be 'queue' or 'ownership', got {self.pool!r}")
        if self.ownership_mode not in ("auto", "manual"):
            raise ConfigurationError(
                f"ownership_mode must be 'auto' or 'manual', got {self.ownership_mode!r}")
        if self.ownership_timeout is not None and not (
            isinstance(self.ownership_timeout, int | float) and self.ownership_timeout > 0
        ):
            raise ConfigurationError(f"ownership_timeout must be a positive number or None, "
                                     f"got {self.ownership_timeout!r}")
        if self.ownership_log is not None and not isinstance(
            logging.getLevelName(self.ownership_log) if isinstance(self.ownership_log, str)
            else self.ownership_log, int
        ):
            raise ConfigurationError(
                f"ownership_log must be a logging level or None, got {self.ownership_log!r}")
        for name in ("configure", "after_connect", "log", "post_checkout", "pre_checkin"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ConfigurationError(f"{name} must be callable, got {value!r}")

    @property
    def effective_idle_limit(self) -> int:
        return self.pool_size if self.idle_limit is None else self.idle_limit

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> PoolOptions:
        """Build options, rejecting unknown names (a typo should not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown pool option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if options.get("min_size") is not None and "pool_size" not in options:
            # An elastic pool starts at its minimum.
            options = {**options, "pool_size": options["min_size"]}
        return cls(**options)


class PoolStartOptions(TypedDict, total=False):
    """The options of :meth:`dbpool.pool.Pool.start`, for type checkers: a misspelt
    name is an error before the code runs.  The fields of :class:`PoolOptions`,
    but ``pool``, which ``Pool.start`` takes itself; a test checks the two agree.
    """

    pool_size: int
    min_size: int | None
    max_size: int | None
    max_idle: float
    max_server_connections: int | None
    budget_name: str
    replicas: Sequence[str]
    max_replica_lag: float | None
    name: str
    backoff_type: Literal["stop", "exp", "rand", "rand_exp"]
    backoff_min: float | None
    backoff_max: float | None
    configure: Callable[[dict[str, Any]], Mapping[str, Any]] | None
    after_connect: Callable[[Any], object] | None
    after_connect_timeout: float
    idle_interval: float
    ping_timeout: float
    spin: float
    idle_limit: int | None
    connection_listeners: Sequence[ListenerSpec]
    max_restarts: int
    max_seconds: float
    show_sensitive_data_on_connection_error: bool
    breaker_threshold: int
    reconnect_log_interval: float
    timeout: float
    queue: bool
    queue_target: float
    queue_interval: float
    max_waiting: int
    barge_window: float | None
    max_lifetime: tuple[float, float] | None
    disconnect_all_every: float | None
    disconnect_all_interval: float
    log: Callable[[Any], object] | None
    checkout_retries: int
    ownership_mode: Literal["auto", "manual"]
    ownership_timeout: float | None
    ownership_log: int | str | None
    post_checkout: Callable[..., Any] | None
    pre_checkin: Callable[..., Any] | None
    connect_kwargs: Mapping[str, Any]


def checkout_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The checkout keywords of a pool call (``timeout``, ``queue``, ``caller``),
    all present; anything else raises TypeError, as a misspelt keyword would."""
    unknown = set(opts) - {"timeout", "queue", "caller"}
    if unknown:
        raise TypeError(f"unexpected option(s): {', '.join(sorted(unknown))}")
    return {"timeout": opts.get("timeout"), "queue": opts.get("queue"),
            "caller": opts.get("caller")}
