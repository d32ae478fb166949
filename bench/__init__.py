"""``dbpool bench``: dbpool against its peers, every contender side by side in one run.

:mod:`dbpool.bench.inprocess` measures the in-process pool against raw psycopg
and psycopg_pool; :mod:`dbpool.bench.remote` measures ``dbpool serve`` and its
client against PgBouncer and direct connections.  Neither is part of the
pool or the service: they drive them from outside, as their users do.
"""
