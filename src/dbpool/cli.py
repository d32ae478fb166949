"""The ``dbpool`` command.

``dbpool demo`` starts a pool (on the embedded PostgreSQL unless ``--dsn``
or ``$DBPOOL_DSN`` names a server), runs queries through it from several
threads and prints the connection events as they happen.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence

from .actors.listeners import ConnectionEvent, HealthEvent

__all__ = ["build_parser", "main"]

logger = logging.getLogger("dbpool.cli")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``dbpool`` command's parser, every subcommand and flag."""
    parser = argparse.ArgumentParser(prog="dbpool", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run queries through a pool, showing its events")
    demo.add_argument("--dsn", default=os.environ.get("DBPOOL_DSN"),
                      help="libpq conninfo or URI (default: $DBPOOL_DSN, else embedded)")
    demo.add_argument("--pool-size", type=int, default=3)
    demo.add_argument("--threads", type=int, default=4)
    demo.add_argument("--queries", type=int, default=25, help="queries per thread")

    bench = commands.add_parser("bench", help="SELECT 1 through raw psycopg, psycopg_pool, dbpool "
                                "(exit status 1 if a target is missed)")
    bench.add_argument("--dsn", default=os.environ.get("DBPOOL_DSN"),
                       help="libpq conninfo or URI (default: $DBPOOL_DSN, else embedded)")
    bench.add_argument("--duration", type=float, default=0.5,
                       help="seconds per contender per round (--remote: at least 1.0)")
    bench.add_argument("--rounds", type=int, default=None,
                       help="rounds per scenario; cells are medians over them "
                            "(default: 10, or 7 with --remote)")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.add_argument("--stream-rows", type=int, metavar="N",
                       help="instead, stream N rows through pool.stream and report the "
                            "peak RSS growth (exit status 1 if it reaches --rss-limit-mb)")
    bench.add_argument("--max-rows", type=int, default=500,
                       help="rows per fetch with --stream-rows")
    bench.add_argument("--rss-limit-mb", type=float, default=100.0,
                       help="the peak RSS growth allowed with --stream-rows")
    bench.add_argument("--remote", action="store_true",
                       help="instead, benchmark `dbpool serve` against PgBouncer and direct "
                            "psycopg from client processes (exit status 1 if a target is "
                            "missed or not measured)")
    bench.add_argument("--fairness", action="store_true",
                       help="instead, flood a pool of 2 from one client and time another "
                            "client's requests, through dbpool serve and through PgBouncer")
    bench.add_argument("--sqlalchemy", action="store_true",
                       help="instead, SQLAlchemy Core SELECT 1 through an engine on a dbpool "
                            "pool, one with SQLAlchemy's QueuePool and psycopg_pool's recipe, "
                            "at 1 and 16 threads")
    bench.add_argument("--processes", default="1,4,16,64", metavar="N,N,...",
                       help="client process counts with --remote (default: %(default)s)")
    bench.add_argument("--tasks", type=int, default=256, metavar="N",
                       help="asyncio tasks of the one-process row with --remote, 0 to leave "
                            "it out (default: %(default)s)")
    bench.add_argument("--overload-seconds", type=float, default=20.0, metavar="SECONDS",
                       help="seconds of the overload row through each pooler with --remote, "
                            "0 to leave it out (default: %(default)s)")

    serve = commands.add_parser(
        "serve", help="serve the pool over ZeroMQ (on the embedded PostgreSQL without a DSN)")
    from .server.config import add_serve_arguments

    add_serve_arguments(serve)

    query = commands.add_parser("query", help="run one statement on a dbpool server")
    query.add_argument("sql")
    query.add_argument("params", nargs="*", help="parameters for %%s placeholders, as text")
    query.add_argument("--pool", default=os.environ.get("DBPOOL_POOL"),
                       help="the server's pool to run it on (default: $DBPOOL_POOL, else the "
                            "server's default pool)")
    _add_client_arguments(query)
    status = commands.add_parser("status", help="print a dbpool server's status and metrics")
    _add_client_arguments(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    admin = commands.add_parser("admin", help="run an admin operation on a dbpool server")
    admin.add_argument("operation", choices=["pause", "resume", "drain", "disconnect-all",
                                              "status", "clients", "reload", "kick"])
    admin.add_argument("name", nargs="?", help="kick: the client's name")
    admin.add_argument("--pool", default=None,
                       help="the pool to act on (default: every pool)")
    admin.add_argument("--seconds", type=float, default=None,
                       help="drain: how long to wait; disconnect-all: over how long")
    _add_client_arguments(admin)

    health = commands.add_parser(
        "healthcheck", help="exit 0 if dbpool serve is ready (or live), else 1: for "
                            "container health checks")
    health.add_argument("--url", default=None,
                        help="the health URL (default: http://$DBPOOL_METRICS_BIND/health/ready, "
                             "else http://127.0.0.1:9187/health/ready)")
    health.add_argument("--live", action="store_true",
                        help="ask /health/live (the request loop runs) instead of ready")
    health.add_argument("--timeout", type=float, default=5.0)

    keygen = commands.add_parser(
        "keygen", help="write a CURVE key pair: NAME.key (public) and NAME.key_secret")
    keygen.add_argument("name", help="the key's name: a client's name is its key's name")
    keygen.add_argument("--dir", default=".", help="the folder to write into (default: .)")

    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "query":
        from .client.commands import query_command

        return query_command(args.endpoint, args.sql, args.params or None, args.timeout,
                             sys.stdout, args.server_key, args.client_key, args.pool)
    if args.command == "status":
        from .client.commands import status_command

        return status_command(args.endpoint, args.timeout, args.json, sys.stdout,
                              args.server_key, args.client_key)
    if args.command == "keygen":
        return _keygen(args)
    if args.command == "healthcheck":
        return _healthcheck(args)
    if args.command == "admin":
        from .client.commands import admin_command

        if args.operation == "kick" and not args.name:
            print("dbpool admin kick: name the client", file=sys.stderr)
            return 2
        return admin_command(args.endpoint, args.operation.replace("-", "_"), args.pool,
                             args.name, args.seconds, args.timeout, sys.stdout,
                             args.server_key, args.client_key)
    if args.command == "demo":
        return _demo(args)
    if args.command == "bench":
        return _bench(args)
    return 2  # pragma: no cover - argparse enforces a command


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint", default=os.environ.get("DBPOOL_ENDPOINT", "tcp://127.0.0.1:7432"),
        help="the server's request endpoint (default: $DBPOOL_ENDPOINT, else %(default)s)")
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument(
        "--server-key", default=None, metavar="PATH",
        help="the server's public key (its NAME.key, or Z85 text), for a server that uses "
             "CURVE (default: $DBPOOL_SERVER_KEY)")
    parser.add_argument(
        "--client-key", default=None, metavar="PATH",
        help="this client's secret key (NAME.key_secret, or Z85 text) "
             "(default: $DBPOOL_CLIENT_KEY)")


def _healthcheck(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = args.url
    if url is None:
        bind = os.environ.get("DBPOOL_METRICS_BIND") or "127.0.0.1:9187"
        url = f"http://{bind}/health/{'live' if args.live else 'ready'}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = response.read().decode(errors="replace")
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(errors="replace"), exc.code
    except (urllib.error.URLError, OSError) as exc:
        print(f"dbpool healthcheck: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    line = " ".join(body.split())
    print(f"dbpool healthcheck: {url}: {status} {line}")
    return 0 if status == 200 else 1


def _keygen(args: argparse.Namespace) -> int:
    from .errors import ConfigurationError
    from .keys import write_key_pair

    try:
        public, secret = write_key_pair(args.name, args.dir)
    except (ConfigurationError, OSError) as exc:
        print(f"dbpool keygen: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret: "
          "keep it private)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .errors import ConfigurationError, DBPoolError
    from .server.config import load_config
    from .server.serve import serve

    try:
        config = load_config(args)
    except DBPoolError as exc:
        print(f"dbpool serve: {exc}", file=sys.stderr)
        return 2
    from .logformat import configure

    configure(logging.DEBUG if args.verbose else config.log_level_number(), config.log_format)
    if not args.verbose:  # pgserver logs every pg_ctl call at INFO
        logging.getLogger("pgserver").setLevel(logging.WARNING)
    if config.dsn is None:
        print("no DSN given: starting the embedded PostgreSQL", flush=True)
    try:
        return serve(config, reload=lambda: load_config(args))
    except ConfigurationError as exc:  # a bad key file, an endpoint that will not bind
        print(f"dbpool serve: {exc}", file=sys.stderr)
        return 2
    except (DBPoolError, OSError) as exc:
        print(f"dbpool serve: {exc}", file=sys.stderr)
        return 1


def _print_event(event: ConnectionEvent | HealthEvent) -> None:
    if isinstance(event, HealthEvent):
        print(f"[event] pool {event.pool} health {event.previous} -> {event.state}", flush=True)
        return
    reason = f" ({event.reason})" if event.reason else ""
    print(f"[event] connection {event.index} {event.kind}: backend pid "
          f"{event.backend_pid}{reason}", flush=True)


def _bench(args: argparse.Namespace) -> int:
    from .bench.inprocess import run, stream
    from .embedded import embedded_conninfo

    dsn = args.dsn or embedded_conninfo()
    if args.fairness:
        from .bench.fairness import run_fairness

        run_fairness(dsn, duration=max(args.duration, 3.0), as_json=args.json)
        return 0
    if args.remote:
        from .bench.remote import ROUNDS, parse_processes, run_remote

        try:
            processes = parse_processes(args.processes)
        except ValueError as exc:
            print(f"dbpool bench: --processes: {exc}", file=sys.stderr)
            return 2
        report = run_remote(dsn, processes=processes, duration=max(args.duration, 1.0),
                            rounds=args.rounds if args.rounds is not None else ROUNDS,
                            as_json=args.json, tasks=max(args.tasks, 0),
                            overload_seconds=max(args.overload_seconds, 0.0))
        return 0 if report["ok"] else 1
    if args.sqlalchemy:
        try:
            from .bench.sqlalchemy_core import run_sqlalchemy
        except ImportError as exc:  # the sqlalchemy or bench extra is not installed
            print(f"dbpool bench --sqlalchemy: {exc} (pip install 'dbpool[bench,sqlalchemy]')",
                  file=sys.stderr)
            return 2
        run_sqlalchemy(dsn, duration=args.duration,
                       rounds=args.rounds if args.rounds is not None else 10, as_json=args.json)
        return 0
    if args.stream_rows is not None:
        report = stream(dsn, args.stream_rows, max_rows=args.max_rows,
                        limit_mb=args.rss_limit_mb, as_json=args.json)
        return 0 if report["within_limit"] else 1
    report = run(dsn, duration=args.duration,
                 rounds=args.rounds if args.rounds is not None else 10, as_json=args.json)
    return 0 if report["ok"] else 1


def _demo(args: argparse.Namespace) -> int:
    from .errors import DBPoolError
    from .pool import Pool

    if args.dsn is None:
        print("no DSN given: starting the embedded PostgreSQL", flush=True)
    try:
        pool = Pool.start(args.dsn, pool_size=args.pool_size, name="demo",
                          connection_listeners=[_print_event])
    except DBPoolError as exc:
        print(f"dbpool: {exc}", file=sys.stderr)
        return 1
    try:
        version = pool.query("SHOW server_version").rows[0][0]
        print(f"connected to PostgreSQL {version}", flush=True)
        served: dict[int, int] = {}
        lock = threading.Lock()

        def work() -> None:
            for _ in range(args.queries):
                pid = pool.query("SELECT pg_backend_pid()").rows[0][0]
                with lock:
                    served[pid] = served.get(pid, 0) + 1

        threads = [threading.Thread(target=work) for _ in range(args.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total = sum(served.values())
        print(f"ran {total} queries from {args.threads} threads on "
              f"{len(served)} connections:", flush=True)
        for pid, count in sorted(served.items()):
            print(f"  backend pid {pid}: {count} queries", flush=True)
        print(f"metrics: {pool.metrics()}", flush=True)
    except DBPoolError as exc:
        print(f"dbpool: {exc}", file=sys.stderr)
        return 1
    finally:
        pool.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
