"""The configuration of ``dbpool serve``: :class:`ServeConfig` and where it comes from.

Every setting is read from four sources; the first that sets it wins:

=====  ==============================  =========================================
Rank   Source                          Example
=====  ==============================  =========================================
1      command-line flag               ``dbpool serve --pool-size 20``
2      ``DBPOOL_*`` environment        ``DBPOOL_POOL_SIZE=20``
3      TOML file (``--config PATH``    ``pool_size = 20``
       or ``$DBPOOL_CONFIG``)
4      default                         ``10``
=====  ==============================  =========================================

The settings, with their flags, variables and defaults:

=================  ===================  ========================  ================================
Field              Flag                 Variable                  Default
=================  ===================  ========================  ================================
dsn                --dsn                DBPOOL_DSN                None: embedded PostgreSQL
bind               --bind               DBPOOL_BIND               tcp://127.0.0.1:7432
events_bind        --events-bind        DBPOOL_EVENTS_BIND        tcp://127.0.0.1:7433
pool_size          --pool-size          DBPOOL_POOL_SIZE          10
name               --name               DBPOOL_NAME               dbpool
timeout            --timeout            DBPOOL_TIMEOUT            15.0 s
backoff_type       --backoff-type       DBPOOL_BACKOFF_TYPE       rand_exp
backoff_min        --backoff-min        DBPOOL_BACKOFF_MIN        1.0 s, or backoff_max if lower
backoff_max        --backoff-max        DBPOOL_BACKOFF_MAX        30.0 s, or backoff_min if higher
breaker_threshold  --breaker-threshold  DBPOOL_BREAKER_THRESHOLD  5
max_message_size   --max-message-size   DBPOOL_MAX_MESSAGE_SIZE   16 MiB, in bytes
heartbeat_timeout  --heartbeat-timeout  DBPOOL_HEARTBEAT_TIMEOUT  10.0 s
lease_max          --lease-max          DBPOOL_LEASE_MAX          300.0 s
pipeline_depth     --pipeline-depth     DBPOOL_PIPELINE_DEPTH     8
grace              --grace              DBPOOL_GRACE              10.0 s
spin               --spin               DBPOOL_SPIN               0.0003 s
log_level          --log-level          DBPOOL_LOG_LEVEL          INFO
curve_secret_key   --curve-secret-key   DBPOOL_CURVE_SECRET_KEY   None: no CURVE
authorized_keys    --authorized-keys    DBPOOL_AUTHORIZED_KEYS    None: no CURVE
insecure           --insecure           DBPOOL_INSECURE           false
metrics_bind       --metrics-bind       DBPOOL_METRICS_BIND       None: no HTTP endpoint
wait_for_database  --wait-for-database  DBPOOL_WAIT_FOR_DATABASE  None: wait as long as it takes
log_format         --log-format         DBPOOL_LOG_FORMAT         text
pool_options       (none)               (none)                    {}: the TOML [pool] table
=================  ===================  ========================  ================================

- ``timeout`` is the default deadline of a remote request, the wait for a
  connection included; ``pipeline_depth`` (>= 1) is how many statements from
  different clients may be queued on one connection; ``grace`` is how long a
  shutdown waits for requests in flight; ``spin`` is how long the request
  loop polls before it sleeps while traffic is steady, for a client's next
  request or a short statement's answer, not through a long one (see
  :mod:`dbpool.server.frontend`).
- ``backoff_type``, ``backoff_min`` and ``backoff_max`` are the delays
  between reconnect attempts (see :mod:`dbpool.actors.backoff`; ``stop``
  makes a failed connect stop the pool); ``breaker_threshold`` is how many
  consecutive failed connects open the circuit (see
  :mod:`dbpool.pool.breaker`).  Their defaults are those of
  :class:`~dbpool.pool.options.PoolOptions`: the bounds' None means 1.0 and
  30.0 s, moved out of the way of the one bound given (``backoff_max = 0.5``
  alone means a minimum of 0.5).  The pool's own checks judge their values,
  each alone and the bounds together (minimum <= maximum unless ``stop``).
- The TOML file's top-level keys are the field names above (``dsn``,
  ``pool_size``...); its ``[pool]`` table holds further options of
  :meth:`dbpool.pool.Pool.start` (``queue_target``, ``max_lifetime``,
  ``connect_kwargs``...), checked against
  :class:`~dbpool.pool.options.PoolOptions`.  The pool options that are
  settings here (``pool_size``, ``name``, ``timeout``, ``backoff_type``,
  ``backoff_min``, ``backoff_max``, ``breaker_threshold``) belong at the top
  level, not in ``[pool]``.  For files written before they were settings,
  ``[pool]`` may still hold the last four: such a key counts as the top-level
  key, with a warning to move it; setting it in both places is an error.
- ``curve_secret_key`` (the server's ``NAME.key_secret`` from ``dbpool
  keygen``, or its secret key as Z85 text) and ``authorized_keys`` (a
  folder of the clients' ``NAME.key`` files) turn on CURVE: only those
  clients may connect, and everything is encrypted (see
  :mod:`dbpool.server.auth`).  They go together.  Without them, binding an
  address other than loopback (``127.0.0.0/8``, ``::1``, ``localhost``;
  ``ipc://`` and ``inproc://`` are local too) is refused unless
  ``insecure`` is true (``--insecure``; ``DBPOOL_INSECURE=1``), and then
  every start logs a warning: anyone who reaches the port runs any SQL as
  the pool's user.
- ``metrics_bind`` (``host:port``) serves ``/metrics`` (Prometheus),
  ``/health/live`` and ``/health/ready`` over HTTP (see
  :mod:`dbpool.server.metrics`; the ``metrics`` extra).
- An environment variable set to the empty string counts as unset.
- A bad value raises :class:`~dbpool.errors.ConfigurationError` naming its
  source: ``DBPOOL_POOL_SIZE: expected an integer >= 1, got 'abc'``,
  ``config.toml: unknown key 'pool_sise'``.
- The DSN's password never appears in ``repr``/``str`` of a config, in
  :meth:`ServeConfig.describe` or in an error message.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, cast

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dbpool.actors import backoff
from dbpool.errors import ConfigurationError
from dbpool.pool.options import PoolOptions

from .clients import ClientPolicy
from .served_pool import DEFAULT_POOL

__all__ = ["ENV_PREFIX", "ServeConfig", "add_serve_arguments", "load_config", "mask_dsn"]

logger = logging.getLogger("dbpool.server.config")

ENV_PREFIX = "DBPOOL_"
_MASK = "******"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Pool options that ServeConfig sets itself: they go at the top level, not in [pool].
_POOL_SETTINGS = ("pool_size", "name", "timeout", "backoff_type", "backoff_min", "backoff_max",
                  "breaker_threshold")
#: Of those, the ones that [pool] held before they were settings: still read from there
#: (as the top-level key, with a warning) unless the top level sets them too.
_MOVED_POOL_KEYS = frozenset({"backoff_type", "backoff_min", "backoff_max",
                              "breaker_threshold"})
#: Checked together by the pool (backoff.new), under the type in effect.
_BACKOFF_BOUNDS = ("backoff_min", "backoff_max")
_POOL_DEFAULTS = PoolOptions()
#: The policy of a client that has no [clients.NAME] table.
_DEFAULT_POLICY = ClientPolicy()
#: What a pool's or a client's name may be.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _empty_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class ServeConfig:
    """The settings of ``dbpool serve``; see the module docstring for each one."""

    dsn: str | None = None
    bind: str = "tcp://127.0.0.1:7432"
    events_bind: str = "tcp://127.0.0.1:7433"
    pool_size: int = 10
    name: str = "dbpool"
    timeout: float = 15.0
    backoff_type: str = _POOL_DEFAULTS.backoff_type
    backoff_min: float | None = _POOL_DEFAULTS.backoff_min
    backoff_max: float | None = _POOL_DEFAULTS.backoff_max
    breaker_threshold: int = _POOL_DEFAULTS.breaker_threshold
    max_message_size: int = 16 * 2**20
    heartbeat_timeout: float = 10.0
    lease_max: float = 300.0
    pipeline_depth: int = 8
    grace: float = 10.0
    spin: float = 0.0003
    log_level: str = "INFO"
    curve_secret_key: str | None = None
    authorized_keys: str | None = None
    insecure: bool = False
    metrics_bind: str | None = None
    wait_for_database: float | None = None
    log_format: str = "text"
    pool_options: Mapping[str, Any] = field(default_factory=_empty_mapping)
    #: The ``[pools.NAME]`` tables: each pool's DSN and options beyond the top level's.
    pools: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty_mapping)
    #: The ``[clients.NAME]`` tables (see :mod:`dbpool.server.clients`).
    clients: Mapping[str, ClientPolicy] = field(default_factory=_empty_mapping)

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dsn" and value is not None:
                value = mask_dsn(value)
            elif f.name == "pool_options":
                value = _masked_pool_options(value)
            elif f.name == "pools":
                value = {name: _masked_pool_options(
                    {**table, "dsn": mask_dsn(table["dsn"])} if "dsn" in table else table)
                    for name, table in value.items()}
            parts.append(f"{f.name}={value!r}")
        return f"ServeConfig({', '.join(parts)})"

    __str__ = __repr__

    def describe(self) -> str:
        """A one-line summary for the start-up log line, without the password."""
        security = ("CURVE, clients in " + str(self.authorized_keys) if self.curve
                    else "no authentication")
        served = "; ".join(
            f"{'pool' if route == DEFAULT_POOL else 'pool ' + route} of "
            f"{options['pool_size']} on "
            f"{'embedded' if dsn is None else mask_dsn(dsn, drop=True)}"
            for route, dsn, options in self.pool_specs())
        return (f"{self.name}: requests on {self.bind}, events on {self.events_bind} "
                f"({security}), {served}")

    def pool_kwargs(self) -> dict[str, Any]:
        """The options :func:`~dbpool.server.serve.serve` gives :meth:`dbpool.pool.Pool.start`
        for the default pool: the pool settings above and the ``[pool]`` table."""
        return {**{key: getattr(self, key) for key in _POOL_SETTINGS}, **self.pool_options}

    def pool_specs(self) -> list[tuple[str, str | None, dict[str, Any]]]:
        """Each pool to serve: ``(name, dsn, Pool.start options)``.

        The top level (``dsn``, the pool settings, ``[pool]``) is the pool
        named ``default``, unless ``[pools.NAME]`` tables are given and the top
        level sets no ``dsn``.  A ``[pools.NAME]`` pool starts from the top
        level's options, overrides them with its table, and is named NAME.
        """
        specs: list[tuple[str, str | None, dict[str, Any]]] = []
        if not self.pools or (self.dsn is not None and DEFAULT_POOL not in self.pools):
            specs.append((DEFAULT_POOL, self.dsn, _elastic_start(self.pool_kwargs())))
        for route, table in self.pools.items():
            options = {**self.pool_kwargs(), **table, "name": route}
            dsn = options.pop("dsn", None)
            specs.append((route, dsn, _elastic_start(options)))
        return specs

    def policy(self, client: str) -> ClientPolicy:
        """What ``client`` may do: its ``[clients.NAME]`` table, else the defaults."""
        return self.clients.get(client) or _DEFAULT_POLICY

    @property
    def curve(self) -> bool:
        """Whether clients authenticate with CURVE keys."""
        return self.curve_secret_key is not None

    def exposed_endpoints(self) -> list[str]:
        """The bound endpoints that other machines may reach (not loopback or local)."""
        return [endpoint for endpoint in (self.bind, self.events_bind)
                if not _is_local(endpoint)]

    def log_level_number(self) -> int:
        """:attr:`log_level` as a :mod:`logging` level number."""
        return logging.getLevelNamesMapping()[self.log_level]


def mask_dsn(dsn: str, *, drop: bool = False) -> str:
    """``dsn`` with its password replaced by ``******`` (or removed if ``drop``).

    The result is a ``key=value`` conninfo string even if ``dsn`` was a URI.
    A DSN that does not parse is hidden whole, since any part of it may be
    the password.
    """
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable DSN hidden>"
    if "password" not in params:
        return dsn
    if drop:
        del params["password"]
    else:
        params["password"] = _MASK
    return make_conninfo("", **params)


def _masked_pool_options(options: Mapping[str, Any]) -> dict[str, Any]:
    masked = dict(options)
    kwargs = masked.get("connect_kwargs")
    if isinstance(kwargs, Mapping) and "password" in kwargs:
        masked["connect_kwargs"] = {**kwargs, "password": _MASK}
    return masked


# -- values ------------------------------------------------------------------------

#: ``parse(value, source, from_text)``: a checked value or ConfigurationError.  With
#: ``from_text`` (flags, environment) a number may be given as a string.
_Parser = Callable[[object, str, bool], object]


def _fail(source: str, expected: str, value: object) -> ConfigurationError:
    shown = f"{value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
    return ConfigurationError(f"{source}: expected {expected}, got {shown}")


def _integer(minimum: int | None) -> _Parser:
    """An integer; with ``minimum`` None, its range is left to another check."""
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"

    def parse(value: object, source: str, from_text: bool) -> int:
        if isinstance(value, str) and from_text:
            try:
                number = int(value.strip())
            except ValueError:
                raise _fail(source, expected, value) from None
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise _fail(source, expected, value)
        if minimum is not None and number < minimum:
            raise _fail(source, expected, value)
        return number

    return parse


def _number(value: object, source: str, from_text: bool, expected: str) -> float:
    """``value`` as a finite float, else ConfigurationError ``expected ...``."""
    if isinstance(value, str) and from_text:
        try:
            number = float(value.strip())
        except ValueError:
            raise _fail(source, expected, value) from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        raise _fail(source, expected, value)
    if not math.isfinite(number):
        raise _fail(source, expected, value)
    return number


def _seconds(*, zero_ok: bool) -> _Parser:
    expected = "a number of seconds >= 0" if zero_ok else "a number of seconds > 0"

    def parse(value: object, source: str, from_text: bool) -> float:
        number = _number(value, source, from_text, expected)
        if number < 0 or (number == 0 and not zero_ok):
            raise _fail(source, expected, value)
        return number

    return parse


def _any_seconds(value: object, source: str, from_text: bool) -> float:
    """A finite number of seconds, its range left to another check."""
    return _number(value, source, from_text, "a finite number of seconds")


def _pool_checked(name: str, convert: _Parser) -> _Parser:
    """``convert`` (a string of a flag or variable to a number...), then the pool's own
    check of its option ``name``: the pool's rules and messages, not a copy of them."""

    def parse(value: object, source: str, from_text: bool) -> object:
        converted = convert(value, source, from_text)
        _check_pool_options({name: converted}, f"{source}: ")
        return converted

    return parse


