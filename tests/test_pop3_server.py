# mypy: allow-untyped-calls
"""Tests for the POP3 server protocol, driven over StringTransport with a fake clock.

Logins go through a real Portal, MailRealm and PasswordChecker over the in-memory store
and user database, so the cred plumbing is exercised exactly as in production.
"""

from __future__ import annotations

import base64
import contextlib
import io
import poplib
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, cast

from twisted.cred.portal import Portal
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTCP, IReactorTime, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.errors import MaildropUnavailable
from mailgate.interfaces import IMaildrop
from mailgate.model import Address
from mailgate.pop3 import Pop3Factory, Pop3Settings
from mailgate.pop3.server import CHUNK_SIZE, MessageStream, State
from mailgate.realm import MailRealm
from mailgate.testing import MemoryMaildrop, MemoryMailStore, MemoryUserDatabase
from mailgate.wire import encode_all

ALICE = Address("alice", "example.com")
TIM = Address("tim", "example.com")
TLS_CONTEXT = object()  # opaque to the protocol; the transport double records it

MSG1 = b"Subject: one\nFrom: a@example.com\n\nHello\n.\nBye\n"
MSG2 = b"Subject: two\nFrom: b@example.com\n\n" + b"line\n" * 30
PLAIN_TIM = base64.b64encode(b"\0tim\0tanstaaf")


class RecordingTransport(StringTransport):
    """A StringTransport that keeps every write separately and records TCP_NODELAY."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.nodelay: bool | None = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


@implementer(ITLSTransport)
class TLSTransport(RecordingTransport):
    """Can start TLS: records the context it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_started: list[object] = []

    def startTLS(self, contextFactory: object) -> None:
        self.tls_started.append(contextFactory)

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def getTcpNoDelay(self) -> bool:
        return bool(self.nodelay)

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


class FailingMaildrop(MemoryMaildrop):
    """A maildrop whose UPDATE goes wrong in a configurable way."""

    mode = "raise"

    def commit(self, deleted: Sequence[int]) -> Deferred[int]:
        if self.mode == "partial":
            self.release()
            return succeed(1)
        return fail(OSError("disk on fire"))


class FailingStore(MemoryMailStore):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def open_maildrop(self, address: Address) -> Deferred[IMaildrop]:
        if self.mode == "unavailable":
            return fail(MaildropUnavailable("no directory"))
        if self.mode == "boom":
            return fail(RuntimeError("secret internals"))
        self.locked.add(address)
        drop = FailingMaildrop(self, address)
        drop.mode = self.mode
        return succeed(drop)


class BrokenReadMaildrop(MemoryMaildrop):
    """open_message fails outright (first message) or part-way through reading (second)."""

    def open_message(self, index: int) -> IO[bytes]:
        if index == 0:
            raise RuntimeError("secret path /var/mail")
        return ExplodingFile(b"x\n" * CHUNK_SIZE)


class ExplodingFile(io.BytesIO):
    """A full first chunk (so the stream reads on), then an I/O error."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() > 0:
            raise OSError("EIO")
        return super().read(size)


class BrokenReadStore(MemoryMailStore):
    def open_maildrop(self, address: Address) -> Deferred[IMaildrop]:
        self.locked.add(address)
        return succeed(BrokenReadMaildrop(self, address))


class PendingPortal(Portal):
    """A portal whose logins complete only when the test says so."""

    def __init__(self, inner: Portal) -> None:
        super().__init__(inner.realm, [])
        self.inner = inner
        self.pending: list[tuple[Deferred[Any], Any]] = []

    def login(self, credentials: Any, mind: object, *interfaces: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, credentials))
        return d

    def finish(self) -> None:
        d, credentials = self.pending.pop(0)
        self.inner.login(credentials, None, IMaildrop).chainDeferred(d)


def make_portal(store: MemoryMailStore) -> Portal:
    users = MemoryUserDatabase(
        {"alice@example.com": "secret", "tim@example.com": "tanstaaf", "sp@example.com": "a b c"}
    )
    realm = MailRealm(store, users, ["example.com"])
    return Portal(realm, [PasswordChecker(users, "example.com", plaintext_verify)])


class Session:
    """One protocol instance on a transport double, with helpers to talk to it."""

    def __init__(
        self,
        store: MemoryMailStore | None = None,
        *,
        plaintext: bool = True,
        tls_context: object | None = TLS_CONTEXT,
        implicit: bool = False,
        tls_transport: bool = True,
        portal: Portal | None = None,
        clock: Clock | None = None,
        max_failures: int = 3,
        **more_settings: Any,
    ) -> None:
        self.store = store if store is not None else MemoryMailStore()
        self.portal = portal if portal is not None else make_portal(self.store)
        self.clock = clock or Clock()
        self.settings = Pop3Settings(
            hostname="mail.example.com",
            tls_context=tls_context,
            implicit_tls=implicit,
            allow_plaintext=lambda host: plaintext,
            max_failures=max_failures,
            **more_settings,
        )
        self.factory = Pop3Factory(self.portal, self.settings, self.clock)
        self.proto = self.factory.buildProtocol(None)
        self.transport: RecordingTransport = (
            TLSTransport() if tls_transport else RecordingTransport()
        )
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def pump(self) -> None:
        """Play the transport's part for registered pull producers."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def send(self, data: bytes, pump: bool = True) -> bytes:
        self.transport.writes.clear()
        self.proto.dataReceived(data)
        if pump:
            self.pump()
        return self.take()

    def cmd(self, line: str | bytes) -> bytes:
        raw = line.encode() if isinstance(line, str) else line
        return self.send(raw + b"\r\n")

    def login(self, user: str = "alice", password: str = "secret") -> bytes:
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        return self.cmd(f"PASS {password}")

    def drop(self) -> None:
        self.proto.connectionLost(Failure(ConnectionError("gone")))

    def state(self) -> State:
        return self.proto.state

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def multiline_body(reply: bytes) -> list[bytes]:
    """Data lines of a multi-line reply, un-stuffed, without status or terminator."""
    assert reply.endswith(b"\r\n.\r\n"), reply
    lines = reply.split(b"\r\n")[1:-2]
    return [line[1:] if line.startswith(b".") else line for line in lines]


