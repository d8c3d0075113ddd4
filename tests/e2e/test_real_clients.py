"""End to end with real clients from Debian: curl, fetchmail, swaks and openssl s_client."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

from tests.e2e.conftest import Gateway, need

MESSAGE = (
    "From: alice@example.com\r\n"
    "To: bob@example.com\r\n"
    "Subject: from curl\r\n"
    "\r\n"
    "line one\r\n"
    ".leading dot\r\n"
    "last line\r\n"
)


def run(
    cmd: list[str],
    stdin: str | bytes | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    r = subprocess.run(cmd, input=data, capture_output=True, timeout=120, env=env)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{cmd[0]} exited {r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"
        )
    return r


def curl(gw: Gateway, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run(
        [need("curl"), "-sS", "--cacert", str(gw.cert), "--max-time", "60", *args], check=check
    )


def curl_submit(gw: Gateway, url: str, mech: str, tmp: Path) -> None:
    msg = tmp / "msg.txt"
    msg.write_bytes(MESSAGE.encode())
    curl(
        gw,
        url,
        "--ssl-reqd",
        "--login-options",
        f"AUTH={mech}",
        "-u",
        "alice@example.com:alice-secret-1",
        "--mail-from",
        "alice@example.com",
        "--mail-rcpt",
        "bob@example.com",
        "--upload-file",
        str(msg),
    )


def test_curl_smtp_starttls_then_pop3_stls_byte_for_byte(gateway: Gateway, tmp_path: Path) -> None:
    curl_submit(gateway, f"smtp://127.0.0.1:{gateway.submission}/client.example", "PLAIN", tmp_path)
    got = curl(
        gateway, "--ssl-reqd", f"pop3://127.0.0.1:{gateway.pop3}/1", "-u", "bob:bob-secret-2"
    ).stdout
    # curl prints the message as sent on the wire (CRLF, dots unstuffed by curl).
    header_end = got.index(b"\r\n\r\n")
    headers, body = got[:header_end], got[header_end + 4 :]
    assert body == b"line one\r\n.leading dot\r\nlast line\r\n"
    assert headers.startswith(b"Received: from client.example")
    assert b"with ESMTPSA" in headers
    assert b"\r\nSubject: from curl" in headers


def test_curl_smtps_login_and_pop3s_login_mechanism(gateway: Gateway, tmp_path: Path) -> None:
    curl_submit(
        gateway, f"smtps://127.0.0.1:{gateway.submissions}/client.example", "LOGIN", tmp_path
    )
    listing = curl(
        gateway,
        f"pop3s://127.0.0.1:{gateway.pop3s}/",
        "--login-options",
        "AUTH=LOGIN",
        "-u",
        "bob@example.com:bob-secret-2",
    ).stdout
    assert listing.startswith(b"1 ")
    got = curl(
        gateway,
        f"pop3s://127.0.0.1:{gateway.pop3s}/1",
        "-u",
        "bob:bob-secret-2",
        "--login-options",
        "AUTH=PLAIN",
    ).stdout
    assert got.endswith(b"last line\r\n")


def test_curl_wrong_password_fails(gateway: Gateway) -> None:
    r = curl(gateway, f"pop3s://127.0.0.1:{gateway.pop3s}/", "-u", "bob:nope", check=False)
    assert r.returncode == 67  # CURLE_LOGIN_DENIED


def fetchmail(gw: Gateway, home: Path, ssl_opts: str, port: int, out: Path) -> int:
    home.mkdir(exist_ok=True)
    rc = home / ".fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f'set idfile "{home}/.fetchids"\n'
        f"poll 127.0.0.1 with proto POP3 port {port} uidl\n"
        f'  user "bob@example.com" there with password "bob-secret-2" is "root" here\n'
        f'  options keep {ssl_opts} sslcertck sslcertfile "{gw.cert}" sslcommonname "localhost"\n'
        f'  mda "cat >> {out}"\n'
    )
    os.chmod(rc, 0o600)
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home))
    r = run([need("fetchmail"), "-f", str(rc), "--nodetach", "-v"], env=env, check=False)
    assert r.returncode in (0, 1), r.stdout.decode(errors="replace") + r.stderr.decode(
        errors="replace"
    )
    return r.returncode


def test_fetchmail_stls_and_implicit_tls_keep_mode(gateway: Gateway, tmp_path: Path) -> None:
    curl_submit(
        gateway, f"smtps://127.0.0.1:{gateway.submissions}/client.example", "PLAIN", tmp_path
    )
    for name, opts, port in (
        ("stls", 'sslproto "tls1.2+"', gateway.pop3),
        ("implicit", "ssl", gateway.pop3s),
    ):
        out = tmp_path / f"{name}.mbox"
        home = tmp_path / f"home-{name}"
        assert fetchmail(gateway, home, opts, port, out) == 0  # 0: mail fetched
        first = out.read_bytes()
        assert b"last line" in first
        assert fetchmail(gateway, home, opts, port, out) == 1  # 1: nothing new (UIDL)
        assert out.read_bytes() == first


def swaks(gw: Gateway, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run(
        [
            need("swaks"),
            "--server",
            "127.0.0.1",
            "--port",
            str(gw.submission),
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(gw.cert),
            "--tls-sni",
            "localhost",
            "--helo",
            "client.example",
            "--timeout",
            "60",
            *args,
        ],
        check=False,
    )


def test_swaks_starttls_auth_and_policy_errors(gateway: Gateway) -> None:
    ok = swaks(
        gateway,
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice@example.com",
        "--auth-password",
        "alice-secret-1",
        "--from",
        "alice@example.com",
        "--to",
        "bob@example.com",
    )
    assert ok.returncode == 0, ok.stdout
    assert b"<~  250 2.0.0" in ok.stdout

    bad = swaks(
        gateway,
        "--auth",
        "LOGIN",
        "--auth-user",
        "alice@example.com",
        "--auth-password",
        "wrong",
        "--from",
        "alice@example.com",
        "--to",
        "bob@example.com",
    )
    assert bad.returncode != 0
    assert b"535 5.7.8" in bad.stdout

    spoof = swaks(
        gateway,
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice@example.com",
        "--auth-password",
        "alice-secret-1",
        "--from",
        "bob@example.com",
        "--to",
        "bob@example.com",
    )
    assert spoof.returncode != 0
    assert b"553 5.7.1" in spoof.stdout


def test_swaks_oversize_message_gets_552(tmp_path: Path) -> None:
    from tests.e2e.conftest import make_gateway

    config = tmp_path / "small.toml"
    config.write_text("[smtp]\nmax_size = 100000\n")
    gen = make_gateway(tmp_path, "--config", str(config))
    gw = next(gen)
    try:
        big = tmp_path / "big.eml"
        big.write_text(
            "From: alice@example.com\r\nTo: bob@example.com\r\nSubject: big\r\n\r\n"
            + ("x" * 70 + "\r\n") * 3000
        )
        r = swaks(
            gw,
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice@example.com",
            "--auth-password",
            "alice-secret-1",
            "--from",
            "alice@example.com",
            "--to",
            "bob@example.com",
            "--data",
            str(big),
        )
        assert r.returncode != 0
        assert b"552 5.3.4" in r.stdout
        assert not list((gw.maildir("bob@example.com") / "new").iterdir())
    finally:
        gen.close()


def s_client(gw: Gateway, proto: str, port: int, script: str) -> str:
    r = run(
        [
            need("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-starttls",
            proto,
            "-CAfile",
            str(gw.cert),
            "-verify_return_error",
            "-quiet",
            "-crlf",
        ],
        stdin=script,
        check=False,
    )
    return r.stdout.decode(errors="replace")


def test_openssl_s_client_starttls_transcripts(gateway: Gateway) -> None:
    pop = s_client(
        gateway,
        "pop3",
        gateway.pop3,
        "CAPA\nUSER alice@example.com\nPASS alice-secret-1\nSTAT\nQUIT\n",
    )
    lines = pop.splitlines()
    assert "USER" in lines and "STLS" not in lines
    assert "+OK 0 0" in lines
    plain = base64.b64encode(b"\0alice@example.com\0alice-secret-1").decode()
    smtp = s_client(
        gateway, "smtp", gateway.submission, f"EHLO client.example\nAUTH PLAIN {plain}\nQUIT\n"
    )
    assert "250-AUTH PLAIN LOGIN" in smtp or "250 AUTH PLAIN LOGIN" in smtp
    assert "235 2.7.0" in smtp
    assert "STARTTLS" not in smtp  # not offered again after the handshake


def test_one_apop_capable_account_does_not_break_curl_for_the_others(gateway: Gateway) -> None:
    """curl picks APOP or CRAM-MD5 whenever offered and never falls back: by default they are
    offered only when every account can use them ([pop3] apop = "auto")."""
    from tests.e2e.conftest import admin

    gateway.stop()  # added before the start: no race with the user file's reload check
    added = admin(
        gateway.state, "user", "add", "--scheme", "PLAIN", "carol@example.com", stdin="carol-pw\n"
    )
    assert added.returncode == 0, added.stderr
    gateway.start()
    got = curl(gateway, "-v", f"pop3s://127.0.0.1:{gateway.pop3s}/", "-u", "bob:bob-secret-2")
    assert b"CRAM-MD5" not in got.stderr
    assert b"+OK" in got.stderr and b"<" not in got.stderr.split(b"\n", 1)[0]
    r = subprocess.run(
        [
            need("curl"),
            "-sS",
            "--cacert",
            str(gateway.cert),
            "-v",
            f"pop3s://127.0.0.1:{gateway.pop3s}/",
            "-u",
            "carol:carol-pw",
        ],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
