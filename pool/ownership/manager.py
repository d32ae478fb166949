"""The ownership manager: the actor that decides who owns which connection.

This is DBConnection's ``Ownership.Manager``.  One pykka actor per
ownership pool serializes every change of ownership: checkouts, checkins,
allowances, mode changes, owners that ended, ``ownership_timeout``.  It
writes the pool's registry (``core.checkouts``: owner -> ``("owner" |
"allowed", proxy)``) and callers read it without a message, as
DBConnection's callers read the manager's ETS table.

Contract:

- ``Checkout`` answers ``"already_owner"`` / ``"already_allowed"``, or the new
  :class:`~dbpool.pool.ownership.proxy.Proxy` and whether the owner needs
  watching (the caller installs the watch: only the owner's own thread can).
- ``Checkin`` answers ``"ok"``, ``"not_owner"`` or ``"not_found"``.
- ``Allow`` answers ``"ok"``, ``"already_owner"`` / ``"already_allowed"`` or
  ``"not_found"``.
- ``SetMode`` answers ``"ok"``, ``"already_shared"``, ``"not_owner"`` or
  ``"not_found"``; setting a mode checks in every connection (but the shared
  owner's), and a shared mode reverts to manual when its owner ends.
- ``OwnerDown``, ``TimedOut`` and ``End`` end an ownership; no answer.
- Every ``idle_interval`` it looks for owners that ended unseen.
- On stop it ends every ownership, giving the connections back.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pykka

from ..loans import Location, format_location
from .owners import Owner, describe_owner, owner_alive
from .proxy import PostCheckout, PreCheckin, Proxy

if TYPE_CHECKING:
    from .core import OwnershipCore

__all__ = [
    "Allow", "Checkin", "Checkout", "End", "OwnerDown", "OwnershipManager", "SetMode", "TimedOut",
]

logger = logging.getLogger("dbpool.ownership")


@dataclass(frozen=True)
class Checkout:
    owner: Owner
    where: Location | None
    #: post_checkout, pre_checkin and ownership_timeout, where the call overrides the pool's.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkin:
    owner: Owner
    by: Owner


@dataclass(frozen=True)
class Allow:
    owner_or_allowed: Owner
    allowed: Owner
    unallow_existing: bool


@dataclass(frozen=True)
class SetMode:
    mode: Any
    by: Owner


@dataclass(frozen=True)
class OwnerDown:
    owner: Owner


@dataclass(frozen=True)
class TimedOut:
    proxy: Proxy


@dataclass(frozen=True)
class End:
    """End an ownership whose connection was lost to a deadline."""

    proxy: Proxy
    message: str


class _Sweep:
    """Timer tick: look for owners that ended unseen."""


class OwnershipManager(pykka.ThreadingActor):
    """One per ownership pool.  See the module docstring for its contract."""

    use_daemon_thread = True

    def __init__(self, core: OwnershipCore) -> None:
        super().__init__()
        self.core = core
        self._numbers = 0
        # Owners whose end is being watched, so that the watch is installed once.
        self._watched: weakref.WeakSet[Owner] = weakref.WeakSet()
        level = core.options.ownership_log
        self._log_level: int | None = (
            logging.getLevelName(level) if isinstance(level, str) else level)

    def on_start(self) -> None:
        self._sweep_later()

    def on_receive(self, message: Any) -> Any:
        match message:
            case Checkout(owner, where, overrides):
                return self._checkout(owner, where, overrides)
            case Checkin(owner, by):
                return self._checkin(owner, by)
            case Allow(owner_or_allowed, allowed, unallow_existing):
                return self._allow(owner_or_allowed, allowed, unallow_existing)
            case SetMode(mode, by):
                return self._set_mode(mode, by)
            case OwnerDown(owner):
                self._watched.discard(owner)
                # By the proxy's owner, not the registry: an owner may have been
                # re-allowed elsewhere (unallow_existing) and still own this one.
                for proxy in list(self.core.proxies.values()):
                    if proxy.owner is owner:
                        self._end(proxy, f"owner {describe_owner(owner)} exited")
            case TimedOut(proxy) if proxy.number in self.core.proxies:
                self._end(proxy, (
                    f"owner {describe_owner(proxy.owner)} timed out because it owned the "
                    f"connection for longer than {proxy.ownership_timeout:g}s (set via the "
                    f"ownership_timeout option); it was checked out at "
                    f"{format_location(proxy.where)}"), disconnect=True, level=logging.WARNING)
            case End(proxy, text) if proxy.number in self.core.proxies:
                self._end(proxy, text, disconnect=True)
            case _Sweep():
                for proxy in list(self.core.proxies.values()):
                    if not owner_alive(proxy.owner):
                        self.on_receive(OwnerDown(proxy.owner))
                self._sweep_later()
            case TimedOut() | End():
                pass  # that ownership ended already
            case _:
                logger.warning("%s: ownership manager ignored unknown message %r",
                               self.core.name, message)
        return None

    def on_stop(self) -> None:
        for proxy in list(self.core.proxies.values()):
            self._end(proxy, f"the pool {self.core.name!r} is stopping")

    # -- requests --------------------------------------------------------

    def _checkout(
        self, owner: Owner, where: Location | None, overrides: dict[str, Any]
    ) -> str | tuple[Proxy, bool]:
        already = self._already(owner)
        if already is not None:
            return already
        options = self.core.options
        self._numbers += 1
        post: PostCheckout | None = overrides.get("post_checkout", options.post_checkout)
        pre: PreCheckin | None = overrides.get("pre_checkin", options.pre_checkin)
        proxy = Proxy(self.core, self._numbers, owner, where, post_checkout=post,
                      pre_checkin=pre, ownership_timeout=overrides.get(
                          "ownership_timeout", options.ownership_timeout))
        watch = owner not in self._watched
        self._watched.add(owner)
        self.core.proxies[proxy.number] = proxy
        self.core.checkouts[owner] = ("owner", proxy)
        if proxy.ownership_timeout is not None:
            proxy.timer = self.core.scheduler.tell_later(
                proxy.ownership_timeout, self.actor_ref, TimedOut(proxy))
        self._log("%s checked out a connection in %s mode using %s",
                  describe_owner(owner), _mode_name(self.core.mode), proxy.describe())
        return proxy, watch

    def _checkin(self, owner: Owner, by: Owner) -> str:
        entry = self.core.checkouts.get(owner)
        if entry is None:
            return "not_found"
        kind, proxy = entry
        if kind != "owner":
            return "not_owner"
        self._end(proxy, f"{describe_owner(by)} checked in the connection owned by "
                         f"{describe_owner(owner)}")
        return "ok"

    def _allow(self, owner_or_allowed: Owner, allowed: Owner, unallow_existing: bool) -> str:
        checkouts = self.core.checkouts
        already = self._already(allowed)
        if already is not None and not unallow_existing:
            return already
        entry = checkouts.get(owner_or_allowed)
        if entry is None:
            return "not_found"
        proxy = entry[1]
        if unallow_existing and allowed in checkouts:
            old = checkouts.pop(allowed)[1]
            if allowed in old.allowed:
                old.allowed.remove(allowed)
            self._log("%s was unallowed by %s on %s", describe_owner(allowed),
                      describe_owner(owner_or_allowed), old.describe())
        checkouts[allowed] = ("allowed", proxy)
        if allowed not in proxy.allowed:
            proxy.allowed.append(allowed)
        self._log("%s was allowed by %s on %s", describe_owner(allowed),
                  describe_owner(owner_or_allowed), proxy.describe())
        return "ok"

    def _set_mode(self, mode: Any, by: Owner) -> str:
        core = self.core
        current = core.mode
        if isinstance(mode, tuple):
            shared = mode[1]
            if isinstance(current, tuple):
                if current[1] is shared:
                    return "ok"
                if owner_alive(current[1]):
                    return "already_shared"
            entry = core.checkouts.get(shared)
            if entry is None:
                return "not_found"
            if entry[0] != "owner":
                return "not_owner"
            self._checkin_all(by, except_proxy=entry[1])
            core.mode = ("shared", shared)
            return "ok"
        if mode == current:
            return "ok"
        self._checkin_all(by)
        core.mode = mode
        return "ok"

    # -- helpers ---------------------------------------------------------

    def _already(self, owner: Owner) -> str | None:
        entry = self.core.checkouts.get(owner)
        return None if entry is None else f"already_{entry[0]}"

    def _checkin_all(self, by: Owner, except_proxy: Proxy | None = None) -> None:
        for proxy in list(self.core.proxies.values()):
            if proxy is not except_proxy:
                self._end(proxy, f"{describe_owner(by)} checked in the connection owned by "
                                 f"{describe_owner(proxy.owner)}")

    def _end(self, proxy: Proxy, message: str, disconnect: bool = False,
             level: int | None = None) -> None:
        """Forget the ownership and end its proxy."""
        core = self.core
        core.proxies.pop(proxy.number, None)
        entries = [proxy.owner, *proxy.allowed]
        for owner in entries:
            entry = core.checkouts.get(owner)
            if entry is not None and entry[1] is proxy:
                del core.checkouts[owner]
        if isinstance(core.mode, tuple) and core.mode[1] is proxy.owner:
            core.mode = "manual"  # a shared mode ends with its owner
        if level is not None:
            logger.log(level, "%s: %s", core.name, message)
        self._log("%s lost the connection of %s: %s",
                  ", ".join(describe_owner(o) for o in entries), proxy.describe(), message)
        try:
            proxy.end(message, disconnect)
        except Exception:  # a pre_checkin bug must not kill the manager
            logger.exception("%s: ending %s failed", core.name, proxy.describe())

    def _log(self, message: str, *args: Any) -> None:
        if self._log_level is not None:
            logger.log(self._log_level, "%s: %s", self.core.name, message % args)

    def _sweep_later(self) -> None:
        self.core.scheduler.tell_later(self.core.options.idle_interval, self.actor_ref, _Sweep())


def _mode_name(mode: Any) -> str:
    if isinstance(mode, tuple):
        return f"shared ({describe_owner(mode[1])})"
    return str(mode)
