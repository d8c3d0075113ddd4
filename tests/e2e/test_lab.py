"""End to end for the interop lab: APOP and CRAM-MD5 with real clients, capability profiles,
wire transcripts and fault injection, all on listeners defined in a config file."""

from __future__ import annotations

import json
import os
import poplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import PROJECT, admin, free_port, need, twistd_command, wait_for_ports

USERS = {
    "alice@example.com": ("ARGON2ID", "alice-secret-1"),
    "carol@example.com": ("PLAIN", "carol-apop-3"),
    "dan@example.com": ("CRAM-MD5", "dan-cram-4"),
}


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.plain = free_port()  # POP3, no TLS, transcripts, faults on RETR/TOP
        self.nostls = free_port()  # POP3 with STLS hidden by its profile
        self.stls = free_port()  # POP3 with STLS, for comparison
        self.smtp = free_port()  # submission without TLS (CRAM-MD5 only needs no TLS)
        self.log = root / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> Path:
        cfg = self.root / "lab.toml"
        cfg.write_text(
            f"""
default_domain = "example.com"
hostname = "mail.example.com"
allow_plaintext_from = ["127.0.0.0/8"]
workers = 1

[pop3]
apop = "some"   # mixed accounts: offer APOP/CRAM-MD5 although alice cannot use them

[auth]
throttle_exempt = ["127.0.0.0/8"]

[[listeners]]
protocol = "pop3"
endpoint = "tcp:{self.plain}:interface=127.0.0.1"
tls = "none"
lab = true
transcripts = true
faults = [
  {{ command = "RETR", action = "error", reply = "-ERR [SYS/TEMP] injected fault", every = 2 }},
]

[[listeners]]
protocol = "pop3"
endpoint = "tcp:{self.nostls}:interface=127.0.0.1"
tls = "starttls"
transcripts = true
profile = {{ stls = false }}

[[listeners]]
protocol = "pop3"
endpoint = "tcp:{self.stls}:interface=127.0.0.1"
tls = "starttls"
transcripts = true

[[listeners]]
protocol = "submission"
endpoint = "tcp:{self.smtp}:interface=127.0.0.1"
tls = "none"
"""
        )
        return cfg

    def start(self) -> None:
        cfg = self.config()
        for address, (scheme, password) in USERS.items():
            r = admin(self.state, "user", "add", "--scheme", scheme, address, stdin=password + "\n")
            assert r.returncode == 0, r.stderr
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                twistd_command("--config", str(cfg), "--state-dir", str(self.state)),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        wait_for_ports(self.proc, [self.plain, self.nostls, self.stls, self.smtp], self.log)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def deliver(self, address: str, count: int) -> None:
        local, _, domain = address.partition("@")
        new = self.state / "mail" / domain / local / "Maildir" / "new"
        new.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            tmp = new.parent / "tmp" / f"lab{i}"
            tmp.write_bytes(f"Subject: lab {i}\nMessage-ID: <lab{i}@x>\n\nbody {i}\n".encode())
            os.rename(tmp, new / f"170000000{i}.lab{i}.host")

    def transcripts(self) -> list[list[dict[str, object]]]:
        files = sorted((self.state / "transcripts").rglob("*.log"))
        return [[json.loads(x) for x in f.read_text().splitlines() if x.strip()] for f in files]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


def fetchmail(
    lab: Lab,
    port: int,
    user: str,
    password: str,
    options: str,
    out: Path,
    user_opts: str = "",
    proto: str = "POP3",
) -> str:
    """One fetchmail run; ``options`` go on the poll line, ``user_opts`` on the user's."""
    home = lab.root / f"home-{port}-{user.split('@')[0]}"
    home.mkdir(exist_ok=True)
    rc = home / ".fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f'set idfile "{home}/.fetchids"\n'
        f"poll 127.0.0.1 with proto {proto} port {port} {options}\n"
        f'  user "{user}" there with password "{password}" is "root" here\n'
        f'  options keep {user_opts} sslcertck sslcommonname "localhost"\n'
        f'  sslcertfile "{lab.state / "tls" / "cert.pem"}" mda "cat >> {out}"\n'
    )
    os.chmod(rc, 0o600)
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home))
    r = subprocess.run(
        [need("fetchmail"), "-f", str(rc), "--nodetach", "-v"],
        capture_output=True,
        timeout=120,
        env=env,
    )
    return (r.stdout + r.stderr).decode(errors="replace")


def test_fetchmail_apop_and_cram_md5(lab: Lab) -> None:
    lab.deliver("carol@example.com", 1)
    lab.deliver("dan@example.com", 1)
    out = lab.root / "apop.mbox"
    # sslproto '': no TLS at all (APOP and CRAM-MD5 send no password; fetchmail 6.4 would
    # otherwise insist on STLS, which this listener's profile hides).
    text = fetchmail(lab, lab.nostls, "carol", "carol-apop-3", "", out, "sslproto ''", "APOP")
    assert "APOP carol" in text, text
    assert b"body 0" in out.read_bytes()
    out2 = lab.root / "cram.mbox"
    text = fetchmail(
        lab, lab.nostls, "dan@example.com", "dan-cram-4", "auth cram-md5", out2, "sslproto ''"
    )
    assert "AUTH CRAM-MD5" in text, text
    assert b"body 0" in out2.read_bytes()


