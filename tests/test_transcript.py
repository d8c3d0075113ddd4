# mypy: allow-untyped-calls
"""Wire transcripts: masking of every secret form, file format, list/show, real STLS."""

from __future__ import annotations

import base64
import io
import json
import poplib
import ssl
from pathlib import Path
from typing import Any, cast

from twisted.cred.portal import Portal
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailgate.admin import main as admin_main
from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.lab.cli import transcripts_command
from mailgate.lab.transcript import (
    Masker,
    SessionRecorder,
    TranscriptFactory,
    TranscriptStore,
    find_transcript,
    format_show,
    list_transcripts,
    mask_command,
    read_events,
)
from mailgate.pop3 import Pop3Factory, Pop3Settings
from mailgate.realm import MailRealm
from mailgate.smtp.server import SmtpFactory, SmtpSettings
from mailgate.testing import MemoryMailStore, MemoryUserDatabase
from mailgate.testing import TLSStringTransport as TLSTransport

T0 = 1700000000.25  # 2023-11-14 22:13:20 UTC


def make_portal(store: MemoryMailStore) -> Portal:
    users = MemoryUserDatabase({"alice@example.com": "s3cr3t-pw"})
    realm = MailRealm(store, users, ["example.com"])
    return Portal(realm, [PasswordChecker(users, "example.com", plaintext_verify)])


