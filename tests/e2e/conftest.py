"""A real ``twistd -n mailgate`` process on loopback ports, for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
USERS = {"alice@example.com": "alice-secret-1", "bob@example.com": "bob-secret-2"}


#: Ports free_port() has handed out in this test process.
_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one handed out before in this process: the kernel may
    give the same ephemeral port to two binds in a row, and a server then got one port for
    two of its listeners ("Address already in use")."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def admin(state: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the ``mailgate`` admin CLI exactly as a user would."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from mailgate.admin import run; run()",
            "--state-dir",
            str(state),
            *args,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT,
    )


def wait_for_ports(proc: subprocess.Popen[bytes], ports: list[int], log: Path) -> None:
    deadline = time.monotonic() + 60
    pending = list(ports)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"twistd exited early:\n{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"twistd did not listen:\n{log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", pending[0]), timeout=1).close()
            pending.pop(0)
        except OSError:
            time.sleep(0.05)


def twistd_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "mailgate",
        *args,
    ]


@dataclass
class Gateway:
    state: Path
    pop3: int
    pop3s: int
    submission: int
    submissions: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    users: dict[str, str] = field(default_factory=lambda: dict(USERS))

    @property
    def cert(self) -> Path:
        return self.state / "tls" / "cert.pem"

    def maildir(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.state / "mail" / domain / local / "Maildir"

    def start(self, *extra: str) -> None:
        args = [
            "--state-dir",
            str(self.state),
            "--hostname",
            "mail.example.com",
            "--default-domain",
            "example.com",
            "--pop3",
            f"tcp:{self.pop3}:interface=127.0.0.1",
            "--pop3s",
            f"tcp:{self.pop3s}:interface=127.0.0.1",
            "--submission",
            f"tcp:{self.submission}:interface=127.0.0.1",
            "--submissions",
            f"tcp:{self.submissions}:interface=127.0.0.1",
            *extra,
        ]
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            twistd_command(*args), stdout=out, stderr=subprocess.STDOUT, cwd=self.state.parent
        )
        wait_for_ports(
            self.proc, [self.pop3, self.pop3s, self.submission, self.submissions], self.log
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def make_gateway(tmp_path: Path, *extra: str) -> Generator[Gateway, None, None]:
    state = tmp_path / "state"
    gw = Gateway(state, free_port(), free_port(), free_port(), free_port(), tmp_path / "twistd.log")
    for address, password in gw.users.items():
        r = admin(state, "user", "add", address, stdin=password + "\n")
        assert r.returncode == 0, r.stderr
    gw.start(*extra)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    """mailgate with alice and bob, TLS required for passwords (the default)."""
    yield from make_gateway(tmp_path)


@pytest.fixture
def plain_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """mailgate that allows plaintext passwords from loopback."""
    yield from make_gateway(tmp_path, "--allow-plaintext-from", "127.0.0.0/8")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (.ci/run should install it)")
        pytest.skip(f"{tool} not installed")
    return path
