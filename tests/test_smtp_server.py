# mypy: allow-untyped-calls
"""Tests for the SMTP submission protocol (checklist section 4, cases S01-S57).

Driven with StringTransport and a Clock; a real Portal over MailRealm and PasswordChecker
with the in-memory store and user database. A few tests use stdlib smtplib over a real
loopback socket, run in a thread.
"""

from __future__ import annotations

import base64
import re
import smtplib
from collections.abc import Callable
from typing import Any, cast

import pytest
from twisted.cred.portal import Portal
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest
from zope.interface import implementer

from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.headers import parse_header_block
from mailgate.interfaces import ISubmission
from mailgate.model import Address
from mailgate.realm import MailRealm
from mailgate.smtp import SmtpFactory, SmtpServer, SmtpSettings
from mailgate.testing import MemoryMailStore, MemoryUserDatabase

HOST = "mx.example.com"
TLS_CONTEXT = object()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN_ALICE = b64(b"\0alice\0secret")


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS and every single write."""

    def __init__(self, peer_ip: str) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", peer_ip, 40000))
        self.tls_started: list[object] = []
        self.writes: list[bytes] = []
        self.nodelay = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def startTLS(self, contextFactory: object) -> None:
        self.tls_started.append(contextFactory)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.nodelay

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


def settings(**kw: Any) -> SmtpSettings:
    base: dict[str, Any] = {
        "hostname": HOST,
        "default_domain": "example.com",
        "tls_context": TLS_CONTEXT,
    }
    base.update(kw)
    return SmtpSettings(**base)


class Session:
    """One protocol instance on a fake transport, with helpers to talk to it."""

    def __init__(
        self,
        smtp_settings: SmtpSettings | None = None,
        peer_ip: str = "192.0.2.10",
        portal: Portal | None = None,
        anonymous: Callable[[], ISubmission] | None = None,
    ) -> None:
        self.clock = Clock()
        self.store = MemoryMailStore()
        self.users = MemoryUserDatabase(
            {"alice@example.com": "secret", "bob@example.com": "hunter2"}
        )
        self.realm = MailRealm(self.store, self.users, ["example.com"])
        if portal is None:
            checker = PasswordChecker(self.users, "example.com", plaintext_verify)
            portal = Portal(self.realm, [checker])
        factory = SmtpFactory(portal, smtp_settings or settings(), self.clock, anonymous)
        proto = factory.buildProtocol(IPv4Address("TCP", peer_ip, 40000))
        assert isinstance(proto, SmtpServer)
        self.proto = proto
        self.transport = TLSStringTransport(peer_ip)
        self.greeting = b""
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, line: str | bytes) -> bytes:
        raw = line.encode() if isinstance(line, str) else line
        return self.send(raw + b"\r\n")

    def starttls(self) -> None:
        assert self.cmd("EHLO c.example").startswith(b"250-")
        assert self.cmd("STARTTLS") == b"220 2.0.0 Ready to start TLS\r\n"
        assert self.transport.tls_started == [TLS_CONTEXT]

    def login(self) -> None:
        """TLS, EHLO, AUTH PLAIN as alice."""
        self.starttls()
        self.cmd("EHLO c.example")
        assert self.cmd(b"AUTH PLAIN " + PLAIN_ALICE).startswith(b"235 2.7.0")

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def codes(data: bytes) -> list[str]:
    """'250 2.1.0' style status of each final reply line."""
    return [
        m.group(1).decode()
        for m in re.finditer(rb"^(\d{3}(?: \d\.\d{1,3}\.\d{1,3})?)(?: |$).*$", data, re.M)
    ]


class GreetingAndEhloTests(unittest.TestCase):
    def test_s01_greeting(self) -> None:
        s = Session()
        assert s.greeting == b"220 mx.example.com ESMTP mailgate\r\n"
        assert s.transport.writes == [s.greeting]
        assert s.transport.nodelay is True

    def test_s02_ehlo_before_tls(self) -> None:
        s = Session()
        out = s.cmd("EHLO c.example")
        lines = out.split(b"\r\n")[:-1]
        assert lines[0] == b"250-mx.example.com"
        keywords = [line[4:] for line in lines[1:]]
        for k in (b"PIPELINING", b"SIZE 26214400", b"8BITMIME", b"ENHANCEDSTATUSCODES"):
            assert k in keywords
        assert b"STARTTLS" in keywords
        assert not any(k.startswith(b"AUTH") for k in keywords)
        assert lines[-1].startswith(b"250 ")
        assert all(line.startswith(b"250-") for line in lines[:-1])

    def test_s03_ehlo_after_tls(self) -> None:
        s = Session()
        s.starttls()
        out = s.cmd("EHLO c.example")
        assert b"STARTTLS" not in out
        assert b"AUTH PLAIN LOGIN" in out

    def test_ehlo_offers_auth_before_tls_when_plaintext_allowed(self) -> None:
        s = Session(settings(allow_plaintext=lambda ip: ip == "192.0.2.10"))
        assert b"250 AUTH PLAIN LOGIN\r\n" in s.cmd("EHLO c.example")

    def test_no_starttls_advertised_without_context(self) -> None:
        s = Session(settings(tls_context=None, require_tls=False))
        assert b"STARTTLS" not in s.cmd("EHLO c.example")
        assert codes(s.cmd("STARTTLS")) == ["454 4.7.0"]

    def test_s47_ehlo_helo_and_mail_before_greeting(self) -> None:
        s = Session(settings(require_tls=False))
        assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["503 5.5.1"]
        assert codes(s.cmd("EHLO")) == ["501 5.5.4"]
        assert s.cmd("HELO c.example") == b"250 mx.example.com\r\n"

    def test_auth_after_helo_is_bad_sequence(self) -> None:
        s = Session()
        s.starttls()
        s.cmd("HELO c.example")
        assert codes(s.cmd(b"AUTH PLAIN " + PLAIN_ALICE)) == ["503 5.5.1"]

    def test_smtputf8_advertised_only_when_enabled(self) -> None:
        assert b"SMTPUTF8" not in Session().cmd("EHLO c")
        assert b"SMTPUTF8" in Session(settings(smtputf8=True)).cmd("EHLO c")

    def test_s53_implicit_tls(self) -> None:
        s = Session(settings(implicit_tls=True))
        assert s.greeting.startswith(b"220 ")
        out = s.cmd("EHLO c.example")
        assert b"STARTTLS" not in out
        assert b"AUTH PLAIN LOGIN" in out
        assert codes(s.cmd("STARTTLS")) == ["503 5.5.1"]
        assert codes(s.cmd(b"AUTH PLAIN " + PLAIN_ALICE)) == ["235 2.7.0"]


class StartTlsTests(unittest.TestCase):
    def test_s04_parameter_and_again(self) -> None:
        s = Session()
        s.cmd("EHLO c.example")
        assert codes(s.cmd("STARTTLS now")) == ["501 5.5.4"]
        s.starttls()
        assert codes(s.cmd("STARTTLS")) == ["503 5.5.1"]

    def test_s05_pipelined_plaintext_discarded(self) -> None:
        s = Session(settings(require_tls=False, allow_plaintext=lambda ip: True))
        s.cmd("EHLO c.example")
        out = s.send(b"STARTTLS\r\nMAIL FROM:<a@example.com>\r\nNOOP\r\n")
        assert out == b"220 2.0.0 Ready to start TLS\r\n"
        # Data arriving after the handshake is handled normally; the old lines never were.
        assert codes(s.cmd("NOOP")) == ["250 2.0.0"]
        assert len(s.transport.tls_started) == 1

    def test_s05_partial_line_before_tls_discarded(self) -> None:
        s = Session()
        s.cmd("EHLO c.example")
        out = s.send(b"STARTTLS\r\nMAIL FROM:<a@exa")
        assert out == b"220 2.0.0 Ready to start TLS\r\n"
        assert codes(s.send(b"EHLO again\r\n")) == ["250"]

    def test_s06_state_reset_after_tls(self) -> None:
        s = Session(settings(require_tls=False, allow_plaintext=lambda ip: True))
        s.cmd("EHLO c.example")
        assert codes(s.cmd(b"AUTH PLAIN " + PLAIN_ALICE)) == ["235 2.7.0"]
        assert codes(s.cmd("STARTTLS")) == ["220 2.0.0"]
        assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["503 5.5.1"]
        s.cmd("EHLO c.example")
        # AUTH was forgotten too.
        assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["530 5.7.0"]

    def test_s07_tls_without_auth(self) -> None:
        s = Session()
        s.starttls()
        s.cmd("EHLO c.example")
        assert s.cmd("MAIL FROM:<alice@example.com>") == b"530 5.7.0 Authentication required\r\n"

    def test_s08_require_tls_gate(self) -> None:
        s = Session()
        assert codes(s.cmd("EHLO c.example")) == ["250"]
        assert (
            s.cmd("MAIL FROM:<a@x.example>") == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        )
        assert codes(s.cmd(b"AUTH PLAIN " + PLAIN_ALICE)) == ["530 5.7.0"]
        assert codes(s.cmd("NOOP")) == ["250 2.0.0"]
        assert codes(s.cmd("RSET")) == ["250 2.0.0"]
        assert codes(s.cmd("HELO c.example")) == ["250"]
        assert codes(s.cmd("QUIT")) == ["221 2.0.0"]
        assert s.closed


class AuthTests(unittest.TestCase):
    def tls_session(self, **kw: Any) -> Session:
        s = Session(settings(**kw))
        s.starttls()
        s.cmd("EHLO c.example")
        return s

    def test_s09_plaintext_refused_without_tls(self) -> None:
        s = Session(settings(require_tls=False))
        s.cmd("EHLO c.example")
        assert (
            s.cmd(b"AUTH PLAIN " + PLAIN_ALICE)
            == b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
        )
        assert codes(s.cmd("AUTH LOGIN")) == ["538 5.7.11"]

    def test_s10_plain_success(self) -> None:
        s = self.tls_session()
        assert s.cmd(b"AUTH PLAIN " + PLAIN_ALICE) == b"235 2.7.0 Authentication successful\r\n"

    def test_plain_without_initial_response(self) -> None:
        s = self.tls_session()
        assert s.cmd("AUTH PLAIN") == b"334 \r\n"
        assert codes(s.cmd(PLAIN_ALICE)) == ["235 2.7.0"]

    def test_s11_wrong_password(self) -> None:
        s = self.tls_session()
        assert (
            s.cmd(b"AUTH PLAIN " + b64(b"\0alice\0wrong"))
            == b"535 5.7.8 Authentication credentials invalid\r\n"
        )
        assert codes(s.cmd(b"AUTH PLAIN " + b64(b"\0nobody\0x"))) == ["535 5.7.8"]

    def test_s12_login(self) -> None:
        s = self.tls_session()
        assert s.cmd("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
        assert s.cmd(b64(b"alice@example.com")) == b"334 UGFzc3dvcmQ6\r\n"
        assert codes(s.cmd(b64(b"secret"))) == ["235 2.7.0"]

    def test_s13_cancel_then_success(self) -> None:
        s = self.tls_session()
        s.cmd("AUTH LOGIN")
        assert codes(s.cmd("*")) == ["501 5.7.0"]
        assert codes(s.cmd(b"AUTH PLAIN " + PLAIN_ALICE)) == ["235 2.7.0"]

    def test_s14_unknown_mechanism(self) -> None:
        s = self.tls_session()
        assert s.cmd("AUTH FOO") == b"504 5.5.4 Unrecognized authentication type\r\n"

    def test_s15_bad_base64(self) -> None:
        s = self.tls_session()
        assert codes(s.cmd("AUTH PLAIN !!!")) == ["501 5.5.2"]
        s.cmd("AUTH LOGIN")
        assert codes(s.cmd("%%%")) == ["501 5.5.2"]
        # the exchange is over: the next line is a command again
        assert codes(s.cmd("NOOP")) == ["250 2.0.0"]

    def test_s16_s17_auth_twice_or_in_transaction(self) -> None:
        s = self.tls_session()
        s.cmd(b"AUTH PLAIN " + PLAIN_ALICE)
        assert codes(s.cmd(b"AUTH PLAIN " + PLAIN_ALICE)) == ["503 5.5.1"]
        s2 = Session(
            settings(), anonymous=lambda: s2.realm.submission_for(None), peer_ip="127.0.0.1"
        )
        s2.starttls()
        s2.cmd("EHLO c")
        s2.proto._settings = settings(trusted=lambda ip: True)
        assert codes(s2.cmd("MAIL FROM:<alice@example.com>")) == ["250 2.1.0"]
        assert codes(s2.cmd(b"AUTH PLAIN " + PLAIN_ALICE)) == ["503 5.5.1"]

    def test_s18_empty_initial_response(self) -> None:
        s = self.tls_session()
        assert codes(s.cmd("AUTH PLAIN =")) == ["535 5.7.8"]

    def test_s19_auth_line_too_long(self) -> None:
        s = self.tls_session()
        assert (
            s.cmd(b"AUTH PLAIN " + b"A" * 12300)
            == b"500 5.5.6 Authentication Exchange line is too long\r\n"
        )
        s.cmd("AUTH PLAIN")
        assert codes(s.cmd(b"A" * 13000)) == ["500 5.5.6"]
        assert codes(s.cmd("NOOP")) == ["250 2.0.0"]
        # 5000 octets is fine for AUTH (but would be too long for any other command)
        assert codes(s.cmd(b"AUTH PLAIN " + b"A" * 5000)) == ["535 5.7.8"]

    def test_s20_too_many_failures(self) -> None:
        s = self.tls_session()
        bad = b"AUTH PLAIN " + b64(b"\0alice\0nope")
        assert codes(s.cmd(bad)) == ["535 5.7.8"]
        assert codes(s.cmd(bad)) == ["535 5.7.8"]
        assert codes(s.cmd(bad + b"\r\nNOOP")) == ["421 4.7.0"]
        assert s.closed

    def test_authzid_for_someone_else_refused(self) -> None:
        s = self.tls_session()
        assert codes(s.cmd(b"AUTH PLAIN " + b64(b"bob\0alice\0secret"))) == ["535 5.7.8"]

    def test_pending_login_holds_pipelined_commands(self) -> None:
        users = MemoryUserDatabase({"alice@example.com": "secret"})
        pending: Deferred[Any] = Deferred()

        class SlowPortal(Portal):
            def login(self, credentials: Any, mind: object, *ifaces: Any) -> Deferred[Any]:
                return pending

        realm = MailRealm(MemoryMailStore(), users, ["example.com"])
        s = Session(portal=SlowPortal(realm, []))
        s.starttls()
        s.cmd("EHLO c")
        out = s.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nNOOP\r\n")
        assert out == b""
        pending.callback((ISubmission, realm.submission_for(Address("alice", "example.com")), ...))
        assert codes(s.take()) == ["235 2.7.0", "250 2.0.0"]

    def test_checker_error_is_temporary_failure_without_leaks(self) -> None:
        class BrokenPortal(Portal):
            def login(self, credentials: Any, mind: object, *ifaces: Any) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                d.errback(KeyError("secret internals"))
                return d

        s = Session(portal=BrokenPortal(MailRealm(MemoryMailStore(), MemoryUserDatabase(), [])))
        s.starttls()
        s.cmd("EHLO c")
        out = s.cmd(b"AUTH PLAIN " + PLAIN_ALICE)
        assert out == b"454 4.7.0 Temporary authentication failure\r\n"
        self.flushLoggedErrors(KeyError)


class MailRcptTests(unittest.TestCase):
    def setUp(self) -> None:
        self.s = Session(settings(max_size=10_000_000))
        self.s.login()

    def test_s21_s22_s23_sender_checks(self) -> None:
        s = self.s
        assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["250 2.1.0"]
        s.cmd("RSET")
        assert (
            s.cmd("MAIL FROM:<bob@example.com>")
            == b"553 5.7.1 Sender address rejected: not owned by user\r\n"
        )
        assert codes(s.cmd("MAIL FROM:<>")) == ["250 2.1.0"]

    def test_bare_sender_is_qualified(self) -> None:
        assert codes(self.s.cmd("MAIL FROM:<alice>")) == ["250 2.1.0"]

    def test_s24_to_s27_parameters(self) -> None:
        s = self.s
        assert codes(s.cmd("MAIL FROM:<alice@example.com> SIZE=20000000")) == ["552 5.3.4"]
        assert codes(s.cmd("MAIL FROM:<alice@example.com> SIZE=abc")) == ["501 5.5.4"]
        assert codes(s.cmd("MAIL FROM:<alice@example.com> BODY=BINARYMIME")) == ["501 5.5.4"]
        assert codes(s.cmd("MAIL FROM:<alice@example.com> FOO=bar")) == ["555 5.5.4"]
        assert codes(s.cmd("MAIL FROM:<alice@example.com> BODY=8BITMIME SIZE=100")) == ["250 2.1.0"]

    def test_s28_second_mail(self) -> None:
        self.s.cmd("MAIL FROM:<alice@example.com>")
        assert codes(self.s.cmd("MAIL FROM:<alice@example.com>")) == ["503 5.5.1"]

    def test_s29_rcpt_before_mail(self) -> None:
        assert codes(self.s.cmd("RCPT TO:<bob@example.com>")) == ["503 5.5.1"]

    def test_s30_recipient_checks(self) -> None:
        s = self.s
        s.cmd("MAIL FROM:<alice@example.com>")
        assert codes(s.cmd("RCPT TO:<bob@example.com>")) == ["250 2.1.5"]
        assert codes(s.cmd("RCPT TO:<nouser@example.com>")) == ["550 5.1.1"]
        # This realm delivers locally only: remote recipients are relay-denied.
        out = s.cmd("RCPT TO:<x@remote.example>")
        assert codes(out) == ["554 5.7.1"]
        assert b"Relay access denied" in out

    def test_s31_too_many_recipients(self) -> None:
        s = Session(settings(max_recipients=3))
        s.login()
        s.cmd("MAIL FROM:<alice@example.com>")
        for name in ("bob", "alice", "bob", "BOB"):
            assert codes(s.cmd(f"RCPT TO:<{name}@example.com>")) == ["250 2.1.5"]
        assert codes(s.cmd("RCPT TO:<alice@EXAMPLE.com>")) == ["452 4.5.3"]
        # an exact repeat is not added twice (and does not count against the limit)
        assert s.proto._recipients == [
            Address("bob", "example.com"),
            Address("alice", "example.com"),
            Address("BOB", "example.com"),
        ]

    def test_s32_s33_rcpt_syntax_and_qualification(self) -> None:
        s = self.s
        s.cmd("MAIL FROM:<alice@example.com>")
        assert codes(s.cmd("RCPT TO:<a@@b>")) == ["501 5.1.3"]
        assert codes(s.cmd("RCPT TO:<>")) == ["501 5.1.3"]
        assert codes(s.cmd("RCPT <bob@example.com>")) == ["501 5.5.2"]
        assert codes(s.cmd("RCPT TO:<bob@example.com> NOTIFY=NEVER")) == ["555 5.5.4"]
        assert codes(s.cmd("RCPT TO:<bob>")) == ["250 2.1.5"]
        s.send(b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        envelope, _ = s.store.delivered[0]
        assert envelope.recipients == (Address("bob", "example.com"),)

    def test_s56_auth_parameter(self) -> None:
        assert codes(self.s.cmd("MAIL FROM:<alice@example.com> AUTH=<>")) == ["250 2.1.0"]

    def test_s57_rset_keeps_auth(self) -> None:
        s = self.s
        s.cmd("MAIL FROM:<alice@example.com>")
        assert codes(s.cmd("RSET")) == ["250 2.0.0"]
        assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["250 2.1.0"]

    def test_ehlo_resets_transaction_but_keeps_auth(self) -> None:
        s = self.s
        s.cmd("MAIL FROM:<alice@example.com>")
        s.cmd("EHLO c.example")
        assert codes(s.cmd("RCPT TO:<bob@example.com>")) == ["503 5.5.1"]
        assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["250 2.1.0"]

    def test_s55_smtputf8(self) -> None:
        assert codes(self.s.cmd("MAIL FROM:<alice@example.com> SMTPUTF8")) == ["555 5.5.4"]
        s = Session(settings(smtputf8=True))
        s.login()
        s.cmd("MAIL FROM:<alice@example.com>")
        assert codes(s.cmd("RCPT TO:<jörg@example.com>")) == ["553 5.6.7"]


def submit(s: Session, body: bytes, rcpts: tuple[str, ...] = ("bob@example.com",)) -> bytes:
    s.cmd("MAIL FROM:<alice@example.com>")
    for r in rcpts:
        assert codes(s.cmd(f"RCPT TO:<{r}>")) == ["250 2.1.5"]
    assert s.cmd("DATA").startswith(b"354 ")
    return s.send(body)


class DataTests(unittest.TestCase):
    def session(self, **kw: Any) -> Session:
        s = Session(settings(**kw))
        s.login()
        return s

    def test_s34_data_without_recipients(self) -> None:
        s = self.session()
        s.cmd("MAIL FROM:<alice@example.com>")
        s.cmd("RCPT TO:<nouser@example.com>")
        assert codes(s.cmd("DATA")) == ["503 5.5.1"]

    def test_s35_s50_s51_message_queued_and_fixed(self) -> None:
        s = self.session(timeout=1e12)
        s.clock.advance(1700000000)
        out = submit(
            s,
            b"From: alice@example.com\r\nBcc: hidden@example.com\r\nReturn-Path: <x@y>\r\n"
            b"Subject: hi\r\n\r\nbody\r\n.\r\n",
        )
        assert re.search(r"^250 2\.0\.0 Ok: queued as Q\d+\r\n$", out.decode())
        envelope, data = s.store.delivered[0]
        assert envelope.sender == Address("alice", "example.com")
        block, body = parse_header_block(data)
        assert body == b"body\n"
        assert block.fields[0].name == "Received"
        assert "with ESMTPSA id " in block.fields[0].value
        assert "for <bob@example.com>" in block.fields[0].value
        assert "14 Nov 2023" in block.fields[0].value
        assert not (block.has("Bcc") or block.has("Return-Path"))
        assert block.values("Date") == ["Tue, 14 Nov 2023 22:13:20 +0000"]
        assert block.first(
            "Message-ID",
        ).endswith("@mx.example.com>")  # type: ignore[union-attr]
        assert b"\r" not in data

    def test_s36_unstuffing(self) -> None:
        s = self.session()
        submit(s, b"Subject: s\r\n\r\n..x\r\n..\r\n.\r\n")
        _, data = s.store.delivered[0]
        assert data.endswith(b"\n\n.x\n.\n")

    def test_s37_smuggling_never_two_messages(self) -> None:
        smuggled = (
            b"Subject: s\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\nRCPT TO:<v@y>\nDATA\nspoof\n.\r\n"
        )
        for mode, expected in (("normalize", "250 2.0.0"), ("reject", "554 5.6.0")):
            s = self.session(bare_newline=mode)
            out = submit(s, smuggled)
            assert out == b""  # still inside DATA
            out = s.send(b"more\r\n.\r\n")
            assert codes(out) == [expected]
            assert len(s.store.delivered) <= 1
            if mode == "normalize":
                _, data = s.store.delivered[0]
                assert b"hello\n.\nMAIL FROM:<evil@x>\n" in data
            assert codes(s.cmd("NOOP")) == ["250 2.0.0"]

    def test_s38_s39_bare_sequences_do_not_end(self) -> None:
        for seq in (b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n"):
            s = self.session()
            assert submit(s, b"a" + seq + b"NOOP\r\n") == b""
            assert codes(s.send(b".\r\n")) == ["250 2.0.0"]
            assert len(s.store.delivered) == 1

    def test_s40_reject_bare_newline(self) -> None:
        s = self.session(bare_newline="reject")
        out = submit(s, b"Subject: s\r\n\r\nline\nother\r\n.\r\n")
        assert out == b"554 5.6.0 Message contains bare CR or LF\r\n"
        assert s.store.delivered == []
        assert codes(s.cmd("NOOP")) == ["250 2.0.0"]

    def test_s41_normalized_dot_line_kept_as_content(self) -> None:
        s = self.session()
        submit(s, b"Subject: s\n\nx\n.\ny\r\n.\r\n")
        _, data = s.store.delivered[0]
        assert data.endswith(b"\n\nx\n.\ny\n")

    def test_s42_long_lines(self) -> None:
        line = b"x" * 999 + b"\r\n"  # 1001 octets with CRLF
        s = self.session()
        assert codes(submit(s, b"S: s\r\n\r\n" + line + b".\r\n")) == ["554 5.6.0"]
        assert s.store.delivered == []
        s = self.session(long_lines="accept")
        assert codes(submit(s, b"S: s\r\n\r\n" + line + b".\r\n")) == ["250 2.0.0"]

    def test_s43_size_overflow_single_reply_after_end(self) -> None:
        s = self.session(max_size=1024 * 1024)
        s.cmd("MAIL FROM:<alice@example.com>")
        s.cmd("RCPT TO:<bob@example.com>")
        s.cmd("DATA")
        chunk = (b"y" * 78 + b"\r\n") * 1000
        replies = b""
        for _ in range(27):  # ~2 MiB
            replies += s.send(chunk)
        assert replies == b""
        assert s.send(b".\r\n") == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        assert s.store.delivered == []
        assert codes(s.cmd("NOOP")) == ["250 2.0.0"]

    def test_s44_huge_line_never_desynchronises(self) -> None:
        s = self.session()
        body = b"S: s\r\n\r\n" + b"z" * 20000 + b"\r\nRSET\r\nQUIT\r\n.\r\n"
        out = submit(s, body)
        assert codes(out) == ["554 5.6.0"]
        assert not s.closed
        assert codes(s.cmd("NOOP")) == ["250 2.0.0"]

    def test_s48_pipelined_transaction(self) -> None:
        s = self.session()
        s.transport.writes.clear()
        out = s.send(
            b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\n"
            b"RCPT TO:<alice@example.com>\r\nDATA\r\nSubject: p\r\n\r\nhi\r\n.\r\nNOOP\r\n"
        )
        assert codes(out) == [
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "250 2.0.0",
        ]
        assert len(s.transport.writes) == 6
        envelope, _ = s.store.delivered[0]
        assert len(envelope.recipients) == 2

    def test_reply_waits_for_finish(self) -> None:
        s = self.session()
        s.cmd("MAIL FROM:<alice@example.com>")
        s.cmd("RCPT TO:<bob@example.com>")
        s.cmd("DATA")
        pending: Deferred[str] = Deferred()
        sinks: list[Any] = []
        original = s.proto._sink
        assert original is not None
        sinks.append(original)
        original.finish = lambda: pending  # type: ignore[method-assign]
        out = s.send(b"Subject: x\r\n\r\nhi\r\n.\r\nNOOP\r\n")
        assert out == b""
        pending.callback("Q42")
        assert codes(s.take()) == ["250 2.0.0", "250 2.0.0"]

    def test_finish_failure_is_451_and_session_continues(self) -> None:
        s = self.session()
        s.store.fail_deliveries = True
        out = submit(s, b"Subject: x\r\n\r\nhi\r\n.\r\n")
        assert codes(out) == ["451 4.3.0"]
        assert b"disk full" not in out
        self.flushLoggedErrors(OSError)
        assert codes(s.cmd("NOOP")) == ["250 2.0.0"]

    def test_connection_lost_in_data_aborts_sink(self) -> None:
        s = self.session()
        submit(s, b"Subject: x\r\n\r\npartial")
        sink = s.proto._sink
        assert sink is not None
        s.proto.connectionLost()
        assert sink.aborted  # type: ignore[attr-defined]
        assert s.store.delivered == []

    def test_message_without_headers(self) -> None:
        s = self.session()
        submit(s, b"no header here\r\n.\r\n")
        _, data = s.store.delivered[0]
        block, body = parse_header_block(data)
        assert body == b"no header here\n"
        assert block.has("Received")

    def test_data_chunked_byte_by_byte(self) -> None:
        s = self.session()
        submit(s, b"")
        msg = b"Subject: b\r\n\r\n..one\r\ntwo\r\n.\r\nNOOP\r\n"
        out = b"".join(s.send(msg[i : i + 1]) for i in range(len(msg)))
        assert codes(out) == ["250 2.0.0", "250 2.0.0"]
        _, data = s.store.delivered[0]
        assert data.endswith(b"\n\n.one\ntwo\n")


class OtherCommandTests(unittest.TestCase):
    def test_s45_long_command_line(self) -> None:
        s = Session(settings(require_tls=False))
        assert s.cmd(b"NOOP " + b"x" * 600) == b"500 5.5.2 Line too long\r\n"
        assert codes(s.cmd("NOOP")) == ["250 2.0.0"]
        # A line far beyond any buffer limit, arriving in pieces, then a pipelined command
        out = s.send(b"x" * 20000)
        out += s.send(b"y" * 20000 + b"\r\nNOOP\r\n")
        assert codes(out) == ["500 5.5.2", "250 2.0.0"]
        assert len(s.proto._buffer) < 100

    def test_s46_misc_commands(self) -> None:
        s = Session(settings(require_tls=False))
        s.cmd("EHLO c")
        assert codes(s.cmd("FOO")) == ["500 5.5.1"]
        assert codes(s.cmd("BDAT 10")) == ["500 5.5.1"]
        assert codes(s.cmd("VRFY x")) == ["252 2.5.2"]
        assert codes(s.cmd("EXPN x")) == ["502 5.5.1"]
        assert codes(s.cmd("HELP")) == ["214 2.0.0"]
        assert codes(s.cmd("NOOP")) == ["250 2.0.0"]
        assert codes(s.cmd("RSET")) == ["250 2.0.0"]
        assert codes(s.cmd("")) == ["500 5.5.2"]
        assert codes(s.cmd("QUIT")) == ["221 2.0.0"]
        assert s.closed
        assert s.cmd("NOOP") == b""

    def test_s49_enhanced_codes_everywhere(self) -> None:
        s = Session(settings(max_recipients=1))
        script = [
            "NOOP",
            "MAIL FROM:<a@example.com>",
            "STARTTLS x",
            "STARTTLS",
            "EHLO c",
            "AUTH FOO",
            "AUTH PLAIN " + b64(b"\0alice\0bad").decode(),
            "AUTH PLAIN " + PLAIN_ALICE.decode(),
            "MAIL FROM:<bob@example.com>",
            "MAIL FROM:<alice@example.com> SIZE=x",
            "MAIL FROM:<alice@example.com>",
            "RCPT TO:<x@remote.example>",
            "RCPT TO:<nouser@example.com>",
            "RCPT TO:<bob@example.com>",
            "RCPT TO:<alice@example.com>",
            "VRFY a",
            "EXPN a",
            "HELP",
            "FROB",
            "RSET",
            "QUIT",
        ]
        for line in script:
            out = s.cmd(line)
            if line.startswith("EHLO"):
                continue
            for reply_line in out.split(b"\r\n")[:-1]:
                m = re.match(rb"^([245])\d\d[ -](\d)\.\d{1,3}\.\d{1,3} ", reply_line)
                assert m is not None, (line, reply_line)
                assert m is not None
                assert m.group(1) == m.group(2), (line, reply_line)

    def test_s52_idle_timeout(self) -> None:
        s = Session(settings(timeout=600))
        s.clock.advance(599)
        assert not s.closed
        s.cmd("NOOP")
        s.clock.advance(599)
        assert not s.closed
        s.clock.advance(2)
        assert s.take() == b"421 4.4.2 mx.example.com Error: timeout exceeded\r\n"
        assert s.closed

    def test_timeout_in_data_aborts(self) -> None:
        s = Session()
        s.login()
        submit(s, b"Subject: x\r\n\r\npartial")
        sink = s.proto._sink
        s.clock.advance(601)
        assert s.closed
        assert sink.aborted  # type: ignore[union-attr]
        assert s.store.delivered == []

    def test_s54_trusted_network(self) -> None:
        def trusted_session(ip: str) -> Session:
            holder: list[Session] = []
            s = Session(
                settings(trusted=lambda peer: peer == "10.0.0.5", require_tls=False),
                peer_ip=ip,
                anonymous=lambda: holder[0].realm.submission_for(None),
            )
            holder.append(s)
            return s

        s = trusted_session("10.0.0.5")
        s.cmd("EHLO c")
        out = submit(s, b"Subject: t\r\n\r\nx\r\n.\r\n")
        assert codes(out) == ["250 2.0.0"]
        _, data = s.store.delivered[0]
        assert b"with ESMTP id" in data
        s = trusted_session("10.0.0.6")
        s.cmd("EHLO c")
        assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["530 5.7.0"]

    def test_every_reply_is_one_write(self) -> None:
        s = Session()
        s.login()
        submit(s, b"Subject: x\r\n\r\nhi\r\n.\r\n")
        s.cmd("HELP")
        s.cmd("EHLO c")
        for w in s.transport.writes:
            lines = w.split(b"\r\n")
            assert lines[-1] == b""
            assert lines[-2][3:4] == b" ", w
            assert all(line[3:4] == b"-" for line in lines[:-2]), w

    def test_settings_validation(self) -> None:
        with pytest.raises(ValueError):
            settings(bare_newline="sometimes")
        with pytest.raises(ValueError):
            settings(max_recipients=0)


class RealSocketTests(unittest.TestCase):
    """stdlib smtplib against a real listener on 127.0.0.1, run in a thread."""

    def setUp(self) -> None:
        self.store = MemoryMailStore()
        users = MemoryUserDatabase({"alice@example.com": "secret", "bob@example.com": "pw"})
        realm = MailRealm(self.store, users, ["example.com"])
        portal = Portal(realm, [PasswordChecker(users, "example.com", plaintext_verify)])
        smtp_settings = SmtpSettings(
            hostname=HOST,
            default_domain="example.com",
            require_tls=False,
            allow_plaintext=lambda ip: ip == "127.0.0.1",
            max_size=100_000,
        )
        the_reactor: Any = reactor
        factory = SmtpFactory(portal, smtp_settings, the_reactor)
        tcp: IReactorTCP = the_reactor
        port = tcp.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.portnum = cast(IPv4Address, port.getHost()).port

    def test_smtplib_login_and_send(self) -> None:
        def client() -> tuple[dict[str, str], Any]:
            with smtplib.SMTP("127.0.0.1", self.portnum, timeout=10) as c:
                c.ehlo("client.example")
                features = dict(c.esmtp_features)
                c.login("alice", "secret")
                refused = c.sendmail(
                    "alice@example.com",
                    ["bob@example.com"],
                    b"Subject: real\r\n\r\n.leading dot\r\nbody\r\n",
                )
                return features, refused

        def check(result: tuple[dict[str, str], Any]) -> None:
            features, refused = result
            assert refused == {}
            assert "pipelining" in features
            assert features["size"] == "100000"
            assert "PLAIN" in features["auth"]
            _, data = self.store.delivered[0]
            assert data.endswith(b"\n\n.leading dot\nbody\n")
            assert b"with ESMTPA" in data

        return threads.deferToThread(client).addCallback(check)  # type: ignore[return-value]

    def test_smtplib_errors(self) -> None:
        def client() -> list[int]:
            got: list[int] = []
            with smtplib.SMTP("127.0.0.1", self.portnum, timeout=10) as c:
                c.ehlo("client.example")
                try:
                    c.login("alice", "wrong")
                except smtplib.SMTPAuthenticationError as e:
                    got.append(e.smtp_code)
                got.append(c.mail("alice@example.com")[0])
                c.login("alice", "secret")
                got.append(c.mail("bob@example.com")[0])
                got.append(c.mail("alice@example.com", ["SIZE=200000"])[0])
                got.append(c.noop()[0])
            return got

        def check(got: list[int]) -> None:
            assert got == [535, 530, 553, 552, 250]

        return threads.deferToThread(client).addCallback(check)  # type: ignore[return-value]


class LoggingTests(unittest.TestCase):
    def test_auth_failure_logged_without_password(self) -> None:
        s = Session()
        s.starttls()
        s.cmd("EHLO c")
        with capturedLogs() as events:
            s.cmd(b"AUTH PLAIN " + b64(b"\0alice\0Sup3rSecretPw"))
            s.cmd("AUTH LOGIN")
            s.cmd(b64(b"bob"))
            s.cmd(b64(b"0therSecretPw"))
        text = "\n".join(formatEvent(e) for e in events)
        assert text.splitlines() == [
            "mailgate: auth failure: protocol=smtp rhost=192.0.2.10 user=alice"
            " reason=bad-credentials",
            "mailgate: auth failure: protocol=smtp rhost=192.0.2.10 user=bob"
            " reason=bad-credentials",
        ]
        assert "Sup3rSecretPw" not in text and "0therSecretPw" not in text
        assert "Sup3rSecretPw" not in repr(events)

    def test_submission_logged(self) -> None:
        s = Session()
        s.login()
        with capturedLogs() as events:
            out = submit(s, b"Subject: x\r\n\r\nhi\r\n.\r\n")
        qid = out.decode().split()[-1]
        text = "\n".join(formatEvent(e) for e in events)
        assert f"id={qid}" in text
        assert "from=<alice@example.com>" in text and "to=bob@example.com" in text
        assert "user=alice@example.com" in text and "peer=192.0.2.10" in text