def _check_pool_options(options: Mapping[str, Any], prefix: str) -> None:
    """Check ``options`` as :class:`PoolOptions` does; its message follows ``prefix``."""
    try:
        PoolOptions.from_kwargs(options)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{prefix}{exc}") from None
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigurationError(f"{prefix}invalid value: {exc}") from None


def _text(value: object, source: str, from_text: bool) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, "a non-empty string", value)
    return value.strip()


def _endpoint(value: object, source: str, from_text: bool) -> str:
    text = value.strip() if isinstance(value, str) else None
    if not text or "://" not in text or text.startswith("://"):
        raise _fail(source, "a ZeroMQ endpoint such as 'tcp://127.0.0.1:7432'", value)
    return text


def _dsn(value: object, source: str, from_text: bool) -> str:
    if not isinstance(value, str):
        # Not a string, so not a password either: safe to show its type only.
        raise ConfigurationError(
            f"{source}: expected a libpq conninfo string or URI, got a {type(value).__name__}")
    if not value.strip():
        raise ConfigurationError(
            f"{source}: expected a libpq conninfo string or URI, got an empty string")
    try:
        conninfo_to_dict(value)
    except Exception:
        # psycopg's message may quote part of the string, password included.
        raise ConfigurationError(
            f"{source}: not a valid libpq conninfo string or URI "
            "(its text is not shown: it may hold a password)") from None
    return value


