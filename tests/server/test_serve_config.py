"""The configuration of ``dbpool serve``: sources, precedence, validation, secrecy."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from dbpool.actors import backoff
from dbpool.errors import ConfigurationError
from dbpool.pool import Pool, PoolOptions
from dbpool.server import serve as serve_module
from dbpool.server.config import ServeConfig, add_serve_arguments, load_config, mask_dsn

SECRET = "s3cr3t-Pa55"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def load(*argv: str, env: dict[str, str] | None = None) -> ServeConfig:
    return load_config(parse(*argv), env or {})


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# field: (flag value, env value, TOML literal, parsed value of each of the three)
VALUES: dict[str, tuple[str, str, str, tuple[Any, Any, Any]]] = {
    "dsn": ("host=flag", "host=env", '"host=file"', ("host=flag", "host=env", "host=file")),
    "bind": ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", '"tcp://127.0.0.1:3"',
             ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3")),
    "events_bind": ("ipc:///tmp/a", "ipc:///tmp/b", '"ipc:///tmp/c"',
                    ("ipc:///tmp/a", "ipc:///tmp/b", "ipc:///tmp/c")),
    "pool_size": ("1", "2", "3", (1, 2, 3)),
    "name": ("flag", "env", '"file"', ("flag", "env", "file")),
    "timeout": ("1.5", "2.5", "3", (1.5, 2.5, 3.0)),
    "backoff_type": ("exp", " rand ", '"stop"', ("exp", "rand", "stop")),
    "backoff_min": ("0.5", "2", "0", (0.5, 2.0, 0.0)),
    "backoff_max": ("5", "10.5", "60", (5.0, 10.5, 60.0)),
    "breaker_threshold": ("1", "3", "7", (1, 3, 7)),
    "max_message_size": ("1024", "2048", "4096", (1024, 2048, 4096)),
    "heartbeat_timeout": ("1", "2", "3.5", (1.0, 2.0, 3.5)),
    "lease_max": ("10", "20", "30", (10.0, 20.0, 30.0)),
    "pipeline_depth": ("1", "2", "8", (1, 2, 8)),
    "grace": ("0", "2", "3", (0.0, 2.0, 3.0)),
    "spin": ("0", "0.001", "0.0002", (0.0, 0.001, 0.0002)),
    "log_level": ("debug", "WARNING", '"error"', ("DEBUG", "WARNING", "ERROR")),
    "metrics_bind": ("127.0.0.1:1", " [::1]:2 ", '"localhost:3"',
                     ("127.0.0.1:1", "[::1]:2", "localhost:3")),
    "wait_for_database": ("1", "2.5", "3", (1.0, 2.5, 3.0)),
    "log_format": ("json", " TEXT ", '"json"', ("json", "text", "json")),
}


def test_defaults() -> None:
    config = load()
    assert config == ServeConfig()
    assert config.dsn is None
    assert config.bind == "tcp://127.0.0.1:7432"
    assert config.events_bind == "tcp://127.0.0.1:7433"
    assert config.pool_size == 10
    assert config.name == "dbpool"
    assert config.timeout == 15.0
    assert config.backoff_type == "rand_exp"
    assert config.backoff_min is None and config.backoff_max is None  # 1.0 and 30.0 s
    assert config.breaker_threshold == 5
    assert config.max_message_size == 16 * 2**20
    assert config.heartbeat_timeout == 10.0
    assert config.lease_max == 300.0
    assert config.pipeline_depth == 8
    assert config.grace == 10.0
    assert config.spin == 0.0003
    assert config.log_level == "INFO"
    assert dict(config.pool_options) == {}
    assert config.log_level_number() == logging.INFO


#: Settings that only go together (CURVE's two) or are a switch: tests/server/test_curve.py.
SECURITY = {"curve_secret_key", "authorized_keys", "insecure"}


def test_every_field_has_a_row_here() -> None:
    assert set(VALUES) == {f.name for f in dataclasses.fields(ServeConfig)} - {
        "pool_options", "pools", "clients", *SECURITY}


@pytest.mark.parametrize("field", sorted(VALUES))
def test_precedence_per_field(field: str, tmp_path: Path) -> None:
    flag_value, env_value, toml_value, (from_flag, from_env, from_file) = VALUES[field]
    flag = "--" + field.replace("_", "-")
    env = {"DBPOOL_" + field.upper(): env_value}
    path = write(tmp_path, f"{field} = {toml_value}\n")
    config_flag = ("--config", str(path))

    assert getattr(load(flag, flag_value, *config_flag, env=env), field) == from_flag
    assert getattr(load(*config_flag, env=env), field) == from_env
    assert getattr(load(*config_flag), field) == from_file
    assert getattr(load(), field) == getattr(ServeConfig(), field)


def test_every_env_var_parsed() -> None:
    env = {"DBPOOL_" + field.upper(): env_value for field, (_, env_value, _, _) in VALUES.items()}
    assert sorted(env) == sorted([
        "DBPOOL_DSN", "DBPOOL_BIND", "DBPOOL_EVENTS_BIND", "DBPOOL_POOL_SIZE", "DBPOOL_NAME",
        "DBPOOL_TIMEOUT", "DBPOOL_MAX_MESSAGE_SIZE", "DBPOOL_HEARTBEAT_TIMEOUT",
        "DBPOOL_LEASE_MAX", "DBPOOL_PIPELINE_DEPTH", "DBPOOL_GRACE", "DBPOOL_SPIN",
        "DBPOOL_LOG_LEVEL", "DBPOOL_BACKOFF_TYPE", "DBPOOL_BACKOFF_MIN",
        "DBPOOL_BACKOFF_MAX", "DBPOOL_BREAKER_THRESHOLD", "DBPOOL_METRICS_BIND",
        "DBPOOL_WAIT_FOR_DATABASE", "DBPOOL_LOG_FORMAT"])
    config = load(env=env)
    for field, (_, _, _, (_, expected, _)) in VALUES.items():
        value = getattr(config, field)
        assert value == expected and type(value) is type(expected), field


def test_empty_env_var_counts_as_unset() -> None:
    assert load(env={"DBPOOL_POOL_SIZE": "", "DBPOOL_DSN": ""}) == ServeConfig()


def test_mixed_sources(tmp_path: Path) -> None:
    path = write(tmp_path, 'pool_size = 7\nname = "from-file"\ngrace = 1\n')
    config = load("--name", "from-flag", env={"DBPOOL_CONFIG": str(path),
                                               "DBPOOL_GRACE": "2"})
    assert (config.pool_size, config.name, config.grace) == (7, "from-flag", 2.0)


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    flagged = write(tmp_path, "pool_size = 3\n", "a.toml")
    env_file = write(tmp_path, "pool_size = 4\n", "b.toml")
    assert load("--config", str(flagged), env={"DBPOOL_CONFIG": str(env_file)}).pool_size == 3
    assert load(env={"DBPOOL_CONFIG": str(env_file)}).pool_size == 4


def test_namespace_with_typed_values_and_missing_attributes() -> None:
    config = load_config(argparse.Namespace(pool_size=5, timeout=2), {})
    assert (config.pool_size, config.timeout) == (5, 2.0)


def test_flags_default_to_none_and_help_names_env_and_default() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = vars(parser.parse_args([]))
    assert set(args) == set(VALUES) | SECURITY | {"config"}
    assert all(value is None for value in args.values())
    text = parser.format_help()
    for field in [*VALUES, *SECURITY]:
        assert "--" + field.replace("_", "-") in text
        assert "DBPOOL_" + field.upper() in text
    assert "DBPOOL_CONFIG" in text
    assert "tcp://127.0.0.1:7432" in text and "16777216" in text
    assert "default: rand_exp" in text and "default: 5)" in text
    assert f"default: {backoff.DEFAULT_MIN}" in text and f"default: {backoff.DEFAULT_MAX}" in text


# -- the [pool] table ------------------------------------------------------------------


def test_pool_table_passthrough(tmp_path: Path) -> None:
    path = write(tmp_path, """
