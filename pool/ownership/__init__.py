"""The Ownership pool (DBConnection.Ownership) and the SQL sandbox built on it.

- :mod:`~dbpool.pool.ownership.core`: the pool core that lends each caller its
  owner's connection, and the answers of the ownership calls;
- :mod:`~dbpool.pool.ownership.owners`: owners (threads and asyncio tasks)
  and the callers chain;
- :mod:`~dbpool.pool.ownership.manager`: the manager actor that serializes
  every change of ownership;
- :mod:`~dbpool.pool.ownership.proxy`: one owned connection, lent in turns;
- :mod:`~dbpool.pool.ownership.sandbox`: Ecto's SQL Sandbox as ownership hooks;
- :mod:`~dbpool.pool.ownership.pytest_plugin`: pytest fixtures for the sandbox.
"""
