"""Connection limits and the slowloris watchdog, as factory wrappers around any protocol.

Two wrappers, because they must sit at different depths:

* :class:`ConnectionLimiter` counts TCP connections (in total and per client address) and
  refuses extra ones with one protocol reply line. It wraps the *outside* of everything,
  implicit TLS included, so a refused client costs no protocol session at all.
* :class:`LineWatchdog` closes a session whose client keeps an incomplete line pending for
  longer than ``line_time`` seconds unless that line streams at ``min_rate`` bytes/s. It
  must see plaintext, so it wraps the application factory *inside* implicit TLS. With STLS
  or STARTTLS it needs nothing special: Twisted's ``startTLS`` inserts the TLS layer
  *below* the outermost protocol, so both wrappers keep seeing plaintext after the switch.

Why a watchdog at all: both servers reset their idle timers only on complete lines, so a
client dripping one byte every few seconds is held for the whole idle timeout (600 s, as the
RFCs ask). The watchdog bounds a partial line by ``line_time`` instead.

:func:`guard` composes the two (and implicit TLS) in the right order. Counts are per
process: with several workers, each enforces the limits on the connections it accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from mailgate.authlog import peer_key as ip_key

log = Logger()

#: The POP3 refusal (RFC 2449/3206 response code: a transient server condition).
POP3_REFUSAL = b"-ERR [SYS/TEMP] Too many connections\r\n"
#: Seconds a refused client gets to read the refusal (and finish a TLS handshake for it).
REFUSAL_GRACE = 10.0
#: Refusals are logged at most once per this many seconds, with a count: floods stay quiet.
REFUSAL_LOG_INTERVAL = 10.0


def smtp_refusal(hostname: str) -> bytes:
    """The SMTP refusal line for a connection over the limits."""
    return f"421 4.7.0 {hostname} Too many connections, try again later\r\n".encode("ascii")


def smtp_line_timeout(hostname: str) -> bytes:
    """What SMTP says when the watchdog ends a session (the same words as its idle timeout)."""
    return f"421 4.4.2 {hostname} Error: timeout exceeded\r\n".encode("ascii")


@dataclass(frozen=True)
class LimitSettings:
    """Resource bounds of one listener. Loopback is a client address like any other."""

    max_total: int = 1000
    max_per_peer: int = 20
    line_time: float = 60.0
    #: A partial line older than ``line_time`` survives only if it grew at this rate.
    min_rate: float = 100.0

    def __post_init__(self) -> None:
        if self.max_total <= 0 or self.max_per_peer <= 0:
            raise ValueError("connection limits must be positive")
        if self.line_time <= 0 or self.min_rate < 0:
            raise ValueError("line_time must be positive and min_rate not negative")


def peer_key(addr: IAddress | None) -> str:
    """The per-client counting key: the IP address, IPv4-mapped IPv6 as plain IPv4."""
    host = getattr(addr, "host", None)
    if not isinstance(host, str):
        return "local"  # UNIX sockets and the like: one shared bucket
    return ip_key(host)


class _Refusal(Protocol):
    """Says the one refusal line and hangs up; aborts a client that does not let go."""

    def __init__(self, reply: bytes, clock: IReactorTime) -> None:
        self._reply = reply
        self._clock = clock
        self._call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self._reply:
            self.transport.write(self._reply)
        self.transport.loseConnection()
        self._call = self._clock.callLater(REFUSAL_GRACE, self._abort)

    def _abort(self) -> None:
        self._call = None
        abort = getattr(self.transport, "abortConnection", None)
        if callable(abort):
            abort()

    def dataReceived(self, data: bytes) -> None:
        """Whatever the refused client says is ignored."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _RefusalFactory(Factory):
    noisy = False

    def __init__(self, reply: bytes, clock: IReactorTime) -> None:
        self.reply = reply
        self.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> _Refusal:
        return _Refusal(self.reply, self.clock)


#: (wrapper class, interfaces its transport provides) -> the wrapper's ``__provides__``.
_provides_cache: dict[tuple[type, object], object] = {}


