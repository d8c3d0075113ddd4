"""End to end: submission to remote recipients goes through the spool to a smarthost."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.e2e.conftest import PROJECT, Gateway, make_gateway
from tests.e2e.smtp_sink import SmtpSink


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink().start()
    yield s
    s.stop()


def relay_gateway(tmp_path: Path, port: int) -> Generator[Gateway, None, None]:
    config = tmp_path / "mailgate.toml"
    config.write_text("[queue]\nfirst_retry = 1\nmax_retry = 2\n")
    yield from make_gateway(
        tmp_path,
        "--config",
        str(config),
        "--smarthost",
        f"tcp:127.0.0.1:{port}",
        "--smarthost-tls",
        "none",
    )


@pytest.fixture
def gateway_to_sink(tmp_path: Path, sink: SmtpSink) -> Iterator[Gateway]:
    yield from relay_gateway(tmp_path, sink.port)


def send(gw: Gateway, to: list[str], body: str = "hello\n.dot line\n") -> None:
    ctx = ssl.create_default_context(cafile=str(gw.cert))
    with smtplib.SMTP_SSL("127.0.0.1", gw.submissions, context=ctx, timeout=30) as s:
        s.login("alice@example.com", "alice-secret-1")
        msg = f"From: alice@example.com\r\nTo: {', '.join(to)}\r\nSubject: out\r\n\r\n{body}"
        s.sendmail("alice@example.com", to, msg.replace("\n", "\r\n").replace("\r\r\n", "\r\n"))


def wait_for_files(directory: Path, count: int, timeout: float = 60) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(p for p in directory.iterdir()) if directory.exists() else []
        if len(files) >= count:
            return files
        time.sleep(0.05)
    return sorted(directory.iterdir()) if directory.exists() else []


def queue_list(gw: Gateway) -> str:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mailgate.admin import run; run()",
            "--state-dir",
            str(gw.state),
            "queue",
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_mixed_recipients_local_copy_and_relay(gateway_to_sink: Gateway, sink: SmtpSink) -> None:
    send(gateway_to_sink, ["carol@remote.example", "bob@example.com"])
    got = sink.state.wait_for(1)
    assert len(got) == 1
    assert got[0].sender == "alice@example.com"
    assert got[0].recipients == ["carol@remote.example"]
    assert b"\r\n.dot line\r\n" in got[0].data
    assert got[0].data.startswith(b"Received: ")
    local = wait_for_files(gateway_to_sink.maildir("bob@example.com") / "new", 1)
    assert len(local) == 1
    assert b".dot line" in local[0].read_bytes()


def test_temporary_failure_then_success_delivers_once(
    gateway_to_sink: Gateway, sink: SmtpSink
) -> None:
    sink.state.rcpt_replies["dave@remote.example"] = ["451 4.3.0 try later"]
    send(gateway_to_sink, ["dave@remote.example"])
    got = sink.state.wait_for(1)
    assert [m.recipients for m in got] == [["dave@remote.example"]]
    time.sleep(3)  # give a wrongly scheduled second attempt the chance to show up
    assert len(sink.state.messages) == 1


def test_permanent_failure_bounces_to_local_sender(
    gateway_to_sink: Gateway, sink: SmtpSink
) -> None:
    sink.state.rcpt_replies["nobody@remote.example"] = ["550 5.1.1 no such user"]
    send(gateway_to_sink, ["nobody@remote.example"])
    files = wait_for_files(gateway_to_sink.maildir("alice@example.com") / "new", 1)
    assert len(files) == 1
    dsn = message_from_bytes(files[0].read_bytes())
    assert dsn.get_content_type() == "multipart/report"
    assert dsn["Auto-Submitted"] == "auto-replied"
    parts = dsn.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    report = str(parts[1])
    assert "Final-Recipient: rfc822; nobody@remote.example" in report
    assert "Status: 5.1.1" in report
    assert "Action: failed" in report


def test_queued_mail_survives_a_restart(tmp_path: Path) -> None:
    sink = SmtpSink()  # bound but not serving yet: connections hang, so stop it first
    port = sink.port
    sink.stop()
    gen = relay_gateway(tmp_path, port)
    gw = next(gen)
    try:
        send(gw, ["erin@remote.example"])
        assert "erin@remote.example" in queue_list(gw)
        gw.stop()
        sink = SmtpSink(port).start()
        try:
            gw.start(
                "--config",
                str(tmp_path / "mailgate.toml"),
                "--smarthost",
                f"tcp:127.0.0.1:{port}",
                "--smarthost-tls",
                "none",
            )
            got = sink.state.wait_for(1)
            assert [m.recipients for m in got] == [["erin@remote.example"]]
            time.sleep(3)
            assert len(sink.state.messages) == 1
            deadline = time.monotonic() + 30
            while "erin@remote.example" in queue_list(gw) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "erin@remote.example" not in queue_list(gw)
        finally:
            sink.stop()
    finally:
        gen.close()
