"""The user file: parsing, automatic reload, malformed lines, atomic rewrites."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailgate.auth.passwords import supports_apop, supports_cram_md5, verify_password
from mailgate.auth.userdb import NoSuchUser, UserExists, UserFile, read_passwd_file
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


# -- Dovecot schemes in the user file ------------------------------------------------------

SHA512_CRYPT = (
    "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoE"
    "OfaS35inz1"
)  # "Hello world!"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("alice@example.org:{PLAIN}a\nbob@example.net:{MD5-CRYPT}$1$x$y\n", 2, "{MD5-CRYPT}"),
        ("alice@example.org:{NOSUCH}abc\n", 1, "unknown password scheme {NOSUCH}"),
        ("alice@example.org:$1$salt$hash\n", 1, "no {SCHEME} prefix"),
        ("alice@example.org:{CRYPT}$1$salt$hash\n", 1, "unsupported CRYPT variant"),
    ],
)
def test_unknown_scheme_is_an_error_naming_file_and_line(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    users = tmp_path / "users"
    users.write_text(text)
    with pytest.raises(UserDatabaseError) as exc:
        UserFile(users)
    assert f"{users}:{line}:" in str(exc.value)
    assert fragment in str(exc.value)


def test_unprefixed_crypt_is_served_with_its_scheme_and_written_back_as_is(
    tmp_path: Path,
) -> None:
    users = tmp_path / "users"
    original = f"alice@example.org:{SHA512_CRYPT}\nbob@example.net:{{PLAIN}}b\n"
    users.write_text(original)
    db = UserFile(users)
    stored = db.get_password_hash(ALICE)
    assert stored == "{SHA512-CRYPT}" + SHA512_CRYPT
    assert verify_password(stored, b"Hello world!")
    db.set_hash(BOB, "{PLAIN}c")
    assert users.read_text() == original.replace("{PLAIN}b", "{PLAIN}c")


def test_add_refuses_unknown_scheme_and_accepts_every_known_one(tmp_path: Path) -> None:
    db = UserFile(tmp_path / "users")
    with pytest.raises(UserDatabaseError, match="unknown password scheme"):
        db.add(ALICE, "{MD5}abc")
    db.add(ALICE, "{CRAM-MD5}" + "0" * 64)
    db.add(BOB, SHA512_CRYPT)
    assert db.get_password_hash(BOB) == "{SHA512-CRYPT}" + SHA512_CRYPT


def test_any_hash_tells_whether_apop_is_worth_offering(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice@example.org:{CRAM-MD5}" + "0" * 64 + "\n")
    clock = FakeClock()
    db = UserFile(users, clock=clock)
    assert not db.any_hash(supports_apop)
    assert db.any_hash(supports_cram_md5)
    write(users, "alice@example.org:{CRAM-MD5}" + "0" * 64 + "\nbob@example.net:{PLAIN}b\n")
    clock.now += 2
    assert db.any_hash(supports_apop)


def test_add_many_writes_once_and_skips_existing(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice@example.org:{PLAIN}a\n")
    db = UserFile(users)
    carol = Address("carol", "example.org")
    skipped = db.add_many([(ALICE, "{PLAIN}new"), (BOB, "{PLAIN}b"), (carol, "{PLAIN}c")])
    assert skipped == [ALICE]
    assert users.read_text() == (
        "alice@example.org:{PLAIN}a\nbob@example.net:{PLAIN}b\ncarol@example.org:{PLAIN}c\n"
    )
    # A bad hash anywhere refuses the whole batch.
    with pytest.raises(UserDatabaseError):
        db.add_many([(Address("dave", "example.org"), "{PLAIN}d"), (carol, "{BAD}x")])
    assert not db.exists(Address("dave", "example.org"))


DOVECOT_FILE = f"""\
# Dovecot passwd-file: user:password:uid:gid:gecos:home:shell:extra
alice@example.org:{{PLAIN}}a:1000:1000::/home/alice::userdb_quota_rule=*:storage=1G
bob:{{SHA512-CRYPT}}{SHA512_CRYPT}:1001:1001::/home/bob
carol:{SHA512_CRYPT}
Dave@Example.ORG:{{CRAM-MD5}}{"0" * 64}

