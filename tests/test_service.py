"""Composition-root pieces: session tracking, graceful drain, reloadable TLS, SIGHUP reload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mailgate import tls
from mailgate.config import Config, Listener
from mailgate.errors import ConfigError
from mailgate.interfaces import IMaildrop
from mailgate.model import Address
from mailgate.pop3.server import Pop3Factory, Pop3Settings
from mailgate.service import ListeningService, MailgateService, ReloadableContext, SessionTracker
from mailgate.testing import MemoryMailStore

ALICE = Address("alice", "example.com")


def failure(e: BaseException) -> Failure:
    return Failure(e)  # type: ignore[no-untyped-call]


def memory_reactor() -> MemoryReactorClock:
    return MemoryReactorClock()  # type: ignore[no-untyped-call]


class AbortableTransport(StringTransport):
    """A StringTransport whose abortConnection ends the connection like a real one."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.aborted = False
        self.protocol: Any = None

    def abortConnection(self) -> None:
        self.aborted = True
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(failure(ConnectionAbortedError()))


class Recorder(Protocol):
    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure | None = None) -> None:
        assert reason is not None
        self.lost.append(reason)


def connect(factory: Any) -> tuple[Any, AbortableTransport]:
    protocol = factory.buildProtocol(None)
    transport = AbortableTransport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def test_tracker_knows_open_sessions_and_still_calls_the_protocol() -> None:
    tracker = SessionTracker(Factory.forProtocol(Recorder))
    p1, _ = connect(tracker)
    p2, _ = connect(tracker)
    assert tracker.sessions == {p1, p2}
    idle = tracker.when_idle()
    p1.connectionLost(failure(ConnectionDone()))
    assert len(p1.lost) == 1  # the protocol's own connectionLost still ran
    assert not idle.called
    p2.connectionLost(failure(ConnectionDone()))
    assert idle.called
    assert tracker.sessions == set()
    assert tracker.when_idle().called


class ConnectionDone(Exception):
    pass


def fired(d: Deferred[Any]) -> list[object]:
    """Collects the result: ``.called`` is already True for a Deferred chained on another."""
    out: list[object] = []
    d.addBoth(out.append)
    return out


def listening(clock: MemoryReactorClock, factory: Any, grace: float) -> ListeningService:
    service = ListeningService(
        clock, Listener("pop3", "tcp:0:interface=127.0.0.1", "none"), factory, grace=grace
    )
    service.startService()
    assert service.listening.called
    return service


def test_stop_waits_for_sessions_then_cuts_them_after_grace() -> None:
    clock = memory_reactor()
    service = listening(clock, Factory.forProtocol(Recorder), grace=30)
    assert len(clock.tcpServers) == 1
    protocol, transport = connect(service.tracker)
    stopped = fired(service.stopService())
    assert service.port is None  # no longer accepting
    assert not stopped
    clock.advance(29)
    assert not stopped and not transport.aborted
    clock.advance(1)
    assert transport.aborted
    assert stopped == [None]
    assert len(protocol.lost) == 1


def test_stop_finishes_early_when_sessions_end_on_their_own() -> None:
    clock = memory_reactor()
    service = listening(clock, Factory.forProtocol(Recorder), grace=30)
    protocol, transport = connect(service.tracker)
    stopped = fired(service.stopService())
    clock.advance(3)
    assert not stopped
    protocol.connectionLost(failure(ConnectionDone()))
    assert stopped == [None]
    assert not transport.aborted
    assert clock.getDelayedCalls() == []


def test_stop_with_no_sessions_is_immediate() -> None:
    clock = memory_reactor()
    service = listening(clock, Factory.forProtocol(Recorder), grace=30)
    assert fired(service.stopService()) == [None]


class OnePortal:
    """Logs anyone in as alice's maildrop in the memory store."""

    def __init__(self, store: MemoryMailStore) -> None:
        self.store = store

    def login(self, credentials: object, mind: object, *interfaces: object) -> Deferred[Any]:
        d = self.store.open_maildrop(ALICE)
        return d.addCallback(lambda drop: (IMaildrop, drop, drop.release))


