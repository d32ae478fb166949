"""The pool's code that has a sync and an asyncio form, written once, for asyncio.

``pool/_sync`` is generated from here by ``.ci/generate_sync.py`` (``async`` and
``await`` dropped, the ``a``-prefixed and ``Async`` names renamed): edit these
files, then run ``python .ci/generate_sync.py`` (CI fails when the twin is stale).
The differences that are more than syntax live outside, in pairs that the
rename maps onto each other: ``CheckoutQueue.get`` / ``aget`` (a thread
waits on a lock, a task on a future), ``Connection`` / ``AsyncConnection``
(every call of the latter runs on a worker thread), ``PoolCore.hold`` /
``ahold`` (a thread's or a task's connection) and ``Checkin.take_back`` /
``atake_back``.
"""