pool_size = 2
[pool]
queue_target = 0.1
max_lifetime = [60, 120]
backoff_type = "exp"
connect_kwargs = { connect_timeout = 5, application_name = "svc" }
""")
    config = load("--config", str(path))
    assert config.pool_size == 2
    assert config.backoff_type == "exp"  # a setting now: see test_pool_table_moved_settings
    assert dict(config.pool_options) == {
        "queue_target": 0.1,
        "max_lifetime": (60, 120),
        "connect_kwargs": {"connect_timeout": 5, "application_name": "svc"},
    }
    with pytest.raises(TypeError):
        config.pool_options["queue_target"] = 1  # type: ignore[index]


def test_pool_table_only_from_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nqueue_target = 0.2\n")
    config = load("--pool-size", "3", "--config", str(path), env={"DBPOOL_POOL_SIZE": "4"})
    assert config.pool_size == 3
    assert dict(config.pool_options) == {"queue_target": 0.2}


@pytest.mark.parametrize(("text", "message"), [
    ("[pool]\nqueue_targte = 1\n", "config.toml: unknown key 'queue_targte' in [pool]"),
    ("[pool]\npool_size = 3\n", "config.toml: [pool] pool_size: set it at the top level"),
    ("[pool]\ntimeout = 3\n", "config.toml: [pool] timeout: set it at the top level"),
    ("[pool]\nqueue_target = -1\n", "config.toml: [pool] queue_target must be a positive"),
    ("[pool]\nmax_lifetime = [5, 1]\n", "config.toml: [pool] max_lifetime must be"),
    ("[pool]\nbackoff_type = 'fast'\n",
     "config.toml: [pool] backoff_type: unknown backoff_type 'fast'"),
    ("[pool]\nbreaker_threshold = 0\n",
     "config.toml: [pool] breaker_threshold: breaker_threshold must be an integer >= 1"),
    ("[pool]\nbackoff_min = 5\nbackoff_max = 2\n",
     "config.toml: backoff minimum 5.0 is greater than maximum 2.0"),
    ("backoff_max = 3\n[pool]\nbackoff_max = 3\n",
     "config.toml: backoff_max is set both at the top level and in [pool]"),
    ("pool = 3\n", "config.toml: 'pool' must be a table"),
])
def test_pool_table_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError) as info:
        load("--config", str(path))
    assert str(info.value).replace(str(tmp_path) + "/", "").startswith(message)


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "bad", "expected"), [
    ("pool_size", "abc", "an integer >= 1"),
    ("pool_size", "0", "an integer >= 1"),
    ("pool_size", "2.5", "an integer >= 1"),
    ("max_message_size", "-1", "an integer >= 1"),
    ("pipeline_depth", "0", "an integer >= 1"),
    ("timeout", "soon", "a number of seconds > 0"),
    ("timeout", "0", "a number of seconds > 0"),
    ("heartbeat_timeout", "-1", "a number of seconds > 0"),
    ("lease_max", "inf", "a number of seconds > 0"),
    ("grace", "-0.5", "a number of seconds >= 0"),
    ("grace", "nan", "a number of seconds >= 0"),
    ("log_level", "loud", "a log level"),
    ("bind", "127.0.0.1:7432", "a ZeroMQ endpoint"),
    ("events_bind", " ", "a ZeroMQ endpoint"),
    ("name", " ", "a non-empty string"),
])
def test_bad_values_from_flag_and_env(field: str, bad: str, expected: str) -> None:
    flag = "--" + field.replace("_", "-")
    env_name = "DBPOOL_" + field.upper()
    with pytest.raises(ConfigurationError) as info:
        load(flag, bad)
    assert str(info.value).startswith(f"{flag}: expected {expected}")
    assert str(info.value).endswith(f", got {bad!r}")
    with pytest.raises(ConfigurationError) as info:
        load(env={env_name: bad})
    assert str(info.value).startswith(f"{env_name}: expected {expected}")
    assert str(info.value).endswith(f", got {bad!r}")


def test_env_error_message_exactly() -> None:
    with pytest.raises(ConfigurationError,
                       match=r"^DBPOOL_POOL_SIZE: expected an integer >= 1, got 'abc'$"):
        load(env={"DBPOOL_POOL_SIZE": "abc"})


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        load("--pool-size", "x")


def test_bad_flag_fails_even_if_env_is_valid() -> None:
    with pytest.raises(ConfigurationError, match=r"^--timeout:"):
        load("--timeout", "x", env={"DBPOOL_TIMEOUT": "3"})


@pytest.mark.parametrize(("text", "message"), [
    ('pool_size = "4"\n', "config.toml: pool_size: expected an integer >= 1, got '4'"),
    ("pool_size = true\n", "config.toml: pool_size: expected an integer >= 1, got True (bool)"),
    ("pool_size = 0\n", "config.toml: pool_size: expected an integer >= 1, got 0 (int)"),
    ("timeout = false\n", "config.toml: timeout: expected a number of seconds > 0, "
                          "got False (bool)"),
    ("grace = -1\n", "config.toml: grace: expected a number of seconds >= 0, got -1 (int)"),
    ("log_level = 10\n", "config.toml: log_level: expected a log level"),
    ("bind = 7432\n", "config.toml: bind: expected a ZeroMQ endpoint"),
    ("dsn = 5\n", "config.toml: dsn: expected a libpq conninfo string or URI, got a int"),
    ("pool_sise = 4\n", "config.toml: unknown key 'pool_sise'"),
    ("[server]\nbind = 'tcp://x:1'\n", "config.toml: unknown key 'server'"),
])
def test_bad_values_from_toml(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError) as info:
        load("--config", str(path))
    assert str(info.value).replace(str(tmp_path) + "/", "").startswith(message)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigurationError, match=r"nope\.toml: cannot read the config file"):
        load("--config", str(missing))
    with pytest.raises(ConfigurationError, match=r"nope\.toml: cannot read the config file"):
        load(env={"DBPOOL_CONFIG": str(missing)})
    bad = write(tmp_path, "pool_size = = 3\n")
    with pytest.raises(ConfigurationError, match=r"config\.toml: not valid TOML"):
        load("--config", str(bad))


def test_bad_value_in_a_lower_source_is_reported_even_when_overridden(tmp_path: Path) -> None:
    # Every source that is read is checked whole: a typo in the file is not hidden by a flag.
    path = write(tmp_path, "pool_size = 0\n")
    with pytest.raises(ConfigurationError, match="pool_size"):
        load("--pool-size", "3", "--config", str(path))


# -- secrets -------------------------------------------------------------------------------

DSNS = [
    f"host=db.example user=app password={SECRET} dbname=app",
    f"postgresql://app:{SECRET}@db.example:5432/app?sslmode=require",
    f"host=db.example password='{SECRET} with spaces' dbname=app",
]


@pytest.mark.parametrize("dsn", DSNS)
def test_password_masked_in_repr_str_describe(dsn: str) -> None:
    config = load("--dsn", dsn)
    assert config.dsn == dsn  # kept whole for connecting
    for text in (repr(config), str(config), config.describe(), f"{config}", f"{[config]}"):
        assert SECRET not in text
    assert "password='******'" in repr(config) or "password=******" in repr(config)
    assert "password" not in config.describe()
    assert "db.example" in config.describe()


def test_uri_password_with_escapes_masked() -> None:
    config = ServeConfig(dsn="postgresql://app:p%40ss%2Fw0rd@localhost/app")
    for text in (repr(config), config.describe()):
        assert "p%40ss" not in text and "p@ss" not in text


def test_connect_kwargs_password_masked_in_repr(tmp_path: Path) -> None:
    path = write(tmp_path, f'[pool]\nconnect_kwargs = {{ password = "{SECRET}" }}\n')
    config = load("--config", str(path))
    assert config.pool_options["connect_kwargs"]["password"] == SECRET
    assert SECRET not in repr(config)


def test_describe() -> None:
    assert ServeConfig().describe() == (
        "dbpool: requests on tcp://127.0.0.1:7432, events on tcp://127.0.0.1:7433 "
        "(no authentication), pool of 10 on embedded")
    described = ServeConfig(dsn="host=h user=u password=p dbname=d", pool_size=3).describe()
    assert "pool of 3 on " in described and "host=h" in described
    assert "password" not in described
    assert "\n" not in described


@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_unparseable_dsn_error_hides_the_dsn(source: str, tmp_path: Path) -> None:
    dsn = f"host=db password={SECRET} =broken"
    with pytest.raises(ConfigurationError) as info:
        if source == "flag":
            load("--dsn", dsn)
        elif source == "env":
            load(env={"DBPOOL_DSN": dsn})
        else:
            load("--config", str(write(tmp_path, f"dsn = '{dsn}'\n")))
    message = str(info.value)
    assert SECRET not in message
    assert "not a valid libpq conninfo" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_mask_dsn() -> None:
    assert SECRET not in mask_dsn(DSNS[0])
    assert "password" not in mask_dsn(DSNS[1], drop=True)
    assert mask_dsn("host=h dbname=d") == "host=h dbname=d"
    assert mask_dsn("host=x =broken password=zzz") == "<unparseable DSN hidden>"


def test_debug_log_has_no_password(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="dbpool.server.config"):
        load("--dsn", DSNS[0])
    assert caplog.records
    assert all(SECRET not in record.getMessage() for record in caplog.records)


def test_frozen() -> None:
    config = ServeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pool_size = 3  # type: ignore[misc]


def test_the_example_deploy_config_loads() -> None:
    """deploy/dbpool.toml stays a valid configuration."""
    path = Path(__file__).resolve().parents[2] / "deploy" / "dbpool.toml"
    config = load_config(argparse.Namespace(config=str(path)), {})
    assert config.pool_size == 10 and config.pipeline_depth == 8
    assert (config.backoff_type, config.backoff_min, config.backoff_max,
            config.breaker_threshold) == ("rand_exp", 1.0, 30.0, 5)
    assert "backoff_type" not in config.pool_options
    assert config.curve and config.exposed_endpoints()  # exposed, so with CURVE
    PoolOptions.from_kwargs(config.pool_kwargs())


# -- the pool's backoff and breaker settings ------------------------------------------------

POOL_SETTINGS = ("backoff_type", "backoff_min", "backoff_max", "breaker_threshold")


def test_pool_settings_default_to_the_pools_defaults() -> None:
    config = load()
    pool_defaults = PoolOptions()
    for field in POOL_SETTINGS:
        assert getattr(config, field) == getattr(pool_defaults, field), field
    assert PoolOptions.from_kwargs(config.pool_kwargs()) == pool_defaults


def _source_args(source: str, field: str, text: str, toml: str,
                 tmp_path: Path) -> tuple[tuple[str, ...], dict[str, str], str]:
    """load() arguments that give ``field`` from ``source``, and the source's name."""
    if source == "flag":
        flag = "--" + field.replace("_", "-")
        return (flag, text), {}, flag
    if source == "env":
        return (), {"DBPOOL_" + field.upper(): text}, "DBPOOL_" + field.upper()
    path = write(tmp_path, f"{field} = {toml}\n")
    return ("--config", str(path)), {}, f"{path}: {field}"


