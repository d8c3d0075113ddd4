"""The admin CLI through main() with in-memory streams."""

from __future__ import annotations

import hmac
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate.admin import main
from mailgate.auth.passwords import (
    apop_digest,
    cram_md5_digest,
    supports_apop,
    supports_cram_md5,
    verify_password,
)
from mailgate.auth.userdb import UserFile
from mailgate.model import Address


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Prompts:
    """A getpass stand-in answering from a list and recording the prompts."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)


def cli(state: Path, *argv: str, stdin: str | io.StringIO = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    inp = stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin)
    code = main(["--state-dir", str(state), *argv], inp, out, err)
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(err: str) -> None:
    assert err.startswith("mailgate: error: ")
    assert err.endswith("\n") and err.count("\n") == 1


def test_add_list_passwd_del(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert cli(state, "user", "add", "Zed@Example.org", stdin="pw one\n") == (0, "", "")
    assert cli(state, "user", "add", "alice@example.org", stdin="secret\n") == (0, "", "")
    assert cli(state, "user", "list") == (0, "alice@example.org\nzed@example.org\n", "")

    db = UserFile(state / "users")
    stored = db.get_password_hash(Address("zed", "example.org"))
    assert stored is not None and stored.startswith("{ARGON2ID}")
    assert verify_password(stored, b"pw one")  # only the newline was stripped
    assert stat.S_IMODE((state / "users").stat().st_mode) == 0o600
    for sub in ("new", "cur", "tmp"):
        assert (state / "mail" / "example.org" / "alice" / "Maildir" / sub).is_dir()

    assert cli(state, "user", "passwd", "alice@example.org", stdin="changed\r\n") == (0, "", "")
    stored = UserFile(state / "users").get_password_hash(Address("alice", "example.org"))
    assert stored is not None
    assert verify_password(stored, b"changed")
    assert not verify_password(stored, b"secret")

    assert cli(state, "user", "del", "alice@example.org") == (0, "", "")
    assert cli(state, "user", "list") == (0, "zed@example.org\n", "")
    # Mail is kept on disk after deletion.
    assert (state / "mail" / "example.org" / "alice" / "Maildir").is_dir()


def test_list_on_fresh_state_dir_is_empty(tmp_path: Path) -> None:
    assert cli(tmp_path / "nothing", "user", "list") == (0, "", "")


@pytest.mark.parametrize(
    ("argv", "stdin", "fragment"),
    [
        (("user", "add", "alice"), "pw\n", "no domain"),
        (("user", "add", "../x@example.org"), "pw\n", "bad address"),
        (("user", "add", "a/b@example.org"), "pw\n", "bad address"),
        (("user", "add", "bob@example.org"), "\n", "empty password"),
        (("user", "add", "bob@example.org"), "", "empty password"),
        (("user", "add", "alice@example.org"), "pw\n", "already exists"),
        (("user", "passwd", "nobody@example.org"), "pw\n", "no such user"),
        (("user", "del", "nobody@example.org"), "", "no such user"),
    ],
)
def test_errors_are_one_line_and_non_zero(
    tmp_path: Path, argv: tuple[str, ...], stdin: str, fragment: str
) -> None:
    assert cli(tmp_path, "user", "add", "alice@example.org", stdin="pw\n")[0] == 0
    before = (tmp_path / "users").read_bytes()
    code, out, err = cli(tmp_path, *argv, stdin=stdin)
    assert code == 1
    assert out == ""
    assert_one_error_line(err)
    assert fragment in err
    assert (tmp_path / "users").read_bytes() == before


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for argv in ((), ("user",), ("user", "frob"), ("user", "add"), ("group", "list")):
        code, out, err = cli(tmp_path, *argv)
        assert code == 2, argv
        assert out == ""
        assert err.startswith("usage: mailgate")
        assert "mailgate" in err and "error:" in err


def test_help_goes_to_stdout(tmp_path: Path) -> None:
    code, out, err = cli(tmp_path, "--help")
    assert code == 0 and err == ""
    assert "usage: mailgate" in out


def test_tty_prompts_twice(tmp_path: Path) -> None:
    prompts = Prompts("typed", "typed")
    out, err = io.StringIO(), io.StringIO()
    code = main(
        ["--state-dir", str(tmp_path), "user", "add", "alice@example.org"],
        TTY(),
        out,
        err,
        getpass_fn=prompts,
    )
    assert (code, err.getvalue()) == (0, "")
    assert len(prompts.prompts) == 2
    stored = UserFile(tmp_path / "users").get_password_hash(Address("alice", "example.org"))
    assert stored is not None and verify_password(stored, b"typed")


def test_tty_mismatch_is_an_error(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = main(
        ["--state-dir", str(tmp_path), "user", "add", "alice@example.org"],
        TTY(),
        out,
        err,
        getpass_fn=Prompts("one", "two"),
    )
    assert code == 1
    assert_one_error_line(err.getvalue())
    assert "do not match" in err.getvalue()
    assert not (tmp_path / "users").exists()


def test_existing_user_fails_before_prompting(tmp_path: Path) -> None:
    assert cli(tmp_path, "user", "add", "alice@example.org", stdin="pw\n")[0] == 0
    prompts = Prompts()
    err = io.StringIO()
    code = main(
        ["--state-dir", str(tmp_path), "user", "add", "alice@example.org"],
        TTY(),
        io.StringIO(),
        err,
        getpass_fn=prompts,
    )
    assert code == 1 and prompts.prompts == []


def test_default_state_dir_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    assert main(["user", "add", "a@example.org"], io.StringIO("pw\n"), out, err) == 0
    assert (tmp_path / "mailgate-data" / "users").read_text().startswith("a@example.org:{ARGON2ID}")


def test_console_script_entry_point(tmp_path: Path) -> None:
    """run() as the installed script would: real process, piped password, exit status."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-c", "from mailgate.admin import run; run()", "--state-dir"]
    add = subprocess.run(
        [*cmd, str(tmp_path), "user", "add", "x@example.org"],
        input=b"pw\n",
        capture_output=True,
        env=env,
        check=False,
    )
    assert (add.returncode, add.stderr) == (0, b"")
    again = subprocess.run(
        [*cmd, str(tmp_path), "user", "add", "x@example.org"],
        input=b"pw\n",
        capture_output=True,
        env=env,
        check=False,
    )
    assert again.returncode == 1
    assert again.stderr == b"mailgate: error: user x@example.org already exists\n"