class _LeanWrapper(ProtocolWrapper):
    """A ProtocolWrapper whose interface declaration is computed once per kind of transport.

    Twisted's ``makeConnection`` calls ``directlyProvides(self, providedBy(transport))``
    for every connection, which flattens the transport's whole interface hierarchy: ~11 us
    when that transport is itself a wrapper, paid twice per connection here. The result
    only depends on the wrapper class and the transport's declaration, so it is reused.
    """

    def makeConnection(self, transport: Any) -> None:
        me: Any = self  # zope's __provides__ and Twisted's wrapper calls are untyped
        key = (type(self), providedBy(transport))
        provides = _provides_cache.get(key)
        if provides is None:
            directlyProvides(self, key[1])
            if len(_provides_cache) >= 64:  # a handful in practice; never unbounded
                _provides_cache.clear()
            _provides_cache[key] = me.__provides__
        else:
            me.__provides__ = provides
        Protocol.makeConnection(self, transport)  # type: ignore[no-untyped-call]
        me.factory.registerProtocol(self)
        me.wrappedProtocol.makeConnection(self)


class _Counted(_LeanWrapper):
    """A session the limiter counts; its factory uncounts it when the connection ends."""

    peer = "local"


class ConnectionLimiter(WrappingFactory):
    """Refuses connections beyond ``max_total`` open ones, or ``max_per_peer`` per address.

    The refusal is ``refuse_reply`` (one protocol line, e.g. :data:`POP3_REFUSAL`) and a
    close. ``wrap_refusal`` wraps the refusing factory the way the listener wraps its real
    one (implicit TLS), so the refusal arrives in the protocol the client speaks. Counting
    starts when a connection is made and stops when it is lost.
    """

    protocol = _Counted
    noisy = False

    def __init__(
        self,
        factory: IProtocolFactory,
        clock: IReactorTime,
        max_total: int = 1000,
        max_per_peer: int = 20,
        refuse_reply: bytes = b"",
        *,
        wrap_refusal: Callable[[IProtocolFactory], IProtocolFactory] | None = None,
    ) -> None:
        super().__init__(factory)  # type: ignore[no-untyped-call]
        if max_total <= 0 or max_per_peer <= 0:
            raise ValueError("connection limits must be positive")
        self.clock = clock
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        refusals: IProtocolFactory = _RefusalFactory(refuse_reply, clock)
        self._refusals = wrap_refusal(refusals) if wrap_refusal is not None else refusals
        self.open = 0
        self.per_peer: dict[str, int] = {}
        self.refused = 0
        self._unlogged = 0
        self._last_log: float | None = None

    def buildProtocol(self, addr: IAddress | None) -> IProtocol | None:  # type: ignore[override]
        key = peer_key(addr)
        if self.open >= self.max_total or self.per_peer.get(key, 0) >= self.max_per_peer:
            self._note_refusal(key)
            return self._refusals.buildProtocol(cast(IAddress, addr))
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        wrapper = _Counted(cast(Any, self), inner)
        wrapper.peer = key
        return wrapper

    def _note_refusal(self, key: str) -> None:
        self.refused += 1
        self._unlogged += 1
        now = self.clock.seconds()
        if self._last_log is None or now - self._last_log >= REFUSAL_LOG_INTERVAL:
            log.warn(
                "refused {count} connection(s) over the limits (last from {peer}; "
                "open {open}/{max_total}, per address {max_per_peer})",
                count=self._unlogged,
                peer=key,
                open=self.open,
                max_total=self.max_total,
                max_per_peer=self.max_per_peer,
            )
            self._unlogged = 0
            self._last_log = now

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)  # type: ignore[no-untyped-call]
        if isinstance(p, _Counted):
            self.open += 1
            self.per_peer[p.peer] = self.per_peer.get(p.peer, 0) + 1

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        if isinstance(p, _Counted) and p in self.protocols:
            self.open -= 1
            left = self.per_peer.get(p.peer, 0) - 1
            if left > 0:
                self.per_peer[p.peer] = left
            else:
                self.per_peer.pop(p.peer, None)
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]