"""


def test_read_passwd_file_with_mixed_schemes() -> None:
    accounts, problems = read_passwd_file(DOVECOT_FILE, "dovecot.users", "example.net")
    assert problems == []
    assert accounts == [
        (Address("alice", "example.org"), "{PLAIN}a"),
        (Address("bob", "example.net"), "{SHA512-CRYPT}" + SHA512_CRYPT),
        (Address("carol", "example.net"), "{SHA512-CRYPT}" + SHA512_CRYPT),
        (Address("dave", "example.org"), "{CRAM-MD5}" + "0" * 64),
    ]


def test_read_passwd_file_reports_every_bad_line() -> None:
    text = (
        "ok@example.org:{PLAIN}x\n"
        "bare:{PLAIN}x\n"
        "nopassword@example.org:\n"
        "weird@example.org:{MD5-CRYPT}$1$x$y\n"
        "../evil@example.org:{PLAIN}x\n"
        "just-a-name\n"
        "OK@example.org:{PLAIN}y\n"
    )
    accounts, problems = read_passwd_file(text, "f", None)
    assert accounts == [(Address("ok", "example.org"), "{PLAIN}x")]
    assert [p.split(": ", 1)[0] for p in problems] == ["f:2", "f:3", "f:4", "f:5", "f:6", "f:7"]
    assert "no domain" in problems[0]
    assert "empty password" in problems[1]
    assert "{MD5-CRYPT}" in problems[2]
    assert "bad user name" in problems[3]
    assert "duplicate user ok@example.org (first on line 1)" in problems[5]


def test_all_hash_needs_accounts_and_every_one(tmp_path: Path) -> None:
    from mailgate.auth.passwords import hash_password, supports_apop
    from mailgate.auth.userdb import UserFile
    from mailgate.model import Address

    clock = [0.0]
    db = UserFile(tmp_path / "users", clock=lambda: clock[0])
    assert not db.all_hash(supports_apop)
    assert not db.any_hash(supports_apop)
    db.add(Address("carol", "example.com"), hash_password("x", "PLAIN"))
    clock[0] += 2
    assert db.all_hash(supports_apop) and db.any_hash(supports_apop)
    db.add(Address("alice", "example.com"), hash_password("y"))
    clock[0] += 2
    assert not db.all_hash(supports_apop)
    assert db.any_hash(supports_apop)


def test_server_reload_runs_in_the_background_and_keeps_old_accounts_meanwhile(
    tmp_path: Path,
) -> None:
    """A changed file is re-read through the runner; lookups answer from the old accounts
    until the new ones are in (the reactor never parses a large file)."""
    from twisted.internet.defer import Deferred

    from mailgate.auth.passwords import hash_password

    clock = [0.0]
    path = tmp_path / "users"
    db = UserFile(path, clock=lambda: clock[0])
    alice, bob = Address("alice", "example.com"), Address("bob", "example.com")
    db.add(alice, hash_password("a", "PLAIN"))
    clock[0] += 2
    assert db.exists(alice)

    pending: list[tuple[Deferred[object], object]] = []

    def runner(f: object, *args: object) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        pending.append((d, f))
        return d

    db.background = runner
    other = UserFile(path)  # the admin CLI in another process
    other.add(bob, hash_password("b", "PLAIN"))
    clock[0] += 2
    assert not db.exists(bob)  # not yet: the re-read is in the runner
    assert db.exists(alice)
    assert len(pending) == 1
    assert not db.exists(bob) and len(pending) == 1  # one re-read at a time
    d, f = pending.pop()
    d.callback(f())  # type: ignore[operator]
    assert db.exists(bob)