# field, flag/env text, TOML literal, a pattern of the message after "<source>: "
BAD_POOL_SETTINGS = [
    ("backoff_type", "fast", '"fast"',
     r"unknown backoff_type 'fast'; expected one of stop, exp, rand, rand_exp$"),
    ("backoff_type", "EXP", '"EXP"', r"unknown backoff_type 'EXP'"),
    ("backoff_type", " ", "3", r"expected a non-empty string, got "),
    ("backoff_min", "-1", "-1", r"backoff minimum -1\.0 is not 0 or a positive number$"),
    # The pool checks the minimum first, and a maximum alone also lowers the minimum.
    ("backoff_max", "-0.5", "-0.5", r"backoff m\w+ -0\.5 is not 0 or a positive number$"),
    ("backoff_min", "soon", '"1"', r"expected a finite number of seconds, got '(soon|1)'$"),
    ("backoff_max", "inf", "inf", r"expected a finite number of seconds, got (')?inf"),
    ("backoff_max", "nan", "true", r"expected a finite number of seconds, got ('nan'|True)"),
    ("breaker_threshold", "0", "0", r"breaker_threshold must be an integer >= 1, got 0$"),
    ("breaker_threshold", "-3", "-3", r"breaker_threshold must be an integer >= 1, got -3$"),
    ("breaker_threshold", "2.5", "2.5", r"expected an integer, got (')?2\.5"),
    ("breaker_threshold", "many", "true", r"expected an integer, got ('many'|True \(bool\))$"),
]


