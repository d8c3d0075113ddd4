"""The conformance probe against a real mailgate (twistd) and, when installed, a Dovecot."""

from __future__ import annotations

import getpass
import grp
import io
import os
import pwd
import shutil
import smtplib
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.lab.cli import probe_command
from mailgate.lab.probe import ProbeOptions, format_report, run_probe
from tests.e2e.conftest import Gateway, free_port, make_gateway

DOVECOT = "/usr/sbin/dovecot"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gen = make_gateway(tmp_path_factory.mktemp("probe"))
    gw = next(gen)
    # One message for alice, so UIDL stability has something to compare.
    ctx = ssl.create_default_context(cafile=str(gw.cert))
    with smtplib.SMTP("127.0.0.1", gw.submission, timeout=30) as smtp:
        smtp.starttls(context=ctx)
        smtp.login("alice@example.com", gw.users["alice@example.com"])
        smtp.sendmail(
            "alice@example.com", ["alice@example.com"], b"Subject: probe\r\n\r\nhello\r\n"
        )
    yield gw
    gen.close()


def probe(*args: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    out, err = io.StringIO(), io.StringIO()
    code = probe_command(list(args), out, err, {"MAILGATE_PROBE_PASSWORD": "alice-secret-1"})
    checks = {}
    for line in out.getvalue().splitlines():
        status, _, rest = line.partition(" ")
        name, _, detail = rest.partition(": ")
        if status in ("PASS", "FAIL", "WARN", "SKIP"):
            checks[name] = (status, detail)
    return code, checks, out.getvalue() + err.getvalue()


def test_pop3_with_stls_and_login(gateway: Gateway) -> None:
    code, checks, text = probe(
        f"pop3://127.0.0.1:{gateway.pop3}",
        "--cafile",
        str(gateway.cert),
        "--user",
        "alice@example.com",
    )
    assert code == 0, text
    for name in (
        "greeting",
        "capa",
        "unknown-command",
        "wrong-state",
        "auth-before-tls",
        "stls",
        "capa-after-tls",
        "auth-after-tls",
        "stls-twice",
        "login",
        "uidl-format",
        "list-vs-stat",
        "uidl-stable",
        "quit",
    ):
        assert checks[name][0] == "PASS", (name, text)
    assert "1 messages" in checks["login"][1]
    assert "alice-secret-1" not in text


def test_pop3s_without_login_skips_login_checks(gateway: Gateway) -> None:
    code, checks, text = probe(f"pop3s://127.0.0.1:{gateway.pop3s}", "--insecure")
    assert code == 0, text
    assert checks["stls-absent"][0] == "PASS" and checks["stls-refused"][0] == "PASS"
    assert checks["uidl-stable"][0] == "SKIP"
    # No --user: the environment password alone does not log in.


def test_smtp_and_smtps(gateway: Gateway) -> None:
    code, checks, text = probe(
        f"smtp://127.0.0.1:{gateway.submission}",
        "--cafile",
        str(gateway.cert),
        "--user",
        "alice@example.com",
    )
    assert code == 0, text
    for name in ("greeting", "ehlo", "auth-before-tls", "starttls", "starttls-gone"):
        assert checks[name][0] == "PASS", (name, text)
    for name in ("auth-after-tls", "unknown-command", "enhanced-codes", "bad-sequence", "login"):
        assert checks[name][0] == "PASS", (name, text)
    code, checks, text = probe(f"smtps://127.0.0.1:{gateway.submissions}", "--insecure")
    assert code == 0, text
    assert checks["starttls-absent"][0] == "PASS"
    assert checks["login"][0] == "SKIP"


def test_wrong_password_and_bad_certificate_fail(gateway: Gateway) -> None:
    options = ProbeOptions.from_url(
        f"pop3://127.0.0.1:{gateway.pop3}",
        user="alice@example.com",
        password="wrong",
        insecure=True,
    )
    checks = run_probe(options)
    assert [c.status for c in checks if c.name == "login"] == ["FAIL"]
    # Default verification against the system CAs refuses the self-signed certificate.
    code, checks_by_name, text = probe(f"pop3s://127.0.0.1:{gateway.pop3s}")
    assert code == 1 and checks_by_name["connect"][0] == "FAIL", text


def test_report_format_and_usage_errors() -> None:
    checks = run_probe(ProbeOptions.from_url(f"smtp://127.0.0.1:{free_port()}", timeout=5))
    report = format_report(checks)
    assert report.splitlines()[0].startswith("FAIL connect: 127.0.0.1:")
    assert report.splitlines()[-1] == "summary: 0 PASS, 1 FAIL, 0 WARN, 0 SKIP"
    code, _, text = probe("imap://127.0.0.1")
    assert code == 2 and "scheme must be one of" in text
    out, err = io.StringIO(), io.StringIO()
    assert probe_command(["pop3://h", "--user", "u"], out, err, {}) == 2
    assert "--password" in err.getvalue()


# -- Dovecot ---------------------------------------------------------------------------------


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[int]:
    if not os.path.exists(DOVECOT):
        pytest.skip("dovecot not installed")
    port = free_port()
    user = getpass.getuser()
    group = grp.getgrgid(os.getgid()).gr_name
    login_user = user
    run_dir = tmp_path / "run"
    if os.getuid() == 0:  # Dovecot's login processes refuse to run as root
        try:
            pwd.getpwnam("dovenull")
        except KeyError:
            pytest.skip("running as root and there is no dovenull user for Dovecot's login")
        login_user = "dovenull"
        run_dir = Path(tempfile.mkdtemp(prefix="dovecot-run-"))
        run_dir.chmod(0o755)
    mail_root = run_dir / "mail"
    for sub in ("alice/new", "alice/cur", "alice/tmp"):
        (mail_root / sub).mkdir(parents=True)
    (tmp_path / "state").mkdir()
    for i in (1, 2):
        (mail_root / "alice/new" / f"100{i}.M1P1.probe").write_bytes(
            f"Subject: m{i}\n\nbody {i}\n".encode()
        )
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:  # mail cannot be served as root either: hand the maildir to dovenull
        entry = pwd.getpwnam("dovenull")
        uid, gid = entry.pw_uid, entry.pw_gid
        for path in [mail_root, *mail_root.rglob("*")]:
            os.chown(path, uid, gid)
    (tmp_path / "passwd").write_text("alice:{PLAIN}alice-secret-1\n")
    conf = tmp_path / "dovecot.conf"
    conf.write_text(
        f"""
base_dir = {run_dir}
state_dir = {tmp_path}/state
log_path = {tmp_path}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {login_user}
mail_location = maildir:{mail_root}/%n
pop3_uidl_format = %08Xu%08Xv
first_valid_uid = 1
first_valid_gid = 1
passdb {{
  driver = passwd-file
  args = {tmp_path}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail_root}/%n
}}
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
"""
    )
    proc = subprocess.Popen(
        [DOVECOT, "-F", "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.skip(f"dovecot would not start as a normal user: {output[-300:]}")
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.skip("dovecot did not listen")
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if run_dir != tmp_path / "run":
            shutil.rmtree(run_dir, ignore_errors=True)


def test_probe_runs_against_dovecot(dovecot: int) -> None:
    code, checks, text = probe(f"pop3://127.0.0.1:{dovecot}", "--user", "alice")
    print(text)
    # No TLS in this throw-away Dovecot: STLS missing and cleartext logins are warnings only.
    assert checks["stls"][0] == "WARN" and checks["auth-before-tls"][0] == "WARN"
    assert checks["login"][0] == "PASS" and "2 messages" in checks["login"][1], text
    assert checks["uidl-stable"][0] == "PASS", text
    assert checks["unknown-command"][0] == "PASS"
    assert code == 0, text
