"""The configuration of ``dbpool serve``: sources, precedence, validation, secrecy."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from dbpool.errors import ConfigurationError
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
    "max_message_size": ("1024", "2048", "4096", (1024, 2048, 4096)),
    "heartbeat_timeout": ("1", "2", "3.5", (1.0, 2.0, 3.5)),
    "lease_max": ("10", "20", "30", (10.0, 20.0, 30.0)),
    "pipeline_depth": ("1", "2", "8", (1, 2, 8)),
    "grace": ("0", "2", "3", (0.0, 2.0, 3.0)),
    "spin": ("0", "0.001", "0.0002", (0.0, 0.001, 0.0002)),
    "log_level": ("debug", "WARNING", '"error"', ("DEBUG", "WARNING", "ERROR")),
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
    assert config.max_message_size == 16 * 2**20
    assert config.heartbeat_timeout == 10.0
    assert config.lease_max == 300.0
    assert config.pipeline_depth == 8
    assert config.grace == 10.0
    assert config.spin == 0.0003
    assert config.log_level == "INFO"
    assert dict(config.pool_options) == {}
    assert config.log_level_number() == logging.INFO


def test_every_field_has_a_row_here() -> None:
    assert set(VALUES) == {f.name for f in dataclasses.fields(ServeConfig)} - {"pool_options"}


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
        "DBPOOL_LOG_LEVEL"])
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
    assert set(args) == set(VALUES) | {"config"}
    assert all(value is None for value in args.values())
    text = parser.format_help()
    for field in VALUES:
        assert "--" + field.replace("_", "-") in text
        assert "DBPOOL_" + field.upper() in text
    assert "DBPOOL_CONFIG" in text
    assert "tcp://127.0.0.1:7432" in text and "16777216" in text


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
    assert dict(config.pool_options) == {
        "queue_target": 0.1,
        "max_lifetime": (60, 120),
        "backoff_type": "exp",
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
        "dbpool: requests on tcp://127.0.0.1:7432, events on tcp://127.0.0.1:7433, "
        "pool of 10 on embedded")
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
    path = Path(__file__).resolve().parent.parent / "deploy" / "dbpool.toml"
    config = load_config(argparse.Namespace(config=str(path)), {})
    assert config.pool_size == 10 and config.pipeline_depth == 8
    assert config.pool_options["backoff_type"] == "rand_exp"
