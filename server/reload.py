"""Live reload: ``SIGHUP`` (or the admin ``reload``) reads the configuration again.

What changes without a restart, with nothing in flight failing:

- the clients' limits and permissions (``[clients.NAME]``), at their next request;
- request settings the front end reads per request (``timeout``,
  ``heartbeat_timeout``, ``lease_max``, ``max_message_size``);
- the log level;
- a pool added (``[pools.NAME]``) starts and serves; a pool removed drains
  (its work in flight finishes) and stops;
- a pool whose ``dsn`` changed has its connections replaced, staggered over
  :data:`RECYCLE_SPREAD` seconds (``disconnect_all``), the new ones to the new
  DSN;
- a pool's size grows or shrinks (:meth:`dbpool.pool.Pool.resize`: idle
  connections past it close, lent ones when they come back);
- the authorized CURVE keys (see :mod:`dbpool.server.auth`).

A configuration that does not load is refused with one log line, and the
old one stays.  A change that needs a restart (a bound endpoint, CURVE
itself, a pool's other options) is named in a warning and left as it was.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbpool.errors import DBPoolError
from dbpool.pool import Pool

from .clients import ANONYMOUS, ANONYMOUS_POLICY
from .config import ServeConfig, mask_dsn

if TYPE_CHECKING:
    from .frontend import FrontEnd

__all__ = ["DsnHolder", "Reloader"]

logger = logging.getLogger("dbpool.server.reload")

#: Seconds over which a pool whose DSN changed replaces its connections.
RECYCLE_SPREAD = 5.0
#: Settings that only a restart changes.
_RESTART_SETTINGS = ("bind", "events_bind", "metrics_bind", "curve_secret_key",
                     "authorized_keys", "insecure", "pipeline_depth", "spin", "log_format")


class DsnHolder:
    """The DSN a pool connects to, changeable while it runs: the pool's ``configure``
    hook puts it into every connect attempt."""

    def __init__(self, dsn: str | None, configure: Callable[[Any], Any] | None) -> None:
        self.dsn = dsn
        self._configure = configure

    def __call__(self, opts: Any) -> Any:
        if self._configure is not None:
            opts = self._configure(opts)
        if self.dsn is not None:
            opts = {**opts, "conninfo": self.dsn}
        return opts


class Reloader:
    """Applies a configuration read again to a running server (see the module docstring).

    ``load`` reads the configuration from its sources; ``start_pool(route, dsn,
    options)`` starts one pool as the server does.  :meth:`reload` runs on the
    front end's loop (posted there by the signal handler or the admin op).
    """

    def __init__(self, front: FrontEnd, config: ServeConfig,
                 load: Callable[[], ServeConfig],
                 start_pool: Callable[[str, str | None, dict[str, Any]], Pool],
                 holders: dict[str, DsnHolder]) -> None:
        self.front = front
        self.config = config
        self._load = load
        self._start_pool = start_pool
        self.holders = holders

    def reload(self) -> None:
        try:
            new = self._load()
        except DBPoolError as error:
            logger.error("reload refused, the configuration stays as it was: %s", error)
            return
        except Exception as error:  # anything else that stops a load is refused the same
            logger.error("reload refused, the configuration stays as it was: %s: %s",
                         type(error).__name__, error)
            return
        old, self.config = self.config, new
        for name in _RESTART_SETTINGS:
            if getattr(old, name) != getattr(new, name):
                logger.warning("reload: %s changed; it takes a restart", name)
        logging.getLogger().setLevel(new.log_level_number())
        front = self.front
        front.config = new
        for state in front.client_states.values():
            state.policy = (new.clients.get(ANONYMOUS, ANONYMOUS_POLICY)
                            if front.authority is None else new.policy(state.name))
        self._reload_pools(old, new)
        front.reread_keys()
        if old.clients != new.clients:
            # Applied subscriptions outlive a policy: judge them all again.
            front.rebind_events()
        logger.info("reloaded: %s", new.describe())

    def _reload_pools(self, old: ServeConfig, new: ServeConfig) -> None:
        before = {route: (dsn, options) for route, dsn, options in old.pool_specs()}
        after = {route: (dsn, options) for route, dsn, options in new.pool_specs()}
        front = self.front
        for route, (dsn, options) in after.items():
            if route not in before:
                logger.info("reload: pool %s added", route)
                front.add_pool(route, self._start_pool(route, dsn, options))
                continue
            old_dsn, old_options = before[route]
            if dsn != old_dsn:
                shown = "the embedded PostgreSQL" if dsn is None else mask_dsn(dsn, drop=True)
                logger.info("reload: pool %s now connects to %s; replacing its connections "
                            "over %g s", route, shown, RECYCLE_SPREAD)
                self.holders[route].dsn = dsn
                front.served[route].pool.disconnect_all(RECYCLE_SPREAD)
            size = options.get("pool_size")
            # An elastic pool sizes itself: its bounds changed take a restart (below).
            if (size != old_options.get("pool_size") and isinstance(size, int)
                    and options.get("min_size") is None):
                logger.info("reload: pool %s resized to %d", route, size)
                threading.Thread(target=front.served[route].pool.resize, args=(size,),
                                 name=f"dbpool-resize-{route}", daemon=True).start()
            changed = sorted(key for key in {*options, *old_options}
                             if key not in ("connection_listeners", "pool_size")
                             and options.get(key) != old_options.get(key))
            if changed:
                logger.warning("reload: pool %s: %s changed; it takes a restart", route,
                               ", ".join(changed))
        for route in before.keys() - after.keys():
            served = front.served.get(route)
            if served is None:
                continue
            logger.info("reload: pool %s removed; draining it", route)
            front.remove_pool(route)
            threading.Thread(target=_drain_and_stop, args=(served.pool,),
                             name=f"dbpool-remove-{route}", daemon=True).start()


def _drain_and_stop(pool: Pool) -> None:
    try:
        pool.drain(30.0)
    finally:
        pool.stop()
