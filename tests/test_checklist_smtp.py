# mypy: allow-untyped-calls
"""Checklist section 8 SMTP cases (S) that no other test asserted, or only weakly.

Uses the harness of tests/test_smtp_server.py (StringTransport, Clock, a real Portal over
MailRealm and PasswordChecker); the relay and implicit-TLS cases run on loopback sockets.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from twisted.cred.portal import Portal
from twisted.internet import reactor as global_reactor
from twisted.internet import threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTCP
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.model import Address
from mailgate.realm import MailRealm
from mailgate.relay.client import SmtpRelay
from mailgate.smtp import SmtpFactory, SmtpSettings
from mailgate.testing import MemoryMailStore, MemoryQueue, MemoryUserDatabase
from tests.test_relay_client import SinkFactory
from tests.test_smtp_server import Session, codes, settings, submit

ALICE = Address("alice", "example.com")
REMOTE = Address("x", "remote.example")


class World:
    """A store, users and an outbound queue: remote recipients are accepted and queued."""

    def __init__(self, known_domains: tuple[str, ...] = ()) -> None:
        self.store = MemoryMailStore()
        self.queue = MemoryQueue()
        self.users = MemoryUserDatabase({"alice@example.com": "secret", "bob@example.com": "pw"})
        checker = PasswordChecker(
            self.users, "example.com", plaintext_verify, known_domains=known_domains
        )
        self.realm = MailRealm(self.store, self.users, ["example.com"], self.queue)
        self.portal = Portal(self.realm, [checker])

    def session(self, **kw: Any) -> Session:
        s = Session(settings(**kw), portal=self.portal)
        s.login()
        return s


class RecipientTests(unittest.TestCase):
    def test_s30_remote_recipient_accepted_unknown_local_refused(self) -> None:
        """S30: MAIL accepted: `RCPT TO:<x@remote>` gets 250 2.1.5, an unknown local 550 5.1.1."""
        world = World()
        s = world.session()
        assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["250 2.1.0"]
        assert codes(s.cmd("RCPT TO:<x@remote.example>")) == ["250 2.1.5"]
        assert codes(s.cmd("RCPT TO:<nouser@example.com>")) == ["550 5.1.1"]
        assert codes(s.cmd("DATA")) == ["354"]
        assert codes(s.send(b"Subject: r\r\n\r\nhi\r\n.\r\n")) == ["250 2.0.0"]
        [(envelope, _)] = world.queue.queued
        assert envelope.sender == ALICE
        assert envelope.recipients == (REMOTE,)

    def test_s31_101st_recipient_with_the_default_limit(self) -> None:
        """S31: limit 100 recipients (the default): the 101st RCPT gets 452 4.5.3."""
        world = World()
        s = world.session()
        assert SmtpSettings(hostname="h", default_domain="d").max_recipients == 100
        s.cmd("MAIL FROM:<alice@example.com>")
        for i in range(100):
            assert codes(s.cmd(f"RCPT TO:<r{i}@remote.example>")) == ["250 2.1.5"], i
        assert codes(s.cmd("RCPT TO:<r100@remote.example>")) == ["452 4.5.3"]
        assert not s.closed
        assert codes(s.cmd("DATA")) == ["354"]
        assert codes(s.send(b"Subject: many\r\n\r\nhi\r\n.\r\n")) == ["250 2.0.0"]
        [(envelope, _)] = world.queue.queued
        assert len(envelope.recipients) == 100


class AuthFormsTests(unittest.TestCase):
    def test_a17_smtp_auth_accepts_all_three_login_forms(self) -> None:
        """A17 (section 0.3, SMTP AUTH): `alice@example.com`, `alice+example.com`, `alice`
        all authenticate as alice (her own MAIL FROM is accepted, bob's is not)."""
        world = World(known_domains=("example.com",))
        for login in ("alice@example.com", "alice+example.com", "alice"):
            s = Session(settings(), portal=world.portal)
            s.starttls()
            s.cmd("EHLO c.example")
            ir = base64.b64encode(b"\0" + login.encode() + b"\0secret")
            assert codes(s.cmd(b"AUTH PLAIN " + ir)) == ["235 2.7.0"], login
            assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["250 2.1.0"], login
            s.cmd("RSET")
            assert codes(s.cmd("MAIL FROM:<bob@example.com>")) == ["553 5.7.1"], login


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")


class RelayedCopyTests(unittest.TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.sink = SinkFactory()
        tcp: IReactorTCP = cast(IReactorTCP, global_reactor)
        sink: Any = self.sink
        port = tcp.listenTCP(0, sink, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port_number = cast(IPv4Address, port.getHost()).port
        done: Deferred[None] = Deferred()
        done.callback(None)
        return done

    def test_s41_bare_lf_dot_line_is_relayed_crlf_and_stuffed(self) -> Deferred[None]:
        """S41: normalize mode: bare-LF lines (a `.` line among them) are relayed with CRLF only,
        the `.` line as `..`."""
        world = World()
        s = world.session()
        out = submit(
            s, b"Subject: s\n\nfirst\n.\n..hidden\nlast\r\n.\r\n", rcpts=("x@remote.example",)
        )
        assert codes(out) == ["250 2.0.0"]
        [(envelope, stored)] = world.queue.queued
        assert stored.endswith(b"\n\nfirst\n.\n.hidden\nlast\n")
        path = Path(self.mktemp())
        path.write_bytes(stored)
        relay = SmtpRelay(
            global_reactor,
            "client.example.com",
            f"tcp:localhost:{self.port_number}",
            "none",
            run_in_thread=maybeDeferred,
        )
        d = relay.deliver(envelope.sender, list(envelope.recipients), _opener(path))

        def check(results: Any) -> None:
            assert [r.status for r in results] == ["sent"]
            raw = self.sink.raw
            wire = raw[raw.index(b"DATA\r\n") + len(b"DATA\r\n") :]
            assert wire.endswith(b"\r\n\r\nfirst\r\n..\r\n..hidden\r\nlast\r\n.\r\nQUIT\r\n")
            assert b"\n" not in wire.replace(b"\r\n", b"")
            assert b"\r" not in wire.replace(b"\r\n", b"")
            assert len(self.sink.messages) == 1

        return d.addCallback(check)


class ImplicitTlsTests(unittest.TestCase):
    def test_s53_greeting_only_after_tls_and_ehlo_lists_auth(self) -> Deferred[None]:
        """S53: port 465: the greeting comes only after TLS; EHLO lists AUTH, not STARTTLS."""
        from mailgate.tls import make_self_signed, server_context

        tmp = Path(self.mktemp())
        tmp.mkdir()
        make_self_signed(tmp / "cert.pem", tmp / "key.pem", "localhost")
        context = server_context(tmp / "cert.pem", tmp / "key.pem")
        world = World()
        smtp_settings = settings(implicit_tls=True, tls_context=context)
        factory: Any = TLSMemoryBIOFactory(
            context, False, SmtpFactory(world.portal, smtp_settings, global_reactor)
        )
        tcp: IReactorTCP = cast(IReactorTCP, global_reactor)
        port = tcp.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        portnum = cast(IPv4Address, port.getHost()).port
        client_ctx = ssl.create_default_context()
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE

        def client() -> tuple[int, bytes, dict[str, str], int]:
            # The TLS handshake is the client's first move; a plaintext greeting sent
            # before it would break the handshake (it is not a TLS record).
            with smtplib.SMTP_SSL("127.0.0.1", portnum, timeout=10, context=client_ctx) as c:
                # SMTP_SSL's connect() already insisted on a 220 greeting, read over TLS.
                code, _ = c.ehlo("client.example")
                welcome = c.ehlo_resp or b""
                features = dict(c.esmtp_features)
                c.login("alice", "secret")
                noop = c.noop()[0]
            return code, welcome, features, noop

        def check(result: tuple[int, bytes, dict[str, str], int]) -> None:
            code, welcome, features, noop = result
            assert code == 250
            assert welcome.startswith(b"mx.example.com")
            assert "starttls" not in features
            assert "PLAIN" in features["auth"].split()
            assert noop == 250

        d: Deferred[Any] = threads.deferToThread(client)
        return d.addCallback(check)