def _path(value: object, source: str, from_text: bool) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, "a path (or a key as Z85 text)", value)
    return value.strip()


def _host_port(value: object, source: str, from_text: bool) -> str:
    text = value.strip() if isinstance(value, str) else ""
    host, _, port = text.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise _fail(source, "host:port such as 127.0.0.1:9187", value)
    return text


def _boolean(value: object, source: str, from_text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_text and isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise _fail(source, "true or false" if not from_text else "1/true/yes or 0/false/no",
                value)


def _is_local(endpoint: str) -> bool:
    """Whether only this machine can reach ``endpoint`` (loopback, ipc, inproc)."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if ";" in host:  # tcp://source;destination: the bound side is the destination
        host = host.rpartition(";")[2]
    if host == "localhost" or host == "::1":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or a wildcard: reachable from outside
        return False


def _log_format(value: object, source: str, from_text: bool) -> str:
    if isinstance(value, str) and value.strip().lower() in ("text", "json"):
        return value.strip().lower()
    raise _fail(source, "text or json", value)


def _log_level(value: object, source: str, from_text: bool) -> str:
    if isinstance(value, str) and value.strip().upper() in _LOG_LEVELS:
        return value.strip().upper()
    raise _fail(source, f"a log level ({', '.join(_LOG_LEVELS)})", value)


@dataclass(frozen=True)
class _Setting:
    field: str
    parse: _Parser
    help: str

    @property
    def metavar(self) -> str:
        return _METAVARS.get(self.field, self.field.upper())

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()


_SETTINGS: tuple[_Setting, ...] = (
    _Setting("dsn", _dsn, "libpq conninfo or URI of the PostgreSQL server"),
    _Setting("bind", _endpoint, "ZeroMQ endpoint of the request (ROUTER) socket"),
    _Setting("events_bind", _endpoint, "ZeroMQ endpoint of the event (PUB) socket"),
    _Setting("pool_size", _integer(1), "connections kept open"),
    _Setting("name", _text, "the pool's name, in logs and events"),
    _Setting("timeout", _seconds(zero_ok=False),
             "default deadline in seconds of a remote request, the wait for a connection "
             "included"),
    _Setting("backoff_type", _pool_checked("backoff_type", _text),
             "delays between reconnect attempts: stop (a failed connect stops the pool), "
             "exp, rand or rand_exp"),
    _Setting("backoff_min", _pool_checked("backoff_min", _any_seconds),
             "shortest delay between reconnect attempts, in seconds"),
    _Setting("backoff_max", _pool_checked("backoff_max", _any_seconds),
             "longest delay between reconnect attempts, in seconds"),
    _Setting("breaker_threshold", _pool_checked("breaker_threshold", _integer(None)),
             "consecutive failed connects that open the circuit (then requests fail at once)"),
    _Setting("max_message_size", _integer(1), "largest request body accepted, in bytes",),
    _Setting("heartbeat_timeout", _seconds(zero_ok=False),
             "seconds of silence after which a session's leases end"),
    _Setting("lease_max", _seconds(zero_ok=False),
             "longest a transaction lease may last, in seconds"),
    _Setting("pipeline_depth", _integer(1),
             "statements from different clients queued on one connection"),
    _Setting("grace", _seconds(zero_ok=True), "seconds a shutdown waits for requests in flight",),
    _Setting("spin", _seconds(zero_ok=True),
             "seconds the request loop keeps polling, yielding the CPU, before it sleeps "
             "(while traffic is steady; 0: always sleep)"),
    _Setting("log_level", _log_level, f"logging level ({', '.join(_LOG_LEVELS)})"),
    _Setting("log_format", _log_format,
             "text, or json: one JSON object a line (time, level, logger, message, and "
             "fields such as pool, client, op, reason)"),
    _Setting("curve_secret_key", _path,
             "the server's secret key file (NAME.key_secret from `dbpool keygen`): turns on "
             "CURVE authentication and encryption, with --authorized-keys"),
    _Setting("authorized_keys", _path,
             "folder of the authorized clients' public key files (NAME.key; the client's "
             "name is NAME); SIGHUP re-reads it"),
    _Setting("metrics_bind", _host_port,
             "host:port of the HTTP endpoint for /metrics (Prometheus), /health/live and "
             "/health/ready (needs the metrics extra)"),
    _Setting("wait_for_database", _seconds(zero_ok=False),
             "exit 1 if a pool has no connection up this many seconds after the start "
             "(ready is printed only once every pool has one)"),
    _Setting("insecure", _boolean,
             "allow binding an address other than loopback without CURVE (anyone who "
             "reaches it runs any SQL as the pool's user)"),
)
#: Settings that are switches: a flag without a value.
_SWITCHES = frozenset({"insecure"})
_BY_FIELD = {s.field: s for s in _SETTINGS}
_METAVARS = {
    "bind": "ENDPOINT", "events_bind": "ENDPOINT", "pool_size": "N", "timeout": "SECONDS",
    "backoff_type": "TYPE", "backoff_min": "SECONDS", "backoff_max": "SECONDS",
    "breaker_threshold": "N",
    "max_message_size": "BYTES", "heartbeat_timeout": "SECONDS", "lease_max": "SECONDS",
    "pipeline_depth": "N", "grace": "SECONDS", "spin": "SECONDS", "log_level": "LEVEL",
    "curve_secret_key": "PATH", "authorized_keys": "FOLDER", "metrics_bind": "HOST:PORT",
    "wait_for_database": "SECONDS", "log_format": "FORMAT",
}
#: What --help shows as the default of a setting whose default is None.
_NONE_DEFAULTS = {
    "dsn": "the embedded PostgreSQL",
    "curve_secret_key": "none: no CURVE",
    "authorized_keys": "none: no CURVE",
    "metrics_bind": "none: no HTTP endpoint",
    "wait_for_database": "none: wait as long as it takes",
    "backoff_min": f"{backoff.DEFAULT_MIN}, or --backoff-max if lower",
    "backoff_max": f"{backoff.DEFAULT_MAX}, or --backoff-min if higher",
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``dbpool serve`` to ``parser``.

    Every flag defaults to None, so that :func:`load_config` can tell an
    unset flag from one set to the default and fall back on the environment
    and the config file.  Values are checked by :func:`load_config`, not by
    argparse, so that every bad value gets the same kind of error.
    """
    defaults = ServeConfig()
    for setting in _SETTINGS:
        default = getattr(defaults, setting.field)
        shown = _NONE_DEFAULTS[setting.field] if default is None else default
        if setting.field in _SWITCHES:
            parser.add_argument(
                setting.flag, dest=setting.field, default=None, action="store_const",
                const=True, help=f"{setting.help} (env {setting.env}=1)".replace("%", "%%"))
            continue
        parser.add_argument(
            setting.flag, dest=setting.field, default=None,
            metavar=setting.metavar,
            help=f"{setting.help} (env {setting.env}; default: {shown})".replace("%", "%%"))
    parser.add_argument(
        "--config", dest="config", default=None, metavar="PATH",
        help=f"TOML file of settings, with an optional [pool] table of further pool "
             f"options (env {ENV_PREFIX}CONFIG; default: none)")


# -- sources -----------------------------------------------------------------------


def _elastic_start(options: dict[str, Any]) -> dict[str, Any]:
    """An elastic pool (``min_size`` set) starts at its minimum; its ``max_size``, if
    not set, is the ``pool_size`` setting (always set here, to its default at least)."""
    if options.get("min_size") is None:
        return options
    maximum = options.get("max_size")
    return {**options, "pool_size": options["min_size"],
            "max_size": options["pool_size"] if maximum is None else maximum}


def load_config(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> ServeConfig:
    """Build the :class:`ServeConfig` from flags, environment, TOML file and defaults.

    ``args`` is a namespace from a parser given :func:`add_serve_arguments`
    (attributes it lacks count as unset).  Raises
    :class:`~dbpool.errors.ConfigurationError` naming the source of a bad
    value.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    #: Each source's values and where each came from, lowest rank first.
    layers: list[tuple[dict[str, Any], dict[str, str]]] = []
    path = _namespace_value(args, "config") or environ.get(ENV_PREFIX + "CONFIG") or None
    if path is not None:
        settings, pool_options, pools, clients = _read_toml(str(path))
        layers.append((settings, dict.fromkeys(settings, str(path))))
        values["pool_options"] = MappingProxyType(pool_options)
        values["pools"] = MappingProxyType(pools)
        values["clients"] = MappingProxyType(clients)
    env_raw = {s: (environ.get(s.env) or None, s.env) for s in _SETTINGS}
    flag_raw = {s: (_namespace_value(args, s.field), s.flag) for s in _SETTINGS}
    for raw_values in (env_raw, flag_raw):
        layer: dict[str, Any] = {}
        layer_origin: dict[str, str] = {}
        for setting, (raw, source) in raw_values.items():
            if raw is True:  # a switch given on the command line
                layer[setting.field] = True
                layer_origin[setting.field] = source
            elif raw is not None:
                layer[setting.field] = setting.parse(raw, source, True)
                layer_origin[setting.field] = source
        layers.append((layer, layer_origin))
    for layer, layer_origin in layers:
        values.update(layer)
        origin.update(layer_origin)
    # Every source that is read is checked whole, even where a higher one overrides it.
    backoff_type = values.get("backoff_type", _POOL_DEFAULTS.backoff_type)
    for layer, layer_origin in [*layers, (values, origin)]:
        _check_backoff_bounds(layer, layer_origin, backoff_type)
    config = ServeConfig(**values)
    _check_security(config, origin)
    _check_clients(config, str(path))
    logger.debug("configuration %r (from %s)", config,
                 ", ".join(f"{k}: {v}" for k, v in origin.items()) or "defaults only")
    return config


def _check_security(config: ServeConfig, origin: Mapping[str, str]) -> None:
    """CURVE's two settings go together; an exposed endpoint needs CURVE or ``insecure``."""
    if (config.curve_secret_key is None) != (config.authorized_keys is None):
        given, missing = (("curve_secret_key", "authorized_keys")
                          if config.curve_secret_key is not None
                          else ("authorized_keys", "curve_secret_key"))
        raise ConfigurationError(
            f"{origin.get(given, given)}: CURVE needs {missing} too ({_BY_FIELD[missing].flag})")
    exposed = config.exposed_endpoints()
    if exposed and not config.curve and not config.insecure:
        raise ConfigurationError(
            f"refusing to serve {', '.join(exposed)} without authentication: anyone who "
            "reaches it could run any SQL as the pool's user. Give --curve-secret-key and "
            "--authorized-keys (keys from `dbpool keygen`), bind 127.0.0.1, or pass "
            "--insecure to accept the risk")


def _check_clients(config: ServeConfig, path: str) -> None:
    """Every pool has a name of its own; a client's ``pools`` name pools that are served."""
    specs = config.pool_specs()
    names = [options["name"] for _, _, options in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigurationError(f"{path}: two pools are named {name!r} (the default "
                                     f"pool takes `name`, {config.name!r}); rename one")
    served = {route for route, _, _ in specs}
    for name, policy in config.clients.items():
        unknown = sorted((policy.pools or frozenset()) - served)
        if unknown:
            raise ConfigurationError(
                f"{path}: [clients.{name}] pools: no pool named {', '.join(unknown)} "
                f"(served: {', '.join(sorted(served))})")


def _namespace_value(args: argparse.Namespace, name: str) -> Any:
    return getattr(args, name, None)


def _check_backoff_bounds(
    values: Mapping[str, Any], origin: Mapping[str, str], backoff_type: str
) -> None:
    """The pool's check of the backoff bounds together (minimum <= maximum unless the
    type is ``stop``), naming where they came from."""
    if "backoff_min" in values and "backoff_max" in values:
        sources = dict.fromkeys(origin[key] for key in _BACKOFF_BOUNDS)
        _check_pool_options({"backoff_type": backoff_type,
                             **{key: values[key] for key in _BACKOFF_BOUNDS}},
                            f"{' and '.join(sources)}: ")


def _read_toml(path: str) -> tuple[dict[str, Any], dict[str, Any],
                                   dict[str, dict[str, Any]], dict[str, ClientPolicy]]:
    """The settings, the ``[pool]`` options, the ``[pools.NAME]`` tables and the
    ``[clients.NAME]`` policies of the TOML file at ``path``."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read the config file: "
                                 f"{exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message gives a line and column, never the text.
        raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    pool_options: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    pools: dict[str, dict[str, Any]] = {}
    clients: dict[str, ClientPolicy] = {}
    for key, value in document.items():
        if key == "pool":
            pool_options, moved = _pool_table(value, path)
        elif key == "pools":
            pools = _pools_tables(value, path)
        elif key == "clients":
            clients = _clients_tables(value, path)
        elif key in _BY_FIELD:
            # TOML has numbers: there, a number written as a string is an error.
            settings[key] = _BY_FIELD[key].parse(value, f"{path}: {key}", False)
        else:
            known = ", ".join([*_BY_FIELD, "[pool]", "[pools.NAME]", "[clients.NAME]"])
            raise ConfigurationError(f"{path}: unknown key {key!r} (known: {known})")
    if DEFAULT_POOL in pools and "dsn" in settings:
        raise ConfigurationError(f"{path}: the default pool's dsn is set both at the top "
                                 f"level and in [pools.{DEFAULT_POOL}]; set it in one place")
    for key, value in moved.items():
        if key in document:
            raise ConfigurationError(f"{path}: {key} is set both at the top level and in "
                                     f"[pool]; set it at the top level only")
        logger.warning("%s: [pool] %s is deprecated: set it at the top level (%s = ...)",
                       path, key, key)
        settings[key] = _BY_FIELD[key].parse(value, f"{path}: [pool] {key}", False)
    return settings, pool_options, pools, clients


def _tables(value: object, path: str, key: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(t, dict) for t in value.values()):
        raise ConfigurationError(f"{path}: '{key}' must hold tables ([{key}.NAME])")
    for name in value:
        if not _NAME.fullmatch(name):
            raise ConfigurationError(f"{path}: [{key}.{name}]: a name is letters, digits, "
                                     "'_', '-' and '.'")
    return value


def _pools_tables(value: object, path: str) -> dict[str, dict[str, Any]]:
    """The ``[pools.NAME]`` tables: a ``dsn`` and Pool.start options, checked."""
    known = {f.name for f in fields(PoolOptions)} - {"name", "pool"}
    pools: dict[str, dict[str, Any]] = {}
    for name, table in _tables(value, path, "pools").items():
        where = f"{path}: [pools.{name}]"
        options: dict[str, Any] = {}
        for key, item in table.items():
            if key == "dsn":
                options["dsn"] = _dsn(item, f"{where} dsn", False)
            elif key in _BY_FIELD and key in _POOL_SETTINGS:
                options[key] = _BY_FIELD[key].parse(item, f"{where} {key}", False)
            elif key in known:
                options[key] = tuple(item) if isinstance(item, list) else item
            else:
                raise ConfigurationError(f"{where}: unknown key {key!r} (known: dsn, "
                                         f"{', '.join(sorted(known))})")
        _check_pool_options({k: v for k, v in options.items() if k != "dsn"}, f"{where} ")
        pools[name] = options
    return pools


def _clients_tables(value: object, path: str) -> dict[str, ClientPolicy]:
    """The ``[clients.NAME]`` tables: pools, admin, max_inflight, max_leases."""
    policies: dict[str, ClientPolicy] = {}
    for name, table in _tables(value, path, "clients").items():
        where = f"{path}: [clients.{name}]"
        unknown = set(table) - {"pools", "admin", "max_inflight", "max_leases"}
        if unknown:
            raise ConfigurationError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: "
                                     "pools, admin, max_inflight, max_leases)")
        pools = table.get("pools")
        if pools is not None and (not isinstance(pools, list)
                                  or not all(isinstance(p, str) for p in pools)):
            raise ConfigurationError(f"{where} pools: expected a list of pool names")
        admin = table.get("admin", False)
        if not isinstance(admin, bool):
            raise _fail(f"{where} admin", "true or false", admin)
        limits: list[int | None] = [
            None if key not in table else
            cast(int, _integer(minimum)(table[key], f"{where} {key}", False))
            for key, minimum in (("max_inflight", 1), ("max_leases", 0))]
        policies[name] = ClientPolicy(pools=None if pools is None else frozenset(pools),
                                      admin=admin, max_inflight=limits[0],
                                      max_leases=limits[1])
    return policies


def _pool_table(table: object, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options of the ``[pool]`` table, checked against PoolOptions (lists become
    tuples), and apart from them the settings that have moved to the top level."""
    if not isinstance(table, dict):
        raise ConfigurationError(f"{path}: 'pool' must be a table ([pool]), "
                                 f"got a {type(table).__name__}")
    known = {f.name for f in fields(PoolOptions)} - set(_POOL_SETTINGS)
    options: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for key, value in table.items():
        if key in _MOVED_POOL_KEYS:
            moved[key] = value
            continue
        if key in _POOL_SETTINGS:
            raise ConfigurationError(
                f"{path}: [pool] {key}: set it at the top level ({key} = ...), not in [pool]")
        if key not in known:
            raise ConfigurationError(f"{path}: unknown key {key!r} in [pool] "
                                     f"(known: {', '.join(sorted(known))})")
        options[key] = tuple(value) if isinstance(value, list) else value
    _check_pool_options(options, f"{path}: [pool] ")
    return options, moved
