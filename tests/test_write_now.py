"""Replies leave in the reactor turn that made them, on a real TCP socket pair.

The shortcut of :func:`mailgate.session.write_now` matters only on a real
``tcp.Server`` (every fake transport takes the ordinary path), so these tests build one
over a loopback connection with a memory reactor and read what reached the peer.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure

from mailgate.limits import POP3_REFUSAL, LimitSettings, guard
from mailgate.pop3 import Pop3Factory, Pop3Settings
from tests.test_pop3_server import make_portal, with_messages

MSG = b"Subject: one\n\nHello\n"


class Reactor(MemoryReactor, Clock):
    def __init__(self) -> None:
        MemoryReactor.__init__(self)  # type: ignore[no-untyped-call]
        Clock.__init__(self)


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback connection: our end (non-blocking, for a tcp.Server) and the peer's."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    peer.settimeout(5)
    return ours, peer


def pop3_factory(reactor: Reactor) -> Pop3Factory:
    settings = Pop3Settings(hostname="mail.example.com", allow_plaintext=lambda host: True)
    return Pop3Factory(make_portal(with_messages(MSG)), settings, reactor)


def connect() -> tuple[tcp.Server, Any, socket.socket, Reactor]:
    ours, peer = socket_pair()
    reactor = Reactor()
    protocol: Any = pop3_factory(reactor).buildProtocol(None)
    server = tcp.Server(ours, protocol, ("127.0.0.1", 40000), None, 1, reactor)  # type: ignore[arg-type]
    protocol.makeConnection(server)
    return server, protocol, peer, reactor


def receive(peer: socket.socket) -> bytes:
    peer.setblocking(False)
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""
    finally:
        peer.settimeout(5)


def close(server: tcp.Server, peer: socket.socket) -> None:
    server.socket.close()
    peer.close()


def flush(server: tcp.Server, reactor: Reactor) -> None:
    """Play the reactor: the socket is writable, so write what was queued."""
    while server in reactor.writers:
        server.doWrite()  # type: ignore[no-untyped-call]


def logged_in() -> tuple[tcp.Server, Any, socket.socket, Reactor]:
    server, protocol, peer, reactor = connect()
    assert receive(peer).startswith(b"+OK mail.example.com POP3 server ready")
    protocol.dataReceived(b"USER alice\r\n")
    assert receive(peer).startswith(b"+OK")
    protocol.dataReceived(b"PASS secret\r\n")
    flush(server, reactor)
    assert receive(peer).startswith(b"+OK maildrop has 1 messages")
    return server, protocol, peer, reactor


def test_a_lone_reply_is_on_the_wire_before_the_reactor_runs() -> None:
    server, protocol, peer, reactor = logged_in()
    protocol.dataReceived(b"NOOP\r\n")
    assert server not in reactor.writers  # nothing queued: no epoll interest
    assert receive(peer) == b"+OK\r\n"
    close(server, peer)


def test_pipelined_replies_are_queued_and_leave_together() -> None:
    server, protocol, peer, reactor = logged_in()
    protocol.dataReceived(b"NOOP\r\nNOOP\r\nNOOP\r\n")
    assert receive(peer) == b""  # not one send per reply ...
    assert server in reactor.writers
    flush(server, reactor)
    assert receive(peer) == b"+OK\r\n" * 3  # ... one send for the whole group
    close(server, peer)


def test_a_small_retr_is_sent_whole_at_once() -> None:
    server, protocol, peer, _ = logged_in()
    protocol.dataReceived(b"RETR 1\r\n")
    assert server.producer is None
    assert receive(peer) == b"+OK 23 octets\r\nSubject: one\r\n\r\nHello\r\n.\r\n"
    close(server, peer)


def read_to_eof(peer: socket.socket) -> bytes:
    chunks = []
    while chunk := peer.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_quit_closes_at_once_with_the_reply_before_the_fin() -> None:
    server, protocol, peer, reactor = logged_in()
    lost: list[object] = []
    real_lost = protocol.connectionLost

    def connection_lost(reason: object) -> None:
        lost.append(reason)
        real_lost(reason)

    protocol.connectionLost = connection_lost
    protocol.dataReceived(b"QUIT\r\n")
    assert len(lost) == 1  # no reactor turn needed
    assert not server.connected
    assert server not in reactor.readers and server not in reactor.writers
    assert read_to_eof(peer) == b"+OK mail.example.com signing off\r\n"  # then FIN, not RST
    peer.close()


def test_a_queued_reply_is_sent_before_the_close() -> None:
    server, protocol, peer, _ = logged_in()
    protocol.dataReceived(b"NOOP\r\nQUIT\r\n")  # pipelined: the replies are queued
    assert server.connected  # so the close waits for them, the usual way
    why = server.doWrite()  # type: ignore[no-untyped-call]
    assert why is not None  # Twisted's "written out, now close"
    server.connectionLost(Failure(why))  # type: ignore[no-untyped-call]
    assert read_to_eof(peer) == b"+OK\r\n+OK mail.example.com signing off\r\n"
    peer.close()


def test_quit_on_a_guarded_listener_closes_at_once_and_uncounts() -> None:
    """The limiter counts through the protocol's connectionLost and the line watchdog
    lives in the protocol; an immediate close must still reach both (count, timers)."""
    ours, peer = socket_pair()
    reactor = Reactor()
    limiter: Any = guard(
        pop3_factory(reactor),
        LimitSettings(),
        reactor,
        refuse_reply=POP3_REFUSAL,
    )
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    outer: Any = limiter.buildProtocol(address)
    server = tcp.Server(ours, outer, ("127.0.0.1", 40000), None, 1, reactor)  # type: ignore[arg-type]
    outer.makeConnection(server)
    assert limiter.open == 1
    assert reactor.getDelayedCalls()  # the session's idle timer
    outer.dataReceived(b"QUIT\r\n")
    assert not server.connected
    assert limiter.open == 0
    assert outer.transport is server  # nothing in between
    assert not [c for c in reactor.getDelayedCalls() if c.active()]
    assert read_to_eof(peer).startswith(b"+OK mail.example.com POP3 server ready")
    peer.close()