def test_shutdown_cut_pop3_session_does_not_apply_its_deletions() -> None:
    clock = memory_reactor()
    store = MemoryMailStore()
    store.deliver(ALICE, b"Subject: one\n\nbody\n")
    store.deliver(ALICE, b"Subject: two\n\nbody\n")
    factory = Pop3Factory(
        OnePortal(store),  # type: ignore[arg-type]
        Pop3Settings(hostname="mail.example.com", allow_plaintext=lambda _: True),
        clock,
    )
    service = listening(clock, factory, grace=10)
    _, transport = connect(service.tracker)
    transport.protocol.dataReceived(b"USER alice\r\nPASS x\r\nDELE 1\r\nDELE 2\r\n")
    replies: bytes = transport.value()  # type: ignore[no-untyped-call]
    assert replies.count(b"+OK") >= 4, replies
    stopped = fired(service.stopService())
    clock.advance(9)
    assert not stopped
    clock.advance(1)
    assert stopped == [None] and transport.aborted
    assert len(store.mailboxes[ALICE]) == 2  # no UPDATE for a session cut by shutdown
    assert ALICE not in store.locked  # ...but the maildrop lock was let go


def test_reloadable_context_swaps_certificate_for_new_handshakes(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tls.make_self_signed(cert, key, "one.example")
    context = ReloadableContext(lambda: tls.server_context(cert, key))
    first = context.getContext()
    assert context.getContext() is first  # same options, same context
    tls.make_self_signed(cert, key, "two.example")
    context.reload()
    assert context.getContext() is not first


def test_reloadable_context_keeps_the_old_one_when_files_are_broken(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tls.make_self_signed(cert, key, "one.example")
    context = ReloadableContext(lambda: tls.server_context(cert, key))
    first = context.getContext()
    cert.write_text("not a certificate")
    with pytest.raises(ConfigError):
        context.reload()
    assert context.getContext() is first


class FakeUsers:
    def __init__(self) -> None:
        self.loads = 0

    def reload(self) -> None:  # UserFile.reload never raises on a broken file
        self.loads += 1


class FakeTls:
    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.reloads = 0

    def reload(self) -> None:
        self.reloads += 1
        if self.broken:
            raise ConfigError("TLS: cert.pem is not valid PEM")


class FakePool:
    def __init__(self) -> None:
        self.reloads = 0

    def reload(self) -> None:
        self.reloads += 1


@pytest.mark.parametrize("broken", [False, True])
def test_reload_reloads_users_tls_and_workers(broken: bool) -> None:
    users, context, pool = FakeUsers(), FakeTls(broken), FakePool()
    service = MailgateService(Config(), realm=None, users=users)  # type: ignore[arg-type]
    service.tls = context  # type: ignore[assignment]
    service.pool = pool  # type: ignore[assignment]
    service.reload()
    assert (users.loads, context.reloads, pool.reloads) == (1, 1, 1)


def test_sighup_handler_is_installed_only_when_asked() -> None:
    import signal

    before = signal.getsignal(signal.SIGHUP)
    service = MailgateService(Config(), realm=None, users=FakeUsers())  # type: ignore[arg-type]
    service.startService()
    assert signal.getsignal(signal.SIGHUP) == before
    service.stopService()
    service = MailgateService(Config(), realm=None, users=FakeUsers())  # type: ignore[arg-type]
    service.install_signals = True
    reloads: list[object] = []

    class Reactor:
        def callFromThread(self, f: Any, *args: Any) -> None:
            reloads.append(f)

    service._reactor = Reactor()
    service.startService()
    try:
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler)
        handler(signal.SIGHUP, None)
        assert reloads == [service.reload]
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) == before


def test_stop_service_returns_a_deferred() -> None:
    service = MailgateService(Config(), realm=None, users=FakeUsers())  # type: ignore[arg-type]
    service.startService()
    d = service.stopService()
    assert isinstance(d, Deferred)
    assert len(fired(d)) == 1


def test_open_file_limit_is_raised_to_the_hard_limit() -> None:
    import resource

    from mailgate.service import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        now = raise_open_file_limit()
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if hard != resource.RLIM_INFINITY:
            assert now == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