class _Watched(_LeanWrapper):
    """Tracks the client's pending partial line and ends a session that dawdles on it."""

    factory: LineWatchdog

    def __init__(self, factory: LineWatchdog, wrapped: IProtocol) -> None:
        super().__init__(cast(Any, factory), wrapped)
        self._since: float | None = None  # when the current partial line (window) began
        self._bytes = 0  # bytes of that partial line received in this window
        self._call: IDelayedCall | None = None
        self._paused = False
        self._expired = False

    @property
    def _below(self) -> Any:
        """The transport under this wrapper, whatever interfaces it provides."""
        return self.transport

    # -- the window over the pending partial line -----------------------------------------

    def _open_window(self, size: int) -> None:
        self._since = self.factory.clock.seconds()
        self._bytes = size
        self._schedule()

    def _close_window(self) -> None:
        self._since = None
        self._bytes = 0
        self._cancel()

    def _schedule(self) -> None:
        self._cancel()
        if not self._paused and not self._expired:
            self._call = self.factory.clock.callLater(self.factory.line_time, self._check)

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = None
        if self._since is None:
            return
        elapsed = self.factory.clock.seconds() - self._since
        rate = self.factory.min_rate
        if rate > 0 and self._bytes >= rate * elapsed:
            self._open_window(0)  # a long line arriving fast: not a slowloris
            return
        self._expire()

    def _expire(self) -> None:
        self._expired = True
        self._since = None
        peer = getattr(self._below.getPeer(), "host", "?")
        log.info(
            "closing session from {peer}: a partial line pending for more than {seconds}s",
            peer=peer,
            seconds=self.factory.line_time,
        )
        if self.factory.timeout_reply:
            self._below.write(self.factory.timeout_reply)
        self._below.loseConnection()

    # -- the data path ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._expired:
            return  # the session is over: nothing more reaches the protocol
        end = data.rfind(b"\n")
        if end < 0:
            if self._since is None:
                self._open_window(len(data))
            else:
                self._bytes += len(data)
        elif end + 1 < len(data):
            self._open_window(len(data) - end - 1)
        else:
            self._close_window()
        self.wrappedProtocol.dataReceived(data)

    # -- calls from the protocol on its transport ------------------------------------------

    def pauseProducing(self) -> None:
        """The protocol stopped reading: the rest of a line cannot arrive, so do not count."""
        self._paused = True
        self._cancel()
        self._below.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._since is not None:
            self._open_window(0)
        self._below.resumeProducing()

    def stopProducing(self) -> None:
        self._cancel()
        self._below.stopProducing()

    def startTLS(self, *args: Any, **kwargs: Any) -> None:
        """Bytes pipelined before the switch are not a line the client still owes us."""
        self._close_window()
        self._below.startTLS(*args, **kwargs)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._since = None
        self._cancel()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class LineWatchdog(WrappingFactory):
    """Ends sessions whose client keeps a line incomplete for more than ``line_time`` s.

    A window opens with the first byte of a partial line and closes with its LF. When it
    has been open ``line_time`` seconds, the session survives only if the line grew by at
    least ``min_rate`` bytes per second meanwhile (0 disables that allowance); otherwise
    ``timeout_reply`` (may be empty) is written and the connection closed. The window does
    not run while the protocol has paused reading.
    """

    protocol = _Watched
    noisy = False

    def __init__(
        self,
        factory: IProtocolFactory,
        clock: IReactorTime,
        line_time: float = 60.0,
        min_rate: float = 100.0,
        timeout_reply: bytes = b"",
    ) -> None:
        super().__init__(factory)  # type: ignore[no-untyped-call]
        if line_time <= 0 or min_rate < 0:
            raise ValueError("line_time must be positive and min_rate not negative")
        self.clock = clock
        self.line_time = line_time
        self.min_rate = min_rate
        self.timeout_reply = timeout_reply


def guard(
    factory: IProtocolFactory,
    settings: LimitSettings,
    clock: IReactorTime,
    *,
    refuse_reply: bytes,
    timeout_reply: bytes = b"",
    tls_context: IOpenSSLServerConnectionCreator | IOpenSSLContextFactory | None = None,
) -> IProtocolFactory:
    """Wrap a listener's protocol factory: watchdog inside, [implicit TLS], limiter outside.

    Pass ``tls_context`` only for implicit-TLS listeners (it replaces the caller's own
    ``TLSMemoryBIOFactory`` wrapping); STLS/STARTTLS listeners pass None.
    """
    wrap: Callable[[IProtocolFactory], IProtocolFactory] | None = None
    if tls_context is not None:
        context = tls_context

        def wrap(inner: IProtocolFactory) -> IProtocolFactory:
            return TLSMemoryBIOFactory(context, False, inner)

    inner: IProtocolFactory = LineWatchdog(
        factory, clock, settings.line_time, settings.min_rate, timeout_reply
    )
    if wrap is not None:
        inner = wrap(inner)
    return ConnectionLimiter(
        inner,
        clock,
        settings.max_total,
        settings.max_per_peer,
        refuse_reply,
        wrap_refusal=wrap,
    )
