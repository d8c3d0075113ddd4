"""The relay client against an in-test SMTP sink on 127.0.0.1, plus MX selection and timeouts."""

# trial's assertion methods, LineReceiver.sendLine and StringTransport are untyped in Twisted.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import base64
import datetime
import io
import random
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred, fail, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from mailgate.errors import DeliveryError
from mailgate.model import Address
from mailgate.relay.client import (
    RecipientResult,
    SmtpClientProtocol,
    SmtpRelay,
    Transaction,
    endpoint_host,
    scan_message,
)
from mailgate.relay.mx import mail_hosts, order_mx

T = TypeVar("T")
reactor: Any = _reactor

ALICE = Address("alice", "example.com")
BOB = Address("bob", "remote.example")
CAROL = Address("carol", "remote.example")
DAVE = Address("dave", "remote.example")


def run_now(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    return maybeDeferred(f, *args, **kwargs)


# -- a small SMTP sink ---------------------------------------------------------------


class SinkFactory(Factory):
    def __init__(self) -> None:
        self.raw = b""
        self.chunks: list[bytes] = []
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.rcpt_replies: dict[str, bytes] = {}
        self.data_reply = b"250 2.0.0 Ok: queued"
        self.extensions = [b"PIPELINING", b"SIZE 10000000", b"8BITMIME"]
        self.tls: ssl.CertificateOptions | None = None
        self.auth: tuple[str, str] | None = None
        self.auth_ok = False
        self.tls_done = False

    def buildProtocol(self, addr: Any) -> SinkServer:  # type: ignore[override]
        p = SinkServer()
        p.factory = self
        return p


class SinkServer(LineReceiver):
    delimiter = b"\r\n"
    factory: SinkFactory

    def __init__(self) -> None:
        self.in_data = False
        self.lines: list[bytes] = []
        self.tls = False

    def connectionMade(self) -> None:
        self.sendLine(b"220 sink.test ESMTP")

    def dataReceived(self, data: bytes) -> None:
        self.factory.raw += data
        self.factory.chunks.append(data)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        f = self.factory
        if self.in_data:
            if line == b".":
                self.in_data = False
                f.messages.append(b"".join(x + b"\r\n" for x in self.lines))
                self.sendLine(f.data_reply)
            else:
                self.lines.append(line[1:] if line.startswith(b".") else line)
            return
        text = line.decode()
        f.commands.append(text)
        verb = text.split(" ")[0].upper()
        if verb == "EHLO":
            ext = list(f.extensions)
            if f.tls is not None and not self.tls:
                ext.append(b"STARTTLS")
            if f.auth is not None:
                ext.append(b"AUTH LOGIN PLAIN")
            self.transport.write(  # type: ignore[union-attr]
                b"".join(b"250-" + e + b"\r\n" for e in [b"sink.test", *ext]) + b"250 HELP\r\n"
            )
        elif verb == "STARTTLS":
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.startTLS(f.tls)  # type: ignore[union-attr]
            self.tls = True
            f.tls_done = True
        elif verb == "AUTH":
            assert f.auth is not None
            expected = base64.b64encode(f"\0{f.auth[0]}\0{f.auth[1]}".encode()).decode()
            f.auth_ok = text == f"AUTH PLAIN {expected}"
            self.sendLine(b"235 2.7.0 ok" if f.auth_ok else b"535 5.7.8 no")
        elif verb == "MAIL":
            self.sendLine(b"250 2.1.0 ok")
        elif verb == "RCPT":
            addr = text.split(":", 1)[1].strip("<>")
            self.sendLine(f.rcpt_replies.get(addr, b"250 2.1.5 ok"))
        elif verb == "DATA":
            self.in_data = True
            self.lines = []
            self.sendLine(b"354 go")
        elif verb == "QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.sendLine(b"500 5.5.1 what")


# -- certificates made in the test ---------------------------------------------------


def make_ca_and_leaf(dns_name: str) -> tuple[bytes, bytes]:
    """A CA certificate (PEM) and a leaf cert+key (PEM) for ``dns_name`` signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailgate test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    leaf_pem = leaf.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), leaf_pem


# -- tests on real sockets -----------------------------------------------------------


class RelayClientTests(unittest.TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.sink = SinkFactory()
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.sink)

        def listening(port: IListeningPort) -> None:
            self.port = port
            self.addCleanup(port.stopListening)
            self.port_number: int = port.getHost().port  # type: ignore[attr-defined]

        result: Deferred[None] = d.addCallback(listening)
        return result

    def relay(self, tls: str = "none", **kwargs: Any) -> SmtpRelay:
        return SmtpRelay(
            reactor,
            "client.example.com",
            f"tcp:localhost:{self.port_number}",
            tls,
            run_in_thread=run_now,
            **kwargs,
        )

    def message(self, data: bytes) -> Callable[[], IO[bytes]]:
        path = Path(self.mktemp())
        path.write_bytes(data)
        return lambda: open(path, "rb")

    @inlineCallbacks
    def test_delivery_with_pipelining_and_size(self) -> Generator[Any, Any, None]:
        data = b"Subject: hi\n\nhello\n"
        results = yield self.relay().deliver(ALICE, [BOB, CAROL], self.message(data))
        self.assertEqual([r.status for r in results], ["sent", "sent"])
        self.assertEqual(
            results[0], RecipientResult(BOB, "sent", 250, "2.0.0 Ok: queued", "localhost")
        )
        self.assertEqual(self.sink.messages, [data.replace(b"\n", b"\r\n")])
        mail = "MAIL FROM:<alice@example.com> SIZE=22"
        self.assertEqual(
            self.sink.commands[:4],
            [
                "EHLO client.example.com",
                mail,
                "RCPT TO:<bob@remote.example>",
                "RCPT TO:<carol@remote.example>",
            ],
        )
        # PIPELINING: MAIL and both RCPTs arrived in one write
        self.assertIn(
            b"MAIL FROM:<alice@example.com> SIZE=22\r\nRCPT TO:<bob@remote.example>\r\n"
            b"RCPT TO:<carol@remote.example>\r\n",
            self.sink.chunks,
        )

    @inlineCallbacks
    def test_no_pipelining_null_sender_8bit(self) -> Generator[Any, Any, None]:
        self.sink.extensions = [b"8BITMIME"]
        data = "Subject: caf\u00e9\n\nna\u00efve\n".encode()
        results = yield self.relay().deliver(None, [BOB], self.message(data))
        self.assertEqual(results[0].status, "sent")
        self.assertIn("MAIL FROM:<> BODY=8BITMIME", self.sink.commands)
        # without PIPELINING each command waits for its reply: never two in one write
        self.assertFalse(any(b"MAIL" in c and b"RCPT" in c for c in self.sink.chunks))

    @inlineCallbacks
    def test_helo_fallback(self) -> Generator[Any, Any, None]:
        class NoEhlo(SinkServer):
            def lineReceived(self, line: bytes) -> None:
                if line.startswith(b"EHLO"):
                    self.factory.commands.append(line.decode())
                    self.sendLine(b"502 5.5.1 no EHLO here")
                elif line.startswith(b"HELO"):
                    self.factory.commands.append(line.decode())
                    self.sendLine(b"250 sink.test")
                else:
                    super().lineReceived(line)

        self.sink.buildProtocol = lambda addr: _with_factory(NoEhlo(), self.sink)  # type: ignore[method-assign]
        results = yield self.relay().deliver(ALICE, [BOB], self.message(b"x\n"))
        self.assertEqual(results[0].status, "sent")
        self.assertIn("HELO client.example.com", self.sink.commands)
        self.assertIn("MAIL FROM:<alice@example.com>", self.sink.commands)

    @inlineCallbacks
    def test_dot_stuffing_first_line_and_chunk_boundary(self) -> Generator[Any, Any, None]:
        head = b".first line\n"
        filler_len = 65536 - len(head)
        filler = (b"a" * 99 + b"\n") * (filler_len // 100)
        filler += b"b" * (filler_len - len(filler) - 1) + b"\n"
        data = head + filler + b".boundary\n.\nlast\n"
        self.assertEqual(data[65536:65537], b".")
        results = yield self.relay().deliver(ALICE, [BOB], self.message(data))
        self.assertEqual(results[0].status, "sent")
        body_start = self.sink.raw.index(b"DATA\r\n") + len(b"DATA\r\n")
        wire = self.sink.raw[body_start:]
        self.assertTrue(wire.startswith(b"..first line\r\n"))
        self.assertIn(b"\r\n..boundary\r\n..\r\nlast\r\n.\r\n", wire)
        self.assertEqual(self.sink.messages, [data.replace(b"\n", b"\r\n")])
        self.assertNotIn(b"\r\r", wire)

    @inlineCallbacks
    def test_per_recipient_temp_and_perm(self) -> Generator[Any, Any, None]:
        self.sink.rcpt_replies = {
            "carol@remote.example": b"450 4.2.1 mailbox busy",
            "dave@remote.example": b"550 5.1.1 no such user",
        }
        results = yield self.relay().deliver(ALICE, [BOB, CAROL, DAVE], self.message(b"x\n"))
        self.assertEqual(
            [(r.recipient, r.status, r.code, r.text) for r in results],
            [
                (BOB, "sent", 250, "2.0.0 Ok: queued"),
                (CAROL, "temp", 450, "4.2.1 mailbox busy"),
                (DAVE, "perm", 550, "5.1.1 no such user"),
            ],
        )
        self.assertEqual(len(self.sink.messages), 1)

    @inlineCallbacks
    def test_no_recipient_accepted_sends_no_data(self) -> Generator[Any, Any, None]:
        self.sink.rcpt_replies = {"bob@remote.example": b"550 5.1.1 no"}
        results = yield self.relay().deliver(ALICE, [BOB], self.message(b"x\n"))
        self.assertEqual(results[0].status, "perm")
        self.assertNotIn("DATA", self.sink.commands)

    @inlineCallbacks
    def test_final_reply_applies_to_accepted(self) -> Generator[Any, Any, None]:
        self.sink.data_reply = b"452 4.3.1 out of space"
        results = yield self.relay().deliver(ALICE, [BOB, CAROL], self.message(b"x\n"))
        self.assertEqual([(r.status, r.code) for r in results], [("temp", 452), ("temp", 452)])

    @inlineCallbacks
    def test_auth_plain_without_tls_when_policy_none(self) -> Generator[Any, Any, None]:
        self.sink.auth = ("relayuser", "s3cret")
        results = yield self.relay(auth=("relayuser", "s3cret")).deliver(
            ALICE, [BOB], self.message(b"x\n")
        )
        self.assertTrue(self.sink.auth_ok)
        self.assertEqual(results[0].status, "sent")

    @inlineCallbacks
    def test_credentials_never_sent_in_clear_unless_policy_none(
        self,
    ) -> Generator[Any, Any, None]:
        self.sink.auth = ("relayuser", "s3cret")
        results = yield self.relay("opportunistic", auth=("relayuser", "s3cret")).deliver(
            ALICE, [BOB], self.message(b"x\n")
        )
        self.assertEqual(results[0].status, "temp")
        self.assertNotIn(b"AUTH", self.sink.raw)
        self.assertNotIn("MAIL", " ".join(self.sink.commands))

    @inlineCallbacks
    def test_starttls_required_verified(self) -> Generator[Any, Any, None]:
        ca_pem, leaf_pem = make_ca_and_leaf("localhost")
        self.sink.tls = ssl.PrivateCertificate.loadPEM(leaf_pem).options()
        self.sink.auth = ("relayuser", "s3cret")
        ca_file = Path(self.mktemp())
        ca_file.write_bytes(ca_pem)
        relay = self.relay("required", ca_file=ca_file, auth=("relayuser", "s3cret"))
        results = yield relay.deliver(ALICE, [BOB], self.message(b"Subject: tls\n\nsecret\n"))
        self.assertEqual(results[0].status, "sent")
        self.assertTrue(self.sink.tls_done)
        self.assertTrue(self.sink.auth_ok)
        self.assertEqual(self.sink.messages, [b"Subject: tls\r\n\r\nsecret\r\n"])
        self.assertNotIn(b"secret", self.sink.raw.split(b"STARTTLS")[0])
        self.assertEqual(self.sink.commands.count("EHLO client.example.com"), 2)

    @inlineCallbacks
    def test_starttls_required_wrong_hostname_refused(self) -> Generator[Any, Any, None]:
        ca_pem, leaf_pem = make_ca_and_leaf("mail.example.org")
        self.sink.tls = ssl.PrivateCertificate.loadPEM(leaf_pem).options()
        ca_file = Path(self.mktemp())
        ca_file.write_bytes(ca_pem)
        results = yield self.relay("required", ca_file=ca_file).deliver(
            ALICE, [BOB], self.message(b"x\n")
        )
        self.assertEqual(results[0].status, "temp")
        self.assertIn("TLS", results[0].text)
        self.assertEqual(self.sink.messages, [])
        self.assertFalse(any(c.startswith("MAIL") for c in self.sink.commands))

    @inlineCallbacks
    def test_starttls_required_but_not_offered(self) -> Generator[Any, Any, None]:
        results = yield self.relay("required").deliver(ALICE, [BOB], self.message(b"x\n"))
        self.assertEqual(results[0].status, "temp")
        self.assertIn("4.7.4", results[0].text)
        self.assertFalse(any(c.startswith("MAIL") for c in self.sink.commands))

    @inlineCallbacks
    def test_mx_hosts_tried_in_order(self) -> Generator[Any, Any, None]:
        resolver = FakeResolver({"remote.example": [(10, "127.0.0.1"), (5, "127.0.0.2")]})
        relay = SmtpRelay(
            reactor,
            "client.example.com",
            None,
            "none",
            resolver=resolver,
            mx_port=self.port_number,
            run_in_thread=run_now,
        )
        results = yield relay.deliver(ALICE, [BOB], self.message(b"x\n"))
        self.assertEqual(results[0].status, "sent")
        self.assertEqual(results[0].remote_mta, "127.0.0.1")
        self.assertEqual(resolver.asked, ["remote.example"])

    @inlineCallbacks
    def test_connection_refused_is_temp(self) -> Generator[Any, Any, None]:
        yield self.port.stopListening()
        results = yield self.relay().deliver(ALICE, [BOB, CAROL], self.message(b"x\n"))
        self.assertEqual([r.status for r in results], ["temp", "temp"])


def _with_factory(p: SinkServer, f: SinkFactory) -> SinkServer:
    p.factory = f
    return p


# -- MX selection with a fake resolver -----------------------------------------------


class FakeResolver:
    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table
        self.asked: list[str] = []

    def lookupMailExchange(
        self, name: str, timeout: Sequence[int] | None = None
    ) -> Deferred[tuple[list[Any], list[Any], list[Any]]]:
        self.asked.append(name)
        value = self.table.get(name, [])
        if isinstance(value, Exception):
            return fail(value)
        answers = [
            dns.RRHeader(name, dns.MX, payload=dns.Record_MX(pref, host)) for pref, host in value
        ]
        return succeed((answers, [], []))


def resolved(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    return out[0]


def test_mx_order_and_fallbacks() -> None:
    r = FakeResolver(
        {
            "a.example": [(20, "mx2.a.example"), (10, "mx1.a.example."), (20, "mx3.a.example")],
            "nullmx.example": [(0, "")],
            "gone.example": DNSNameError("nx"),
            "flaky.example": DNSServerError("servfail"),
        }
    )
    hosts = resolved(mail_hosts(r, "a.example"))
    assert hosts[0] == "mx1.a.example"
    assert sorted(hosts[1:]) == ["mx2.a.example", "mx3.a.example"]
    assert resolved(mail_hosts(r, "plain.example")) == ["plain.example"]
    assert resolved(mail_hosts(r, "[192.0.2.1]")) == ["192.0.2.1"]
    null = resolved(mail_hosts(r, "nullmx.example"))
    assert isinstance(null.value, DeliveryError) and null.value.permanent
    gone = resolved(mail_hosts(r, "gone.example"))
    assert isinstance(gone.value, DeliveryError) and gone.value.permanent
    flaky = resolved(mail_hosts(r, "flaky.example"))
    assert isinstance(flaky.value, DeliveryError) and not flaky.value.permanent
    assert order_mx([(5, "x."), (5, "X")], "d") == ["x"]


def test_equal_preference_hosts_are_tried_in_random_order() -> None:
    """RFC 5321 5.1: spread the load over MX hosts of one preference; never across them."""
    records = [(20, "c.example"), (10, "a1.example"), (10, "a2.example"), (10, "a3.example")]
    seen = set()
    rng = random.Random(7)
    for _ in range(200):
        hosts = order_mx(records, "d", rng)
        assert hosts[3] == "c.example"
        assert sorted(hosts[:3]) == ["a1.example", "a2.example", "a3.example"]
        seen.add(tuple(hosts[:3]))
    assert len(seen) == 6  # every order of the three equal hosts occurs


def test_host_listed_twice_keeps_its_best_place() -> None:
    records = [(10, "a.example"), (10, "b.example"), (20, "a.example"), (30, "c.example")]
    for seed in range(20):
        hosts = order_mx(records, "d", random.Random(seed))
        assert sorted(hosts[:2]) == ["a.example", "b.example"]
        assert hosts[2:] == ["c.example"]


def test_null_mx_is_permanent_per_recipient() -> None:
    relay = SmtpRelay(
        Clock(),
        "c.example",
        None,
        "none",
        resolver=FakeResolver({"remote.example": [(0, "")]}),  # the root name, as decoded
        run_in_thread=run_now,
    )
    results = resolved(relay.deliver(ALICE, [BOB], lambda: io.BytesIO(b"x\n")))
    assert [(x.status, x.code) for x in results] == [("perm", 556)]


def test_endpoint_host() -> None:
    assert endpoint_host("tcp:127.0.0.1:2525") == "127.0.0.1"
    assert endpoint_host("tcp:host=smtp.example:port=587") == "smtp.example"
    assert endpoint_host("tcp:port=25:host=relay.example") == "relay.example"


def test_scan_message() -> None:
    assert scan_message(lambda: io.BytesIO(b"a\nb\n")) == (6, False)
    assert scan_message(lambda: io.BytesIO("\u00e9\n".encode())) == (4, True)


# -- timeouts and broken connections on a Clock --------------------------------------


def client(
    recipients: tuple[Address, ...] = (BOB,),
) -> tuple[SmtpClientProtocol, Clock, StringTransport, list[Any]]:
    clock = Clock()
    txn = Transaction(ALICE, recipients, lambda: io.BytesIO(b"hello\n"))
    p = SmtpClientProtocol(
        ehlo_name="c.example",
        transaction=txn,
        clock=clock,
        remote_name="mx.test",
        tls_policy="none",
    )
    t = StringTransport()
    p.makeConnection(t)
    out: list[Any] = []
    p.done.addCallback(out.append)
    return p, clock, t, out


def pump(t: StringTransport) -> None:
    """StringTransport never pulls from a producer: do it like a real transport would."""
    while t.producer is not None:
        t.producer.resumeProducing()


def test_greeting_timeout() -> None:
    p, clock, t, out = client()
    clock.advance(299)
    assert out == []
    clock.advance(1)
    assert t.disconnecting or getattr(t, "aborted", False) or out == []
    p.connectionLost(None)
    assert [r.status for r in out[0].results] == ["temp"]
    assert "timeout" in out[0].results[0].text
    assert out[0].try_next


def test_lost_after_data_sent_is_temp_for_all() -> None:
    p, _, t, out = client((BOB, CAROL))
    p.dataReceived(b"220 hi\r\n")
    p.dataReceived(b"250-mx.test\r\n250 PIPELINING\r\n")
    assert t.value().endswith(b"RCPT TO:<carol@remote.example>\r\n")
    p.dataReceived(b"250 ok\r\n250 ok\r\n250 ok\r\n")
    p.dataReceived(b"354 go\r\n")
    pump(t)
    assert t.value().endswith(b"hello\r\n.\r\n")
    p.connectionLost(None)
    assert [r.status for r in out[0].results] == ["temp", "temp"]
    assert not out[0].try_next


def test_data_termination_timeout_is_ten_minutes() -> None:
    p, clock, t, out = client()
    p.dataReceived(b"220 hi\r\n250 mx.test\r\n")
    p.dataReceived(b"250 ok\r\n")
    p.dataReceived(b"250 ok\r\n")
    p.dataReceived(b"354 go\r\n")
    pump(t)
    assert t.value().endswith(b".\r\n")
    clock.advance(599)
    assert out == []
    clock.advance(1)
    p.connectionLost(None)
    assert out[0].results[0].status == "temp"


def test_malformed_reply_is_temp() -> None:
    p, _, _, out = client()
    p.dataReceived(b"hello there\r\n")
    p.connectionLost(None)
    assert out[0].results[0].status == "temp"
