"""The front end's readiness poller: ``epoll`` where the system has it, else ``poll``.

Why not ``poll`` alone: it hands the kernel every registered descriptor on
every call, and the front end's loop calls it once or twice per request.  So
each request paid for every connected client, busy or idle.  With 1,000 idle
clients connected, 4 processes of ``SELECT 1`` got 5,900 q/s through ``poll``
(the server's CPU per request 164 µs) and 9,050 through ``epoll`` (87 µs);
with no idle client, 64 processes got 10% more (``docs/performance.md``).
``epoll`` keeps the set in the kernel, and a call costs what is ready.

:class:`Poller` has ``select.poll``'s interface, with one difference: its
timeout is in seconds.  ``poll`` is the system's own method, called as is on
the hot path.
"""

from __future__ import annotations

import errno
import select
from collections.abc import Callable

__all__ = ["Poller"]

_EPOLL = getattr(select, "epoll", None)


class Poller:
    """Descriptors and the events (``select.POLLIN``, ``POLLOUT``) they are watched for.

    - :meth:`register` watches a descriptor (again: changes its events);
    - :meth:`modify` changes its events;
    - :meth:`unregister` stops watching it (``KeyError`` if it was not watched);
    - ``poll(timeout)`` waits up to ``timeout`` seconds (None: for ever) and
      returns ``(fd, events)`` for each ready descriptor.

    A descriptor must be unregistered before it is closed: the kernel forgets a
    closed one by itself under ``epoll``, but ``poll`` would report it ``POLLNVAL``.
    """

    __slots__ = ("_epoll", "_poll", "poll")

    poll: Callable[[float | None], list[tuple[int, int]]]

    def __init__(self, epoll: bool = True) -> None:
        """``epoll=False`` uses ``poll`` even where ``epoll`` exists (for tests)."""
        self._epoll = _EPOLL() if epoll and _EPOLL is not None else None
        if self._epoll is not None:
            self.poll = self._epoll.poll
        else:  # not Linux: poll, whose timeout is in milliseconds
            self._poll = select.poll()
            self.poll = self._poll_seconds

    def _poll_seconds(self, timeout: float | None) -> list[tuple[int, int]]:
        return self._poll.poll(None if timeout is None or timeout < 0 else timeout * 1000)

    def register(self, fd: int, events: int) -> None:
        epoll = self._epoll
        if epoll is None:
            self._poll.register(fd, events)
            return
        try:
            epoll.register(fd, events)
        except FileExistsError:
            epoll.modify(fd, events)

    def modify(self, fd: int, events: int) -> None:
        epoll = self._epoll
        if epoll is None:
            self._poll.modify(fd, events)
            return
        epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        epoll = self._epoll
        if epoll is None:
            self._poll.unregister(fd)
            return
        try:
            epoll.unregister(fd)
        except OSError as error:
            # ENOENT: not watched; EBADF: closed already, which epoll forgets by itself.
            if error.errno in (errno.ENOENT, errno.EBADF):
                raise KeyError(fd) from None
            raise

    def close(self) -> None:
        """Release the kernel's set (``epoll``); the poller is unusable afterwards."""
        if self._epoll is not None:
            self._epoll.close()
