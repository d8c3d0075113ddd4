"""Transport plumbing both line protocols share: timers on an injected clock, TCP_NODELAY,
replies sent without a reactor turn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import ProtocolWrapper, TimeoutMixin
from twisted.python.failure import Failure


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


def _idle_plain_tcp(transport: Any) -> tcp.Server | None:
    """The TCP connection under ``transport`` when nothing stands between them that looks at
    writes (transcripts, faults, TLS) and nothing is queued or producing; else None."""
    below = transport
    while type(below).write is ProtocolWrapper.write:
        below = below.transport
    if (
        type(below) is tcp.Server
        and not below.TLS
        and below.connected
        and not below.disconnecting
        and not below._writeDisconnected
        and below.producer is None
        and not below._tempDataLen
        and len(below.dataBuffer) == below.offset
    ):
        return below
    return None


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but sent at once when a plain TCP connection is idle.

    Twisted queues every write until the next writable event, switching the socket's
    epoll interest on and off around it: two ``epoll_ctl`` calls per reply, which the
    submission profile showed as a fifth of the reactor's time. When nothing is queued, no
    producer is registered and there is no TLS, sending right away is the same bytes in
    the same order; whatever the socket does not take is queued the usual way. Any wrapper
    that looks at writes (transcripts, faults, TLS) stops the shortcut.
    """
    below = _idle_plain_tcp(transport)
    if below is not None:
        try:
            sent = below.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # Twisted's own write path meets and reports the error
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def close_now(transport: Any) -> None:
    """``transport.loseConnection()``, done at once when a plain TCP connection has nothing
    left to send (every reply went out through :func:`write_now`).

    Twisted closes on the next writable event: an ``epoll_ctl`` to watch for it, a reactor
    turn, another ``epoll_ctl`` to stop. With nothing queued there is nothing to wait for,
    so this does what Twisted itself does for a connection whose write side is already shut:
    stop watching it and report the connection lost (orderly: FIN, not RST) right here. The
    protocol's ``connectionLost`` therefore runs inside the call; callers mark themselves
    closed first.
    """
    below = _idle_plain_tcp(transport)
    if below is None:
        transport.loseConnection()
        return
    wrapper = transport
    while wrapper is not below:  # as ProtocolWrapper.loseConnection would have marked them
        wrapper.disconnecting = 1
        wrapper = wrapper.transport
    below.stopReading()
    below.stopWriting()
    below.connectionLost(Failure(CONNECTION_DONE))  # type: ignore[no-untyped-call]


def log_line(logger: Logger, text: str, level: LogLevel = LogLevel.info, **fields: object) -> None:
    """Emit a line already formatted by the caller; ``fields`` stay for structured
    observers. Twisted's per-field formatting was half the cost of a log line (~50 us of
    ~100), and the busiest lines come once per message or session."""
    logger.emit(level, text.replace("{", "{{").replace("}", "}}"), mailgate_text=text, **fields)
