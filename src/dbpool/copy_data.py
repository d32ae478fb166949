"""What ``copy_from`` takes, in-process and remote, and how it is cut into blocks.

The data of a ``COPY ... FROM STDIN`` may be one ``bytes`` or ``str``, an
iterable of them (rows from a generator, say), or a file object opened in
binary or text mode.  :func:`blocks` turns any of these into ``bytes``
blocks of at most ``size`` bytes: small pieces are joined and large ones cut,
so that memory holds one block at a time, a generator of short rows does not
cost a round trip per row, and no block is larger than the server takes.  ``str`` is encoded as
UTF-8, the client encoding dbpool's connections use.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeAlias

__all__ = ["BLOCK_SIZE", "CopyData", "blocks"]

#: What ``copy_from`` takes: one block, blocks, or a file object to read them from.
CopyData: TypeAlias = "bytes | bytearray | memoryview | str | Iterable[bytes | str] | IO[Any]"

#: The default size of a block: large enough that a round trip per block is
#: cheap, small enough that a block in memory is.
BLOCK_SIZE = 256 * 1024


def blocks(data: CopyData, size: int = BLOCK_SIZE) -> Iterator[bytes]:
    """``data`` as blocks of at most ``size`` bytes (see the module docstring)."""
    pending: list[bytes] = []
    held = 0
    for piece in _pieces(data, size):
        raw = memoryview(piece.encode() if isinstance(piece, str) else piece).cast("B")
        while raw:
            if held + len(raw) > size:
                if held:
                    yield b"".join(pending)
                    pending, held = [], 0
                if len(raw) > size:  # a piece too large for one block: cut it
                    yield bytes(raw[:size])
                    raw = raw[size:]
                    continue
            pending.append(bytes(raw))
            held += len(raw)
            break
    if pending:
        yield b"".join(pending)


def _pieces(data: CopyData, size: int) -> Iterable[bytes | bytearray | memoryview | str]:
    if isinstance(data, bytes | bytearray | memoryview | str):
        return (data,)
    read = getattr(data, "read", None)
    if read is not None:
        return iter(lambda: read(size), read(0))
    return data
