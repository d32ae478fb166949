"""Test-support helpers.

* :mod:`tests.support.pgcluster` -- ``PgCluster``: private, throwaway PostgreSQL servers.
* :mod:`tests.support.faultproxy` -- ``FaultProxy``: a TCP proxy that injects network faults.
* :mod:`tests.support.pools` -- ``start_named``: a started pool and its connection events;
  ``POOL_KINDS``: the pool kinds a module can run its tests against.
* :mod:`tests.support.server` -- what a server sees: backends, running statements.

Import from the modules directly; this package init stays empty so importing
one helper never drags in (or starts) another.
"""
