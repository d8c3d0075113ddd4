"""Crash-safety harness: SIGKILL mailgate at random moments, restart, and check every ack.

Runnable by hand::

    .venv/bin/python -m tests.crash.harness --kills 200 [--workers 2] [--seed 1] [--keep DIR]

It starts ``twistd -n mailgate`` (several worker processes by default) on loopback ports,
runs SMTP submission clients, XTND XMIT clients and POP3 clients that DELE everything and
then drop the connection without QUIT, kills the master with SIGKILL after a random
0.2-1.5 s (its workers die with it), restarts it, and repeats. At the end it reads the files
on disk (server stopped) and checks that:

- every message acknowledged with 250 (SMTP) or +OK (XTND XMIT) is present exactly once in
  each local recipient's Maildir (``new/`` + ``cur/``) and exactly once in the outbound spool
  for its remote recipient (the smarthost port is closed, so remote mail stays queued);
- no message file anywhere is half-written (each body ends with ``END <token>`` and the
  Maildir ``S=`` size matches; spool entries have a readable envelope);
- no message, acknowledged or not, is present twice;
- no deletion was applied: no session ever reached QUIT after DELE, so nothing acknowledged
  may be missing.

It prints ``kills K, acknowledged A, lost L, duplicated D`` (plus details) and exits 1 when
anything is lost, duplicated or half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import poplib
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.conftest import free_port

PROJECT = Path(__file__).resolve().parents[2]
DOMAIN = "example.com"
REMOTE = "far.example"
USERS = {
    "alice": "alice-crash-1",
    "bob": "bob-crash-2",
    "carol": "carol-crash-3",  # sends with XTND XMIT only (a POP3 login locks her maildrop)
    "dave": "dave-crash-4",  # sends with XTND XMIT only
}
RECIPIENTS = ("alice", "bob")
TOKEN_RE = re.compile(rb"^Subject: crash ([0-9a-z-]+)$", re.M)
SPOOL_STATES = ("incoming", "active", "deferred", "hold")


@dataclass
class Ack:
    """One acknowledged message: where its copies must be."""

    token: str
    local: tuple[str, ...]
    remote: tuple[str, ...]


@dataclass
class Ledger:
    """What clients saw; shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, Ack] = field(default_factory=dict)
    attempts: int = 0
    pop3_drops: int = 0
    counter: int = 0

    def token(self, kind: str) -> str:
        with self.lock:
            self.counter += 1
            self.attempts += 1
            return f"{kind}-{self.counter}-{random.getrandbits(32):08x}"

    def ack(self, ack: Ack) -> None:
        with self.lock:
            self.acked[ack.token] = ack


def message(sender: str, token: str, local: tuple[str, ...], remote: tuple[str, ...]) -> bytes:
    to = ", ".join([f"{u}@{DOMAIN}" for u in local] + [f"{u}@{REMOTE}" for u in remote])
    body = "".join(f"line {i} of {token} {'x' * (i % 70)}\n" for i in range(random.randint(1, 300)))
    return (
        f"From: {sender}@{DOMAIN}\nTo: {to}\nSubject: crash {token}\n\n{body}END {token}\n"
    ).encode()


def pick_recipients() -> tuple[tuple[str, ...], tuple[str, ...]]:
    local = tuple(sorted(random.sample(RECIPIENTS, random.randint(1, 2))))
    remote = ("zed",) if random.random() < 0.2 else ()
    return local, remote


