"""The admin CLI through main() with in-memory streams."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate.admin import main
from mailgate.auth.passwords import verify_password
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
