"""``twistd -n mailgate`` with no options: the newcomer's first minute."""

from __future__ import annotations

import os
import poplib
import re
import signal
import ssl
import subprocess
from pathlib import Path

from tests.e2e.conftest import PROJECT, twistd_command, wait_for_ports


def test_embedded_defaults_demo_account(tmp_path: Path) -> None:
    log = tmp_path / "twistd.log"
    # Buffered stdout, as under systemd or docker: the banner must not wait for an exit.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            twistd_command(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env
        )
    try:
        wait_for_ports(proc, [1110, 1995, 1587, 1465], log)
        text = log.read_text()
        m = re.search(r"password: (\S+)", text)
        assert m, text
        password = m.group(1)
        state = tmp_path / "mailgate-data"
        assert (state / "tls" / "cert.pem").exists()
        assert (state / "mail" / "localhost" / "demo" / "Maildir" / "new").is_dir()
        ctx = ssl.create_default_context(cafile=str(state / "tls" / "cert.pem"))
        p = poplib.POP3_SSL("127.0.0.1", 1995, context=ctx, timeout=30)
        p.user("demo")
        p.pass_(password)
        _, lines, _ = p.retr(1)
        assert b"Subject: Welcome to mailgate" in lines
        p.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    # A second start keeps the account and does not print a new password.
    with log.open("wb") as out:
        proc = subprocess.Popen(
            twistd_command(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    try:
        wait_for_ports(proc, [1110], log)
        assert "password:" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert PROJECT.exists()


def test_bad_config_stops_the_server_with_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[smtp]\nmax_sise = 10\n")
    r = subprocess.run(
        twistd_command("--config", str(config), "--state-dir", str(tmp_path / "s")),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode != 0
    assert f"mailgate: error: {config}: smtp.max_sise: unknown key" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
