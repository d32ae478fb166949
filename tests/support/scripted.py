"""A scripted driver for deterministic unit tests of pool logic.

Like db_connection's TestConnection: each callback takes the next entry of
its script, so a test says exactly what the "database" does ("connect fails
twice, then works; the first ping says disconnect") and then reads back
every call the pool made, with the time it was made.

Script entries per callback name:

- for ``connect``: an exception (raised) or a state object (returned);
- for the others: an Outcome (``Ok``, ``Error``, ``Disconnect``,
  ``WrongStatus``), or an exception, which is *raised* (a driver bug);
- or a callable, called with the callback's arguments, whose return value
  is used as above.

An exhausted script falls back to success: a fresh :class:`FakeState` from
``connect`` and ``Ok`` from everything else.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dbpool.driver import Ok, Result

__all__ = ["Call", "FakeState", "ScriptedDriver"]

_ids = itertools.count(1)


@dataclass
class FakeState:
    """What a scripted connect returns: an id standing in for a backend pid."""

    backend_pid: int = field(default_factory=lambda: next(_ids))
    closed: bool = False


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Any, ...]
    at: float


class ScriptedDriver:
    """A Driver whose every answer comes from a script."""

    def __init__(self, script: Mapping[str, Iterable[Any]] | None = None) -> None:
        self._script: dict[str, deque[Any]] = {k: deque(v) for k, v in (script or {}).items()}
        self.calls: list[Call] = []
        self._cond = threading.Condition()

    def add(self, name: str, *entries: Any) -> None:
        """Append entries to the script of callback ``name``."""
        with self._cond:
            self._script.setdefault(name, deque()).extend(entries)

    def calls_to(self, name: str) -> list[Call]:
        with self._cond:
            return [c for c in self.calls if c.name == name]

    def wait_for(self, name: str, count: int, timeout: float = 5.0) -> list[Call]:
        """Block until ``name`` was called ``count`` times; return those calls."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len([c for c in self.calls if c.name == name]) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{name} called {len(self.calls_to(name))} times, expected {count}"
                    )
                self._cond.wait(remaining)
        return self.calls_to(name)[:count]

    def _answer(self, name: str, args: tuple[Any, ...], default: Callable[[], Any]) -> Any:
        with self._cond:
            self.calls.append(Call(name, args, time.monotonic()))
            self._cond.notify_all()
            queue = self._script.get(name)
            entry = queue.popleft() if queue else None
        if entry is None:
            return default()
        if callable(entry) and not isinstance(entry, type):
            entry = entry(*args)
        if isinstance(entry, BaseException):
            raise entry
        return entry

    # -- the Driver callbacks ---------------------------------------------

    def connect(self, opts: Mapping[str, Any]) -> Any:
        return self._answer("connect", (dict(opts),), FakeState)

    def disconnect(self, err: BaseException | None, state: Any) -> None:
        self._answer("disconnect", (err, state), lambda: None)
        if isinstance(state, FakeState):
            state.closed = True

    def checkout(self, state: Any) -> Any:
        return self._answer("checkout", (state,), lambda: Ok(None))

    def ping(self, state: Any) -> Any:
        return self._answer("ping", (state,), lambda: Ok(None))

    def handle_begin(self, opts: Any, state: Any) -> Any:
        return self._answer("handle_begin", (opts, state), lambda: Ok(_result("BEGIN")))

    def handle_commit(self, opts: Any, state: Any) -> Any:
        return self._answer("handle_commit", (opts, state), lambda: Ok(_result("COMMIT")))

    def handle_rollback(self, opts: Any, state: Any) -> Any:
        return self._answer("handle_rollback", (opts, state), lambda: Ok(_result("ROLLBACK")))

    def handle_status(self, opts: Any, state: Any) -> Any:
        return self._answer("handle_status", (opts, state), lambda: Ok("idle"))

    def handle_prepare(self, query: Any, opts: Any, state: Any) -> Any:
        return self._answer("handle_prepare", (query, opts, state), lambda: Ok(query))

    def handle_execute(self, query: Any, params: Any, opts: Any, state: Any) -> Any:
        return self._answer("handle_execute", (query, params, opts, state),
                            lambda: Ok(_result("SELECT 0")))

    def handle_close(self, query: Any, opts: Any, state: Any) -> Any:
        return self._answer("handle_close", (query, opts, state), lambda: Ok(None))

    def handle_declare(self, query: Any, params: Any, opts: Any, state: Any) -> Any:
        return self._answer("handle_declare", (query, params, opts, state), lambda: Ok(object()))

    def handle_fetch(self, query: Any, cursor: Any, opts: Any, state: Any) -> Any:
        return self._answer("handle_fetch", (query, cursor, opts, state),
                            lambda: Ok(("halt", _result("FETCH 0"))))

    def handle_deallocate(self, query: Any, cursor: Any, opts: Any, state: Any) -> Any:
        return self._answer("handle_deallocate", (query, cursor, opts, state), lambda: Ok(None))

    def handle_copy(self, query: Any, params: Any, direction: Any, opts: Any,
                    state: Any) -> Any:
        return self._answer("handle_copy", (query, params, direction, opts, state),
                            lambda: Ok(object()))

    def handle_copy_read(self, copy: Any, opts: Any, state: Any) -> Any:
        return self._answer("handle_copy_read", (copy, opts, state), lambda: Ok(None))

    def handle_copy_write(self, copy: Any, data: Any, opts: Any, state: Any) -> Any:
        return self._answer("handle_copy_write", (copy, data, opts, state), lambda: Ok(None))

    def handle_copy_end(self, copy: Any, error: Any, opts: Any, state: Any) -> Any:
        return self._answer("handle_copy_end", (copy, error, opts, state),
                            lambda: Ok(_result("COPY 0")))


def _result(command: str) -> Result:
    return Result([], [], 0, command)
