"""Transport plumbing both line protocols share: timers on an injected clock, TCP_NODELAY."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.protocols.policies import TimeoutMixin


class ClockedTimeout(TimeoutMixin):
    """TimeoutMixin whose timers run on ``self._clock``, never the global reactor.

    Tests drive the idle timeout with ``twisted.internet.task.Clock``.
    """

    _clock: IReactorTime

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        return self._clock.callLater(period, func)

    def _set_timeout(self, period: float | None) -> None:
        self.setTimeout(period)  # type: ignore[no-untyped-call]


def set_no_delay(transport: Any) -> None:
    """Send each reply at once (no Nagle/delayed-ACK stall); ignored off TCP."""
    set_it = getattr(transport, "setTcpNoDelay", None)
    if callable(set_it):
        try:
            set_it(True)
        except Exception:
            pass  # not a TCP socket underneath (e.g. in-memory): nothing to tune