# -- schemes and Dovecot import -------------------------------------------------------------

ALICE = Address("alice", "example.org")


def stored_hash(state: Path, address: Address) -> str:
    stored = UserFile(state / "users").get_password_hash(address)
    assert stored is not None
    return stored


def test_add_with_scheme_plain_gives_an_apop_account(tmp_path: Path) -> None:
    assert (
        cli(tmp_path, "user", "add", "--scheme", "PLAIN", "alice@example.org", stdin="tanstaaf\n")[
            0
        ]
        == 0
    )
    stored = stored_hash(tmp_path, ALICE)
    assert stored == "{PLAIN}tanstaaf"
    assert apop_digest(stored, b"<1896.697170952@dbc.mtview.ca.us>") == (
        "c4c9334bac560ecc979e58001b3e22fb"
    )
    assert (tmp_path / "mail" / "example.org" / "alice" / "Maildir" / "new").is_dir()


def test_add_with_scheme_cram_md5_lower_case(tmp_path: Path) -> None:
    code, out, err = cli(
        tmp_path, "user", "add", "--scheme", "cram-md5", "alice@example.org", stdin="secret\n"
    )
    assert (code, out, err) == (0, "", "")
    stored = stored_hash(tmp_path, ALICE)
    assert stored.startswith("{CRAM-MD5}")
    assert supports_cram_md5(stored) and not supports_apop(stored)
    assert cram_md5_digest(stored, b"<x@y>") == hmac.new(b"secret", b"<x@y>", "md5").hexdigest()
    assert verify_password(stored, b"secret")


def test_passwd_can_change_the_scheme(tmp_path: Path) -> None:
    assert cli(tmp_path, "user", "add", "alice@example.org", stdin="one\n")[0] == 0
    assert stored_hash(tmp_path, ALICE).startswith("{ARGON2ID}")
    assert cli(
        tmp_path, "user", "passwd", "--scheme", "SHA512-CRYPT", "alice@example.org", stdin="two\n"
    ) == (0, "", "")
    stored = stored_hash(tmp_path, ALICE)
    assert stored.startswith("{SHA512-CRYPT}$6$")
    assert verify_password(stored, b"two") and not verify_password(stored, b"one")
    # And back to the default when --scheme is not given.
    assert cli(tmp_path, "user", "passwd", "alice@example.org", stdin="three\n")[0] == 0
    assert stored_hash(tmp_path, ALICE).startswith("{ARGON2ID}")


def test_unknown_scheme_is_a_usage_error(tmp_path: Path) -> None:
    code, out, err = cli(tmp_path, "user", "add", "--scheme", "MD5", "a@example.org", stdin="x\n")
    assert code == 2 and out == ""
    assert "invalid choice" in err
    assert not (tmp_path / "users").exists()


def test_password_the_scheme_cannot_take_is_one_error_line(tmp_path: Path) -> None:
    code, out, err = cli(
        tmp_path, "user", "add", "--scheme", "BLF-CRYPT", "a@example.org", stdin="x" * 73 + "\n"
    )
    assert code == 1 and out == ""
    assert_one_error_line(err)
    assert "72 bytes" in err
    assert not (tmp_path / "users").exists()


