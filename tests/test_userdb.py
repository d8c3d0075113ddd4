"""The user file: parsing, automatic reload, malformed lines, atomic rewrites."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailgate.auth.userdb import NoSuchUser, UserExists, UserFile
from mailgate.errors import UserDatabaseError
from mailgate.interfaces import IUserDatabase
from mailgate.model import Address

ALICE = Address("alice", "example.org")
BOB = Address("bob", "example.net")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    """Replace the file the way an editor or the CLI would (new inode)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def test_provides_interface_and_reads_entries(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(
        "# accounts\n\nalice@example.org:{PLAIN}a\nBob@Example.NET:{ARGON2ID}$argon2id$x:1000::\n"
    )
    db = UserFile(users)
    assert IUserDatabase.providedBy(db)
    assert db.get_password_hash(ALICE) == "{PLAIN}a"
    # Account names are canonical: domain and (by default) local part lower-cased.
    assert db.get_password_hash(BOB) == "{ARGON2ID}$argon2id$x"
    assert db.exists(BOB)
    assert not db.exists(Address("carol", "example.org"))
    assert db.get_password_hash(Address("carol", "example.org")) is None
    assert db.list() == [ALICE, BOB]


def test_missing_file_is_an_empty_database(tmp_path: Path) -> None:
    db = UserFile(tmp_path / "users")
    assert db.list() == []
    assert not db.exists(ALICE)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("alice@example.org:{PLAIN}a\nnocolon\n", 2),
        ("# c\n\nalice:{PLAIN}a\n", 3),  # no domain
        ("alice@example.org:\n", 1),  # empty hash
        ("alice@example.org:plainhash\n", 1),  # no {SCHEME}
        ("../x@example.org:{PLAIN}a\n", 1),
        ("alice@example.org:{PLAIN}a\nALICE@example.org:{PLAIN}b\n", 2),  # duplicate
    ],
)
def test_malformed_line_names_its_number(tmp_path: Path, text: str, line: int) -> None:
    users = tmp_path / "users"
    users.write_text(text)
    with pytest.raises(UserDatabaseError) as exc:
        UserFile(users)
    assert f"{users}:{line}:" in str(exc.value)


def test_invalid_utf8_is_an_error(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_bytes(b"al\xffce@example.org:{PLAIN}a\n")
    with pytest.raises(UserDatabaseError):
        UserFile(users)


def test_reloads_on_change_at_most_once_a_second(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice@example.org:{PLAIN}a\n")
    clock = FakeClock()
    db = UserFile(users, clock=clock)
    write(users, "alice@example.org:{PLAIN}changed\nbob@example.net:{PLAIN}b\n")
    # Within the same second no stat happens: the old data is still served.
    clock.now += 0.5
    assert db.get_password_hash(ALICE) == "{PLAIN}a"
    assert not db.exists(BOB)
    clock.now += 0.6
    assert db.get_password_hash(ALICE) == "{PLAIN}changed"
    assert db.exists(BOB)


def test_broken_edit_keeps_previous_accounts(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice@example.org:{PLAIN}a\n")
    clock = FakeClock()
    db = UserFile(users, clock=clock)
    write(users, "alice@example.org {PLAIN}a\n")
    clock.now += 2
    assert db.get_password_hash(ALICE) == "{PLAIN}a"
    # Fixing the file is picked up again.
    write(users, "bob@example.net:{PLAIN}b\n")
    clock.now += 2
    assert not db.exists(ALICE)
    assert db.exists(BOB)


def test_add_set_delete_preserve_other_lines(tmp_path: Path) -> None:
    users = tmp_path / "users"
    original = "# header comment\n\nBob@example.net:{PLAIN}b:1000:1000::/home/bob\n"
    users.write_text(original)
    db = UserFile(users)
    db.add(ALICE, "{PLAIN}a")
    assert users.read_text() == original + "alice@example.org:{PLAIN}a\n"
    db.set_hash(BOB, "{PLAIN}new")
    assert "Bob@example.net:{PLAIN}new:1000:1000::/home/bob\n" in users.read_text()
    assert db.get_password_hash(BOB) == "{PLAIN}new"
    db.delete(ALICE)
    assert users.read_text() == original.replace("{PLAIN}b", "{PLAIN}new")
    assert not db.exists(ALICE)
    # A second instance (another process) sees the result.
    assert UserFile(users).list() == [BOB]


def test_write_errors(tmp_path: Path) -> None:
    db = UserFile(tmp_path / "users")
    db.add(ALICE, "{PLAIN}a")
    with pytest.raises(UserExists):
        db.add(ALICE, "{PLAIN}b")
    with pytest.raises(NoSuchUser):
        db.set_hash(BOB, "{PLAIN}b")
    with pytest.raises(NoSuchUser):
        db.delete(BOB)
    for bad in ("{PLAIN}a:b", "{PLAIN}a\nevil@example.org:{PLAIN}x", "nohash", "{}x"):
        with pytest.raises(UserDatabaseError):
            db.add(BOB, bad)
    assert db.list() == [ALICE]


def test_atomic_write_mode_and_no_leftovers(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice@example.org:{PLAIN}a\n")
    os.chmod(users, 0o644)
    inode_before = users.stat().st_ino
    db = UserFile(users)
    db.add(BOB, "{PLAIN}b")
    st = users.stat()
    # Replaced by rename (new inode), never rewritten in place; private to the owner.
    assert st.st_ino != inode_before
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users", "users.lock"]


def test_failed_write_leaves_file_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "users"
    users.write_text("alice@example.org:{PLAIN}a\n")
    db = UserFile(users)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(UserDatabaseError) as exc:
        db.add(BOB, "{PLAIN}b")
    assert "No space left" in str(exc.value)
    monkeypatch.undo()
    assert users.read_text() == "alice@example.org:{PLAIN}a\n"
    # The temporary file was cleaned up.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users", "users.lock"]
    assert not db.exists(BOB)