@pytest.mark.parametrize("source", ["flag", "env", "file"])
@pytest.mark.parametrize(("field", "text", "toml", "message"), BAD_POOL_SETTINGS)
def test_bad_pool_settings_name_their_source(source: str, field: str, text: str, toml: str,
                                             message: str, tmp_path: Path) -> None:
    argv, env, name = _source_args(source, field, text, toml, tmp_path)
    with pytest.raises(ConfigurationError) as info:
        load(*argv, env=env)
    assert re.match(re.escape(f"{name}: ") + message, str(info.value)), str(info.value)
    assert info.value.__cause__ is None


@pytest.mark.parametrize(("argv", "env", "toml", "sources"), [
    (("--backoff-min", "5", "--backoff-max", "2"), {}, "", "--backoff-min and --backoff-max"),
    (("--backoff-min", "5"), {"DBPOOL_BACKOFF_MAX": "2"}, "",
     "--backoff-min and DBPOOL_BACKOFF_MAX"),
    ((), {"DBPOOL_BACKOFF_MIN": "5"}, "backoff_max = 2\n",
     "DBPOOL_BACKOFF_MIN and {path}"),
    ((), {}, "backoff_min = 5\nbackoff_max = 2\n", "{path}"),
    # A source is checked whole: the file's bounds are wrong even if a flag overrides one.
    (("--backoff-max", "10"), {}, "backoff_min = 5\nbackoff_max = 2\n", "{path}"),
    (("--backoff-type", "exp"), {"DBPOOL_BACKOFF_MIN": "5", "DBPOOL_BACKOFF_MAX": "2"}, "",
     "DBPOOL_BACKOFF_MIN and DBPOOL_BACKOFF_MAX"),
])
def test_backoff_minimum_above_maximum_names_both_sources(
        argv: tuple[str, ...], env: dict[str, str], toml: str, sources: str,
        tmp_path: Path) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigurationError) as info:
        load(*argv, "--config", str(path), env=env)
    assert str(info.value) == (f"{sources.format(path=path)}: "
                               "backoff minimum 5.0 is greater than maximum 2.0")