def unstuffed_retr(reply: bytes) -> bytes:
    """The message octets of a RETR/TOP reply: status and terminator removed, un-stuffed."""
    status, _, rest = reply.partition(b"\r\n")
    assert status.startswith(b"+OK"), reply
    assert rest.endswith(b".\r\n")
    body = rest[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def capa_tags(reply: bytes) -> list[bytes]:
    return multiline_body(reply)


def with_messages(*messages: bytes) -> MemoryMailStore:
    store = MemoryMailStore()
    for m in messages:
        store.deliver(ALICE, m)
    return store


class GreetingAndAuthorization(unittest.TestCase):
    def test_greeting(self) -> None:
        s = Session()
        assert s.greeting.startswith(b"+OK ")
        assert s.greeting.endswith(b"\r\n") and len(s.greeting) <= 512
        assert s.transport.writes == [s.greeting]
        assert s.transport.nodelay is True

    def test_commands_before_login_are_refused(self) -> None:
        s = Session(with_messages(MSG1))
        for line in ("STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 0", "UIDL"):
            assert s.cmd(line).startswith(b"-ERR"), line
        assert s.state() is State.AUTHORIZATION
        assert s.login().startswith(b"+OK")

    def test_user_pass(self) -> None:
        s = Session(with_messages(MSG1, MSG2))
        assert s.cmd("user alice").startswith(b"+OK")
        reply = s.cmd("PASS secret")
        assert reply.startswith(b"+OK")
        assert s.state() is State.TRANSACTION
        assert s.cmd("STAT").startswith(b"+OK 2 ")

    def test_wrong_password(self) -> None:
        s = Session()
        assert s.login(password="wrong").startswith(b"-ERR [AUTH] ")
        assert s.cmd("STAT").startswith(b"-ERR")
        assert not s.closed

    def test_pass_without_user(self) -> None:
        s = Session()
        reply = s.cmd("PASS secret")
        assert reply.startswith(b"-ERR") and b"[AUTH]" not in reply

    def test_pass_must_follow_user_immediately(self) -> None:
        s = Session()
        s.cmd("USER alice")
        s.cmd("CAPA")
        assert s.cmd("PASS secret").startswith(b"-ERR")

    def test_password_with_spaces_is_verbatim(self) -> None:
        s = Session()
        assert s.login("sp", "a b c").startswith(b"+OK")

    def test_user_argument_count(self) -> None:
        s = Session()
        assert s.cmd("USER").startswith(b"-ERR")
        assert s.cmd("USER a b").startswith(b"-ERR")
        assert s.cmd("PASS").startswith(b"-ERR")

    def test_unknown_user_gets_ok_then_auth_error(self) -> None:
        s = Session()
        assert s.cmd("USER nobody").startswith(b"+OK")
        assert s.cmd("PASS x").startswith(b"-ERR [AUTH]")

    def test_bare_and_qualified_logins_reach_same_mailbox(self) -> None:
        store = with_messages(MSG1)
        for name in ("alice", "alice@example.com", "ALICE@Example.COM"):
            s = Session(store)
            assert s.login(name).startswith(b"+OK 1 ") or s.cmd("STAT").startswith(b"+OK 1 ")
            assert s.cmd("QUIT").startswith(b"+OK")

    def test_max_failures_closes(self) -> None:
        s = Session()
        assert s.login(password="a").startswith(b"-ERR [AUTH]")
        assert s.login(password="b").startswith(b"-ERR [AUTH]")
        assert not s.closed
        assert s.login(password="c").startswith(b"-ERR [AUTH]")
        assert s.closed
        assert s.send(b"CAPA\r\n") == b""

    def test_failed_login_is_logged_without_password(self) -> None:
        events: Sequence[LogEvent]
        with capturedLogs() as events:
            s = Session()
            s.login(password="hunter2hunter2")
        text = "\n".join(formatEvent(e) for e in events)
        assert "alice" in text
        assert "hunter2" not in text

    def test_quit_in_authorization(self) -> None:
        s = Session()
        assert s.cmd("QUIT").startswith(b"+OK")
        assert s.closed

    def test_unknown_and_empty_commands(self) -> None:
        s = Session()
        assert s.cmd("FOO").startswith(b"-ERR")
        assert s.cmd("").startswith(b"-ERR")
        assert s.cmd("LAST").startswith(b"-ERR")
        assert s.state() is State.AUTHORIZATION
        s.login()
        assert s.cmd("FOO").startswith(b"-ERR")
        assert s.cmd("").startswith(b"-ERR")
        assert s.state() is State.TRANSACTION

    def test_bare_lf_cr_nul_inside_command(self) -> None:
        s = Session(with_messages(MSG1))
        s.login()
        assert s.send(b"LIST\n1\r\n").startswith(b"-ERR")
        assert s.send(b"LIST 1\rX\r\n").startswith(b"-ERR")
        assert s.send(b"NO\0OP\r\n").startswith(b"-ERR")
        assert s.cmd("NOOP") == b"+OK\r\n"

    def test_overlong_line_is_discarded_and_session_continues(self) -> None:
        s = Session()
        reply = s.send(b"X" * 298 + b"\r\n")
        assert reply.startswith(b"-ERR") and reply.count(b"\r\n") == 1
        assert s.cmd("CAPA").startswith(b"+OK")
        assert not s.closed

    def test_overlong_line_in_many_pieces_gets_one_error(self) -> None:
        s = Session()
        for _ in range(50):
            assert s.send(b"Y" * 1000) == b""
        reply = s.send(b"\r\nCAPA\r\n")
        assert reply.startswith(b"-ERR")
        assert reply.count(b"-ERR") == 1 and b"\r\nTOP\r\n" in reply
        assert not s.closed

    def test_254_octet_line_is_not_too_long_255_is(self) -> None:
        s = Session()
        ok_line = b"USER " + b"a" * 248  # 253 + CRLF = 255
        assert s.send(ok_line + b"\r\n").startswith(b"+OK")
        reply = s.send(b"USER " + b"a" * 249 + b"\r\n")
        assert reply.startswith(b"-ERR") and b"too long" in reply

    def test_long_unknown_command_reply_is_bounded(self) -> None:
        s = Session()
        reply = s.cmd("FOOBARBAZ " + "x" * 200)
        assert reply.startswith(b"-ERR") and len(reply) <= 512
        reply = s.cmd("F" * 16)
        assert len(reply) <= 512 and b"F" * 16 in reply

    def test_plaintext_disallowed(self) -> None:
        s = Session(plaintext=False)
        for line in ("USER alice", "PASS secret", "AUTH PLAIN " + PLAIN_TIM.decode(), "AUTH LOGIN"):
            reply = s.cmd(line)
            assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed"), line
        assert s.cmd("AUTH") == b"+OK Supported mechanisms follow\r\n.\r\n"


class Capabilities(unittest.TestCase):
    def test_plaintext_port_before_tls(self) -> None:
        s = Session(plaintext=False)
        tags = capa_tags(s.cmd("CAPA"))
        for tag in (b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"STLS"):
            assert tag in tags
        assert b"USER" not in tags
        assert not any(t.startswith(b"SASL") for t in tags)
        assert not any(t.startswith(b"IMPLEMENTATION") for t in tags)

    def test_after_stls(self) -> None:
        s = Session(plaintext=False)
        assert s.cmd("STLS") == b"+OK Begin TLS negotiation\r\n"
        tags = capa_tags(s.cmd("CAPA"))
        assert b"USER" in tags and b"SASL PLAIN LOGIN" in tags
        assert b"STLS" not in tags

    def test_implicit_tls(self) -> None:
        s = Session(plaintext=False, implicit=True)
        tags = capa_tags(s.cmd("CAPA"))
        assert b"STLS" not in tags and b"USER" in tags

    def test_no_stls_when_tls_not_configured(self) -> None:
        s = Session(tls_context=None)
        assert b"STLS" not in capa_tags(s.cmd("CAPA"))

    def test_no_stls_when_transport_cannot(self) -> None:
        s = Session(tls_transport=False)
        assert b"STLS" not in capa_tags(s.cmd("CAPA"))
        assert s.cmd("STLS").startswith(b"-ERR")

    def test_transaction_lists_superset(self) -> None:
        for plaintext in (True, False):
            s = Session(plaintext=plaintext)
            if not plaintext:
                s.cmd("STLS")
            before = capa_tags(s.cmd("CAPA"))
            s.login()
            after = capa_tags(s.cmd("CAPA"))
            assert set(before) <= set(after)
            assert b"IMPLEMENTATION mailgate" in after

    def test_stls_tag_kept_in_transaction_when_logged_in_without_tls(self) -> None:
        s = Session(plaintext=True)
        before = capa_tags(s.cmd("CAPA"))
        assert b"STLS" in before
        s.login()
        assert set(before) <= set(capa_tags(s.cmd("CAPA")))

    def test_no_legacy_twisted_tags_and_argument_refused(self) -> None:
        s = Session()
        reply = s.cmd("CAPA")
        for legacy in (b"PIPELINE\r", b"CELERITY", b"AUSPEX", b"POTENCE"):
            assert legacy not in reply
        assert s.cmd("CAPA x").startswith(b"-ERR")
        assert s.transport.writes == [b"-ERR CAPA takes no argument\r\n"]


class Stls(unittest.TestCase):
    def test_stls_starts_tls_with_context(self) -> None:
        s = Session(plaintext=False)
        assert s.cmd("STLS") == b"+OK Begin TLS negotiation\r\n"
        assert isinstance(s.transport, TLSTransport)
        assert s.transport.tls_started == [TLS_CONTEXT]

    def test_stls_when_active(self) -> None:
        s = Session()
        s.cmd("STLS")
        assert s.cmd("STLS") == b"-ERR Command not permitted when TLS active\r\n"
        s2 = Session(implicit=True)
        assert s2.cmd("STLS") == b"-ERR Command not permitted when TLS active\r\n"
        assert isinstance(s2.transport, TLSTransport) and s2.transport.tls_started == []

    def test_stls_in_transaction(self) -> None:
        s = Session()
        s.login()
        assert s.cmd("STLS").startswith(b"-ERR")
        assert isinstance(s.transport, TLSTransport) and s.transport.tls_started == []

    def test_stls_not_configured(self) -> None:
        s = Session(tls_context=None)
        assert s.cmd("STLS").startswith(b"-ERR")
        assert s.cmd("CAPA").startswith(b"+OK")

    def test_stls_with_argument(self) -> None:
        s = Session()
        assert s.cmd("STLS now").startswith(b"-ERR")

    def test_pipelined_plaintext_after_stls_is_discarded(self) -> None:
        s = Session(plaintext=False)
        reply = s.send(b"STLS\r\nUSER mallory\r\nPASS x\r\nCAPA\r\n")
        assert reply == b"+OK Begin TLS negotiation\r\n"
        # The first line after the handshake is handled afresh, nothing replays.
        assert s.cmd("NOOP").startswith(b"-ERR")
        assert s.state() is State.AUTHORIZATION

    def test_partial_line_before_stls_is_discarded(self) -> None:
        s = Session(plaintext=False)
        reply = s.send(b"STLS\r\nUSER mall")
        assert reply == b"+OK Begin TLS negotiation\r\n"
        assert s.send(b"CAPA\r\n").startswith(b"+OK Capability")

    def test_user_before_stls_is_forgotten(self) -> None:
        s = Session(plaintext=True)
        assert s.cmd("USER alice").startswith(b"+OK")
        s.cmd("STLS")
        assert s.cmd("PASS secret").startswith(b"-ERR")
        assert s.state() is State.AUTHORIZATION


class Auth(unittest.TestCase):
    def test_auth_lists_mechanisms(self) -> None:
        s = Session()
        assert s.cmd("AUTH") == b"+OK Supported mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n"

    def test_plain_initial_response(self) -> None:
        s = Session()
        assert s.cmd(b"AUTH PLAIN " + PLAIN_TIM).startswith(b"+OK")
        assert s.state() is State.TRANSACTION

    def test_lower_case(self) -> None:
        s = Session()
        assert s.cmd(b"auth plain " + PLAIN_TIM).startswith(b"+OK")

    def test_plain_with_continuation(self) -> None:
        s = Session()
        assert s.cmd("AUTH PLAIN") == b"+ \r\n"
        assert s.state() is State.SASL
        assert s.cmd(PLAIN_TIM).startswith(b"+OK")

    def test_plain_empty_initial_response(self) -> None:
        s = Session()
        assert s.cmd("AUTH PLAIN =").startswith(b"-ERR [AUTH]")
        assert not s.closed

    def test_plain_foreign_authzid(self) -> None:
        s = Session()
        ir = base64.b64encode(b"admin\0tim\0tanstaaf")
        assert s.cmd(b"AUTH PLAIN " + ir).startswith(b"-ERR [AUTH]")
        same = base64.b64encode(b"tim\0tim\0tanstaaf")
        assert s.cmd(b"AUTH PLAIN " + same).startswith(b"+OK")

    def test_plain_wrong_nul_count(self) -> None:
        s = Session(max_failures=10)
        for raw in (b"tim\0tanstaaf", b"\0tim\0tanstaaf\0"):
            assert s.cmd(b"AUTH PLAIN " + base64.b64encode(raw)).startswith(b"-ERR")
        assert not s.closed
        assert s.state() is State.AUTHORIZATION

    def test_wrong_password(self) -> None:
        s = Session()
        ir = base64.b64encode(b"\0tim\0nope")
        assert s.cmd(b"AUTH PLAIN " + ir).startswith(b"-ERR [AUTH]")

    def test_strict_base64(self) -> None:
        s = Session()
        assert s.cmd("AUTH PLAIN") == b"+ \r\n"
        reply = s.cmd("!!!")
        assert reply.startswith(b"-ERR") and b"[AUTH]" not in reply
        assert s.state() is State.AUTHORIZATION
        assert s.cmd("AUTH PLAIN !!!").startswith(b"-ERR")

    def test_cancel_then_retry(self) -> None:
        s = Session()
        assert s.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6\r\n"
        assert s.cmd("*") == b"-ERR Authentication cancelled\r\n"
        assert s.state() is State.AUTHORIZATION
        assert s.cmd(b"AUTH PLAIN " + PLAIN_TIM).startswith(b"+OK")

    def test_login_mechanism(self) -> None:
        s = Session()
        assert s.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6\r\n"
        assert s.cmd(base64.b64encode(b"tim")) == b"+ UGFzc3dvcmQ6\r\n"
        assert s.cmd(base64.b64encode(b"tanstaaf")).startswith(b"+OK")

    def test_login_initial_response(self) -> None:
        s = Session()
        assert s.cmd("AUTH LOGIN dGlt") == b"+ UGFzc3dvcmQ6\r\n"
        assert s.cmd(base64.b64encode(b"tanstaaf")).startswith(b"+OK")

    def test_unknown_mechanism_and_extra_args(self) -> None:
        s = Session()
        assert s.cmd("AUTH FOO").startswith(b"-ERR")
        assert s.cmd("AUTH CRAM-MD5").startswith(b"-ERR")
        assert s.cmd("AUTH PLAIN a b").startswith(b"-ERR")
        assert s.state() is State.AUTHORIZATION

    def test_long_continuation_lines(self) -> None:
        s = Session()
        assert s.cmd("AUTH PLAIN") == b"+ \r\n"
        # 5000 octets of valid base64: processed (and failing as credentials).
        assert s.cmd(b"QUFB" * 1250).startswith(b"-ERR [AUTH]")
        assert s.cmd("AUTH PLAIN") == b"+ \r\n"
        reply = s.cmd(b"QUFB" * 3250)
        assert reply.startswith(b"-ERR") and b"[AUTH]" not in reply
        assert s.state() is State.AUTHORIZATION
        assert not s.closed

    def test_long_auth_command_line_is_allowed(self) -> None:
        s = Session()
        assert s.cmd(b"AUTH PLAIN " + b"QUFB" * 100).startswith(b"-ERR [AUTH]")

    def test_auth_in_transaction(self) -> None:
        s = Session()
        s.login()
        for line in ("USER x", "PASS x", "APOP x y", "AUTH PLAIN", "STLS"):
            assert s.cmd(line).startswith(b"-ERR"), line
        assert s.state() is State.TRANSACTION


class Transaction(unittest.TestCase):
    def setUp(self) -> None:
        self.store = with_messages(MSG1, MSG2)
        self.s = Session(self.store)
        assert self.s.login().startswith(b"+OK")
        self.size1 = len(encode_all([MSG1], stuff=False))
        self.size2 = len(encode_all([MSG2], stuff=False))

    def test_stat_and_list(self) -> None:
        s = self.s
        assert s.cmd("STAT") == f"+OK 2 {self.size1 + self.size2}\r\n".encode()
        assert multiline_body(s.cmd("LIST")) == [
            f"1 {self.size1}".encode(),
            f"2 {self.size2}".encode(),
        ]
        assert s.cmd("LIST 2") == f"+OK 2 {self.size2}\r\n".encode()
        assert s.cmd("LIST  1") == f"+OK 1 {self.size1}\r\n".encode()
        assert s.cmd("STAT x").startswith(b"-ERR")

    def test_bad_message_numbers(self) -> None:
        self.s.drop()  # more invalid commands than the default max_junk tolerates
        s = Session(self.store, max_junk=100)
        assert s.login().startswith(b"+OK")
        for arg in ("3", "0", "-1", "x", "1 2", "99999999999999999999999", "+1"):
            assert s.cmd(f"LIST {arg}").startswith(b"-ERR"), arg
            assert s.cmd(f"RETR {arg}").startswith(b"-ERR"), arg
            assert s.cmd(f"DELE {arg}").startswith(b"-ERR"), arg
        assert s.cmd("RETR").startswith(b"-ERR")
        assert s.cmd("NOOP") == b"+OK\r\n"

    def test_retr_size_matches_list(self) -> None:
        s = self.s
        for n, stored in ((1, MSG1), (2, MSG2)):
            reply = s.cmd(f"RETR {n}")
            body = unstuffed_retr(reply)
            assert body == encode_all([stored], stuff=False)
            size = int(s.cmd(f"LIST {n}").split()[2])
            assert len(body) == size

    def test_retr_stuffs_dot_line_and_is_one_write(self) -> None:
        s = self.s
        reply = s.cmd("rEtR 1")
        assert b"\r\n..\r\nBye\r\n.\r\n" in reply
        assert reply.endswith(b"Bye\r\n.\r\n")
        assert len(s.transport.writes) == 1

    def test_dele_marks_only(self) -> None:
        s = self.s
        assert s.cmd("DELE 1").startswith(b"+OK")
        assert multiline_body(s.cmd("LIST")) == [f"2 {self.size2}".encode()]
        assert s.cmd("STAT") == f"+OK 1 {self.size2}\r\n".encode()
        assert s.cmd("DELE 1").startswith(b"-ERR")
        for line in ("RETR 1", "TOP 1 0", "UIDL 1", "LIST 1"):
            assert s.cmd(line).startswith(b"-ERR"), line
        assert len(self.store.mailboxes[ALICE]) == 2

    def test_rset(self) -> None:
        s = self.s
        s.cmd("DELE 1")
        assert s.cmd("RSET").startswith(b"+OK")
        assert s.cmd("STAT").startswith(b"+OK 2 ")
        assert s.cmd("RSET x").startswith(b"-ERR")
        assert s.cmd("NOOP x").startswith(b"-ERR")

    def test_quit_applies_deletions_and_keeps_uids(self) -> None:
        s = self.s
        uid2 = multiline_body(s.cmd("UIDL"))[1].split()[1]
        s.cmd("DELE 1")
        assert s.cmd("QUIT").startswith(b"+OK")
        assert s.closed
        s.drop()
        assert ALICE not in self.store.locked
        s2 = Session(self.store)
        assert s2.login().startswith(b"+OK")
        assert s2.cmd("STAT") == f"+OK 1 {self.size2}\r\n".encode()
        assert s2.cmd("UIDL 1") == b"+OK 1 " + uid2 + b"\r\n"

    def test_drop_after_dele_applies_nothing(self) -> None:
        s = self.s
        s.cmd("DELE 1")
        s.drop()
        assert ALICE not in self.store.locked
        assert len(self.store.mailboxes[ALICE]) == 2
        s2 = Session(self.store)
        assert s2.login().startswith(b"+OK")
        assert s2.cmd("STAT").startswith(b"+OK 2 ")

    def test_in_use_then_free_after_quit(self) -> None:
        other = Session(self.store)
        assert other.login().startswith(b"-ERR [IN-USE] ")
        assert other.state() is State.AUTHORIZATION
        self.s.cmd("QUIT")
        assert other.login().startswith(b"+OK")

    def test_uidl(self) -> None:
        s = self.s
        lines = multiline_body(s.cmd("UIDL"))
        assert [line.split()[0] for line in lines] == [b"1", b"2"]
        uids = [line.split()[1] for line in lines]
        assert len(set(uids)) == 2
        for uid in uids:
            assert 1 <= len(uid) <= 70 and all(0x21 <= c <= 0x7E for c in uid)
        assert s.cmd("UIDL 1") == b"+OK 1 " + uids[0] + b"\r\n"
        assert s.cmd("UIDL 1 2").startswith(b"-ERR")

    def test_top_variants(self) -> None:
        store = with_messages(b"H: 1\nH2: 2\n\n.a\nb\nc\nd\ne\n")
        s = Session(store)
        s.login()
        assert unstuffed_retr(s.cmd("TOP 1 0")) == b"H: 1\r\nH2: 2\r\n\r\n"
        reply = s.cmd("TOP 1 2")
        assert reply.endswith(b"\r\n\r\n..a\r\nb\r\n.\r\n")
        assert len(s.transport.writes) == 1
        assert unstuffed_retr(s.cmd("TOP 1 1000000")) == encode_all(
            [b"H: 1\nH2: 2\n\n.a\nb\nc\nd\ne\n"], stuff=False
        )
        for line in ("TOP 1", "TOP 1 -1", "TOP 1 x", "TOP 1 2 3", "TOP x 1"):
            assert s.cmd(line).startswith(b"-ERR"), line

    def test_noop(self) -> None:
        assert self.s.cmd("NOOP") == b"+OK\r\n"

    def test_snapshot_does_not_change(self) -> None:
        self.store.deliver(ALICE, b"Subject: new\n\nx\n")
        assert self.s.cmd("STAT").startswith(b"+OK 2 ")

    def test_pipelined_commands_in_order(self) -> None:
        s = self.s
        reply = s.send(b"STAT\r\nLIST\r\nUIDL\r\nNOOP\r\n")
        parts = reply.split(b"\r\n.\r\n")
        assert parts[0].startswith(b"+OK 2 ")
        assert b"\r\n+OK" in parts[0]  # LIST status follows STAT
        assert parts[1].startswith(b"+OK")  # UIDL
        assert parts[2] == b"+OK\r\n"
        assert len(s.transport.writes) == 4

    def big_session(self) -> Session:
        """Message 2 is larger than one chunk, so RETR 2 streams through a producer."""
        s = Session(with_messages(MSG1, b"big\n" * (CHUNK_SIZE // 2) + b"Bye\n"))
        assert s.login().startswith(b"+OK")
        return s

    def test_commands_behind_a_stream_wait_for_it(self) -> None:
        s = self.big_session()
        out = s.send(b"RETR 2\r\nSTAT\r\nRETR 1\r\nNOOP\r\n", pump=False)
        assert out == b""
        s.pump()
        reply = s.take()
        first_end = reply.index(b"\r\n.\r\n") + 5
        assert reply[:first_end].startswith(b"+OK")
        assert reply[first_end:].startswith(b"+OK 2 ")
        assert reply.endswith(b"Bye\r\n.\r\n+OK\r\n")

    def test_retr_status_shares_first_write(self) -> None:
        s = self.big_session()
        s.send(b"RETR 2\r\n", pump=False)
        assert s.transport.writes == []
        assert s.transport.producer is not None
        assert not s.transport.streaming
        s.transport.producer.resumeProducing()
        assert len(s.transport.writes) == 1
        assert s.transport.writes[0].startswith(b"+OK")

    def test_autologout(self) -> None:
        s = self.s
        s.cmd("DELE 1")
        s.clock.advance(599)
        assert not s.closed
        s.cmd("NOOP")  # activity resets the timer
        s.clock.advance(599)
        assert not s.closed
        s.clock.advance(1)
        assert s.closed
        assert s.take() == b""
        s.drop()
        assert ALICE not in self.store.locked
        assert len(self.store.mailboxes[ALICE]) == 2

    def test_autologout_and_session_end_are_logged(self) -> None:
        events: Sequence[LogEvent]
        with capturedLogs() as events:
            self.s.clock.advance(600)
            self.s.drop()
        text = "\n".join(formatEvent(e) for e in events)
        assert "autologout" in text and "alice" in text

    def test_timer_suspended_while_streaming(self) -> None:
        s = self.big_session()
        s.send(b"RETR 2\r\n", pump=False)
        s.clock.advance(5000)
        assert not s.closed
        s.pump()
        s.clock.advance(599)
        assert not s.closed
        s.clock.advance(1)
        assert s.closed

    def test_drop_during_stream(self) -> None:
        s = self.big_session()
        s.send(b"RETR 2\r\n", pump=False)
        producer = s.transport.producer
        s.drop()
        assert ALICE not in s.store.locked
        assert producer is not None
        producer.resumeProducing()  # a late pull after the drop writes nothing
        assert s.take() == b""

    def test_small_message_is_sent_in_one_write_without_a_producer(self) -> None:
        s = self.s
        out = s.send(b"RETR 1\r\n", pump=False)  # no reactor turn needed: already written
        assert s.transport.producer is None
        assert s.transport.writes == [out]
        assert out == b"+OK %d octets\r\n" % self.size1 + encode_all([MSG1]) + b".\r\n"

    def test_backlog_pauses_reading_while_busy(self) -> None:
        store = with_messages(MSG1, b"big\n" * (CHUNK_SIZE // 2))  # streamed: RETR stays busy
        s = Session(store)
        assert s.login().startswith(b"+OK")
        s.send(b"RETR 2\r\n" + b"NOOP\r\n" * 20000, pump=False)
        assert s.transport.producerState == "paused"
        s.pump()
        assert s.transport.producerState == "producing"
        assert s.take().count(b"+OK\r\n") == 20000


class StuffingAcrossChunks(unittest.TestCase):
    def stream(self, stored: bytes, chunk: int, top: int | None = None) -> bytes:
        transport = StringTransport()
        done: list[bool] = []
        producer = MessageStream(io.BytesIO(stored), b"+OK\r\n", transport, top, done.append, chunk)
        transport.registerProducer(producer, False)
        while transport.producer is not None:
            producer.resumeProducing()
        assert done == [True]
        wire: bytes = transport.value()
        return wire

    def test_first_line_and_boundary_lines_stuffed(self) -> None:
        stored = b".first line\naaaaaaa\n.\nhidden\n"
        for chunk in (1, 2, 3, 7, 8, 9, 64):
            wire = self.stream(stored, chunk)
            assert wire == b"+OK\r\n..first line\r\naaaaaaa\r\n..\r\nhidden\r\n.\r\n", chunk

    def test_crlf_storage_does_not_double_cr(self) -> None:
        for chunk in (1, 2, 5, 64):
            wire = self.stream(b"x\r\n.y\r\n", chunk)
            assert wire == b"+OK\r\nx\r\n..y\r\n.\r\n"

    def test_missing_final_newline(self) -> None:
        for chunk in (1, 4, 64):
            assert self.stream(b"a\nb", chunk) == b"+OK\r\na\r\nb\r\n.\r\n"

    def test_top_across_chunks(self) -> None:
        stored = b"H: 1\n\n.x\ny\nz\n"
        for chunk in (1, 3, 64):
            assert self.stream(stored, chunk, top=1) == b"+OK\r\nH: 1\r\n\r\n..x\r\n.\r\n"

    def test_dot_line_at_chunk_boundary_through_server(self) -> None:
        filler = b"a" * 99 + b"\n"
        lines, rest = divmod(CHUNK_SIZE, len(filler))
        stored = filler * (lines - 1) + b"a" * (len(filler) + rest - 1) + b"\n" + b".\nafter\n"
        assert stored.index(b"\n.\n") + 1 == CHUNK_SIZE
        s = Session(with_messages(stored))
        s.login()
        reply = s.cmd("RETR 1")
        assert reply.endswith(b"\r\n..\r\nafter\r\n.\r\n")
        assert reply.count(b"\r\n.\r\n") == 1
        assert len(unstuffed_retr(reply)) == len(encode_all([stored], stuff=False))
        assert len(s.transport.writes) >= 2


class Failures(unittest.TestCase):
    def test_commit_failure(self) -> None:
        store = FailingStore("raise")
        store.deliver(ALICE, MSG1)
        s = Session(store)
        s.login()
        s.cmd("DELE 1")
        assert s.cmd("QUIT") == b"-ERR some deleted messages not removed\r\n"
        assert s.closed
        assert ALICE not in store.locked
        self.flushLoggedErrors(OSError)

    def test_commit_partial(self) -> None:
        store = FailingStore("partial")
        store.deliver(ALICE, MSG1)
        s = Session(store)
        s.login()
        s.cmd("DELE 1")
        assert s.cmd("QUIT") == b"-ERR some deleted messages not removed\r\n"
        assert s.closed

    def test_maildrop_unavailable(self) -> None:
        s = Session(FailingStore("unavailable"))
        assert s.login().startswith(b"-ERR [SYS/TEMP] ")
        assert s.state() is State.AUTHORIZATION
        self.flushLoggedErrors(MaildropUnavailable)

    def test_unexpected_login_error_does_not_leak(self) -> None:
        s = Session(FailingStore("boom"))
        reply = s.login()
        assert reply.startswith(b"-ERR [SYS/TEMP] ")
        assert b"secret" not in reply and b"RuntimeError" not in reply
        self.flushLoggedErrors(RuntimeError)

    def test_open_message_error_does_not_leak(self) -> None:
        store = BrokenReadStore()
        store.deliver(ALICE, MSG1)
        store.deliver(ALICE, MSG1)
        s = Session(store)
        s.login()
        reply = s.cmd("RETR 1")
        assert reply.startswith(b"-ERR [SYS/TEMP] ")
        assert b"secret" not in reply and b"Error" not in reply
        assert s.cmd("NOOP") == b"+OK\r\n"
        self.flushLoggedErrors(RuntimeError)

    def test_read_error_mid_stream_closes(self) -> None:
        store = BrokenReadStore()
        store.deliver(ALICE, MSG1)
        store.deliver(ALICE, MSG1)
        s = Session(store)
        s.login()
        s.cmd("RETR 2")
        assert s.closed
        s.drop()
        assert ALICE not in store.locked
        self.flushLoggedErrors(OSError)


class PendingLogin(unittest.TestCase):
    def setUp(self) -> None:
        self.store = with_messages(MSG1)
        self.portal = PendingPortal(make_portal(self.store))
        self.s = Session(self.store, portal=self.portal)

    def test_lines_wait_for_login(self) -> None:
        s = self.s
        assert (
            s.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nNOOP\r\n")
            == b"+OK Send your password\r\n"
        )
        self.portal.finish()
        reply = s.take()
        lines = reply.split(b"\r\n")
        assert lines[0].startswith(b"+OK maildrop has 1")
        assert lines[1].startswith(b"+OK 1 ")
        assert lines[2] == b"+OK"

    def test_drop_during_login_releases(self) -> None:
        s = self.s
        s.send(b"USER alice\r\nPASS secret\r\n")
        s.drop()
        self.portal.finish()
        assert ALICE not in self.store.locked
        assert s.take() == b""


class RealSocket(unittest.TestCase):
    """A real listener on 127.0.0.1 and the stdlib poplib client in a thread."""

    def test_poplib_session(self) -> Deferred[None]:
        dotted = b".starts with dot\n\nbody\n"
        store = with_messages(MSG1, dotted)
        octets = sum(len(encode_all([m], stuff=False)) for m in (MSG1, dotted))
        reactor: Any = global_reactor
        clock: IReactorTime = reactor
        settings = Pop3Settings(hostname="localhost", allow_plaintext=lambda host: True)
        factory = Pop3Factory(make_portal(store), settings, clock)
        tcp: IReactorTCP = reactor
        port = tcp.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        portnum = cast(IPv4Address, port.getHost()).port

        def client() -> tuple[bytes, list[bytes], list[bytes], tuple[int, int]]:
            pop = poplib.POP3("127.0.0.1", portnum, timeout=10)
            try:
                capa = pop.capa()
                assert "USER" in capa and "STLS" not in capa
                pop.user("alice")
                pop.pass_("secret")
                stat = pop.stat()
                _, lines1, _ = pop.retr(1)
                _, lines2, _ = pop.retr(2)
                pop.dele(1)
                greeting = pop.getwelcome()
            finally:
                pop.quit()
            return greeting, lines1, lines2, stat

        def check(result: tuple[bytes, list[bytes], list[bytes], tuple[int, int]]) -> None:
            greeting, lines1, lines2, stat = result
            assert greeting.startswith(b"+OK")
            assert stat == (2, octets)
            assert lines1 == MSG1.rstrip(b"\n").split(b"\n")
            assert lines2 == [b".starts with dot", b"", b"body"]
            assert [m.data for m in store.mailboxes[ALICE]] == [b".starts with dot\n\nbody\n"]

        d: Deferred[Any] = deferToThread(client)
        d.addCallback(check)
        return d


BIG = b"Subject: big\n\n" + (b"x" * 99 + b"\n" + b".\n") * 3000 + b".last\n"


class RealTls(unittest.TestCase):
    """STLS and POP3S against a real TLS stack: the pull producer under TLSMemoryBIOProtocol."""

    def setUp(self) -> None:
        from mailgate.tls import make_self_signed, server_context

        tmp = Path(self.mktemp())
        tmp.mkdir()
        make_self_signed(tmp / "cert.pem", tmp / "key.pem", "localhost")
        self.context = server_context(tmp / "cert.pem", tmp / "key.pem")
        self.store = with_messages(MSG1, BIG)

    def listen(self, implicit: bool) -> int:
        reactor: Any = global_reactor
        settings = Pop3Settings(
            hostname="localhost",
            tls_context=self.context,
            implicit_tls=implicit,
            allow_plaintext=lambda host: False,
        )
        factory: Any = Pop3Factory(make_portal(self.store), settings, reactor)
        if implicit:
            factory = TLSMemoryBIOFactory(self.context, False, factory)
        tcp: IReactorTCP = reactor
        port = tcp.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return cast(IPv4Address, port.getHost()).port

    @staticmethod
    def client_context() -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def fetch(self, pop: poplib.POP3) -> tuple[list[bytes], dict[str, list[str]]]:
        capa = pop.capa()
        pop.user("alice")
        pop.pass_("secret")
        _, lines, _ = pop.retr(2)
        pop.quit()
        return lines, capa

    def check(self, result: tuple[list[bytes], dict[str, list[str]]]) -> None:
        lines, capa = result
        assert "USER" in capa and "STLS" not in capa
        assert b"\n".join(lines) + b"\n" == BIG

    def test_stls(self) -> Deferred[None]:
        portnum = self.listen(implicit=False)

        def client() -> tuple[list[bytes], dict[str, list[str]]]:
            pop = poplib.POP3("127.0.0.1", portnum, timeout=10)
            before = pop.capa()
            assert "STLS" in before and "USER" not in before
            with contextlib.suppress(poplib.error_proto):
                pop.user("alice")
                raise AssertionError("USER accepted before TLS")
            pop.stls(self.client_context())
            return self.fetch(pop)

        d: Deferred[Any] = deferToThread(client)
        return d.addCallback(self.check)

    def test_implicit_tls(self) -> Deferred[None]:
        portnum = self.listen(implicit=True)

        def client() -> tuple[list[bytes], dict[str, list[str]]]:
            pop = poplib.POP3_SSL("127.0.0.1", portnum, timeout=10, context=self.client_context())
            with contextlib.suppress(poplib.error_proto):
                pop.stls(self.client_context())
                raise AssertionError("STLS accepted on POP3S")
            return self.fetch(pop)

        d: Deferred[Any] = deferToThread(client)
        return d.addCallback(self.check)
