"""The backend's dbpool pools: one per distinct set of connection parameters.

``OPTIONS["dbpool"]`` (:data:`OPTIONS_KEY`) is read by :func:`parse_options`:
the options of :meth:`dbpool.pool.Pool.start`, plus the backend's own
``hold_timeout``.  :func:`lender_for` starts a pool the first time a set of
libpq parameters and pool options is asked for, and returns the same pool's
:class:`~dbpool.dbapi.lending.Lender` every later time, from any thread.
Pools live until :func:`close_pool` or :func:`close_pools`, which also runs
at interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from psycopg.conninfo import make_conninfo

from dbpool.dbapi.lending import Lender
from dbpool.errors import ConfigurationError
from dbpool.pool import Pool, PoolOptions

__all__ = ["OPTIONS_KEY", "PoolConfig", "close_pool", "close_pools", "conninfo", "lender_for",
           "parse_options", "running_pool", "running_pools"]

logger = logging.getLogger("dbpool.django")

#: The key of a database's ``OPTIONS`` that holds its dbpool options.
OPTIONS_KEY = "dbpool"

#: Options of ``OPTIONS["dbpool"]`` that are the backend's, not ``Pool.start``'s.
_BACKEND_OPTIONS = frozenset({"hold_timeout"})

#: ``Pool.start`` options the backend sets itself, and why a user may not.
_REFUSED_OPTIONS = {
    "pool": "the backend lends from a plain queue pool; ownership pools are for Elixir-style "
            "callers, not for Django's per-thread connections",
    "connect_kwargs": "libpq parameters come from NAME, USER, PASSWORD, HOST, PORT and the "
                      "other OPTIONS keys, as for django.db.backends.postgresql",
}


@dataclass(frozen=True)
class PoolConfig:
    """A database's ``OPTIONS["dbpool"]``, checked.

    ``start_options`` go to :meth:`~dbpool.pool.Pool.start`; ``hold_timeout``
    to the :class:`~dbpool.dbapi.lending.Lender` (None: Django holds a
    connection until it closes it); ``key`` tells two configurations apart.
    """

    start_options: Mapping[str, Any]
    hold_timeout: float | None
    key: Hashable


#: Each connect reads the settings again (Django's may change between two), but
#: parsing them costs as much as the checkout: results are kept by content.
#: A few distinct settings per process; the bound only stops a runaway.
_CACHE_LIMIT = 256
_configs: dict[tuple[Hashable, str], PoolConfig] = {}
_conninfos: dict[Hashable, str] = {}


def parse_options(value: object, alias: str) -> PoolConfig:
    """Check ``OPTIONS["dbpool"]`` of database ``alias``; ImproperlyConfigured if unusable.

    Every name and value is checked here, as ``Pool.start`` would check it, so
    that a typo fails when the alias is first used rather than at its first
    query (or, for a value, in a pool's thread).
    """
    key = (_freeze(value), alias)
    config = _configs.get(key)
    if config is None:
        config = _parse_options(value, alias)
        _remember(_configs, key, config)
    return config


def conninfo(params: Mapping[str, Any]) -> str:
    """``make_conninfo("", **params)``, kept by content (psycopg.ProgrammingError for a
    parameter libpq does not know)."""
    key = _freeze(params)
    made = _conninfos.get(key)
    if made is None:
        made = make_conninfo("", **params)
        _remember(_conninfos, key, made)
    return made


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _parse_options(value: object, alias: str) -> PoolConfig:
    where = f"DATABASES[{alias!r}]['OPTIONS'][{OPTIONS_KEY!r}]"
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(
            f"{where} must be a dict of dbpool pool options, got {value!r}")
    for name in value:
        if name in _REFUSED_OPTIONS:
            raise ImproperlyConfigured(
                f"{where}: {name!r} cannot be set here: {_REFUSED_OPTIONS[name]}")
    hold_timeout = value.get("hold_timeout")
    if hold_timeout is not None and (
        isinstance(hold_timeout, bool) or not isinstance(hold_timeout, int | float)
        or hold_timeout <= 0
    ):
        raise ImproperlyConfigured(
            f"{where}: hold_timeout must be a positive number of seconds or None, "
            f"got {hold_timeout!r}")
    start_options = {k: v for k, v in value.items() if k not in _BACKEND_OPTIONS}
    try:
        PoolOptions.from_kwargs({**start_options, "pool": "queue"})
    except ConfigurationError as exc:
        raise ImproperlyConfigured(f"{where}: {exc}") from exc
    except TypeError as exc:  # a value of a type the dataclass cannot even compare
        raise ImproperlyConfigured(f"{where}: {exc}") from exc
    return PoolConfig(start_options, hold_timeout, _freeze(value))


def _freeze(value: object) -> Hashable:
    """A hashable stand-in for an options value: containers by content, the rest as
    themselves with their type (``True`` is not ``1`` here), callables and listeners
    by identity, anything unhashable by id (what holds the key holds the object,
    so the id is not reused meanwhile)."""
    if isinstance(value, Mapping):
        return tuple(sorted(((str(k), _freeze(v)) for k, v in value.items()),
                            key=lambda kv: kv[0]))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, set | frozenset):
        return frozenset(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value), value)


@dataclass(frozen=True)
class _Entry:
    pool: Pool
    lender: Lender


_lock = threading.Lock()
_pools: dict[tuple[str, Hashable], _Entry] = {}


def lender_for(conninfo: str, config: PoolConfig, name: str, described: str) -> Lender:
    """The lender of the pool for ``conninfo`` and ``config``, started now if need be.

    ``name`` names a new pool unless ``config`` names it; ``described`` says
    where it connects, for the log (``conninfo`` may hold a password).  A pool
    that stopped by itself (e.g. too many crashes) is replaced.  Thread-safe:
    threads asking at once share one pool.
    """
    key = (conninfo, config.key)
    with _lock:
        entry = _pools.get(key)
        if entry is not None and entry.pool.alive:
            return entry.lender
        if entry is not None:
            logger.warning("dbpool pool %s for %s had stopped (%r); starting another",
                           entry.pool.name, described, entry.pool.exit_error)
        # Pool.start returns at once (connections open in the background), so
        # holding the lock costs the other threads nothing worth a finer lock.
        pool = Pool.start(conninfo, **{"name": name, **config.start_options})
        entry = _Entry(pool, Lender(pool, hold_timeout=config.hold_timeout))
        _pools[key] = entry
    logger.info("started dbpool pool %s for %s (pool_size=%d)", pool.name, described,
                pool.options.pool_size)
    return entry.lender


def running_pool(conninfo: str, config: PoolConfig) -> Pool | None:
    """The pool :func:`lender_for` would lend from for these, if it is running."""
    with _lock:
        entry = _pools.get((conninfo, config.key))
    return entry.pool if entry is not None and entry.pool.alive else None


def running_pools() -> list[Pool]:
    """Every pool the backend has started and not closed."""
    with _lock:
        return [entry.pool for entry in _pools.values()]


def close_pool(conninfo: str, config: PoolConfig, timeout: float = 30.0) -> bool:
    """Stop the pool for these, if any: its idle connections close now, lent ones
    when they are given back (dbpool's ``Pool.close``).

    Returns whether there was one.  The next :func:`lender_for` starts anew.
    """
    with _lock:
        entry = _pools.pop((conninfo, config.key), None)
    if entry is None:
        return False
    entry.pool.close(timeout)
    logger.info("closed dbpool pool %s", entry.pool.name)
    return True


def close_pools(timeout: float = 30.0) -> None:
    """Stop every pool the backend started (it runs at interpreter exit too)."""
    with _lock:
        entries = list(_pools.values())
        _pools.clear()
    for entry in entries:
        try:
            entry.pool.close(timeout)
        except Exception:  # at exit, one pool's failure must not keep the others open
            logger.warning("dbpool pool %s did not close cleanly", entry.pool.name,
                           exc_info=True)
    if entries:
        logger.info("closed %d dbpool pool(s)", len(entries))


# Registered after dbpool.pool's own exit hook, so it runs first (atexit is
# LIFO) and the registry is emptied by the code that filled it.
atexit.register(close_pools)