def test_curl_cram_md5_pop3_and_smtp(lab: Lab, tmp_path: Path) -> None:
    lab.deliver("dan@example.com", 1)
    r = subprocess.run(
        [
            need("curl"),
            "-sS",
            f"pop3://127.0.0.1:{lab.nostls}/1",
            "--login-options",
            "AUTH=CRAM-MD5",
            "-u",
            "dan:dan-cram-4",
        ],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert b"body 0" in r.stdout
    msg = tmp_path / "m.txt"
    msg.write_bytes(b"From: dan@example.com\r\nTo: carol@example.com\r\nSubject: c\r\n\r\nhi\r\n")
    r = subprocess.run(
        [
            need("curl"),
            "-sS",
            f"smtp://127.0.0.1:{lab.smtp}/client.example",
            "--login-options",
            "AUTH=CRAM-MD5",
            "-u",
            "dan@example.com:dan-cram-4",
            "--mail-from",
            "dan@example.com",
            "--mail-rcpt",
            "carol@example.com",
            "--upload-file",
            str(msg),
        ],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    # An Argon2id account cannot do CRAM-MD5: the normal authentication failure.
    r = subprocess.run(
        [
            need("curl"),
            "-sS",
            f"pop3://127.0.0.1:{lab.nostls}/",
            "--login-options",
            "AUTH=CRAM-MD5",
            "-u",
            "alice:alice-secret-1",
        ],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 67, r.stderr  # CURLE_LOGIN_DENIED


def test_profile_without_stls_makes_fetchmail_fall_back(lab: Lab) -> None:
    """fetchmail 6.4 upgrades when STLS is listed; when a profile hides it, fetchmail's
    default still tries STLS, gets -ERR and gives up without sending the password; told to
    go without TLS it falls back to a plaintext login (allowed from loopback here)."""
    lab.deliver("alice@example.com", 1)
    out = lab.root / "with-stls.mbox"
    text = fetchmail(lab, lab.stls, "alice@example.com", "alice-secret-1", "", out)
    assert "POP3> STLS" in text and "POP3< +OK Begin TLS" in text, text
    assert b"body 0" in out.read_bytes(), text

    out = lab.root / "hidden-stls.mbox"
    text = fetchmail(lab, lab.nostls, "alice@example.com", "alice-secret-1", "", out)
    assert "POP3> STLS" in text and "POP3< -ERR" in text, text
    assert "POP3> PASS" not in text and "POP3> USER" not in text, text
    assert not out.exists()

    text = fetchmail(lab, lab.nostls, "alice@example.com", "alice-secret-1", "", out, "sslproto ''")
    assert "POP3> STLS" not in text, text
    assert b"body 0" in out.read_bytes(), text


def test_transcript_matches_the_session_byte_for_byte(lab: Lab) -> None:
    lab.deliver("alice@example.com", 1)
    p = poplib.POP3("127.0.0.1", lab.plain, timeout=30)
    sent = [b"CAPA", b"USER alice@example.com", b"PASS alice-secret-1", b"STAT", b"UIDL 1", b"QUIT"]
    p.capa()
    p.user("alice@example.com")
    p.pass_("alice-secret-1")
    p.stat()
    p.uidl(1)
    p.quit()
    deadline = time.monotonic() + 30
    sessions: list[list[dict[str, object]]] = []
    while time.monotonic() < deadline:
        sessions = [
            s
            for s in lab.transcripts()
            if any(e.get("event") == "close" for e in s) and any(e["dir"] == "C" for e in s)
        ]
        if sessions:
            break
        time.sleep(0.1)
    assert len(sessions) == 1
    events = sessions[0]
    client = [str(e["data"]) for e in events if e["dir"] == "C"]
    expected = [c.decode() + "\r\n" for c in sent]
    expected[2] = "PASS ****\r\n"
    assert client == expected
    server = "".join(str(e["data"]) for e in events if e["dir"] == "S")
    assert server.startswith("+OK ")
    assert server.count("\r\n.\r\n") == 1  # CAPA's multi-line answer
    assert "alice-secret-1" not in json.dumps(events)
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mailgate.admin import run; run()",
            "--state-dir",
            str(lab.state),
            "transcripts",
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT,
    )
    assert shown.returncode == 0 and "pop3" in shown.stdout, shown.stderr


def test_fault_on_the_second_retr_and_fetchmail_retries(lab: Lab) -> None:
    lab.deliver("alice@example.com", 2)
    out = lab.root / "faults.mbox"
    first = fetchmail(lab, lab.plain, "alice@example.com", "alice-secret-1", "", out, "sslproto ''")
    assert "injected fault" in first, first
    assert out.read_bytes().count(b"Subject: lab ") == 1
    second = fetchmail(
        lab, lab.plain, "alice@example.com", "alice-secret-1", "", out, "sslproto ''"
    )
    data = out.read_bytes()
    assert b"body 0" in data and b"body 1" in data, second
    assert data.count(b"Subject: lab ") == 2  # each message exactly once
