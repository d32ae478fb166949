"""Which client connections a session reaches the server through, and when they are gone.

A lease (a transaction, a stream, a copy) belongs to a client *session*, and
a session reaches the server through one or more ZeroMQ connections: one
per thread of a sync client, plus its heartbeat socket.  When the client
process dies, the kernel closes all of them at once, and libzmq's socket
monitor reports each ``DISCONNECTED`` with its file descriptor.  The front
end then rolls the session's leases back at once, as DBConnection releases
a dead owner's connection when its monitor fires, instead of waiting for
``heartbeat_timeout`` (which remains for clients that hang or are cut off
without their connections closing).

:class:`Peers` keeps, for each session holding a lease, the connections its
requests came through, each as its descriptor (the ``SRCFD`` property of a
received message) and the identity of the socket behind it (its inode, from
``fstat``).  A descriptor number is reused as soon as it is closed, perhaps
by a new client that sends before the old one's ``DISCONNECTED`` has been
read; the inode tells the new socket from the old one.  The monitor may also
report a disconnection a moment before libzmq closes the descriptor, so a
reported descriptor stays *suspect* and is looked at again on each tick for
:data:`SUSPECT_FOR` seconds.

A session is dead once every connection it was seen through is gone.
"""

from __future__ import annotations

import os
from collections.abc import Container

__all__ = ["SUSPECT_FOR", "Peers"]

#: Seconds a descriptor reported disconnected is watched for its socket to go.
SUSPECT_FOR = 1.0
#: Seconds a session with no lease keeps its record (a begin may be in flight).
_UNUSED_FOR = 60.0

Peer = tuple[int, int]  # (descriptor, inode of the socket behind it)


def _inode(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:  # closed
        return None


class Peers:
    """The connections of lease-holding sessions (see the module docstring)."""

    def __init__(self) -> None:
        self._of_session: dict[str, set[Peer]] = {}
        self._sessions_of_fd: dict[int, set[str]] = {}
        self._since: dict[str, float] = {}  # when each session was first seen
        self._suspects: dict[int, float] = {}  # descriptor -> watch until

    def __len__(self) -> int:
        return len(self._of_session)

    @property
    def watching(self) -> bool:
        """Whether some reported descriptor is still being watched."""
        return bool(self._suspects)

    def note(self, session: str, fd: int, now: float) -> None:
        """A request of ``session`` came through the connection with descriptor ``fd``."""
        inode = _inode(fd)
        if inode is None:
            return
        peers = self._of_session.get(session)
        if peers is None:
            peers = self._of_session[session] = set()
            self._since[session] = now
        elif (fd, inode) in peers:
            return
        peers.add((fd, inode))
        self._sessions_of_fd.setdefault(fd, set()).add(session)

    def disconnected(self, fd: int, now: float) -> None:
        """The monitor reported the connection with descriptor ``fd`` closed."""
        if fd in self._sessions_of_fd:
            self._suspects[fd] = now + SUSPECT_FOR

    def dead(self, now: float) -> list[str]:
        """Sessions whose connections have all closed (each reported once)."""
        dead: list[str] = []
        for fd, until in list(self._suspects.items()):
            inode = _inode(fd)
            for session in list(self._sessions_of_fd.get(fd, ())):
                peers = self._of_session.get(session)
                if peers is None:
                    continue
                for peer in [p for p in peers if p[0] == fd and p[1] != inode]:
                    peers.discard(peer)
                    self._unlink(fd, session)
                if not peers:
                    dead.append(session)
                    self.forget(session)
            if now >= until or fd not in self._sessions_of_fd:
                del self._suspects[fd]
        return dead

    def alive(self, session: str) -> bool:
        """False if ``session`` was seen and all its connections have closed since."""
        peers = self._of_session.get(session)
        if peers is None:
            return True  # never seen: nothing says otherwise
        return any(_inode(fd) == inode for fd, inode in peers)

    def forget(self, session: str) -> None:
        """``session`` holds no lease any more."""
        for fd, _ in self._of_session.pop(session, ()):
            self._unlink(fd, session)
        self._since.pop(session, None)

    def prune(self, now: float, holding: Container[str]) -> None:
        """Forget sessions seen long ago that hold no lease (a begin that failed)."""
        stale = [s for s, since in self._since.items()
                 if s not in holding and now - since > _UNUSED_FOR]
        for session in stale:
            self.forget(session)

    def _unlink(self, fd: int, session: str) -> None:
        sessions = self._sessions_of_fd.get(fd)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions_of_fd[fd]
