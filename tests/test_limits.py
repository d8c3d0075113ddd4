"""Connection limits and the partial-line watchdog, on StringTransport and a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IProtocol, ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.limits import (
    POP3_REFUSAL,
    ConnectionLimiter,
    LimitSettings,
    guard,
    peer_key,
    smtp_refusal,
)
from mailgate.session import PartialLineWatch


class Recorder(Protocol):
    """An application protocol that records what reaches it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


class RecorderFactory(Factory):
    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: IAddress | None) -> Recorder:
        p = Recorder()
        self.built.append(p)
        return p


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):  # type: ignore[misc]
    """A StringTransport that records startTLS calls."""

    def __init__(self, peer: IAddress) -> None:
        super().__init__(peerAddress=peer)  # type: ignore[no-untyped-call]
        self.tls_started: list[object] = []

    def startTLS(self, contextFactory: object) -> None:
        self.tls_started.append(contextFactory)

    def value(self) -> bytes:
        data: bytes = super().value()  # type: ignore[no-untyped-call]
        return data


def v4(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def connect(factory: Any, addr: IAddress) -> tuple[IProtocol, TLSStringTransport]:
    proto = factory.buildProtocol(addr)
    assert proto is not None
    transport = TLSStringTransport(addr)
    proto.makeConnection(transport)
    return proto, transport


def drop(proto: IProtocol) -> None:
    proto.connectionLost(Failure(ConnectionDone()))  # type: ignore[no-untyped-call]


# -- ConnectionLimiter ---------------------------------------------------------------------


def test_per_peer_limit_refuses_with_one_reply_then_releases() -> None:
    clock = Clock()
    app = RecorderFactory()
    limiter = ConnectionLimiter(
        app, clock, max_total=100, max_per_peer=2, refuse_reply=POP3_REFUSAL
    )
    a, _ = connect(limiter, v4("192.0.2.1"))
    _b, _ = connect(limiter, v4("192.0.2.1", 40001))
    refused, rt = connect(limiter, v4("192.0.2.1", 40002))
    assert rt.value() == b"-ERR [SYS/TEMP] Too many connections\r\n"
    assert rt.disconnecting
    assert len(app.built) == 2  # the refused client never got a session
    _other, ot = connect(limiter, v4("192.0.2.2"))  # another address is not affected
    assert not ot.disconnecting and len(app.built) == 3
    assert limiter.per_peer == {"192.0.2.1": 2, "192.0.2.2": 1}
    drop(refused)
    assert limiter.open == 3  # refusals were never counted
    drop(a)
    assert limiter.per_peer["192.0.2.1"] == 1
    _, again = connect(limiter, v4("192.0.2.1", 40003))
    assert not again.disconnecting
    assert limiter.refused == 1


def test_total_limit_counts_every_address() -> None:
    limiter = ConnectionLimiter(
        RecorderFactory(), Clock(), max_total=3, max_per_peer=20, refuse_reply=smtp_refusal("mx")
    )
    protos = [connect(limiter, v4(f"198.51.100.{i}"))[0] for i in range(3)]
    _, t = connect(limiter, v4("198.51.100.99"))
    assert t.value() == b"421 4.7.0 mx Too many connections, try again later\r\n"
    drop(protos[0])
    _, t = connect(limiter, v4("198.51.100.99"))
    assert t.value() == b"" and not t.disconnecting
    assert limiter.open == 3 and sum(limiter.per_peer.values()) == 3


def test_ipv4_mapped_ipv6_counts_as_the_ipv4_peer() -> None:
    limiter = ConnectionLimiter(RecorderFactory(), Clock(), 100, 1, POP3_REFUSAL)
    connect(limiter, v4("203.0.113.7"))
    _, t = connect(limiter, IPv6Address("TCP", "::ffff:203.0.113.7", 1))
    assert t.value() == POP3_REFUSAL
    assert peer_key(IPv6Address("TCP", "fe80::1%eth0", 1)) == "fe80::1"
    assert peer_key(None) == "local"


def test_loopback_is_a_peer_like_any_other() -> None:
    limiter = ConnectionLimiter(RecorderFactory(), Clock(), 100, 20, POP3_REFUSAL)
    for i in range(20):
        connect(limiter, v4("127.0.0.1", 1000 + i))
    _, t = connect(limiter, v4("127.0.0.1", 2000))
    assert t.value() == POP3_REFUSAL
    _, t = connect(limiter, v4("127.0.0.2", 2000))
    assert t.value() == b""


def test_refused_client_that_never_leaves_is_aborted() -> None:
    clock = Clock()
    limiter = ConnectionLimiter(RecorderFactory(), clock, 1, 1, POP3_REFUSAL)
    connect(limiter, v4("192.0.2.1"))
    refused, t = connect(limiter, v4("192.0.2.1", 2))
    refused.dataReceived(b"USER alice\r\n")  # ignored
    assert t.value() == POP3_REFUSAL
    clock.advance(10)
    assert t.disconnected  # StringTransport.abortConnection sets it
    assert clock.getDelayedCalls() == []


def test_refusal_goes_through_the_listeners_tls_wrapping() -> None:
    wrapped: list[Any] = []

    def wrap(f: Any) -> Any:
        wrapped.append(f)
        return f

    limiter = ConnectionLimiter(RecorderFactory(), Clock(), 1, 1, POP3_REFUSAL, wrap_refusal=wrap)
    assert len(wrapped) == 1
    connect(limiter, v4("192.0.2.1"))
    _, t = connect(limiter, v4("192.0.2.1", 2))
    assert t.value() == POP3_REFUSAL


def test_starttls_reaches_the_socket() -> None:
    """STLS: the protocol's transport still provides ITLSTransport and reaches the socket."""
    app = RecorderFactory()
    factory = guard(app, LimitSettings(), Clock(), refuse_reply=POP3_REFUSAL)
    _, t = connect(factory, v4("192.0.2.1"))
    inner = app.built[0]
    assert ITLSTransport.providedBy(inner.transport)
    context = object()
    inner.transport.startTLS(context)  # type: ignore[arg-type]
    assert isinstance(t, TLSStringTransport) and t.tls_started == [context]


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        LimitSettings(max_total=0)
    with pytest.raises(ValueError):
        PartialLineWatch(Clock(), 0, 100, lambda: None)
    with pytest.raises(ValueError):
        PartialLineWatch(Clock(), 60, -1, lambda: None)
    with pytest.raises(ValueError):
        ConnectionLimiter(RecorderFactory(), Clock(), 1, 0)


def test_the_limiter_puts_nothing_between_protocol_and_transport() -> None:
    """No wrapper layer in the data path: the protocol's transport is the connection."""
    app = RecorderFactory()
    limiter = ConnectionLimiter(app, Clock(), 10, 10, POP3_REFUSAL)
    proto, t = connect(limiter, v4("192.0.2.1"))
    assert proto is app.built[0] and proto.transport is t  # type: ignore[attr-defined]
    assert limiter.open == 1
    drop(proto)
    drop(proto)  # a second report of the same loss is not a second uncount
    assert app.built[0].lost and limiter.open == 0 and limiter.per_peer == {}


# -- PartialLineWatch -------------------------------------------------------------------


class Watched(Recorder):
    """An application protocol wired to its watchdog as SmtpServer and Pop3Server are."""

    def __init__(self, clock: Clock, line_time: float, min_rate: float, reply: bytes) -> None:
        super().__init__()
        self.reply = reply
        self.watch = PartialLineWatch(clock, line_time, min_rate, self.expired)

    def dataReceived(self, data: bytes) -> None:
        if self.watch.expired:
            return  # the session is over
        self.watch.received(data)
        super().dataReceived(data)

    def pause(self) -> None:
        self.watch.pause()
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.watch.resume()
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def start_tls(self, context: object) -> None:
        self.watch.forget()
        self.transport.startTLS(context)  # type: ignore[union-attr]

    def expired(self) -> None:
        assert self.transport is not None
        if self.reply:
            self.transport.write(self.reply)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.watch.stop()
        super().connectionLost(reason)


def watched(
    line_time: float = 60.0, min_rate: float = 100.0, reply: bytes = b""
) -> tuple[Clock, Watched, TLSStringTransport, Watched]:
    clock = Clock()
    proto = Watched(clock, line_time, min_rate, reply)
    t = TLSStringTransport(v4("192.0.2.1"))
    proto.makeConnection(t)  # type: ignore[no-untyped-call]
    return clock, proto, t, proto


def test_slowloris_is_closed_after_line_time_with_the_protocol_reply() -> None:
    clock, app, t, proto = watched(reply=b"421 4.4.2 mx.example Error: timeout exceeded\r\n")
    proto.dataReceived(b"E")
    for _ in range(19):
        clock.advance(3)
        proto.dataReceived(b"H")  # one byte every 3 s never completes a line
    assert not t.disconnecting
    clock.advance(3)
    assert t.value() == b"421 4.4.2 mx.example Error: timeout exceeded\r\n"
    assert t.disconnecting
    proto.dataReceived(b"LO x\r\n")
    assert b"".join(app.received) == b"E" + b"H" * 19  # nothing after the cut reaches the app


def test_complete_lines_keep_a_slow_but_honest_client_alive() -> None:
    clock, _app, t, proto = watched()
    for _ in range(10):
        proto.dataReceived(b"NOOP")
        clock.advance(59)
        proto.dataReceived(b"\r\n")
        clock.advance(500)  # idle with no partial line: the protocol's own timer's business
    assert not t.disconnecting
    assert clock.getDelayedCalls() == []


def test_a_line_completed_with_a_new_partial_one_restarts_the_window() -> None:
    clock, _, t, proto = watched()
    proto.dataReceived(b"STAT")
    clock.advance(50)
    proto.dataReceived(b"\r\nLI")  # new partial line starts now
    clock.advance(59)
    assert not t.disconnecting
    clock.advance(1)
    assert t.disconnecting
    assert t.value() == b""  # POP3 style: close without a reply


def test_a_long_line_arriving_fast_is_not_a_slowloris() -> None:
    clock, _, t, proto = watched(line_time=10.0, min_rate=100.0)
    for _ in range(30):
        proto.dataReceived(b"x" * 200)  # 200 bytes/s, no newline
        clock.advance(1)
    assert not t.disconnecting
    for _ in range(10):
        proto.dataReceived(b"x" * 50)  # falls to 50 bytes/s
        clock.advance(1)
    clock.advance(10)
    assert t.disconnecting


def test_zero_min_rate_means_no_allowance() -> None:
    clock, _, t, proto = watched(line_time=5.0, min_rate=0.0)
    for _ in range(5):
        proto.dataReceived(b"x" * 10000)
        clock.advance(1)
    assert t.disconnecting


def test_window_does_not_run_while_the_protocol_paused_reading() -> None:
    clock, app, t, proto = watched(line_time=10.0, min_rate=0.0)
    proto.dataReceived(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d")
    app.pause()
    assert t.producerState == "paused"
    clock.advance(100)
    assert not t.disconnecting
    app.resume()
    assert t.producerState == "producing"
    clock.advance(9)
    assert not t.disconnecting
    clock.advance(1)
    assert t.disconnecting


def test_bytes_pipelined_before_starttls_do_not_count() -> None:
    clock, app, t, proto = watched(line_time=10.0, min_rate=0.0)
    proto.dataReceived(b"STLS\r\n\x16\x03\x01")  # a client that did not wait for +OK
    app.start_tls(object())
    clock.advance(30)
    assert not t.disconnecting


def test_connection_lost_cancels_the_timer() -> None:
    clock, app, _, proto = watched()
    proto.dataReceived(b"US")
    drop(proto)
    assert app.lost
    assert clock.getDelayedCalls() == []


def test_guard_puts_implicit_tls_inside_the_limiter() -> None:
    from twisted.internet.ssl import CertificateOptions

    context = CertificateOptions()
    app = RecorderFactory()
    factory = guard(
        app,
        LimitSettings(max_total=1, max_per_peer=1),
        Clock(),
        refuse_reply=POP3_REFUSAL,
        tls_context=context,
    )
    assert isinstance(factory, ConnectionLimiter)
    tls = factory.wrappedFactory
    assert isinstance(tls, TLSMemoryBIOFactory)
    assert tls.wrappedFactory is app
    first = factory.buildProtocol(v4("192.0.2.1"))
    assert first is not None
    first.makeConnection(TLSStringTransport(v4("192.0.2.1")))
    refused = factory.buildProtocol(v4("192.0.2.1", 2))
    assert isinstance(refused, TLSMemoryBIOProtocol)  # the refusal is spoken inside TLS
    assert factory.open == 1
    drop(first)
    assert factory.open == 0


def test_a_plain_listener_gets_the_protocol_itself() -> None:
    app = RecorderFactory()
    factory: Any = guard(app, LimitSettings(), Clock(), refuse_reply=POP3_REFUSAL)
    assert factory.wrappedFactory is app
    proto, t = connect(factory, v4("192.0.2.1"))
    built = app.built[0]
    assert built.transport is t
    assert proto is built


def _cyclic_garbage(make_and_end_a_session: Any) -> list[str]:
    """Type names of what one ended session leaves for the cyclic GC (nothing, ideally: a
    full collection's pause grows with what it has to walk and free)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        make_and_end_a_session()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return sorted(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_an_ended_session_leaves_no_reference_cycle_behind() -> None:
    from mailgate.service import SessionTracker
    from tests.test_smtp_server import Session, settings

    def guarded_session() -> None:
        limiter = ConnectionLimiter(RecorderFactory(), Clock(), 10, 10, POP3_REFUSAL)
        tracker = SessionTracker(limiter)
        proto, _ = connect(tracker, v4("192.0.2.1"))
        drop(proto)
        assert tracker.sessions == set() and limiter.open == 0

    def smtp_session() -> None:
        s = Session(settings(line_time=10.0))
        s.cmd("EHLO c.example")
        s.cmd("QUIT")
        s.proto.connectionLost()

    assert _cyclic_garbage(guarded_session) == []
    assert _cyclic_garbage(smtp_session) == []


def test_a_stopped_watch_stays_inert() -> None:
    """POP3 stops its watch when UPDATE begins: a partial line sent after QUIT, even in a
    later packet, must not end the session while the commit runs."""
    clock = Clock()
    fired: list[bool] = []
    watch = PartialLineWatch(clock, 10, 0, lambda: fired.append(True))
    watch.received(b"QUIT\r\n")
    watch.stop()
    watch.received(b"X")
    watch.resume()
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert fired == []
