"""The handle of an ownership pool: :class:`Pool` with DBConnection.Ownership's calls.

``Pool.start(..., pool="ownership")`` returns an :class:`OwnershipPool`.  Its
calls work on the caller's owned connection (see :mod:`dbpool.pool.ownership`);
the four ownership calls below change who owns what.  A plain :class:`Pool`
has none of them.
"""

from __future__ import annotations

from typing import Any

from ..loans import caller_location
from ..pool import Pool
from .core import AllowAnswer, CheckinAnswer, CheckoutAnswer, ModeAnswer, OwnershipCore
from .owners import Owner

__all__ = ["OwnershipPool"]


class OwnershipPool(Pool):
    """A pool whose connections are owned by threads and tasks (DBConnection.Ownership)."""

    _core: OwnershipCore
    #: A plain checkout holds its connection for the thread's other calls, which
    #: could only wait for it otherwise.
    _holds_checkouts = True

    def ownership_checkout(
        self, owner: Owner | None = None, *, timeout: float | None = None,
        queue: bool | None = None, **overrides: Any,
    ) -> CheckoutAnswer:
        """Check out a connection owned by ``owner`` (this thread or task by default).

        Returns ``"ok"``, or ``"already_owner"`` / ``"already_allowed"``.  The
        connection is taken from the pool at once (waiting up to ``timeout``),
        so an error taking it, or from ``post_checkout``, is raised here.
        ``post_checkout``, ``pre_checkin`` and ``ownership_timeout`` override
        the pool's options for this ownership.
        """
        return self._core.ownership_checkout(
            owner, self._default_timeout if timeout is None else timeout,
            self._default_queue if queue is None else queue, caller_location(), overrides)

    def ownership_checkin(self, owner: Owner | None = None) -> CheckinAnswer:
        """Give back the connection ``owner`` (this thread or task) owns.

        Returns ``"ok"``, ``"not_owner"`` (it is only allowed on one) or
        ``"not_found"``.  The owners allowed on it lose it too.
        """
        return self._core.ownership_checkin(owner)

    def ownership_allow(
        self, owner_or_allowed: Owner, allowed: Owner, *, unallow_existing: bool = False
    ) -> AllowAnswer:
        """Let ``allowed`` use the connection of ``owner_or_allowed`` (an owner or allowed).

        Returns ``"ok"``, ``"already_owner"`` / ``"already_allowed"`` if
        ``allowed`` has a connection already (``unallow_existing=True`` moves
        it instead), or ``"not_found"``.
        """
        return self._core.ownership_allow(owner_or_allowed, allowed, unallow_existing)

    def ownership_mode(self, mode: Any) -> ModeAnswer:
        """Set the mode: ``"auto"``, ``"manual"`` or ``("shared", owner)``.

        Returns ``"ok"``, or for a shared mode ``"already_shared"`` (another
        live owner shares), ``"not_owner"`` or ``"not_found"``.  Every owned
        connection but the shared owner's is checked in.
        """
        return self._core.ownership_mode(mode)

    def _owned_metrics(self) -> list[dict[str, Any]]:
        return self._core.proxy_metrics()