def test_help_lists_the_schemes(tmp_path: Path) -> None:
    code, out, _ = cli(tmp_path, "user", "add", "--help")
    assert code == 0
    for scheme in ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SSHA512", "PLAIN", "CRAM-MD5"):
        assert scheme in out


SHA512_CRYPT = (
    "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoE"
    "OfaS35inz1"
)  # "Hello world!"
BLF_CRYPT = "$2y$05$Z.QpSjRyNifGrDKM2eJFj.CJjtpnA6lz0U2KWfE86VcrP.cCZPgu2"  # "hunter2"
CRAM = "d06d4e1b26fccaa4b0b61801132340a354b21152711fb604ca3e035e7015116b"  # "tanstaaftanstaaf"

DOVECOT_USERS = f"""\
# exported from Dovecot
alice@example.org:{{SHA512-CRYPT}}{SHA512_CRYPT}:1000:1000::/home/alice::
bob:{{BLF-CRYPT}}{BLF_CRYPT}:1001:1001::/home/bob
carol:{{CRAM-MD5}}{CRAM}
dave@example.net:{{PLAIN}}tanstaaf
erin:{SHA512_CRYPT}
"""


def test_import_dovecot_file_with_mixed_schemes(tmp_path: Path) -> None:
    source = tmp_path / "dovecot.users"
    source.write_text(DOVECOT_USERS)
    state = tmp_path / "state"
    code, out, err = cli(state, "user", "import", "--domain", "Example.COM", str(source))
    assert (code, out, err) == (0, "imported 5 users\n", "")
    assert cli(state, "user", "list")[1] == (
        "alice@example.org\nbob@example.com\ncarol@example.com\ndave@example.net\nerin@example.com\n"
    )
    db = UserFile(state / "users")
    checks = {
        Address("alice", "example.org"): b"Hello world!",
        Address("bob", "example.com"): b"hunter2",
        Address("carol", "example.com"): b"tanstaaftanstaaf",
        Address("dave", "example.net"): b"tanstaaf",
        Address("erin", "example.com"): b"Hello world!",
    }
    for address, password in checks.items():
        stored = db.get_password_hash(address)
        assert stored is not None and verify_password(stored, password), address
        assert (state / "mail" / address.domain / address.local / "Maildir" / "cur").is_dir()
    # The unprefixed crypt string was written with its scheme; Dovecot's uid/home are dropped.
    assert f"erin@example.com:{{SHA512-CRYPT}}{SHA512_CRYPT}\n" in (state / "users").read_text()
    assert "/home/" not in (state / "users").read_text()


def test_import_skips_existing_users_with_a_warning(tmp_path: Path) -> None:
    assert cli(tmp_path, "user", "add", "alice@example.org", stdin="mine\n")[0] == 0
    before = stored_hash(tmp_path, ALICE)
    source = tmp_path / "in"
    source.write_text("alice@example.org:{PLAIN}theirs\nnew@example.org:{PLAIN}n\n")
    code, out, err = cli(tmp_path, "user", "import", str(source))
    assert code == 0
    assert out == "imported 1 users\n"
    assert err == "mailgate: warning: user alice@example.org already exists, skipped\n"
    assert stored_hash(tmp_path, ALICE) == before
    assert UserFile(tmp_path / "users").exists(Address("new", "example.org"))


def test_import_with_a_bad_line_imports_nothing(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.write_text(
        "good@example.org:{PLAIN}g\nbad@example.org:{MD5-CRYPT}$1$x$y\nbare:{PLAIN}b\n"
    )
    code, out, err = cli(tmp_path / "state", "user", "import", str(source))
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"mailgate: error: {source}:2: ")
    assert "{MD5-CRYPT}" in lines[0]
    assert lines[1].startswith(f"mailgate: error: {source}:3: ")
    assert "no domain" in lines[1] and "nothing imported" in lines[1]
    assert not (tmp_path / "state" / "users").exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("user", "import", "/nonexistent/file"), "No such file"),
        (("user", "import", "--domain", "bad/domain", "FILE"), "bad domain"),
    ],
)
def test_import_errors(tmp_path: Path, argv: tuple[str, ...], fragment: str) -> None:
    source = tmp_path / "in"
    source.write_text("x@example.org:{PLAIN}x\n")
    argv = tuple(str(source) if a == "FILE" else a for a in argv)
    code, out, err = cli(tmp_path, *argv)
    assert code == 1 and out == ""
    assert_one_error_line(err)
    assert fragment in err


def test_import_refuses_non_utf8(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.write_bytes(b"\xffx@example.org:{PLAIN}x\n")
    code, _, err = cli(tmp_path, "user", "import", str(source))
    assert code == 1
    assert "not valid UTF-8" in err
