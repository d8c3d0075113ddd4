"""End to end: without a smarthost, mail goes to the recipient domain's MX found in DNS.

A throw-away Twisted DNS server (``twistd dns``) serves the test zone on loopback; its MX
points at ``localhost``, where the test SMTP sink listens.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Gateway, free_port, make_gateway
from tests.e2e.smtp_sink import SmtpSink
from tests.e2e.test_outbound import send

ZONE = """
zone = [
    SOA('remote.test', mname='ns.remote.test', rname='root.remote.test',
        serial=1, refresh=60, retry=60, expire=60, minimum=60),
    MX('remote.test', 10, 'localhost'),
    SOA('nomail.test', mname='ns.nomail.test', rname='root.nomail.test',
        serial=1, refresh=60, retry=60, expire=60, minimum=60),
    MX('nomail.test', 0, b''),
]
"""


def dns_answers(port: int) -> bool:
    """True once the DNS server answers a query for the zone over UDP."""
    from twisted.names import dns

    query = dns.Message(id=1, recDes=0)
    query.addQuery(b"remote.test", dns.MX)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(query.toStr(), ("127.0.0.1", port))
        try:
            s.recvfrom(4096)
        except OSError:
            return False
    return True


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[int]:
    zone = tmp_path / "zone.py"
    zone.write_text(ZONE)
    port = free_port()
    log = (tmp_path / "dns.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "dns",
            "--pyzone",
            str(zone),
            "-p",
            str(port),
            "-i",
            "127.0.0.1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while not dns_answers(port):
            assert proc.poll() is None, (tmp_path / "dns.log").read_text()
            assert time.monotonic() < deadline, "DNS server did not answer"
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink().start()
    yield s
    s.stop()


@pytest.fixture
def mx_gateway(tmp_path: Path, dns_server: int, sink: SmtpSink) -> Iterator[Gateway]:
    config = tmp_path / "mx.toml"
    config.write_text(
        f'[relay]\ntls = "none"\nmx_port = {sink.port}\ndns_servers = ["127.0.0.1:{dns_server}"]\n'
    )
    yield from make_gateway(tmp_path, "--config", str(config))


def test_delivery_to_the_domain_mx(mx_gateway: Gateway, sink: SmtpSink) -> None:
    send(mx_gateway, ["frank@remote.test"])
    got = sink.state.wait_for(1)
    assert [m.recipients for m in got] == [["frank@remote.test"]]
    assert got[0].sender == "alice@example.com"


def test_null_mx_bounces_at_once(mx_gateway: Gateway, sink: SmtpSink) -> None:
    from tests.e2e.test_outbound import wait_for_files

    send(mx_gateway, ["gina@nomail.test"])
    files = wait_for_files(mx_gateway.maildir("alice@example.com") / "new", 1)
    assert len(files) == 1
    assert b"Final-Recipient: rfc822; gina@nomail.test" in files[0].read_bytes()
    assert sink.state.messages == []
