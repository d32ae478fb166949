"""The SQL sandbox: an owned connection inside a transaction that is never committed.

This is Ecto's SQL Sandbox on dbpool's ownership pool.  A test checks out a
connection with :func:`checkout`; everything that runs on it, from the test
or from code it allowed, runs inside one transaction, which :func:`checkin`
rolls back.  Tests therefore never see each other's writes, and the
database is left as it was.

Two hooks do it (:mod:`dbpool.pool.ownership`):

- ``post_checkout`` sends ``BEGIN`` and wraps the driver in a
  :class:`SandboxDriver`;
- ``pre_checkin`` sends ``ROLLBACK`` and unwraps it.

Inside the sandbox the application's own transactions become savepoints,
and a statement run outside any of them runs inside a savepoint of its
own, so that a failing statement leaves the sandbox usable, as it would
leave an autocommit connection.  ``status()`` reports what the application
would see without the sandbox.

::

    pool = Pool.start(dsn, pool="ownership", ownership_mode="manual")
    sandbox.checkout(pool)          # this thread's sandboxed connection
    pool.query("INSERT ...")
    sandbox.checkin(pool)           # rolled back
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dbpool.driver import (
    CopyDirection,
    Driver,
    Error,
    FetchStatus,
    Ok,
    Options,
    Outcome,
    Params,
    Query,
    Result,
    TxOutcome,
    WrongStatus,
)
from dbpool.errors import TransactionStatus

from .owners import Owner
from .proxy import CheckinReason

if TYPE_CHECKING:
    from .core import CheckinAnswer, CheckoutAnswer
    from .pool import OwnershipPool

__all__ = ["SandboxDriver", "SandboxState", "checkin", "checkout", "post_checkout",
           "pre_checkin"]

T = TypeVar("T")
_NO_OPTS: dict[str, Any] = {}
_TX = "dbpool_sandbox_tx"  # the application's transaction
_STMT = "dbpool_sandbox_stmt"  # one statement outside a transaction


@dataclass(eq=False)
class SandboxState:
    """The wrapped driver state, and whether the application has a transaction open."""

    inner: Any
    in_transaction: bool = False

    @property
    def backend_pid(self) -> int | None:
        return getattr(self.inner, "backend_pid", None)


class SandboxDriver:
    """A driver that runs another inside the sandbox's transaction (see the module)."""

    def __init__(self, inner: Driver[Any]) -> None:
        self.inner = inner

    # -- lifecycle: the inner driver's -------------------------------------

    def connect(self, opts: Options) -> SandboxState:
        raise NotImplementedError("a sandbox wraps a connection; it never opens one")

    def disconnect(self, err: BaseException | None, state: SandboxState) -> None:
        self.inner.disconnect(err, state.inner)

    def checkout(self, state: SandboxState) -> Outcome[None]:
        return self.inner.checkout(state.inner)

    def ping(self, state: SandboxState) -> Outcome[None]:
        return self.inner.ping(state.inner)

    def cancel(self, state: SandboxState) -> None:
        cancel = getattr(self.inner, "cancel", None)
        if cancel is not None:
            cancel(state.inner)

    def prepare_cancel(self, state: SandboxState) -> Callable[[], object]:
        prepare = getattr(self.inner, "prepare_cancel", None)
        if prepare is not None:
            send: Callable[[], object] = prepare(state.inner)
            return send
        return lambda: self.cancel(state)

    def interrupt(self, state: SandboxState) -> None:
        interrupt = getattr(self.inner, "interrupt", None)
        if interrupt is not None:
            interrupt(state.inner)

    # -- transactions become savepoints ------------------------------------

    def handle_begin(self, opts: Options, state: SandboxState) -> TxOutcome[Result]:
        if state.in_transaction:
            return WrongStatus("transaction")
        outcome = self._run(f"SAVEPOINT {_TX}", opts, state)
        if isinstance(outcome, Ok):
            state.in_transaction = True
        return outcome

    def handle_commit(self, opts: Options, state: SandboxState) -> TxOutcome[Result]:
        status = self.handle_status(opts, state)
        if not isinstance(status, Ok):
            return status
        if status.value != "transaction":
            return WrongStatus(status.value)
        outcome = self._run(f"RELEASE SAVEPOINT {_TX}", opts, state)
        if isinstance(outcome, Ok):
            state.in_transaction = False
        return outcome

    def handle_rollback(self, opts: Options, state: SandboxState) -> TxOutcome[Result]:
        if not state.in_transaction:
            return WrongStatus("idle")
        outcome = self._run(f"ROLLBACK TO SAVEPOINT {_TX}", opts, state)
        if isinstance(outcome, Ok):
            outcome = self._run(f"RELEASE SAVEPOINT {_TX}", opts, state)
            state.in_transaction = False
        return outcome

    def handle_status(self, opts: Options, state: SandboxState) -> Outcome[TransactionStatus]:
        outcome = self.inner.handle_status(opts, state.inner)
        if isinstance(outcome, Ok) and outcome.value == "transaction" and not state.in_transaction:
            return Ok("idle")  # only the sandbox's own transaction is open
        return outcome

    # -- statements --------------------------------------------------------

    def handle_prepare(self, query: Query, opts: Options, state: SandboxState) -> Outcome[Query]:
        return self._guarded(lambda: self.inner.handle_prepare(query, opts, state.inner), state)

    def handle_execute(
        self, query: Query | str, params: Params, opts: Options, state: SandboxState
    ) -> Outcome[Result]:
        return self._guarded(
            lambda: self.inner.handle_execute(query, params, opts, state.inner), state)

    def handle_close(self, query: Query, opts: Options, state: SandboxState) -> Outcome[None]:
        return self._guarded(lambda: self.inner.handle_close(query, opts, state.inner), state)

    def handle_declare(
        self, query: Query, params: Params, opts: Options, state: SandboxState
    ) -> Outcome[Any]:
        return self.inner.handle_declare(query, params, opts, state.inner)

    def handle_fetch(
        self, query: Query, cursor: Any, opts: Options, state: SandboxState
    ) -> Outcome[tuple[FetchStatus, Result]]:
        return self.inner.handle_fetch(query, cursor, opts, state.inner)

    def handle_deallocate(
        self, query: Query, cursor: Any, opts: Options, state: SandboxState
    ) -> Outcome[None]:
        return self.inner.handle_deallocate(query, cursor, opts, state.inner)

    # A COPY runs straight on the inner driver, as a cursor does: its handle
    # outlives any one call, so it cannot sit in a savepoint of its own.

    def handle_copy(
        self, query: Query, params: Params, direction: CopyDirection, opts: Options,
        state: SandboxState,
    ) -> Outcome[Any]:
        return self.inner.handle_copy(query, params, direction, opts, state.inner)

    def handle_copy_read(
        self, copy: Any, opts: Options, state: SandboxState
    ) -> Outcome[bytes | None]:
        return self.inner.handle_copy_read(copy, opts, state.inner)

    def handle_copy_write(
        self, copy: Any, data: bytes, opts: Options, state: SandboxState
    ) -> Outcome[None]:
        return self.inner.handle_copy_write(copy, data, opts, state.inner)

    def handle_copy_end(
        self, copy: Any, error: BaseException | None, opts: Options, state: SandboxState
    ) -> Outcome[Result]:
        return self.inner.handle_copy_end(copy, error, opts, state.inner)

    # -- helpers -----------------------------------------------------------

    def _run(self, statement: str, opts: Options, state: SandboxState) -> Outcome[Result]:
        return self.inner.handle_execute(statement, None, opts, state.inner)

    def _guarded(self, call: Callable[[], Outcome[T]], state: SandboxState) -> Outcome[T]:
        """Run ``call()`` in a savepoint of its own unless the application has a
        transaction open, so that its failure does not abort the sandbox."""
        if state.in_transaction:
            return call()
        begun = self._run(f"SAVEPOINT {_STMT}", _NO_OPTS, state)
        if not isinstance(begun, Ok):
            return begun
        outcome = call()
        if isinstance(outcome, Error):
            undone = self._run(f"ROLLBACK TO SAVEPOINT {_STMT}", _NO_OPTS, state)
            if not isinstance(undone, Ok):
                return undone
        released = self._run(f"RELEASE SAVEPOINT {_STMT}", _NO_OPTS, state)
        if isinstance(released, Ok) or not isinstance(outcome, Ok):
            return outcome
        return released  # an Error or a lost connection