class CapturingStore(TranscriptStore):
    """Keeps the recorders so a test can wait for their last batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorders: list[SessionRecorder] = []

    def open_session(self, listener: str, peer: str, local: str) -> SessionRecorder:
        recorder = super().open_session(listener, peer, local)
        self.recorders.append(recorder)
        return recorder


class Masking(unittest.TestCase):
    def test_command_forms(self) -> None:
        assert mask_command(b"PASS hunter2\r\n") == b"PASS ****\r\n"
        assert mask_command(b"pass with spaces inside\r\n") == b"pass ****\r\n"
        assert mask_command(b"APOP tim c4c9334bac560ecc979e58001b3e22fb\r\n") == (
            b"APOP tim ****\r\n"
        )
        assert mask_command(b"AUTH PLAIN AHRpbQB0YW5zdGFhZg==\r\n") == b"AUTH PLAIN ****\r\n"
        assert mask_command(b"auth login dGlt\r\n") == b"auth login ****\r\n"
        # Nothing secret: left alone.
        assert mask_command(b"AUTH PLAIN\r\n") == b"AUTH PLAIN\r\n"
        assert mask_command(b"USER alice\r\n") == b"USER alice\r\n"
        assert mask_command(b"RETR 1\r\n") == b"RETR 1\r\n"

    def test_pop3_sasl_exchange_masks_every_client_line(self) -> None:
        m = Masker()
        m.server_data(b"+OK ready\r\n")
        assert m.client_line(b"AUTH LOGIN\r\n") == b"AUTH LOGIN\r\n"
        m.server_data(b"+ VXNlcm5hbWU6\r\n")
        assert m.client_line(b"YWxpY2U=\r\n") == b"****\r\n"
        m.server_data(b"+ UGFzc3dvcmQ6\r\n")
        assert m.client_line(b"c2VjcmV0\r\n") == b"****\r\n"
        m.server_data(b"+OK logged in\r\n")
        assert m.client_line(b"STAT\r\n") == b"STAT\r\n"

    def test_cancelled_exchange_ends_masking(self) -> None:
        m = Masker()
        m.client_line(b"AUTH PLAIN\r\n")
        m.server_data(b"+ \r\n")
        assert m.client_line(b"*\r\n") == b"****\r\n"
        m.server_data(b"-ERR Authentication cancelled\r\n")
        assert m.client_line(b"USER alice\r\n") == b"USER alice\r\n"

    def test_smtp_auth_and_data_phase(self) -> None:
        m = Masker()
        m.server_data(b"220 mail ESMTP\r\n")
        m.client_line(b"EHLO x\r\n")
        m.server_data(b"250-mail\r\n250 AUTH PLAIN LOGIN\r\n")
        assert m.client_line(b"AUTH PLAIN AGFsaWNlAHB3\r\n") == b"AUTH PLAIN ****\r\n"
        m.server_data(b"235 2.7.0 Authentication successful\r\n")
        assert m.client_line(b"AUTH LOGIN\r\n") == b"AUTH LOGIN\r\n"
        m.server_data(b"334 VXNlcm5hbWU6\r\n")
        assert m.client_line(b"YWxpY2U=\r\n") == b"****\r\n"
        m.server_data(b"334 UGFzc3dvcmQ6\r\n")
        assert m.client_line(b"cHc=\r\n") == b"****\r\n"
        m.server_data(b"503 5.5.1 Already authenticated\r\n")
        # Pipelined transaction: the 354 answers DATA, not MAIL.
        for line in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n", b"DATA\r\n"):
            assert m.client_line(line) == line
        m.server_data(b"250 2.1.0 Ok\r\n")
        m.server_data(b"250 2.1.5 Ok\r\n")
        m.server_data(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        # Message text is data, even when it looks like a command.
        assert m.client_line(b"PASS not-a-secret\r\n") == b"PASS not-a-secret\r\n"
        assert m.client_line(b".\r\n") == b".\r\n"
        m.server_data(b"250 2.0.0 queued\r\n")
        assert m.client_line(b"AUTH PLAIN AGFsaWNlAHB3\r\n") == b"AUTH PLAIN ****\r\n"


class Pop3Transcript(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.dir = Path(self.mktemp())
        ids = iter(f"20231114T221320-0123abc{c}" for c in "def")
        self.store = CapturingStore(
            self.dir, self.clock, flush_delay=1.0, new_id=lambda t: next(ids)
        )
        settings = Pop3Settings(
            hostname="mail.example.com",
            tls_context=object(),
            allow_plaintext=lambda host: True,
        )
        pop3 = Pop3Factory(make_portal(MemoryMailStore()), settings, self.clock)
        self.factory = TranscriptFactory(pop3, self.store, "pop3")
        self.proto = self.factory.buildProtocol(None)
        self.transport = TLSTransport()
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.proto.dataReceived(data)
        return cast(bytes, self.transport.value())

    def close(self) -> list[dict[str, Any]]:
        self.proto.connectionLost(Failure(ConnectionError("bye")))
        path = self.dir / "20231114" / "20231114T221320-0123abcd.log"
        return read_events(path)

    def test_secrets_never_reach_the_file_and_format_is_json_lines(self) -> None:
        plain = base64.b64encode(b"\0alice\0s3cr3t-pw")
        assert self.send(b"USER alice\r\nPASS s3cr3t-pw\r\n").startswith(b"+OK")
        self.send(b"QUIT\r\n")
        # A second session exercising APOP and AUTH forms.
        other = self.factory.buildProtocol(None)
        t2 = TLSTransport()
        other.makeConnection(t2)
        other.dataReceived(b"AUTH LOGIN\r\n")
        assert t2.value().endswith(b"+ VXNlcm5hbWU6\r\n")
        other.dataReceived(base64.b64encode(b"alice") + b"\r\n")
        other.dataReceived(base64.b64encode(b"s3cr3t-pw") + b"\r\n")
        assert t2.value().splitlines()[-1].startswith(b"+OK")
        other.dataReceived(b"QUIT\r\n")
        third = self.factory.buildProtocol(None)
        t3 = TLSTransport()
        third.makeConnection(t3)
        third.dataReceived(b"APOP alice 0123456789abcdef0123456789abcdef\r\n")
        self.clock.advance(30)  # any failure penalty
        third.dataReceived(b"AUTH PLAIN " + plain + b"\r\n")
        third.connectionLost(Failure(ConnectionError("bye")))
        other.connectionLost(Failure(ConnectionError("bye")))

        events = self.close()
        second = read_events(self.dir / "20231114" / "20231114T221320-0123abce.log")
        text = "".join(p.read_text() for p in self.dir.glob("*/*.log"))
        for line in text.splitlines():
            record = json.loads(line)
            assert set(record) >= {"t", "dir"} and record["dir"] in ("C", "S", "-")
        assert events[0]["event"] == "open" and events[0]["listener"] == "pop3"
        assert events[0]["peer"] == "192.0.2.7:40000"
        client = [e["data"] for e in events if e["dir"] == "C"]
        assert events[1]["t"] == T0 and events[1]["dir"] == "S"
        assert events[1]["data"].startswith("+OK mail.example.com") and events[1]["data"].endswith(
            "\r\n"
        )
        assert events[-1]["event"] == "close" and events[-1]["bytes_in"] == 34
        assert client == ["USER alice\r\n", "PASS ****\r\n", "QUIT\r\n"]

        assert [e["data"] for e in second if e["dir"] == "C"] == [
            "AUTH LOGIN\r\n",
            "****\r\n",
            "****\r\n",
            "QUIT\r\n",
        ]
        third_events = read_events(self.dir / "20231114" / "20231114T221320-0123abcf.log")
        assert [e["data"] for e in third_events if e["dir"] == "C"] == [
            "APOP alice ****\r\n",
            "AUTH PLAIN ****\r\n",
        ]
        assert "s3cr3t-pw" not in text
        assert plain.decode() not in text
        assert base64.b64encode(b"s3cr3t-pw").decode() not in text
        assert "0123456789abcdef0123456789abcdef" not in text

    def test_writes_are_batched_not_per_line(self) -> None:
        path = self.dir / "20231114" / "20231114T221320-0123abcd.log"
        self.send(b"CAPA\r\n")
        self.send(b"NOOP\r\n")
        assert not path.exists()  # nothing written on the hot path
        self.clock.advance(1.0)
        first = read_events(path)
        assert [e["data"] for e in first if e["dir"] == "C"] == ["CAPA\r\n", "NOOP\r\n"]
        self.send(b"USER alice\r\n")
        assert len(read_events(path)) == len(first)
        events = self.close()  # the last batch goes out at session end
        assert events[-1]["event"] == "close"
        assert self.store.recorders[0].done.called

    def test_stls_is_noted_and_session_is_readable(self) -> None:
        self.send(b"STLS\r\n")
        assert self.transport.tls_started  # went through the wrapper to the transport
        self.send(b"CAPA\r\n")
        events = self.close()
        assert [e.get("event") for e in events if e["dir"] == "-"] == ["open", "tls", "close"]
        shown = format_show(events)
        assert "C: STLS" in shown and "S: +OK Begin TLS negotiation" in shown
        assert "-- TLS started" in shown
        assert "S: STLS" not in shown

    def test_a_line_that_never_ends_is_recorded_in_bounded_pieces(self) -> None:
        from mailgate.lab.transcript import MAX_PARTIAL_LINE

        for _ in range(40):  # 40 x 16 KiB without LF: a flood, never one growing buffer
            self.send(b"x" * 16384)
            assert len(self.proto._partial) <= MAX_PARTIAL_LINE
        events = self.close()
        client = [e for e in events if e["dir"] == "C"]
        assert sum(len(e["data"]) for e in client) == 40 * 16384  # nothing lost

    def test_partial_line_at_close_is_recorded(self) -> None:
        self.send(b"PASS half-typed")
        events = self.close()
        assert events[-2]["data"] == "PASS ****"


class SmtpTranscript(unittest.TestCase):
    def test_smtp_auth_plain_masked(self) -> None:
        clock = Clock()
        directory = Path(self.mktemp())
        store = TranscriptStore(directory, clock)
        settings = SmtpSettings(
            hostname="mail.example.com",
            default_domain="example.com",
            tls_context=object(),
            require_tls=False,
            allow_plaintext=lambda host: True,
        )
        smtp = SmtpFactory(make_portal(MemoryMailStore()), settings, clock)
        proto = TranscriptFactory(smtp, store, "submission").buildProtocol(None)
        transport = TLSTransport()
        proto.makeConnection(transport)
        plain = base64.b64encode(b"\0alice@example.com\0s3cr3t-pw")
        proto.dataReceived(b"EHLO client.example\r\nAUTH PLAIN " + plain + b"\r\n")
        assert b"235 " in transport.value()
        proto.connectionLost(Failure(ConnectionError("bye")))
        (path,) = list(directory.glob("*/*.log"))
        text = path.read_text()
        assert plain.decode() not in text and "s3cr3t-pw" not in text
        client = [e["data"] for e in read_events(path) if e["dir"] == "C"]
        assert client == ["EHLO client.example\r\n", "AUTH PLAIN ****\r\n"]


class ListAndShow(unittest.TestCase):
    def setUp(self) -> None:
        self.state = Path(self.mktemp())
        day = self.state / "transcripts" / "20231114"
        day.mkdir(parents=True)
        events = [
            {"t": T0, "dir": "-", "event": "open", "id": "20231114T221320-0123abcd",
             "listener": "pop3", "peer": "192.0.2.7:40000", "local": "127.0.0.1:1110"},
            {"t": T0 + 0.001, "dir": "S", "data": "+OK ready\r\n"},
            {"t": T0 + 0.5, "dir": "C", "data": "CAPA\r\n"},
            {"t": T0 + 0.6, "dir": "S", "data": "+OK Capability list follows\r\nTOP\r\n.\r\n"},
            {"t": T0 + 0.7, "dir": "C", "data": "X\udcffY\rZ\r\n"},
            {"t": T0 + 2.5, "dir": "-", "event": "close", "bytes_in": 12, "bytes_out": 50},
        ]  # fmt: skip
        body = "".join(json.dumps(e) + "\n" for e in events) + '{"t": 1, "dir'  # torn
        (day / "20231114T221320-0123abcd.log").write_text(body)

    def run_cli(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = admin_main(["--state-dir", str(self.state), "transcripts", *args], None, out, err)
        return code, out.getvalue(), err.getvalue()

    def test_list(self) -> None:
        code, out, _ = self.run_cli("list")
        assert code == 0
        header, row = out.splitlines()
        assert header.split()[:3] == ["ID", "LISTENER", "PEER"]
        assert row.split() == [
            "20231114T221320-0123abcd",
            "pop3",
            "192.0.2.7:40000",
            "2023-11-14",
            "22:13:20",
            "2.5s",
            "12/50",
        ]

    def test_show(self) -> None:
        code, out, _ = self.run_cli("show", "20231114T221320-0123abcd")
        assert code == 0
        assert out.splitlines() == [
            "2023-11-14 22:13:20.250 -- session 20231114T221320-0123abcd on pop3 from "
            "192.0.2.7:40000 to 127.0.0.1:1110",
            "22:13:20.251 S: +OK ready",
            "22:13:20.750 C: CAPA",
            "22:13:20.850 S: +OK Capability list follows",
            "22:13:20.850 S: TOP",
            "22:13:20.850 S: .",
            "22:13:20.950 C: X\\xffY\\x0dZ",
            "22:13:22.750 -- closed (12 bytes in, 50 bytes out)",
        ]

    def test_show_by_prefix_and_unknown(self) -> None:
        code, out, _ = self.run_cli("show", "20231114T2213")
        assert code == 0 and "C: CAPA" in out
        code, _, err = self.run_cli("show", "nope")
        assert code == 1 and err == "mailgate: error: no transcript 'nope'\n"
        code, _, err = self.run_cli("frobnicate")
        assert code == 2 and "usage" in err

    def test_list_when_nothing_recorded(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        empty = Path(self.mktemp())
        assert transcripts_command(empty, ["list"], out, err) == 0
        assert out.getvalue().split() == [
            "ID",
            "LISTENER",
            "PEER",
            "START",
            "(UTC)",
            "DURATION",
            "BYTES",
            "IN/OUT",
        ]
        summaries = list_transcripts(self.state / "transcripts")
        assert find_transcript(self.state / "transcripts", summaries[0].id) == summaries[0].path


class RealTls(unittest.TestCase):
    """A real STLS and a real POP3S session: the transcript holds plaintext only."""

    def setUp(self) -> None:
        from mailgate.tls import make_self_signed, server_context

        tmp = Path(self.mktemp())
        tmp.mkdir()
        make_self_signed(tmp / "cert.pem", tmp / "key.pem", "localhost")
        self.context = server_context(tmp / "cert.pem", tmp / "key.pem")
        self.dir = tmp / "transcripts"
        self.portal = make_portal(MemoryMailStore())

    def listen(self, implicit: bool) -> tuple[int, CapturingStore]:
        reactor: Any = global_reactor
        settings = Pop3Settings(
            hostname="localhost",
            tls_context=self.context,
            implicit_tls=implicit,
            allow_plaintext=lambda host: False,
        )
        transcripts = CapturingStore(self.dir, reactor, flush_delay=0.01)
        factory: Any = TranscriptFactory(
            Pop3Factory(self.portal, settings, reactor),
            transcripts,
            "pop3s" if implicit else "pop3",
        )
        if implicit:  # the transcript sits inside the TLS layer
            factory = TLSMemoryBIOFactory(self.context, False, factory)
        tcp: IReactorTCP = reactor
        port = tcp.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return cast(IPv4Address, port.getHost()).port, transcripts

    @staticmethod
    def client_context() -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def session(self, pop: poplib.POP3) -> None:
        pop.capa()
        pop.user("alice")
        pop.pass_("s3cr3t-pw")
        pop.stat()
        pop.quit()

    def recorded(self, transcripts: CapturingStore) -> Deferred[list[dict[str, Any]]]:
        def wait(_: object) -> Deferred[None]:
            (recorder,) = transcripts.recorders
            return recorder.done

        def load(_: object) -> list[dict[str, Any]]:
            (path,) = list(self.dir.glob("*/*.log"))
            return read_events(path)

        return self._done.addCallback(wait).addCallback(load)

    def test_stls_session_recorded_in_plaintext(self) -> Deferred[None]:
        portnum, transcripts = self.listen(implicit=False)

        def client() -> None:
            pop = poplib.POP3("127.0.0.1", portnum, timeout=10)
            pop.stls(self.client_context())
            self.session(pop)

        self._done: Deferred[Any] = deferToThread(client)

        def check(events: list[dict[str, Any]]) -> None:
            notes = [e.get("event") for e in events if e["dir"] == "-"]
            assert notes == ["open", "tls", "close"]
            tls_at = next(i for i, e in enumerate(events) if e.get("event") == "tls")
            after = [e["data"] for e in events[tls_at:] if e["dir"] == "C"]
            assert after == ["CAPA\r\n", "USER alice\r\n", "PASS ****\r\n", "STAT\r\n", "QUIT\r\n"]
            replies = [e["data"] for e in events[tls_at:] if e["dir"] == "S"]
            assert all(r.startswith("+OK") for r in replies), replies
            assert "s3cr3t-pw" not in json.dumps(events)

        return self.recorded(transcripts).addCallback(check)

    def test_implicit_tls_session_recorded_in_plaintext(self) -> Deferred[None]:
        portnum, transcripts = self.listen(implicit=True)

        def client() -> None:
            pop = poplib.POP3_SSL("127.0.0.1", portnum, timeout=10, context=self.client_context())
            self.session(pop)

        self._done = deferToThread(client)

        def check(events: list[dict[str, Any]]) -> None:
            assert events[1]["dir"] == "S" and events[1]["data"].startswith("+OK")
            client_lines = [e["data"] for e in events if e["dir"] == "C"]
            assert client_lines == [
                "CAPA\r\n",
                "USER alice\r\n",
                "PASS ****\r\n",
                "STAT\r\n",
                "QUIT\r\n",
            ]

        return self.recorded(transcripts).addCallback(check)
