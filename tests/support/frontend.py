"""``dbpool serve``'s front end on a thread of the test's own process.

Unlike :class:`tests.support.remote.ServerProcess`, the test can then call
the served pool's own methods (``pool.listen``, ``pool.open_circuit``...)
while remote clients use it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dbpool.pool import Pool
from dbpool.server.config import ServeConfig
from dbpool.server.frontend import FrontEnd


@contextmanager
def front_end(pool: Pool, **settings: Any) -> Iterator[FrontEnd]:
    """Serve ``pool`` on free loopback ports until the block ends."""
    config = ServeConfig(**{"bind": "tcp://127.0.0.1:*", "events_bind": "tcp://127.0.0.1:*",
                            "pool_size": pool.options.pool_size, "name": pool.name,
                            "grace": 2.0, **settings})
    front = FrontEnd(pool, config)
    thread = threading.Thread(target=front.run, daemon=True, name="front-end")
    thread.start()
    try:
        yield front
    finally:
        front.stop()
        thread.join(10)