def post_checkout(driver: Driver[Any], state: Any) -> tuple[SandboxDriver, SandboxState]:
    """Begin the sandbox's transaction and wrap the connection (an ownership hook)."""
    outcome = driver.handle_begin(_NO_OPTS, state)
    if not isinstance(outcome, Ok):
        error = getattr(outcome, "error", None)
        raise error if error is not None else RuntimeError(
            f"the sandbox could not begin its transaction: {outcome!r}")
    return SandboxDriver(driver), SandboxState(state)


def pre_checkin(reason: CheckinReason, driver: Any, state: Any) -> tuple[Any, Any]:
    """Roll the sandbox's transaction back and unwrap the connection (an ownership hook).

    A connection being dropped is not rolled back: it is closed anyway.  If
    the sandbox's transaction is gone, the application ended it with a raw
    ``COMMIT`` or ``ROLLBACK``, and what it wrote before may be committed:
    that raises, so the connection is dropped and the error logged.
    """
    if not isinstance(driver, SandboxDriver):  # post_checkout never ran
        return driver, state
    inner_driver, inner_state = driver.inner, state.inner
    if reason == "checkin":
        outcome = inner_driver.handle_rollback(_NO_OPTS, inner_state)
        if isinstance(outcome, WrongStatus):
            raise RuntimeError(
                "the sandbox's transaction was already ended at checkin: the application "
                "sent COMMIT or ROLLBACK as SQL, so its earlier writes may have been "
                "committed; use pool.transaction() instead")
        if not isinstance(outcome, Ok):
            raise outcome.error
    return inner_driver, inner_state


def checkout(pool: OwnershipPool, owner: Owner | None = None, **options: Any) -> CheckoutAnswer:
    """Check out a sandboxed connection for ``owner`` (this thread or task by default)."""
    return pool.ownership_checkout(owner, post_checkout=post_checkout,
                                   pre_checkin=pre_checkin, **options)


def checkin(pool: OwnershipPool, owner: Owner | None = None) -> CheckinAnswer:
    """Roll back and give back the sandboxed connection of ``owner``."""
    return pool.ownership_checkin(owner)
