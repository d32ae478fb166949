"""The pool: in-process checkout, the pool actor and its options.

``from dbpool.pool import Pool`` is the entry point; see :mod:`dbpool.pool.pool`.
``Pool.start(..., pool="ownership")`` returns an :class:`OwnershipPool`.
"""

from .connection import Connection
from .options import PoolOptions, PoolStartOptions
from .ownership.pool import OwnershipPool
from .pool import AsyncCheckout, AsyncPoolTransaction, Checkout, Pool, PoolTransaction

__all__ = ["AsyncCheckout", "AsyncPoolTransaction", "Checkout", "Connection", "OwnershipPool",
           "Pool", "PoolOptions", "PoolStartOptions", "PoolTransaction"]