def test_backoff_bounds_follow_the_pools_rules() -> None:
    # One bound alone moves the pool's default for the other out of its way.
    for argv, low, high in [(("--backoff-max", "0.5"), 0.5, 0.5),
                            (("--backoff-min", "60"), 60.0, 60.0),
                            (("--backoff-min", "0", "--backoff-max", "0"), 0.0, 0.0)]:
        config = load(*argv)
        made = backoff.new(config.backoff_type, config.backoff_min, config.backoff_max)
        assert made is not None and (made.min, made.max) == (low, high), argv
    # "stop" never retries, so the pool does not compare the bounds, nor does the config.
    config = load("--backoff-min", "5", "--backoff-max", "2", env={"DBPOOL_BACKOFF_TYPE": "stop"})
    assert (config.backoff_type, config.backoff_min, config.backoff_max) == ("stop", 5.0, 2.0)


def test_pool_table_moved_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """backoff_* and breaker_threshold in [pool] (before they were settings) still load, as
    the file's value of the setting: flags and variables still win over them."""
    path = write(tmp_path, "[pool]\nbackoff_type = 'exp'\nbackoff_min = 0.2\n"
                           "backoff_max = 1.0\nbreaker_threshold = 2\nidle_interval = 0.2\n")
    with caplog.at_level(logging.WARNING, logger="dbpool.server.config"):
        config = load("--config", str(path))
    assert (config.backoff_type, config.backoff_min, config.backoff_max,
            config.breaker_threshold) == ("exp", 0.2, 1.0, 2)
    assert dict(config.pool_options) == {"idle_interval": 0.2}
    assert [r.getMessage().replace(str(tmp_path) + "/", "") for r in caplog.records] == [
        f"config.toml: [pool] {key} is deprecated: set it at the top level ({key} = ...)"
        for key in POOL_SETTINGS]
    config = load("--config", str(path), "--backoff-max", "3",
                  env={"DBPOOL_BREAKER_THRESHOLD": "9", "DBPOOL_BACKOFF_MAX": "4"})
    assert (config.backoff_max, config.breaker_threshold) == (3.0, 9)
    assert config.pool_kwargs()["backoff_max"] == 3.0


