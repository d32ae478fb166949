"""A program that never calls ``pool.stop()`` still exits, and closes its connections.

pykka's actor threads would keep the interpreter alive for ever; dbpool's
run as daemon threads, and an ``atexit`` hook stops every running pool, so
the connections are closed properly (each announced as ``disconnected``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    from dbpool.pool import Pool

    def listener(event):  # one write per line: the actors' threads print too
        print(f"{event.kind} {event.index}\\n", end="", flush=True)

    pool = Pool.start(sys.argv[1], pool_size=2, connection_listeners=[listener])
    rows = pool.query("SELECT 41 + 1").rows
    print(f"result {rows}\\n", end="", flush=True)
    with pool.checkout() as conn:
        conn.query("SELECT 1")
    # no pool.stop(): the interpreter must exit anyway
""")


def test_a_program_that_never_stops_its_pool_exits_and_closes_connections(pg_dsn: str) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, pg_dsn], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "result [(42,)]" in lines
    # Both connections were open and both were closed by the pool at exit.
    assert sorted(line for line in lines if line.startswith("disconnected")) == [
        "disconnected 0", "disconnected 1"]