class Clients:
    """Client threads that run until stopped, reconnecting whenever the server is down."""

    def __init__(self, pop3: int, submission: int, ledger: Ledger) -> None:
        self.pop3 = pop3
        self.submission = submission
        self.ledger = ledger
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(self._smtp, "alice"), daemon=True),
            threading.Thread(target=self._loop, args=(self._smtp, "bob"), daemon=True),
            threading.Thread(target=self._loop, args=(self._smtp, "alice"), daemon=True),
            threading.Thread(target=self._loop, args=(self._xmit, "carol"), daemon=True),
            threading.Thread(target=self._loop, args=(self._xmit, "dave"), daemon=True),
            threading.Thread(target=self._loop, args=(self._pop3_drop, "alice"), daemon=True),
            threading.Thread(target=self._loop, args=(self._pop3_drop, "bob"), daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _loop(self, body: object, user: str) -> None:
        assert callable(body)
        while not self.stop.is_set():
            try:
                body(user)
            except (OSError, EOFError, smtplib.SMTPException, poplib.error_proto):
                time.sleep(0.05)

    def _smtp(self, user: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.submission, timeout=10) as s:
            s.ehlo("crash.client")
            s.login(f"{user}@{DOMAIN}", USERS[user])
            for _ in range(random.randint(1, 5)):
                if self.stop.is_set():
                    return
                local, remote = pick_recipients()
                token = self.ledger.token("smtp")
                rcpts = [f"{u}@{DOMAIN}" for u in local] + [f"{u}@{REMOTE}" for u in remote]
                data = message(user, token, local, remote).replace(b"\n", b"\r\n")
                s.sendmail(f"{user}@{DOMAIN}", rcpts, data)
                # sendmail returned: the server answered 250 to the end of DATA.
                self.ledger.ack(Ack(token, local, remote))

    def _xmit(self, user: str) -> None:
        # poplib has no XTND: its private line helpers do the raw exchange.
        p: Any = poplib.POP3("127.0.0.1", self.pop3, timeout=10)
        sock = p.sock
        try:
            p.user(f"{user}@{DOMAIN}")
            p.pass_(USERS[user])
            for _ in range(random.randint(1, 3)):
                if self.stop.is_set():
                    return
                local, remote = pick_recipients()
                token = self.ledger.token("xmit")
                resp = p._shortcmd("XTND XMIT")
                if not resp.startswith(b"+OK"):
                    return
                for line in message(user, token, local, remote).split(b"\n")[:-1]:
                    p._putline(b"." + line if line.startswith(b".") else line)
                p._putline(b".")
                if p._getresp().startswith(b"+OK"):
                    self.ledger.ack(Ack(token, local, remote))
            p.quit()
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _pop3_drop(self, user: str) -> None:
        """Read, DELE everything, then vanish without QUIT: nothing may be deleted."""
        p = poplib.POP3("127.0.0.1", self.pop3, timeout=10)
        sock = p.sock
        try:
            p.user(f"{user}@{DOMAIN}")
            p.pass_(USERS[user])
            count, _ = p.stat()
            if count:
                p.retr(random.randint(1, count))
            for i in range(1, count + 1):
                p.dele(i)
            with self.ledger.lock:
                self.ledger.pop3_drops += 1
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        time.sleep(random.uniform(0.0, 0.3))


class Server:
    """``twistd -n mailgate`` in its own process group, killable and restartable."""

    def __init__(self, root: Path, workers: int) -> None:
        self.root = root
        self.state = root / "state"
        self.pop3 = free_port()
        self.submission = free_port()
        self.workers = workers
        self.log = root / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        closed = free_port()  # nobody listens there: remote mail stays deferred
        self.config = root / "mailgate.toml"
        self.config.write_text(
            f"""state_dir = "{self.state}"
hostname = "mail.{DOMAIN}"
default_domain = "{DOMAIN}"
allow_plaintext_from = ["127.0.0.0/8"]
shutdown_grace = 5

[[listeners]]
protocol = "pop3"
endpoint = "tcp:{self.pop3}:interface=127.0.0.1"
tls = "none"

[[listeners]]
protocol = "submission"
endpoint = "tcp:{self.submission}:interface=127.0.0.1"
tls = "none"

[pop3]
xtnd_xmit = true

[relay]
smarthost = "tcp:127.0.0.1:{closed}"
tls = "none"
"""
        )

    def add_users(self) -> None:
        for user, password in USERS.items():
            r = subprocess.run(
                [
                    *(sys.executable, "-c", "from mailgate.admin import run; run()"),
                    *("--state-dir", str(self.state), "user", "add", "--scheme", "SHA512-CRYPT"),
                    f"{user}@{DOMAIN}",
                ],
                input=password + "\n",
                capture_output=True,
                text=True,
                cwd=PROJECT,
                timeout=120,
            )
            if r.returncode != 0:
                raise RuntimeError(f"user add failed: {r.stderr}")

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-c", "from twisted.scripts.twistd import run; run()"),
                *("-n", "--pidfile=", "mailgate", "--config", str(self.config)),
                *("--workers", str(self.workers)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + 60
        for port in (self.pop3, self.submission):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"twistd exited early, see {self.log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"twistd did not listen, see {self.log}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.02)

    def kill(self) -> int:
        """SIGKILL the master only; returns how many of its processes outlived it."""
        assert self.proc is not None
        pgid = self.proc.pid
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return 0
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        return 1

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc = None


@dataclass
class Report:
    kills: int
    acknowledged: int
    attempts: int
    lost: list[str]
    duplicated: list[str]
    half_written: list[str]
    orphans: int
    pop3_drops: int
    spooled: int

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.half_written or self.orphans)

    def summary(self) -> str:
        return (
            f"kills {self.kills}, acknowledged {self.acknowledged}, lost {len(self.lost)}, "
            f"duplicated {len(self.duplicated)}"
        )

    def details(self) -> str:
        return (
            f"attempted {self.attempts}, half-written {len(self.half_written)}, "
            f"surviving workers {self.orphans}, POP3 sessions dropped after DELE "
            f"{self.pop3_drops}, remote copies in the spool {self.spooled}"
        )