def test_pool_settings_reach_pool_kwargs(tmp_path: Path) -> None:
    path = write(tmp_path, "backoff_type = 'rand'\nbackoff_min = 0.25\n"
                           "[pool]\nqueue_target = 0.1\n")
    config = load("--config", str(path), "--breaker-threshold", "3",
                  env={"DBPOOL_BACKOFF_MAX": "2"})
    kwargs = config.pool_kwargs()
    assert kwargs == {"pool_size": 10, "name": "dbpool", "timeout": 15.0,
                      "backoff_type": "rand", "backoff_min": 0.25, "backoff_max": 2.0,
                      "breaker_threshold": 3, "queue_target": 0.1}
    options = PoolOptions.from_kwargs(kwargs)
    assert (options.backoff_type, options.backoff_min, options.backoff_max,
            options.breaker_threshold) == ("rand", 0.25, 2.0, 3)


class _Started(Exception):
    """Stops serve() once it has started its pool."""


def test_serve_starts_the_pool_with_the_settings(
        monkeypatch: pytest.MonkeyPatch, pg_dsn: str) -> None:
    started: list[tuple[str | None, dict[str, Any], Pool]] = []

    class RecordingPool:
        @staticmethod
        def start(conninfo: str | None, **options: Any) -> Pool:
            pool = Pool.start(conninfo, **options)
            started.append((conninfo, options, pool))
            raise _Started

    monkeypatch.setattr(serve_module, "Pool", RecordingPool)
    monkeypatch.setattr(serve_module, "_raise_file_limit", lambda: None)
    config = load("--dsn", pg_dsn, "--pool-size", "1", "--backoff-type", "exp",
                  "--breaker-threshold", "4",
                  env={"DBPOOL_BACKOFF_MIN": "0.1", "DBPOOL_BACKOFF_MAX": "0.3"})
    with pytest.raises(_Started):
        serve_module.serve(config)
    [(conninfo, options, pool)] = started
    try:
        assert conninfo == pg_dsn
        assert {key: options[key] for key in POOL_SETTINGS} == {
            "backoff_type": "exp", "backoff_min": 0.1, "backoff_max": 0.3,
            "breaker_threshold": 4}
        got = pool.options
        assert (got.backoff_type, got.backoff_min, got.backoff_max,
                got.breaker_threshold) == ("exp", 0.1, 0.3, 4)
    finally:
        pool.stop()


