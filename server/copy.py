"""A COPY driven from the front end's loop, on a connection held for it.

``COPY ... TO STDOUT`` and ``COPY ... FROM STDIN`` use PostgreSQL's copy
sub-protocol, which cannot share a pipeline with other requests: libpq
would hand the front end the same COPY result for ever (the loop span at
100% CPU, growing, before this module existed), and a COPY FROM swallows the
Syncs of whatever was sent behind it.  So a COPY runs only on a connection
held for it (a lease, or one of its own) with nothing in flight: the
:class:`~dbpool.server.pipeline.Pipe` leaves pipeline mode, a :class:`Copy`
drives the connection until the COPY's result is in, and the pipe goes back
to pipeline mode.

Memory stays bounded in both directions:

- **out**: data is read from libpq one page (``page_bytes``) at a time.
  Once a page is full, the copy stops reading the socket (:attr:`Copy.reading`
  is false, and the loop stops polling it) until the client asks for the
  next page; PostgreSQL is held back by TCP, not by the server's memory.
- **in**: a block of data is acknowledged only once libpq has handed it to
  the socket; the client sends the next block after the acknowledgement.

Every libpq call is non-blocking; :meth:`Copy.read` and :meth:`Copy.flush`
are called by the loop when the socket is readable or writable.  When
anything changes (data arrived, a block was taken, the COPY ended or
failed), the copy calls its ``notify`` callback; the front end then answers
whoever waits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg import pq

from dbpool.driver import CopyDirection
from dbpool.errors import StatementNotAllowed

if TYPE_CHECKING:
    from .pipeline import Pipe

__all__ = ["Copy", "Phase"]

logger = logging.getLogger("dbpool.server.copy")

#: ``starting`` (the statement is sent), ``data`` (data flows), ``ending``
#: (the end is sent or the data is all in; waiting for the result), ``done``.
Phase = Literal["starting", "data", "ending", "done"]

_COPY_OUT = int(pq.ExecStatus.COPY_OUT)
_COPY_IN = int(pq.ExecStatus.COPY_IN)
_FATAL = int(pq.ExecStatus.FATAL_ERROR)
_BAD = int(pq.ConnStatus.BAD)


class Copy:
    """One COPY on a held pipe (see the module docstring).

    The front end reads :attr:`phase`, :attr:`blocks`, :attr:`result` and
    :attr:`error` when ``notify(copy)`` is called, and drives it with
    :meth:`take_page`, :meth:`write`, :meth:`end` and :meth:`abort`.
    """

    def __init__(self, pipe: Pipe, statement: bytes, direction: CopyDirection,
                 page_bytes: int, notify: Callable[[Copy], None]) -> None:
        self.pipe = pipe
        self.statement = statement
        self.direction = direction
        self.page_bytes = page_bytes
        self.notify = notify
        self.phase: Phase = "starting"
        #: Data read and not yet taken (out).
        self.blocks: list[bytes] = []
        self.size = 0
        #: Whether the copy wants the socket read (out: false while a page waits).
        self.reading = True
        #: A block libpq could not take yet (in).
        self.pending: bytes | None = None
        #: Bytes of data moved so far.
        self.moved = 0
        #: The COPY's last result (``COPY n``), once it is in.
        self.result: pq.abc.PGresult | None = None
        #: Why the COPY failed (a SQL error, or the connection lost).
        self.error: BaseException | None = None
        #: Out: data still arriving is thrown away (the client closed it early).
        self.discarding = False
        #: A cancel was sent because a request waiting on the copy ran out of time.
        self.cancelling = False

    # -- starting ------------------------------------------------------------

    def start(self) -> None:
        """Leave pipeline mode and send the COPY statement (parameters merged in)."""
        pgconn = self.pipe.pgconn
        try:
            pgconn.exit_pipeline_mode()
            pgconn.send_query_params(self.statement, None)
        except psycopg.Error as error:
            self._lost(error)
            return
        self.flush()

    # -- the loop's calls ------------------------------------------------------

    def flush(self) -> None:
        """Send what libpq holds; a block or end that waited for room goes now."""
        pipe, pgconn = self.pipe, self.pipe.pgconn
        try:
            pipe.wants_write = pgconn.flush() == 1
            if self.pending is not None and not pipe.wants_write:
                self._put(self.pending)
        except psycopg.Error as error:
            self._failed_or_lost(error)
            return
        if self.pending is None and not pipe.wants_write and self.phase == "data" \
                and self.direction == "in":
            self.notify(self)  # the last block is on its way: it may be acknowledged

    def read(self) -> None:
        """Take what arrived: the COPY's start, data, its result."""
        pgconn = self.pipe.pgconn
        try:
            # Called while paused only for a hang-up or an error on the socket
            # (the loop polls no POLLIN then): reading is how libpq learns of it.
            pgconn.consume_input()
            if self.phase == "starting":
                self._started()
            if self.phase == "data":
                if self.direction == "out" or self.discarding:
                    self._read_data()
                else:
                    # Has the server ended the COPY (an error mid-way)?  is_busy()
                    # parses what arrived; an empty block is refused once it has.
                    pgconn.is_busy()
                    pgconn.put_copy_data(b"")
            if self.phase == "ending":
                self._read_result()
        except psycopg.Error as error:
            self._failed_or_lost(error)
            return
        if self.phase != "done" and pgconn.status == _BAD:
            self._lost(psycopg.OperationalError("the server closed the connection"))

    # -- the front end's calls -------------------------------------------------

    def take_page(self) -> bytes:
        """The data read so far (out); :meth:`resume` goes on reading."""
        data = b"".join(self.blocks)
        self.blocks, self.size = [], 0
        return data

    def resume(self) -> None:
        """Read on after a page was taken (libpq may hold more already, which the
        socket will not say)."""
        if self.phase == "data" and not self.reading:
            self.reading = True
            self.read()

    def write(self, data: bytes) -> None:
        """Send a block of data (in); ``notify`` says when it is on its way."""
        try:
            self._put(data)
            self.pipe.wants_write = self.pipe.pgconn.flush() == 1
        except psycopg.Error as error:
            self._failed_or_lost(error)
            return
        if self.pending is None and not self.pipe.wants_write:
            self.notify(self)

    def acknowledged(self) -> bool:
        """Whether the blocks written so far have all left for the server (in)."""
        return self.pending is None and not self.pipe.wants_write

    def end(self, error: str | None = None) -> None:
        """End the data (in): the COPY takes the rows, or with ``error`` takes none."""
        if self.phase != "data":
            return
        pgconn = self.pipe.pgconn
        try:
            if pgconn.put_copy_end(error.encode() if error is not None else None) != 1:
                # Non-blocking libpq could not queue it: it never says this for an
                # end message with room in its buffer, so treat it as lost.
                raise psycopg.OperationalError("sending the end of the COPY failed")
            self.pipe.wants_write = pgconn.flush() == 1
        except psycopg.Error as error2:
            self._failed_or_lost(error2)
            return
        self.phase = "ending"
        self.read()

    def abort(self, why: str) -> None:
        """Stop the COPY: an in-COPY takes no row; an out-COPY's data is thrown away
        (the caller cancels the statement, so the rest arrives soon)."""
        if self.direction == "in":
            self.pending = None
            self.end(why)
            return
        self.discarding = True
        self.blocks, self.size = [], 0
        self.reading = True
        self.read()

    # -- inside ----------------------------------------------------------------

    def _started(self) -> None:
        pgconn = self.pipe.pgconn
        if pgconn.is_busy():
            return
        result = pgconn.get_result()
        if result is None:  # never happens before the first result; be safe
            return
        status = result.status
        if status == (_COPY_OUT if self.direction == "out" else _COPY_IN):
            self.phase = "data"
            self.notify(self)
            return
        self.result = result
        if status == _FATAL:
            self.error = psycopg.errors.error_from_result(result, self.pipe.encoding)
        else:  # COPY to or from a file on the server, or the other direction
            other = {_COPY_OUT: "TO STDOUT", _COPY_IN: "FROM STDIN"}.get(status)
            if other is not None:
                call = "copy_from (copy_in)" if status == _COPY_OUT else "copy_to (copy_out)"
                self.error = StatementNotAllowed(
                    f"the statement is a COPY {other}, the wrong way round for {call}; "
                    "it was stopped", scope="copy")
                self.discarding = True
                if status == _COPY_IN:
                    pgconn.put_copy_end(b"COPY the wrong way round: stopped")
                    self.phase = "ending"
                    return
                self.phase = "data"  # read out and thrown away
                return
        self.phase = "ending"

    def _read_data(self) -> None:
        if not self.reading:
            return
        pgconn = self.pipe.pgconn
        got = False
        while self.discarding or self.size < self.page_bytes:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                self.moved += nbytes
                if not self.discarding:
                    self.blocks.append(bytes(data))
                    self.size += nbytes
                    got = True
                continue
            if nbytes < 0:
                self.phase = "ending"  # -1: the data is all in
            break
        else:
            self.reading = False  # a page is full: wait for the client to take it
        if got and self.phase == "data":
            self.notify(self)

    def _read_result(self) -> None:
        pgconn = self.pipe.pgconn
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                self._done()
                return
            if result.status == _FATAL and self.error is None:
                self.error = psycopg.errors.error_from_result(result, self.pipe.encoding)
            if self.result is None or result.status != _FATAL:
                self.result = result

    def _put(self, data: bytes) -> None:
        """Hand ``data`` to libpq (in), or keep it until there is room."""
        if self.phase != "data":
            return
        if self.pipe.pgconn.put_copy_data(data) == 1:
            self.pending = None
            self.moved += len(data)
        else:
            self.pending = data

    def _done(self) -> None:
        """The result is in: back to pipeline mode; tell the front end."""
        try:
            self.pipe.pgconn.enter_pipeline_mode()
        except psycopg.Error as error:
            self._lost(error)
            return
        self.phase = "done"
        self.reading = True
        self.pipe.copy = None
        self.notify(self)

    def _failed_or_lost(self, error: psycopg.Error) -> None:
        """A libpq call raised: the COPY ended on an error, or the connection is gone."""
        pgconn = self.pipe.pgconn
        if pgconn.status == _BAD:
            self._lost(error)
            return
        # The server ended the COPY (an error mid-way): its result says why.
        self.pending = None
        self.phase = "ending"
        try:
            self._read_result()
        except psycopg.Error as error2:
            self._lost(error2)

    def _lost(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.phase = "done"
        self.reading = True
        self.pipe.copy = None
        self.pipe.break_(error)
        self.notify(self)

    def describe(self) -> dict[str, Any]:
        """For logs."""
        return {"direction": self.direction, "phase": self.phase, "moved": self.moved}