def scan(state: Path) -> tuple[Counter[tuple[str, str]], list[str], int]:
    """Copies on disk: (token, where) -> count; half-written files; spool entries."""
    copies: Counter[tuple[str, str]] = Counter()
    broken: list[str] = []
    mail = state / "mail" / DOMAIN
    for user in USERS:
        for sub in ("new", "cur"):
            folder = mail / user / "Maildir" / sub
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                data = path.read_bytes()
                m = TOKEN_RE.search(data)
                size = re.search(r",S=(\d+)", path.name)
                if m is None:
                    broken.append(str(path))
                    continue
                token = m.group(1).decode()
                if not data.endswith(f"END {token}\n".encode()) or (
                    size is not None and int(size.group(1)) != len(data)
                ):
                    broken.append(str(path))
                copies[(token, user)] += 1
    spooled = 0
    for st in SPOOL_STATES:
        folder = state / "spool" / st
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            try:
                data = (entry / "message").read_bytes()
                envelope = json.loads((entry / "envelope.json").read_bytes())
            except (OSError, ValueError):
                broken.append(str(entry))
                continue
            m = TOKEN_RE.search(data)
            if m is None or not data.endswith(f"END {m.group(1).decode()}\n".encode()):
                broken.append(str(entry))
                continue
            for r in envelope.get("recipients", []):
                copies[(m.group(1).decode(), "spool:" + r["address"].partition("@")[0])] += 1
                spooled += 1
    corrupt = state / "spool" / "corrupt"
    if corrupt.is_dir():
        broken.extend(str(p) for p in corrupt.iterdir())
    return copies, broken, spooled


def run(kills: int, workers: int, seed: int, root: Path, out: object = print) -> Report:
    assert callable(out)
    random.seed(seed)
    server = Server(root, workers)
    server.add_users()
    ledger = Ledger()
    server.start()
    clients = Clients(server.pop3, server.submission, ledger)
    clients.start()
    orphans = 0
    try:
        for k in range(kills):
            time.sleep(random.uniform(0.2, 1.5))
            orphans += server.kill()
            if (k + 1) % 10 == 0:
                out(f"... {k + 1} kills, {len(ledger.acked)} acknowledged")
            server.start()
        time.sleep(0.5)
    finally:
        clients.join()
        server.stop()
    copies, broken, spooled = scan(server.state)
    lost = []
    for token, ack in ledger.acked.items():
        for user in ack.local:
            if copies[(token, user)] == 0:
                lost.append(f"{token} -> {user}")
        for user in ack.remote:
            if copies[(token, "spool:" + user)] == 0:
                lost.append(f"{token} -> {user}@{REMOTE}")
    duplicated = [f"{t} in {w} x{n}" for (t, w), n in copies.items() if n > 1]
    return Report(
        kills,
        len(ledger.acked),
        ledger.attempts,
        lost,
        duplicated,
        broken,
        orphans,
        ledger.pop3_drops,
        spooled,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="mailgate-crash-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"seed {args.seed}, workers {args.workers}, directory {root}")
    try:
        report = run(args.kills, args.workers, args.seed, root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(report.summary())
    print(report.details())
    for line in (report.lost + report.duplicated + report.half_written)[:20]:
        print("  ", line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
