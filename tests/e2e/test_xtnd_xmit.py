"""End to end: XTND XMIT over a real POP3S socket, to a local and a remote recipient."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Gateway, make_gateway
from tests.e2e.smtp_sink import SmtpSink
from tests.e2e.test_outbound import wait_for_files


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink().start()
    yield s
    s.stop()


@pytest.fixture
def xmit_gateway(tmp_path: Path, sink: SmtpSink) -> Iterator[Gateway]:
    yield from make_gateway(
        tmp_path,
        "--xtnd-xmit",
        "--smarthost",
        f"tcp:127.0.0.1:{sink.port}",
        "--smarthost-tls",
        "none",
    )


class Pop3Wire:
    """A raw POP3 conversation: exact bytes out, exact lines back."""

    def __init__(self, gw: Gateway) -> None:
        ctx = ssl.create_default_context(cafile=str(gw.cert))
        raw = socket.create_connection(("127.0.0.1", gw.pop3s), timeout=30)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.file.readline().rstrip(b"\r\n")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.line()


BODY_LOCAL = b"first line\r\n..leading dot, stuffed\r\n...two dots\r\nlast\r\n"
BODY_REMOTE = b"to the world\r\n..\r\n...\r\nend\r\n"  # content lines "." and ".."


def test_xtnd_xmit_local_and_remote_byte_exact(xmit_gateway: Gateway, sink: SmtpSink) -> None:
    pop = Pop3Wire(xmit_gateway)
    assert pop.line().startswith(b"+OK")
    assert pop.command("XTND XMIT").startswith(b"-ERR")  # not before login
    assert pop.command("USER alice@example.com").startswith(b"+OK")
    assert pop.command("PASS alice-secret-1").startswith(b"+OK")

    headers_local = (
        b"From: alice@example.com\r\nTo: bob@example.com\r\nBcc: carol@remote.example\r\n"
        b"Subject: one\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <one@example.com>\r\n"
    )
    assert pop.command("XTND XMIT") == b"+OK Start sending message."
    pop.send(headers_local + b"\r\n" + BODY_LOCAL + b".\r\n")
    assert pop.line() == b"+OK Message sent successfully"

    headers_remote = (
        b"From: alice@example.com\r\nTo: dave@remote.example\r\nSubject: two\r\n"
        b"Return-Path: <spoof@evil.example>\r\n"
    )
    assert pop.command("xtnd xmit") == b"+OK Start sending message."
    pop.send(headers_remote + b"\r\n" + BODY_REMOTE + b".\r\n")
    assert pop.line() == b"+OK Message sent successfully"
    assert pop.command("STAT") == b"+OK 0 0"  # own snapshot untouched
    assert pop.command("QUIT").startswith(b"+OK")

    # bob (local) got message one, unstuffed once, without Bcc.
    files = wait_for_files(xmit_gateway.maildir("bob@example.com") / "new", 1)
    stored = files[0].read_bytes()
    head, _, body = stored.partition(b"\n\n")
    assert body == b"first line\n.leading dot, stuffed\n..two dots\nlast\n"
    assert head.startswith(b"Received: from ")
    assert b"with XTND-XMIT" in head
    assert b"Bcc:" not in head
    assert b"Message-ID: <one@example.com>" in head

    # carol (Bcc, remote) and dave (remote) got their copies through the smarthost.
    got = sink.state.wait_for(2)
    by_rcpt = {tuple(m.recipients): m for m in got}
    assert set(by_rcpt) == {("carol@remote.example",), ("dave@remote.example",)}
    for m in got:
        assert m.sender == "alice@example.com"
    carol = by_rcpt[("carol@remote.example",)].data
    assert carol.split(b"\r\n\r\n", 1)[1] == (
        b"first line\r\n.leading dot, stuffed\r\n..two dots\r\nlast\r\n"
    )
    assert b"Bcc:" not in carol.split(b"\r\n\r\n", 1)[0]
    dave = by_rcpt[("dave@remote.example",)].data
    dave_head, dave_body = dave.split(b"\r\n\r\n", 1)
    assert dave_body == b"to the world\r\n.\r\n..\r\nend\r\n"
    assert b"Return-Path" not in dave_head
    assert b"\r\nDate: " in dave_head and b"\r\nMessage-ID: " in dave_head


def test_xtnd_xmit_off_by_default(gateway: Gateway) -> None:
    pop = Pop3Wire(gateway)
    pop.line()
    pop.command("USER alice@example.com")
    assert pop.command("PASS alice-secret-1").startswith(b"+OK")
    assert pop.command("XTND XMIT").startswith(b"-ERR")
    assert pop.command("NOOP") == b"+OK"


def test_xtnd_xmit_permanent_failure_bounces_to_sender(
    xmit_gateway: Gateway, sink: SmtpSink
) -> None:
    """Checklist X28: a later permanent failure comes back as a DSN in alice's maildrop."""
    sink.state.rcpt_replies["zed@remote.example"] = ["550 5.1.1 no such user here"]
    pop = Pop3Wire(xmit_gateway)
    pop.line()
    pop.command("USER alice@example.com")
    assert pop.command("PASS alice-secret-1").startswith(b"+OK")
    assert pop.command("XTND XMIT").startswith(b"+OK")
    pop.send(b"From: alice@example.com\r\nTo: zed@remote.example\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert pop.line() == b"+OK Message sent successfully"
    pop.command("QUIT")
    files = wait_for_files(xmit_gateway.maildir("alice@example.com") / "new", 1)
    assert len(files) == 1
    dsn = files[0].read_bytes()
    assert b"multipart/report" in dsn
    assert b"Final-Recipient: rfc822; zed@remote.example" in dsn
    assert b"Status: 5.1.1" in dsn
