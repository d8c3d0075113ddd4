"""Transport plumbing both line protocols share: timers on an injected clock, the slowloris
watchdog, TCP_NODELAY, replies sent without a reactor turn."""

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


def _nothing() -> None:
    """What a stopped watch would call (it never fires: its timer is cancelled)."""


class PartialLineWatch:
    """The slowloris watchdog of one session, fed by its protocol.

    Both servers reset their idle timers only on complete lines, so a client dripping one
    byte every few seconds would be held for the whole idle timeout (600 s, as the RFCs
    ask). This bounds a partial line by ``line_time`` instead. It lives in the protocol,
    not in a wrapper around it: a wrapper layer was a Python call on every read, write,
    connect and close (see mailgate/limits.py).

    A window opens with the first byte of a partial line and closes with its LF. When it
    has been open ``line_time`` seconds, the session survives only if the line grew by at
    least ``min_rate`` bytes per second meanwhile (0 disables that allowance); otherwise
    ``expire`` is called once (the protocol logs, may reply, and closes). The window does
    not run while the protocol has paused reading: the rest of a line cannot arrive then.
    """

    __slots__ = (
        "_bytes",
        "_call",
        "_clock",
        "_expire",
        "_paused",
        "_since",
        "_stopped",
        "expired",
        "fed_in_front",
        "line_time",
        "min_rate",
    )

    def __init__(
        self,
        clock: IReactorTime,
        line_time: float,
        min_rate: float,
        expire: Callable[[], None],
    ) -> None:
        if line_time <= 0 or min_rate < 0:
            raise ValueError("line_time must be positive and min_rate not negative")
        self._clock = clock
        self.line_time = line_time
        self.min_rate = min_rate
        self._expire = expire
        self._since: float | None = None  # when the current partial line (window) began
        self._bytes = 0  # bytes of that partial line received in this window
        self._call: IDelayedCall | None = None
        self._paused = False
        self._stopped = False
        #: The session is over: whatever else arrives must not reach the protocol.
        self.expired = False
        #: Set by a layer in front of the protocol that holds partial lines back (the lab's
        #: fault injection): it feeds the watch the bytes as they arrive, and the protocol,
        #: which then only sees whole lines, does not.
        self.fed_in_front = False

    def received(self, data: bytes) -> None:
        """Plaintext from the client, before the protocol looks at it."""
        if self.expired:
            return
        end = data.rfind(b"\n")
        if end < 0:
            if self._since is None:
                self._open_window(len(data))
            else:
                self._bytes += len(data)
        elif end + 1 < len(data):
            self._open_window(len(data) - end - 1)
        elif self._since is not None:
            self._close_window()

    def pause(self) -> None:
        """The protocol stopped reading: the rest of a line cannot arrive, so do not count."""
        self._paused = True
        self._cancel()

    def resume(self) -> None:
        self._paused = False
        if self._since is not None:
            self._open_window(0)

    def forget(self) -> None:
        """STLS/STARTTLS: bytes pipelined before the switch are not a line still owed."""
        self._close_window()

    def stop(self) -> None:
        """The connection is gone (or its end is decided): no timer may outlive it, and the
        callback, a method of the protocol that holds this watch, is let go so that no
        reference cycle keeps the session for the cyclic GC."""
        self._since = None
        self._cancel()
        self._expire = _nothing
        self._stopped = True  # inert from now on: nothing re-arms it

    def _open_window(self, size: int) -> None:
        self._since = self._clock.seconds()
        self._bytes = size
        self._cancel()
        if not self._paused and not self.expired and not self._stopped:
            self._call = self._clock.callLater(self.line_time, self._check)

    def _close_window(self) -> None:
        self._since = None
        self._bytes = 0
        self._cancel()

    def _cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _check(self) -> None:
        self._call = None
        if self._since is None:
            return
        elapsed = self._clock.seconds() - self._since
        rate = self.min_rate
        if rate > 0 and self._bytes >= rate * elapsed:
            self._open_window(0)  # a long line arriving fast: not a slowloris
            return
        self.expired = True
        self._since = None
        self._expire()


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
    while wrapper is not below:  # the lab's wrappers, marked as their loseConnection would
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
