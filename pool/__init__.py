"""The pool: in-process checkout, the pool actor and its options.

``from dbpool.pool import Pool`` is the entry point; see :mod:`dbpool.pool.pool`.
"""

from .connection import Connection
from .options import PoolOptions
from .pool import Pool

__all__ = ["Connection", "Pool", "PoolOptions"]
