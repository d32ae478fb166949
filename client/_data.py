"""``copy_from``'s data as blocks, for the sync client and, from async iterables too,
for the asyncio client (the async requests call :func:`ablocks`, their sync twin
:func:`blocks`)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from dbpool.copy_data import CopyData, blocks

__all__ = ["ablocks", "blocks"]


async def ablocks(data: CopyData | AsyncIterable[bytes | str],
                  size: int) -> AsyncIterator[bytes]:
    """:func:`dbpool.copy_data.blocks`, for an async iterable too."""
    if not isinstance(data, AsyncIterable):
        for block in blocks(data, size):
            yield block
        return
    pending: list[bytes | str] = []
    held = 0
    async for piece in data:
        pending.append(piece)
        held += len(piece)
        if held >= size:
            for block in blocks(pending, size):
                yield block
            pending, held = [], 0
    for block in blocks(pending, size):
        yield block