# -- several pools and named clients -------------------------------------------------------


def test_pools_tables_start_from_the_top_level_and_keep_the_default(tmp_path: Path) -> None:
    path = write(tmp_path, """
dsn = "host=main"
pool_size = 6
timeout = 3

[pool]
queue_target = 0.1

[pools.reports]
dsn = "host=replica password=s3cret"
pool_size = 2
max_lifetime = [10, 20]
""")
    config = load("--config", str(path))
    specs = {route: (dsn, options) for route, dsn, options in config.pool_specs()}
    assert set(specs) == {"default", "reports"}
    assert specs["default"][0] == "host=main"
    assert specs["default"][1]["pool_size"] == 6 and specs["default"][1]["name"] == "dbpool"
    dsn, options = specs["reports"]
    assert dsn == "host=replica password=s3cret"
    assert (options["pool_size"], options["timeout"], options["queue_target"],
            options["max_lifetime"], options["name"]) == (2, 3.0, 0.1, (10, 20), "reports")
    assert "dsn" not in options
    for text in (repr(config), config.describe()):
        assert "s3cret" not in text
    assert "pool reports of 2 on host=replica" in config.describe()


def test_only_pools_tables_means_no_default(tmp_path: Path) -> None:
    path = write(tmp_path, '[pools.a]\ndsn = "host=a"\n[pools.b]\ndsn = "host=b"\n')
    assert [route for route, _, _ in load("--config", str(path)).pool_specs()] == ["a", "b"]
    assert [route for route, _, _ in load().pool_specs()] == ["default"]


