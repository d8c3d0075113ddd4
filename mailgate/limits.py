"""Connection limits, with nothing between the protocol and its socket.

* :class:`ConnectionLimiter` counts TCP connections (in total and per client address) and
  refuses extra ones with one protocol reply line. It sits *outside* everything, implicit
  TLS included, so a refused client costs no protocol session at all.
* The slowloris watchdog (``[limits] line_time``, ``min_rate``) is not here: each protocol
  owns a :class:`mailgate.session.PartialLineWatch` and feeds it the plaintext it receives,
  so it works the same inside implicit TLS and after STLS/STARTTLS.

Neither is a ProtocolWrapper. Each wrapper layer was a Python call on every read, write,
connect and close: removing the two layers cut the server CPU of a one-message submission
session by about 7% (benchmarks/README.md, seventh session). The limiter counts when it
builds the protocol and uncounts from the protocol's own ``connectionLost`` (an instance
attribute set over the method). :func:`guard` composes limiter and implicit TLS. Counts are
per process: with several workers, each enforces the limits on the connections it accepted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

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
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

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


@dataclass(frozen=True)
class LimitSettings:
    """Resource bounds of one listener. Loopback is a client address like any other."""

    max_total: int = 1000
    max_per_peer: int = 20

    def __post_init__(self) -> None:
        if self.max_total <= 0 or self.max_per_peer <= 0:
            raise ValueError("connection limits must be positive")


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


class FactoryInFront(Factory):
    """A factory in front of ``wrappedFactory``: builds its protocols with it, starts, stops
    and names itself after it, and sees each connection end through
    :func:`after_connection_lost` rather than through a wrapper protocol."""

    noisy = False

    def __init__(self, factory: IProtocolFactory) -> None:
        self.wrappedFactory = factory

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedFactory, "logPrefix", None)
        return str(prefix()) if callable(prefix) else type(self.wrappedFactory).__name__

    def startFactory(self) -> None:
        self.wrappedFactory.doStart()

    def stopFactory(self) -> None:
        self.wrappedFactory.doStop()


class _LostHook:
    """Set over a protocol's ``connectionLost``: runs the method, then each follower once.

    One small object per connection, whoever follows it (the limiter, the session
    tracker): closures per follower cost ~1 KB per idle session. It removes itself before
    running, so no reference cycle outlives the session (the cyclic GC would free it only
    in a full collection, whose pause grows with the heap) and a second report of the
    loss reaches the method alone.
    """

    __slots__ = ("followers", "protocol")

    def __init__(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        self.followers: list[Callable[[], None]] = []

    def __call__(self, reason: Failure = connectionDone) -> None:
        protocol, followers = self.protocol, self.followers
        self.followers = []
        vars(protocol).pop("connectionLost", None)
        try:
            protocol.connectionLost(reason)
        finally:
            for follow in followers:
                try:
                    follow()
                except Exception:
                    log.failure("after connectionLost")


def after_connection_lost(protocol: IProtocol, then: Callable[[], None]) -> None:
    """Call ``then`` once, after ``protocol.connectionLost`` has run (even if it raised).

    An instance attribute shadows the method: whoever reports the loss calls it, and nothing
    stands between the protocol and its transport for every read and write.
    """
    hook = vars(protocol).get("connectionLost")
    if not isinstance(hook, _LostHook):
        hook = _LostHook(protocol)
        setattr(protocol, "connectionLost", hook)  # noqa: B010
    hook.followers.append(then)


class ConnectionLimiter(FactoryInFront):
    """Refuses connections beyond ``max_total`` open ones, or ``max_per_peer`` per address.

    The refusal is ``refuse_reply`` (one protocol line, e.g. :data:`POP3_REFUSAL`) and a
    close. ``wrap_refusal`` wraps the refusing factory the way the listener wraps its real
    one (implicit TLS), so the refusal arrives in the protocol the client speaks. A session
    is counted from the moment its protocol is built (the listening port connects it at
    once) until its ``connectionLost``.
    """

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
        if max_total <= 0 or max_per_peer <= 0:
            raise ValueError("connection limits must be positive")
        super().__init__(factory)
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
        protocol = self.wrappedFactory.buildProtocol(cast(IAddress, addr))
        if protocol is None:
            return None
        self.open += 1
        self.per_peer[key] = self.per_peer.get(key, 0) + 1
        after_connection_lost(protocol, functools.partial(self._release, key))
        return protocol

    def _release(self, key: str) -> None:
        self.open -= 1
        left = self.per_peer.get(key, 0) - 1
        if left > 0:
            self.per_peer[key] = left
        else:
            self.per_peer.pop(key, None)

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


def guard(
    factory: IProtocolFactory,
    settings: LimitSettings,
    clock: IReactorTime,
    *,
    refuse_reply: bytes,
    tls_context: IOpenSSLServerConnectionCreator | IOpenSSLContextFactory | None = None,
) -> IProtocolFactory:
    """Wrap a listener's protocol factory: [implicit TLS inside], the limiter outside.

    Pass ``tls_context`` only for implicit-TLS listeners (it replaces the caller's own
    ``TLSMemoryBIOFactory`` wrapping); STLS/STARTTLS listeners pass None.
    """
    wrap: Callable[[IProtocolFactory], IProtocolFactory] | None = None
    inner = factory
    if tls_context is not None:
        context = tls_context

        def wrap(inner: IProtocolFactory) -> IProtocolFactory:
            return TLSMemoryBIOFactory(context, False, inner)

        inner = wrap(factory)
    return ConnectionLimiter(
        inner,
        clock,
        settings.max_total,
        settings.max_per_peer,
        refuse_reply,
        wrap_refusal=wrap,
    )
