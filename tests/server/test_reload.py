"""Live reload of ``dbpool serve``'s configuration (SIGHUP), under load (issue 18).

Four client processes keep querying the default pool while the TOML file is
changed and SIGHUP sent seven times: the default pool's size up and down, a
client limit changed, a pool added, a broken file (refused; the old
configuration stays), the new pool's DSN changed (its connections are
replaced, now to the new DSN), and the pool removed.  The clients see no
error throughout.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path

import psycopg
import pytest

from dbpool.client import Client
from dbpool.errors import ConnectionError, ProtocolError
from tests.support.events import wait_for
from tests.support.remote import ServerProcess


def _load(endpoint: str, stop: Event, done: Synchronized[int],
          errors: Synchronized[int]) -> None:
    with Client(endpoint, timeout=10) as client:
        while not stop.is_set():
            try:
                client.query("SELECT 1")
            except Exception:
                with errors.get_lock():
                    errors.value += 1
            else:
                with done.get_lock():
                    done.value += 1


def reload(server: ServerProcess, path: Path, text: str, outcome: str) -> None:
    before = server.output().count(outcome)
    path.write_text(text)
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: server.output().count(outcome) > before, 10, f"{outcome!r} in the log")


def application_names(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT application_name FROM pg_stat_activity "
                            "WHERE backend_type = 'client backend'").fetchall()
    return {row[0] for row in rows}


def test_reloads_under_load_cost_the_clients_nothing(pg_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "dbpool.toml"
    base = f'dsn = "{pg_dsn}"\n[clients.anonymous]\nadmin = true\n'

    spawn = multiprocessing.get_context("spawn")
    stop, done, errors = spawn.Event(), spawn.Value("q", 0), spawn.Value("q", 0)
    path.write_text("pool_size = 2\n" + base)
    with ServerProcess(pg_dsn, "--config", str(path), pool_size=None) as server:
        workers = [spawn.Process(target=_load, args=(server.endpoint, stop, done, errors))
                   for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            wait_for(lambda: done.value > 100, 30, "the load to run")
            with Client(server.endpoint, timeout=10) as client, \
                    Client(server.endpoint, timeout=10, pool="extra") as extra:

                def size_is(size: int) -> bool:
                    default = client.status()["pools"]["default"]
                    connections = default["connections"]
                    return bool(default["pool_size"] == size
                                and connections["idle"] + connections["in_use"] == size)

                # 0. the default pool's size, up and down, under the load
                reload(server, path, "pool_size = 4\n" + base, "reload: pool default resized")
                wait_for(lambda: size_is(4), 10, "four connections")
                base = "pool_size = 1\n" + base
                reload(server, path, base, "reload: pool default resized")
                wait_for(lambda: size_is(1), 10, "one connection")
                # 1. a limit
                reload(server, path, base + "max_leases = 0\n", "reloaded:")
                with pytest.raises(ConnectionError) as caught:
                    client.transaction().begin()
                assert caught.value.reason == "client_limit"
                # 2. a pool added
                with_extra = base + f'[pools.extra]\ndsn = "{pg_dsn}"\npool_size = 1\n'
                reload(server, path, with_extra, "reload: pool extra added")
                assert extra.query("SELECT 2").rows == [(2,)]
                with client.transaction() as tx:  # the limit went with the old file
                    tx.query("SELECT 1")
                # 3. a file that does not load: refused, the old one stays
                reload(server, path, "pool_size = [", "reload refused")
                assert extra.query("SELECT 3").rows == [(3,)]
                # 4. the pool's DSN changed: its connections are replaced
                moved = pg_dsn + " application_name=dbpool-reloaded"
                reload(server, path, base + f'[pools.extra]\ndsn = "{moved}"\npool_size = 1\n',
                       "reload: pool extra now connects to")

                def moved_over() -> bool:
                    extra.query("SELECT 4")
                    return "dbpool-reloaded" in application_names(pg_dsn)

                wait_for(moved_over, 15, "the extra pool's connections to use the new DSN")
                # 5. the pool removed
                reload(server, path, base, "reload: pool extra removed")
                with pytest.raises(ProtocolError) as gone:
                    extra.query("SELECT 5")
                assert gone.value.code == "unknown_pool"
            before = done.value
            wait_for(lambda: done.value > before + 100, 30, "the load to go on")
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=30)
                if worker.is_alive():
                    worker.kill()
        assert errors.value == 0
        assert server.output().count("reload refused") == 1
        assert "Traceback" not in server.output()