@pytest.mark.parametrize(("text", "message"), [
    ('[pools.a]\nsize = 2\n', "[pools.a]: unknown key 'size'"),
    ('[pools.a]\npool_size = 0\n', "[pools.a] pool_size: expected an integer >= 1"),
    ('[pools.a]\ndsn = "host=x password=\'unclosed"\n', "its text is not shown"),
    ('dsn = "host=x"\n[pools.default]\ndsn = "host=y"\n', "set it in one place"),
    ('[pools."a b"]\ndsn = "host=x"\n', "a name is letters"),
    ('[pools.dbpool]\ndsn = "host=x"\n[pools.b]\ndsn = "host=y"\n'
     'dsn = "host=z"\n', "not valid TOML"),
    ('dsn = "host=x"\n[pools.dbpool]\ndsn = "host=y"\n', "two pools are named 'dbpool'"),
    ('[clients.app]\npools = ["nope"]\n', "[clients.app] pools: no pool named nope"),
    ('[clients.app]\nadmin = "yes"\n', "[clients.app] admin: expected true or false"),
    ('[clients.app]\nmax_inflight = 0\n', "max_inflight: expected an integer >= 1"),
    ('[clients.app]\nmax_leases = -1\n', "max_leases: expected an integer >= 0"),
    ('[clients.app]\nlimit = 3\n', "unknown key 'limit'"),
])
def test_bad_pools_and_clients_tables_name_what_is_wrong(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError) as caught:
        load("--config", str(path))
    assert message in str(caught.value)
    assert "unclosed" not in str(caught.value)


def test_clients_tables_give_policies(tmp_path: Path) -> None:
    path = write(tmp_path, """
[pools.a]
dsn = "host=a"
[clients.app]
pools = ["a"]
max_inflight = 4
max_leases = 0
[clients.ops]
admin = true
""")
    config = load("--config", str(path))
    app, ops, other = config.policy("app"), config.policy("ops"), config.policy("nobody")
    assert app.may_use("a") and not app.may_use("default")
    assert (app.max_inflight, app.max_leases, app.admin) == (4, 0, False)
    assert ops.admin and ops.may_use("a") and ops.max_inflight is None
    assert not other.admin and other.may_use("anything")


def test_an_elastic_pool_in_the_file_starts_at_its_minimum(tmp_path: Path) -> None:
    path = tmp_path / "dbpool.toml"
    path.write_text("""
dsn = "host=127.0.0.1"

[pool]
min_size = 2
max_size = 8
max_idle = 30.0

[pools.fixed]
dsn = "host=127.0.0.1"
pool_size = 3
min_size = 3
max_size = 3
""")
    config = load("--config", str(path))
    specs = {name: options for name, _, options in config.pool_specs()}
    assert {k: specs["default"][k] for k in ("pool_size", "min_size", "max_size")} == {
        "pool_size": 2, "min_size": 2, "max_size": 8}
    assert specs["fixed"]["pool_size"] == 3
    PoolOptions.from_kwargs(specs["default"])  # the pool takes them as they are
    # min_size alone: elastic up to the pool_size setting, as Pool.start would be.
    path.write_text("""
dsn = "host=127.0.0.1"
pool_size = 10

[pool]
min_size = 2
""")
    specs = {name: options for name, _, options in load("--config", str(path)).pool_specs()}
    assert {k: specs["default"][k] for k in ("pool_size", "min_size", "max_size")} == {
        "pool_size": 2, "min_size": 2, "max_size": 10}
