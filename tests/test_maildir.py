"""Maildir-specific behaviour: on-disk layout, foreign files, the UID list, locks, fsync, safety."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from mailgate.errors import DeliveryError, MaildropInUse, MaildropUnavailable
from mailgate.interfaces import IMaildrop
from mailgate.model import Address, Envelope
from mailgate.pop3.server import CHUNK_SIZE, MessageStream
from mailgate.store.maildir import MEMORY_LIMIT, MaildirStore, _Scanner
from mailgate.testing import HeldRunner
from mailgate.wire import encode_all
from tests.test_pop3_stream import Consumer
from tests.test_store_contract import failure_of, run_sync, temp_dir

ALICE = Address("alice", "example.org")
BOB = Address("bob", "example.org")

NAME = re.compile(
    r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.test\.host,S=(\d+),W=(\d+)$",
)
NAME_Q = re.compile(r"Q(\d+)\.")


def patch(case: unittest.TestCase, obj: object, name: str, value: object) -> None:
    """Replace an attribute for the duration of one test (trial's patch is untyped)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    case.addCleanup(setattr, obj, name, old)


class RecordingFsync:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        os.fsync(fd)


class MaildirTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.base = Path(temp_dir(self))
        self.root = self.base / "mail"
        self.fsync = RecordingFsync()
        self.store = self.make_store()

    def make_store(self) -> MaildirStore:
        return MaildirStore(str(self.root), run_sync, hostname="test.host", fsync=self.fsync)

    def maildir(self, who: Address = ALICE) -> Path:
        return self.root / who.domain / who.local / "Maildir"

    def deliver(self, data: bytes, *rcpts: Address) -> str:
        sink = self.store.open_delivery(Envelope(None, rcpts or (ALICE,)))
        sink.write(data)
        result: str = self.successResultOf(sink.finish())
        return result

    def open(self, who: Address = ALICE, store: MaildirStore | None = None) -> IMaildrop:
        drop: IMaildrop = self.successResultOf((store or self.store).open_maildrop(who))
        return drop

    def record_calls(self, *names: str, arg: int = 0) -> list[str]:
        """Wrap ``os.<name>`` for each name (for this test); the returned list collects the
        ``arg``-th argument of every call, e.g. the paths listed, or renamed to."""
        seen: list[str] = []
        for name in names:
            real = getattr(os, name)

            def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                seen.append(str(args[arg]))
                return _real(*args, **kwargs)

            patch(self, os, name, spy)
        return seen

    def drop_foreign(self, sub: str, name: str, data: bytes, who: Address = ALICE) -> Path:
        md = self.maildir(who)
        for d in ("new", "cur", "tmp"):
            (md / d).mkdir(parents=True, exist_ok=True)
        path = md / sub / name
        path.write_bytes(data)
        return path


class DeliveryTests(MaildirTestCase):
    def test_layout_and_file_name(self) -> None:
        data = b"Subject: hi\n\nline\n.dot\n"
        self.deliver(data)
        md = self.maildir()
        assert sorted(p.name for p in md.iterdir()) == ["cur", "new", "tmp"]
        (name,) = os.listdir(md / "new")
        assert ":" not in name
        m = NAME.match(name)
        assert m, name
        assert int(m.group(3)) == os.getpid()
        assert int(m.group(5)) == len(data)
        assert int(m.group(6)) == len(encode_all([data], stuff=False))
        assert (md / "new" / name).read_bytes() == data
        assert os.listdir(md / "tmp") == []
        # A small message never needed a spool file.
        assert not (self.root / ".incoming").exists()

    def test_fsync_happens_in_finish_only(self) -> None:
        sink = self.store.open_delivery(Envelope(None, (ALICE, BOB)))
        sink.write(b"a\n" * 1000)
        assert self.fsync.calls == 0
        self.successResultOf(sink.finish())
        # The file, plus new/ and tmp/ of each of the two recipients (and new dirs).
        assert self.fsync.calls >= 5

    def test_duplicate_recipients_get_one_copy(self) -> None:
        self.deliver(b"x\n", ALICE, ALICE)
        assert len(os.listdir(self.maildir() / "new")) == 1

    def test_unique_names_for_many_deliveries(self) -> None:
        for i in range(50):
            self.deliver(b"m%d\n" % i)
        names = os.listdir(self.maildir() / "new")
        assert len(set(names)) == 50
        drop = self.open()
        contents = []
        for i in range(len(drop.messages)):
            with drop.open_message(i) as f:
                contents.append(f.read())
        assert contents == [b"m%d\n" % i for i in range(50)]  # delivery order
        drop.release()

    def test_cr_in_data_still_gives_exact_wire_size(self) -> None:
        data = b"a\r\nb\rc\n"
        self.deliver(data)
        drop = self.open()
        assert drop.messages[0].size == len(encode_all([data], stuff=False))
        drop.release()

    def test_abort_removes_spool_file(self) -> None:
        sink = self.store.open_delivery(Envelope(None, (ALICE,)))
        sink.write(b"data\n" * (MEMORY_LIMIT // 5 + 1))
        assert len(os.listdir(self.root / ".incoming")) == 1
        sink.abort()
        assert os.listdir(self.root / ".incoming") == []
        assert not self.maildir().exists()

    def test_small_message_touches_no_disk_before_finish(self) -> None:
        sink = self.store.open_delivery(Envelope(None, (ALICE, BOB)))
        for _ in range(MEMORY_LIMIT // 1000):
            sink.write(b"x" * 999 + b"\n")
        assert not self.root.exists()  # no spool file, no Maildir, nothing on the reactor
        assert self.fsync.calls == 0
        self.successResultOf(sink.finish())
        data = (b"x" * 999 + b"\n") * (MEMORY_LIMIT // 1000)
        (a,) = (self.maildir(ALICE) / "new").iterdir()
        (b,) = (self.maildir(BOB) / "new").iterdir()
        assert a.read_bytes() == b.read_bytes() == data
        assert a.stat().st_ino == b.stat().st_ino  # one file, hard-linked
        assert not (self.root / ".incoming").exists()
        assert os.listdir(self.maildir(ALICE) / "tmp") == []

    def test_small_message_aborted_leaves_nothing(self) -> None:
        sink = self.store.open_delivery(Envelope(None, (ALICE,)))
        sink.write(b"data\n")
        sink.abort()
        assert not self.root.exists()
        failure_of(sink.finish(), DeliveryError)

    def test_large_message_streams_to_a_spool_file(self) -> None:
        chunk = b"y" * 4095 + b"\n"
        sink = self.store.open_delivery(Envelope(None, (ALICE,)))
        for i in range(MEMORY_LIMIT // len(chunk) * 3):
            sink.write(chunk)
            spooled = (
                os.listdir(self.root / ".incoming") if (self.root / ".incoming").exists() else []
            )
            assert len(spooled) == (1 if (i + 1) * len(chunk) > MEMORY_LIMIT else 0)
        self.successResultOf(sink.finish())
        (name,) = os.listdir(self.maildir() / "new")
        data = chunk * (MEMORY_LIMIT // len(chunk) * 3)
        assert (self.maildir() / "new" / name).read_bytes() == data
        wire = len(data) + data.count(b"\n")
        assert name.endswith(f",S={len(data)},W={wire},D=0")  # no line starts with "."
        assert os.listdir(self.root / ".incoming") == []
        assert os.listdir(self.maildir() / "tmp") == []

    def test_io_failure_is_temporary_and_all_or_nothing(self) -> None:
        self.deliver(b"warm up\n", ALICE, BOB)  # create both Maildirs
        bob_new = self.maildir(BOB) / "new"
        for p in bob_new.iterdir():
            p.unlink()
        os.chmod(bob_new, 0o500)
        self.addCleanup(os.chmod, bob_new, 0o700)
        if os.access(bob_new, os.W_OK):
            # Running as root: simulate the failure at the rename instead.
            real_rename = os.rename

            def rename(src: Any, dst: Any) -> None:
                if str(dst).startswith(str(bob_new)):
                    raise OSError(28, "No space left on device")
                real_rename(src, dst)

            patch(self, os, "rename", rename)
        before = set(os.listdir(self.maildir(ALICE) / "new"))
        sink = self.store.open_delivery(Envelope(None, (ALICE, BOB)))
        sink.write(b"second\n")
        err = failure_of(sink.finish(), DeliveryError)
        assert isinstance(err, DeliveryError) and not err.permanent
        assert "No space" not in str(err)  # no OS text towards the client
        logged = self.flushLoggedErrors(OSError)  # type: ignore[no-untyped-call]
        assert len(logged) == 1  # but it is logged for the admin
        # Alice's copy was rolled back; nothing is left in tmp/ either.
        assert set(os.listdir(self.maildir(ALICE) / "new")) == before
        assert os.listdir(self.maildir(ALICE) / "tmp") == []
        assert os.listdir(self.maildir(BOB) / "tmp") == []

    def test_link_falls_back_to_copy(self) -> None:
        def no_link(src: Any, dst: Any) -> None:
            raise OSError(18, "Invalid cross-device link")

        patch(self, os, "link", no_link)
        self.deliver(b"copied\n", ALICE, BOB)
        for who in (ALICE, BOB):
            (name,) = os.listdir(self.maildir(who) / "new")
            assert (self.maildir(who) / "new" / name).read_bytes() == b"copied\n"

    def test_finish_twice_fails(self) -> None:
        sink = self.store.open_delivery(Envelope(None, (ALICE,)))
        self.successResultOf(sink.finish())
        failure_of(sink.finish(), DeliveryError)

    def test_filepath_root_accepted(self) -> None:
        store = MaildirStore(FilePath(str(self.base / "other")), run_sync, hostname="h")
        sink = store.open_delivery(Envelope(None, (ALICE,)))
        sink.write(b"x\n")
        self.successResultOf(sink.finish())
        assert (self.base / "other" / "example.org" / "alice" / "Maildir" / "new").is_dir()


class ForeignFileTests(MaildirTestCase):
    def test_foreign_crlf_and_lf_files_in_new(self) -> None:
        crlf = b"Subject: a\r\n\r\nbody\r\n"
        lf = b"Subject: b\n\nbody\nno newline at end"
        self.drop_foreign("new", "1000.foreign1.host", crlf)
        self.drop_foreign("new", "1001.foreign2.host", lf)
        drop = self.open()
        assert [m.size for m in drop.messages] == [
            len(encode_all([crlf], stuff=False)),
            len(encode_all([lf], stuff=False)),
        ]
        with drop.open_message(0) as f:
            assert f.read() == crlf
        cur = sorted(os.listdir(self.maildir() / "cur"))
        assert cur == [
            f"1000.foreign1.host,S={len(crlf)},W={len(crlf)}:2,",
            f"1001.foreign2.host,S={len(lf)},W={len(lf) + 3 + 2}:2,",
        ]
        assert os.listdir(self.maildir() / "new") == []
        drop.release()

    def test_foreign_file_in_cur_without_sizes_keeps_flags(self) -> None:
        data = b"x\r\ny\r\n"
        self.drop_foreign("cur", "999.abc.host:2,S", data)
        drop = self.open()
        assert drop.messages[0].size == 6
        assert os.listdir(self.maildir() / "cur") == ["999.abc.host,S=6,W=6:2,S"]
        drop.release()

    def test_junk_is_ignored(self) -> None:
        self.drop_foreign("new", ".hidden", b"x\n")
        self.drop_foreign("cur", ".hidden:2,", b"x\n")
        self.drop_foreign("tmp", "123.inprogress.host", b"x\n")
        (self.maildir() / "new" / "subdir").mkdir()
        (self.maildir() / "cur" / "link:2,").symlink_to("/etc/passwd")
        drop = self.open()
        assert list(drop.messages) == []
        drop.release()

    def test_vanished_message_is_unavailable(self) -> None:
        self.deliver(b"one\n")
        drop = self.open()
        (name,) = os.listdir(self.maildir() / "new")
        os.unlink(self.maildir() / "new" / name)
        with pytest.raises(MaildropUnavailable):
            drop.open_message(0)
        # Deleting an already vanished message is not a failure.
        assert self.successResultOf(drop.commit([0])) == 0

    def test_move_to_cur_by_another_program_is_followed(self) -> None:
        # A mail reader that marks our (unmoved) message seen moves it new/ -> cur/.
        self.deliver(b"one\n")
        drop = self.open()
        md = self.maildir()
        (name,) = os.listdir(md / "new")
        os.rename(md / "new" / name, md / "cur" / (name + ":2,S"))
        with drop.open_message(0) as f:
            assert f.read() == b"one\n"
        assert self.successResultOf(drop.commit([0])) == 0
        assert os.listdir(md / "cur") == [] and os.listdir(md / "new") == []

    def test_flag_rename_in_cur_by_another_program_is_followed(self) -> None:
        self.drop_foreign("cur", "1700000000.foreign,S=4,W=6:2,", b"a\nb\n")
        drop = self.open()
        cur = self.maildir() / "cur"
        (name,) = os.listdir(cur)
        os.rename(cur / name, cur / (name + "S"))
        with drop.open_message(0) as f:
            assert f.read() == b"a\nb\n"
        assert self.successResultOf(drop.commit([0])) == 0
        assert os.listdir(cur) == []


class NoMoveTests(MaildirTestCase):
    """Delivered messages stay in new/ at login (see _Scanner: no 100,000 renames)."""

    def test_login_moves_nothing_and_keys_say_where_the_file_is(self) -> None:
        for i in range(3):
            self.deliver(b"m%d\n" % i)
        md = self.maildir()
        names = sorted(os.listdir(md / "new"))
        renames = self.record_calls("rename", arg=1)
        drop = self.open()
        assert renames == []
        assert sorted(os.listdir(md / "new")) == names
        assert os.listdir(md / "cur") == []
        # (as sets: the names' microseconds are not zero-padded, so a string sort of them
        # is not delivery order when two deliveries straddle a power of ten)
        assert sorted(m.key for m in drop.messages) == [f"new/{n}" for n in names]
        for i in range(3):
            with drop.open_message(i) as f:
                assert f.read() == b"m%d\n" % i
        drop.release()

    def test_uid_survives_a_move_to_cur_by_another_program(self) -> None:
        self.deliver(b"one\n")
        self.deliver(b"two\n")
        first = self.open()
        uids = [m.uid for m in first.messages]
        first.release()
        md = self.maildir()
        for name in os.listdir(md / "new"):
            os.rename(md / "new" / name, md / "cur" / (name + ":2,S"))
        for store in (self.store, self.make_store()):  # cached scan and a fresh one
            drop = self.open(store=store)
            assert [m.uid for m in drop.messages] == uids
            assert all(m.key.startswith("cur/") for m in drop.messages)
            drop.release()

    def test_messages_in_new_and_cur_are_listed_in_uid_order(self) -> None:
        self.drop_foreign("cur", "1600000000.old,S=4,W=6:2,S", b"a\nb\n")
        self.deliver(b"newer\n")
        drop = self.open()
        assert [m.key[:4] for m in drop.messages] == ["cur/", "new/"]
        assert [m.size for m in drop.messages] == [6, 7]
        drop.release()

    def test_commit_deletes_from_both_directories_and_fsyncs_each(self) -> None:
        self.drop_foreign("cur", "1600000000.old,S=4,W=6:2,S", b"a\nb\n")
        self.deliver(b"newer\n")
        self.deliver(b"newest\n")
        drop = self.open()
        fsyncs = self.fsync.calls
        assert self.successResultOf(drop.commit([0, 1])) == 0
        assert self.fsync.calls == fsyncs + 2  # cur/ and new/
        md = self.maildir()
        assert os.listdir(md / "cur") == []
        assert len(os.listdir(md / "new")) == 1
        again = self.open()
        assert len(again.messages) == 1
        with again.open_message(0) as f:
            assert f.read() == b"newest\n"
        again.release()

    def test_same_base_in_new_and_cur_is_listed_once(self) -> None:
        self.deliver(b"one\n")
        md = self.maildir()
        (name,) = os.listdir(md / "new")
        os.link(md / "new" / name, md / "cur" / (name + ":2,S"))
        drop = self.open()
        assert [m.key for m in drop.messages] == [f"cur/{name}:2,S"]
        drop.release()


class UidListTests(MaildirTestCase):
    def uidlist(self) -> list[str]:
        return (self.maildir() / "mailgate-uidlist").read_text().splitlines()

    def test_uidlist_format_and_survives_a_new_store_instance(self) -> None:
        self.deliver(b"one\n")
        self.deliver(b"two\n")
        drop = self.open()
        uids = [m.uid for m in drop.messages]
        drop.release()
        lines = self.uidlist()
        m = re.fullmatch(r"V(\d+) N3", lines[0])
        assert m
        validity = int(m.group(1))
        assert uids == [f"{validity:08x}{1:08x}", f"{validity:08x}{2:08x}"]
        assert [ln.split(" ")[0] for ln in lines[1:]] == ["1", "2"]
        fresh = self.make_store()
        again = self.open(store=fresh)
        assert [m.uid for m in again.messages] == uids
        again.release()

    def test_next_uid_persists_after_deleting_everything(self) -> None:
        self.deliver(b"one\n")
        drop = self.open()
        self.successResultOf(drop.commit([0]))
        self.open().release()
        assert self.uidlist()[0].endswith(" N2")
        self.deliver(b"two\n")
        drop = self.open(store=self.make_store())
        assert drop.messages[0].uid.endswith(f"{2:08x}")
        drop.release()

    def test_corrupt_uidlist_gets_a_new_validity(self) -> None:
        self.deliver(b"one\n")
        drop = self.open()
        old_uid = drop.messages[0].uid
        drop.release()
        path = self.maildir() / "mailgate-uidlist"
        header = path.read_text().splitlines()[0]
        path.write_text(header + "\nnot a number\n")
        drop = self.open()
        assert len(drop.messages) == 1
        assert drop.messages[0].uid != old_uid
        drop.release()

    def test_dropped_session_changes_nothing_on_disk(self) -> None:
        self.deliver(b"one\n")
        self.deliver(b"two\n")
        self.open().release()  # the first scan writes the uidlist

        def snapshot() -> dict[str, bytes]:
            md = self.maildir()
            return {
                str(p.relative_to(md)): p.read_bytes()
                for p in md.rglob("*")
                if p.is_file() and p.name != "mailgate.lock"
            }

        before = snapshot()
        drop = self.open()
        del drop  # the connection went away: no commit, no explicit release
        after = snapshot()
        assert after == before
        self.open().release()  # and the lock did not outlive the session


class LockTests(MaildirTestCase):
    def test_lock_across_two_store_instances(self) -> None:
        other = self.make_store()
        drop = self.open()
        failure_of(other.open_maildrop(ALICE), MaildropInUse)
        drop.release()
        self.open(store=other).release()

    def test_lock_file_names_the_holder(self) -> None:
        drop = self.open()
        assert (self.maildir() / "mailgate.lock").read_text().strip() == str(os.getpid())
        drop.release()

    def test_new_holder_overwrites_the_pid_in_place(self) -> None:
        """Another process held it last (same width, old pid): no truncate, just a write."""
        self.open().release()
        lock = self.maildir() / "mailgate.lock"
        lock.write_text(f"{1:<10}\n")
        truncated = self.record_calls("ftruncate")
        drop = self.open()
        assert lock.read_text().strip() == str(os.getpid())
        assert truncated == []
        drop.release()

    def test_lock_file_of_another_width_is_rewritten_whole(self) -> None:
        self.open().release()
        lock = self.maildir() / "mailgate.lock"
        lock.write_text("4194303 left by an old version\n")
        drop = self.open()
        assert lock.read_text() == f"{os.getpid():<10}\n"
        drop.release()

    def test_commit_after_release_is_refused(self) -> None:
        drop = self.open()
        drop.release()
        failure_of(drop.commit([]), MaildropUnavailable)

    def test_lock_held_by_another_process(self) -> None:
        self.open().release()  # create the Maildir and lock file
        lock = str(self.maildir() / "mailgate.lock")
        with subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, sys\n"
                "f = open(sys.argv[1], 'r+')\n"
                "fcntl.flock(f, fcntl.LOCK_EX)\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n",
                lock,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        ) as holder:
            assert holder.stdout is not None and holder.stdin is not None
            try:
                assert holder.stdout.readline() == b"locked\n"
                failure_of(self.store.open_maildrop(ALICE), MaildropInUse)
            finally:
                holder.stdin.close()
                holder.wait()
        self.open().release()


class SafetyTests(MaildirTestCase):
    BAD = [
        Address("..", "example.org"),
        Address(".", "example.org"),
        Address("", "example.org"),
        Address("a/../../b", "example.org"),
        Address("a\\b", "example.org"),
        Address("a%b", "example.org"),
        Address("a\x00b", "example.org"),
        Address(".hidden", "example.org"),
        Address("alice", ".."),
        Address("alice", "../../canary"),
        Address("alice", ""),
    ]

    def test_traversal_names_refused_and_canary_untouched(self) -> None:
        canary = self.base / "canary"
        canary.write_bytes(b"do not touch\n")
        self.root.mkdir()
        for bad in self.BAD:
            failure_of(self.store.open_maildrop(bad), MaildropUnavailable)
            sink = self.store.open_delivery(Envelope(None, (ALICE, bad)))
            sink.write(b"evil\n")
            err = failure_of(sink.finish(), DeliveryError)
            assert isinstance(err, DeliveryError) and err.permanent
        assert canary.read_bytes() == b"do not touch\n"
        assert sorted(p.name for p in self.base.iterdir()) == ["canary", "mail"]
        # Nothing was delivered to the good recipient either, nor created anywhere.
        assert list(self.root.iterdir()) == []

    def test_io_error_on_open_is_unavailable_not_oserror(self) -> None:
        # A file where the domain directory should be.
        self.root.mkdir()
        (self.root / "example.org").write_bytes(b"")
        failure_of(self.store.open_maildrop(ALICE), MaildropUnavailable)


class RealThreadTests(unittest.TestCase):
    """The same store through a real thread pool (deferToThread), as in production."""

    @inlineCallbacks
    def test_deliver_open_commit_in_threads(self) -> Generator[Deferred[Any], Any, None]:
        store = MaildirStore(temp_dir(self), deferToThread, hostname="test.host")
        data = b"Subject: threaded\n\nhi\n"
        sink = store.open_delivery(Envelope(None, (ALICE,)))
        sink.write(data)
        queue_id = yield sink.finish()
        assert queue_id == sink.queue_id
        drop = yield store.open_maildrop(ALICE)
        assert [m.size for m in drop.messages] == [len(data) + 3]
        # A second session, also through the thread pool, is refused while this one holds it.
        try:
            yield store.open_maildrop(ALICE)
        except MaildropInUse:
            pass
        else:
            raise AssertionError("second session was not refused")
        failed = yield drop.commit([0])
        assert failed == 0
        drop = yield store.open_maildrop(ALICE)
        assert list(drop.messages) == []
        drop.release()


class ScanCacheTests(MaildirTestCase):
    def test_later_login_stats_no_message_and_keeps_the_uidlist(self) -> None:
        for i in range(5):
            self.deliver(b"m%d\n" % i)
        first = self.open()
        uids = [(m.uid, m.size, m.key) for m in first.messages]
        first.release()
        uidlist = self.maildir() / "mailgate-uidlist"
        before = uidlist.stat()
        seen = self.record_calls("lstat")
        again = self.open()
        assert [(m.uid, m.size, m.key) for m in again.messages] == uids
        again.release()
        assert not [p for p in seen if "/cur/" in p or "/new/" in p]
        after = uidlist.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    def test_changes_by_another_process_are_seen(self) -> None:
        for i in range(3):
            self.deliver(b"m%d\n" % i)
        drop = self.open()
        uids = [m.uid for m in drop.messages]
        drop.release()
        other = self.make_store()  # another process: its own cache
        drop = self.open(store=other)
        self.successResultOf(drop.commit([1]))
        sink = other.open_delivery(Envelope(None, (ALICE,)))
        sink.write(b"m3\n")
        self.successResultOf(sink.finish())
        self.open(store=other).release()  # assigns UID 4 and rewrites the uidlist
        drop = self.open()
        assert [m.uid for m in drop.messages] == [uids[0], uids[2], uids[2][:8] + f"{4:08x}"]
        with drop.open_message(2) as f:
            assert f.read() == b"m3\n"
        drop.release()
        # A fresh store (no cache) agrees with the cached one.
        fresh = self.open(store=self.make_store())
        assert [m.uid for m in fresh.messages] == [uids[0], uids[2], uids[2][:8] + f"{4:08x}"]
        fresh.release()

    def test_foreign_file_in_cur_between_logins_is_examined(self) -> None:
        self.deliver(b"one\n")
        self.open().release()
        self.drop_foreign("cur", "1700000000.foreign:2,S", b"a\nb\n")
        (self.maildir() / "cur" / "subdir").mkdir()
        drop = self.open()
        assert [m.size for m in drop.messages] == [5, 4 + 2]
        assert drop.messages[1].key.startswith("cur/1700000000.foreign,S=4,W=6:2,")
        drop.release()

    def age_dirs(self, seconds: float = 60.0, who: Address = ALICE) -> None:
        """Make new/ and cur/ look untouched for ``seconds`` (a quiet mailbox)."""
        past = time.time() - seconds
        for sub in ("new", "cur"):
            os.utime(self.maildir(who) / sub, (past, past))

    def test_quiet_maildir_is_not_listed_again(self) -> None:
        for i in range(3):
            self.deliver(b"m%d\n" % i)
        self.age_dirs()
        first = self.open()
        uids = [m.uid for m in first.messages]
        first.release()
        seen = self.record_calls("scandir", "listdir")
        again = self.open()
        assert [m.uid for m in again.messages] == uids
        again.release()
        assert seen == []

    def test_a_change_to_a_quiet_maildir_is_seen(self) -> None:
        self.deliver(b"m0\n")
        self.age_dirs()
        self.open().release()
        other = self.make_store()  # another process delivers: new/ gets a fresh mtime
        sink = other.open_delivery(Envelope(None, (ALICE,)))
        sink.write(b"m1\n")
        self.successResultOf(sink.finish())
        drop = self.open()
        assert len(drop.messages) == 2
        drop.release()
        # ... and a deletion by the other process, once the directories are quiet again
        self.age_dirs()
        self.open().release()
        drop = self.open(store=other)
        self.successResultOf(drop.commit([0]))
        drop = self.open()
        assert len(drop.messages) == 1
        drop.release()

    def test_recently_changed_maildir_is_listed_every_time(self) -> None:
        """An mtime within QUIET_DIR of now is not trusted: a change in the same
        timestamp tick as the listing would not move it."""
        self.deliver(b"m0\n")
        self.open().release()
        seen = self.record_calls("scandir", "listdir")
        self.open().release()
        assert any(p.endswith("/new") for p in seen)

    def test_scan_cache_is_bounded(self) -> None:
        store = MaildirStore(
            str(self.root), run_sync, hostname="test.host", fsync=self.fsync, cache_messages=3
        )
        for who in (ALICE, BOB):
            for i in range(2):
                self.deliver(b"x%d\n" % i, who)
            self.open(who, store=store).release()
        assert len(store._states) == 1  # 2 + 2 messages exceed 3: the older is dropped


class ReviewFindingsTests(MaildirTestCase):
    """Cases found by review: odd file names from other programs, duplicate links."""

    def test_undecodable_file_name_keeps_logins_working_and_uids_stable(self) -> None:
        self.deliver(b"Subject: ours\n\nx\n")
        md = self.maildir()
        raw = os.path.join(os.fsencode(md / "new"), b"1700000000.foo\xe9bar.host")
        with open(raw, "wb") as f:
            f.write(b"Subject: foreign\n\ny\n")
        first = self.open()
        uids = [m.uid for m in first.messages]
        assert len(uids) == 2
        first.release()
        second = self.open(store=self.make_store())  # a fresh process: reads the uidlist
        assert [m.uid for m in second.messages] == uids
        second.release()

    def test_deleting_removes_every_link_of_the_message(self) -> None:
        self.drop_foreign("cur", "1700000001.twin.host:2,S", b"Subject: twin\n\nz\n")
        os.link(
            self.maildir() / "cur" / "1700000001.twin.host:2,S",
            self.maildir() / "new" / "1700000001.twin.host",
        )
        drop = self.open()
        assert len(drop.messages) == 1
        assert self.successResultOf(drop.commit([0])) == 0
        again = self.open(store=self.make_store())
        assert list(again.messages) == []
        again.release()

    def test_no_copy_becomes_visible_until_every_copy_is_staged(self) -> None:
        self.deliver(b"warm up\n", ALICE, BOB)
        renames: list[str] = []
        real_rename = os.rename
        real_ensure = self.store.ensure_maildir

        def rename(src: Any, dst: Any) -> None:
            renames.append(str(dst))
            real_rename(src, dst)

        def ensure(maildir: str) -> None:
            if "/bob/" in maildir:
                raise OSError(28, "No space left on device")
            real_ensure(maildir)

        patch(self, os, "rename", rename)
        patch(self, self.store, "ensure_maildir", ensure)
        before = set(os.listdir(self.maildir(ALICE) / "new"))
        sink = self.store.open_delivery(Envelope(None, (ALICE, BOB)))
        sink.write(b"second\n")
        failure_of(sink.finish(), DeliveryError)
        self.flushLoggedErrors(OSError)  # type: ignore[no-untyped-call]
        assert not [r for r in renames if "/new/" in r]  # alice never saw it, even briefly
        assert set(os.listdir(self.maildir(ALICE) / "new")) == before
        assert os.listdir(self.maildir(ALICE) / "tmp") == []

    def test_stale_partial_deliveries_are_swept_but_fresh_ones_kept(self) -> None:
        spool = Path(self.store.spool)
        spool.mkdir(parents=True, exist_ok=True)
        old, fresh = spool / "old.part", spool / "fresh.part"
        old.write_bytes(b"x")
        fresh.write_bytes(b"y")
        os.utime(old, (1_000_000, 1_000_000))
        assert self.store.sweep_stale(now=1_000_000 + 37 * 3600) == 1
        assert not old.exists() and fresh.exists()

    def test_crash_leftovers_in_a_maildir_tmp_are_swept_once_per_process(self) -> None:
        self.deliver(b"hello\n")
        tmp = self.maildir() / "tmp"
        old, fresh = tmp / "123.crashed", tmp / "456.writing"
        old.write_bytes(b"half a message")
        fresh.write_bytes(b"being written right now")
        past = time.time() - 37 * 3600
        os.utime(old, (past, past))
        self.deliver(b"again\n")  # this process already checked the Maildir: no new sweep
        assert old.exists()
        other = self.make_store()  # a restarted process: first use of the Maildir
        drop = self.open(store=other)
        assert len(drop.messages) == 2
        drop.release()
        assert not old.exists() and fresh.exists()


def test_delivery_order_matches_the_full_key_for_any_mix_of_names() -> None:
    """The string-sort shortcut of in_delivery_order gives exactly the order of sorting by
    the full delivery key (ties by name), for ours, foreign and odd names mixed."""
    import random

    from mailgate.store.maildir import _delivery_rank, in_delivery_order

    rng = random.Random(6)
    for _ in range(2000):
        names = set()
        for _ in range(rng.randint(0, 25)):
            secs = rng.choice([1700000000, 1700000001, 1700000002, 999999999, 17000000000])
            roll = rng.random()
            if roll < 0.6:
                q = rng.randint(0, 50)
                names.add(f"{secs}.M{rng.randint(0, 999999)}P{rng.randint(1, 99)}Q{q}.h,S=1,W=2")
            elif roll < 0.8:
                names.add(f"{secs}.foreign{rng.randint(0, 9)}")
            else:
                names.add(rng.choice(["abc", "x.y", "1700000000", "1700000000.", "0001700000.x"]))
        expected = sorted(sorted(names), key=_delivery_rank)
        assert in_delivery_order(names) == expected


class GroupCommitTests(MaildirTestCase):
    def make_store(self) -> MaildirStore:
        self.runner = HeldRunner()
        return MaildirStore(str(self.root), self.runner, hostname="test.host", fsync=self.fsync)

    def start(self, data: bytes, *rcpts: Address) -> Deferred[str]:
        sink = self.store.open_delivery(Envelope(None, rcpts or (ALICE,)))
        sink.write(data)
        return sink.finish()

    def test_messages_arriving_during_a_commit_share_the_next_one(self) -> None:
        self.store.ensure_maildir(str(self.maildir(BOB)))  # its creation fsyncs are not counted
        first = self.start(b"one\n")
        assert len(self.runner.jobs) == 1  # a lone message is committed at once
        later = [self.start(b"two\n"), self.start(b"three\n", ALICE, BOB)]
        assert len(self.runner.jobs) == 1  # ... the others wait for it to finish
        self.runner.run_one()
        assert self.successResultOf(first)
        assert len(self.runner.jobs) == 1  # one hop for both waiting messages
        fsyncs = self.fsync.calls
        assert not any(d.called for d in later)
        self.runner.run_one()
        ids = [self.successResultOf(d) for d in later]
        assert len(set(ids)) == 2
        # one fsync per written file (the copy for bob is a hard link) and one per new/
        assert self.fsync.calls - fsyncs == 2 + 2
        contents = sorted(p.read_bytes() for p in (self.maildir() / "new").iterdir())
        assert contents == [b"one\n", b"three\n", b"two\n"]
        assert [p.read_bytes() for p in (self.maildir(BOB) / "new").iterdir()] == [b"three\n"]

    def test_one_failing_message_does_not_fail_the_rest_of_its_group(self) -> None:
        self.start(b"warm up\n", ALICE, BOB)
        self.runner.run_one()
        real_ensure = self.store.ensure_maildir

        def ensure(maildir: str) -> None:
            if "/bob/" in maildir:
                raise OSError(28, "No space left on device")
            real_ensure(maildir)

        blocker = self.start(b"first\n")
        doomed = self.start(b"to both\n", ALICE, BOB)
        fine = self.start(b"to alice\n")
        self.runner.run_one()
        self.successResultOf(blocker)
        patch(self, self.store, "ensure_maildir", ensure)
        self.runner.run_one()
        failure_of(doomed, DeliveryError)
        self.flushLoggedErrors(OSError)  # type: ignore[no-untyped-call]
        self.successResultOf(fine)
        alice = sorted(p.read_bytes() for p in (self.maildir() / "new").iterdir())
        assert alice == [b"first\n", b"to alice\n", b"warm up\n"]  # no half of "to both"
        assert os.listdir(self.maildir() / "tmp") == []

    def test_a_failed_directory_fsync_fails_every_message_in_it(self) -> None:
        self.start(b"warm up\n", BOB)
        self.runner.run_one()
        self.start(b"blocker\n", BOB)
        to_alice = [self.start(b"a1\n"), self.start(b"a2\n")]
        to_bob = self.start(b"b1\n", BOB)
        self.runner.run_one()
        real_fsync_dir = self.store.fsync_dir

        def fsync_dir(path: str) -> None:
            if "/alice/" in path and path.endswith("/new"):
                raise OSError(5, "Input/output error")
            real_fsync_dir(path)

        patch(self, self.store, "fsync_dir", fsync_dir)
        self.runner.run_one()
        for d in to_alice:
            failure_of(d, DeliveryError)
        self.flushLoggedErrors(OSError)  # type: ignore[no-untyped-call]
        self.successResultOf(to_bob)
        assert list((self.maildir() / "new").iterdir()) == []  # rolled back


class QuickOpenTests(MaildirTestCase):
    """An unchanged, quiet maildrop opens on the calling thread; anything else goes to
    the thread pool as before."""

    def make_store(self) -> MaildirStore:
        self.runner = HeldRunner()
        return MaildirStore(str(self.root), self.runner, hostname="test.host", fsync=self.fsync)

    def open_via_thread(self) -> IMaildrop:
        d = self.store.open_maildrop(ALICE)
        assert len(self.runner.jobs) == 1
        self.runner.run_one()
        drop: IMaildrop = self.successResultOf(d)
        return drop

    def setUp(self) -> None:
        super().setUp()
        for i in range(2):
            d = self.start(b"m%d\n" % i)
            self.runner.run_one()
            self.successResultOf(d)
        past = time.time() - 60
        for sub in ("new", "cur"):
            os.utime(self.maildir() / sub, (past, past))
        drop = self.open_via_thread()
        self.first = [m.uid for m in drop.messages]
        drop.release()

    def start(self, data: bytes) -> Deferred[str]:
        sink = self.store.open_delivery(Envelope(None, (ALICE,)))
        sink.write(data)
        return sink.finish()

    def test_unchanged_maildrop_opens_without_a_thread_hop(self) -> None:
        drop = self.successResultOf(self.store.open_maildrop(ALICE))
        assert self.runner.jobs == []
        assert [m.uid for m in drop.messages] == self.first
        # and it holds the lock like any other open
        failure_of(self.store.open_maildrop(ALICE), MaildropInUse)
        drop.release()

    def test_a_changed_maildrop_is_scanned_in_the_thread_pool(self) -> None:
        d = self.start(b"m2\n")
        self.runner.run_one()
        self.successResultOf(d)
        drop = self.open_via_thread()
        assert len(drop.messages) == 3
        drop.release()


class DotLineTests(MaildirTestCase):
    """``,D=0``: a delivery records that no line starts with "."; RETR trusts it only in a
    name of mailgate's own form."""

    def deliver_chunks(self, *chunks: bytes) -> str:
        sink = self.store.open_delivery(Envelope(None, (ALICE,)))
        for chunk in chunks:
            sink.write(chunk)
        self.successResultOf(sink.finish())

        def counter(name: str) -> int:
            m = NAME_Q.search(name)
            assert m, name
            return int(m.group(1))

        return max(os.listdir(self.maildir() / "new"), key=counter)

    def test_a_delivery_records_whether_any_line_starts_with_a_dot(self) -> None:
        assert self.deliver_chunks(b"Subject: x\n\nno dot lines. at all.\n").endswith(",D=0")
        assert not self.deliver_chunks(b"Subject: x\n\n.dot\n").endswith(",D=0")
        assert not self.deliver_chunks(b"Subject: x\n\nend\n", b".dot\n").endswith(",D=0")
        assert not self.deliver_chunks(b"Subject: x\r\n\r\nend\r", b".dot\r").endswith(",D=0")

    def test_a_large_spooled_delivery_records_it_too(self) -> None:
        line = b"x" * 99 + b"\n"
        clean = line * (MEMORY_LIMIT // len(line) + 10)
        assert self.deliver_chunks(clean).endswith(",D=0")
        assert not self.deliver_chunks(clean, b".\n", clean).endswith(",D=0")

    def test_the_maildrop_trusts_the_mark_only_in_its_own_names(self) -> None:
        self.deliver(b"Subject: clean\n\nbody\n")
        self.deliver(b"Subject: dotted\n\n.body\n")
        self.drop_foreign("cur", "1700000000.other,S=5,W=6,D=0:2,", b"x\n.\n")
        drop = self.open()
        by_subject = {}
        for i, _ in enumerate(drop.messages):
            with drop.open_message(i) as f:
                by_subject[f.read().split(b"\n", 1)[0]] = drop.may_have_dot_lines(i)
        drop.release()
        assert by_subject == {b"Subject: clean": False, b"Subject: dotted": True, b"x": True}

    def test_retr_sends_marked_and_unmarked_messages_exactly(self) -> None:
        line = b"Some text. More text, and a dot.\n"
        clean = b"Subject: clean\n\n" + line * (3 * CHUNK_SIZE // len(line))
        dotted = clean + b".dot line\n" + clean
        self.deliver(clean)
        self.deliver(dotted)
        drop = self.open()
        for i, data in enumerate([clean, dotted]):
            consumer = Consumer()
            done: list[bool] = []
            stream = MessageStream(
                drop.open_message(i),
                b"+OK\r\n",
                consumer,  # type: ignore[arg-type]
                None,
                done.append,
                stuff=drop.may_have_dot_lines(i),
            )
            while not done:
                stream.resumeProducing()
            assert b"".join(consumer.writes) == b"+OK\r\n" + encode_all([data]) + b".\r\n"
        assert [drop.may_have_dot_lines(i) for i in range(2)] == [False, True]
        drop.release()

    def test_a_login_reads_marked_names_without_examining_them(self) -> None:
        self.deliver(b"Subject: clean\n\nbody\n")
        examined: list[str] = []
        real = _Scanner._examine

        def examine(scanner: _Scanner, sub: str, name: str, now: float) -> Any:
            examined.append(name)
            return real(scanner, sub, name, now)

        patch(self, _Scanner, "_examine", examine)
        drop = self.open()
        assert len(drop.messages) == 1
        assert examined == []  # the inline fast path took ",W=<n>,D=0"
        drop.release()


class CollectionPausedTests(unittest.TestCase):
    """The cyclic collector is off while a scan runs, and comes back as it was."""

    def test_off_inside_back_on_after_the_last_concurrent_scan(self) -> None:
        import gc

        from mailgate.store.maildir import collection_paused

        assert gc.isenabled()
        outer = collection_paused()
        outer.__enter__()
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer scan still runs
        outer.__exit__(None, None, None)
        assert gc.isenabled()

    def test_left_off_when_it_was_off_before(self) -> None:
        import gc

        from mailgate.store.maildir import collection_paused

        gc.disable()
        try:
            with collection_paused():
                pass
            assert not gc.isenabled()
        finally:
            gc.enable()

    def test_a_login_scan_runs_without_collection(self) -> None:
        import gc

        from mailgate.store import maildir

        seen: list[bool] = []
        real_scan = maildir._Scanner.scan

        def scan(scanner: maildir._Scanner) -> list[Any]:
            seen.append(gc.isenabled())
            return real_scan(scanner)

        patch(self, maildir._Scanner, "scan", scan)
        base = Path(temp_dir(self))
        store = MaildirStore(str(base / "mail"), run_sync, hostname="h")
        drop: IMaildrop = self.successResultOf(store.open_maildrop(ALICE))
        drop.release()
        new = base / "mail" / ALICE.domain / ALICE.local / "Maildir" / "new"
        (new / "1700000000.M1P1Q1.h,S=3,W=4").write_bytes(b"hi\n")
        drop = self.successResultOf(store.open_maildrop(ALICE))  # a rescan, state cached
        drop.release()
        assert seen == [False, True]  # only the first scan of a maildrop pauses it
        assert gc.isenabled()
