"""Owners and the callers chain: who an ownership pool lends connections to.

An **owner** is a thread or an asyncio task.  The ownership pool (see
:mod:`dbpool.pool.ownership`) gives a connection to an owner, and to the
owners it allows, until the owner checks it in or ends.

The **callers chain** is DBConnection's ``$callers``: the owners whose work
the current code is doing.  In manual mode a caller with no connection of
its own uses the first connection found along its chain.  It lives in a
context variable, so:

- asyncio tasks inherit it: a task created by an owner, or by a task of its
  chain, after the owner took its connection, finds that connection;
- ``asyncio.to_thread`` and ``loop.run_in_executor`` with a context copy
  carry it too;
- plain threads and ``concurrent.futures`` executors do not copy contexts:
  wrap the function with :func:`propagate_callers`, or submit to a
  :class:`CallersThreadPoolExecutor`::

      threading.Thread(target=propagate_callers(work)).start()
      with CallersThreadPoolExecutor() as executor:
          executor.submit(work)
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeAlias, TypeVar

__all__ = [
    "CallersThreadPoolExecutor",
    "Owner",
    "callers",
    "current_owner",
    "describe_owner",
    "owner_alive",
    "propagate_callers",
]

#: A thread or an asyncio task.
Owner: TypeAlias = "threading.Thread | asyncio.Task[Any]"

P = ParamSpec("P")
T = TypeVar("T")

_CALLERS: contextvars.ContextVar[tuple[Owner, ...]] = contextvars.ContextVar(
    "dbpool_callers", default=())


def current_owner() -> Owner:
    """The running asyncio task, or else the current thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop running in this thread
        task = None
    return task if task is not None else threading.current_thread()


def callers() -> tuple[Owner, ...]:
    """The callers chain of the current context, nearest first (without the current owner)."""
    return _CALLERS.get()


def join_chain(owner: Owner, via: Owner | None = None) -> None:
    """Put ``owner`` (the current owner), then ``via``, at the head of this context's chain.

    Work this context starts afterwards (tasks, :func:`propagate_callers`)
    then counts them among its callers.  ``via`` is the owner whose
    connection ``owner`` was found to use, when that is another.
    """
    chain = _CALLERS.get()
    head = (owner,) if via is None or via is owner else (owner, via)
    if chain[:len(head)] != head:
        _CALLERS.set((*head, *(c for c in chain if c not in head)))


def propagate_callers(fn: Callable[P, T]) -> Callable[P, T]:
    """Wrap ``fn`` so that, run on another thread, its callers chain is the caller's.

    The chain is the current owner followed by its own chain, taken when
    ``propagate_callers`` is called.  The wrapped function runs in a copy of
    the caller's context, so other context variables go along too.
    """
    owner = current_owner()
    chain = (owner, *(c for c in _CALLERS.get() if c is not owner))
    context = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        def inner() -> T:
            _CALLERS.set(chain)
            return fn(*args, **kwargs)

        return context.copy().run(inner)

    return run


class CallersThreadPoolExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose tasks run with the submitter's callers chain."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(propagate_callers(fn), *args, **kwargs)


def describe_owner(owner: Owner) -> str:
    """``thread 'name' (ident)`` or ``task 'name'``, for messages and logs."""
    if isinstance(owner, threading.Thread):
        return f"thread {owner.name!r} ({owner.ident})"
    return f"task {owner.get_name()!r}"


def owner_alive(owner: Owner) -> bool:
    """Whether the thread is still running, or the task not yet done."""
    if isinstance(owner, threading.Thread):
        return owner.is_alive()
    return not owner.done()


def on_owner_exit(owner: Owner, callback: Callable[[Owner], object]) -> None:
    """Call ``callback(owner)`` once ``owner`` has ended, as soon as it can be seen.

    Install it once per owner and listener: each call adds a callback.

    A task's done callback tells at once.  A thread is seen ending only
    from inside it: a sentinel in its thread-local storage is freed when the
    thread exits, which runs ``callback`` there.  For another thread (one
    that is not the caller) nothing is installed: the ownership manager's
    periodic sweep notices it instead.
    """
    if isinstance(owner, threading.Thread):
        if owner is threading.current_thread():
            _sentinel().callbacks.append(lambda: callback(owner))
        return
    loop = owner.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        owner.add_done_callback(callback)
    else:
        loop.call_soon_threadsafe(owner.add_done_callback, callback)


class _ThreadExitSentinel:
    """Lives in one thread's local storage; its ``__del__`` runs as the thread exits."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], object]] = []

    def __del__(self) -> None:
        for callback in self.callbacks:
            try:
                callback()
            except Exception:  # a stopped pool: nobody to tell
                pass


_local = threading.local()


def _sentinel() -> _ThreadExitSentinel:
    sentinel: _ThreadExitSentinel | None = getattr(_local, "sentinel", None)
    if sentinel is None:
        sentinel = _local.sentinel = _ThreadExitSentinel()
    return sentinel
