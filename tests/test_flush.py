"""Group commits made durable by syncfs: the policy, the system call, the store's use of it."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from mailgate import fileio
from mailgate.config import parse_config
from mailgate.errors import ConfigError, DeliveryError
from mailgate.model import Address, Envelope
from mailgate.service import group_flush
from mailgate.store.flush import FilesystemFlush
from mailgate.store.maildir import MaildirStore
from mailgate.testing import HeldRunner
from tests.test_maildir import ALICE, BOB, MaildirTestCase, patch
from tests.test_store_contract import failure_of, run_sync

EXT4 = 0xEF53
TMPFS = 0x01021994


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingSyncfs:
    """Counts syncfs calls; can take (fake) time, fail, or look at the Maildir first."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.calls: list[int] = []
        self.clock = clock
        self.takes = 0.0
        self.error: OSError | None = None
        self.fail_on_call: int | None = None
        self.seen: list[list[str]] = []
        self.watch: Path | None = None

    def __call__(self, fd: int) -> None:
        os.fstat(fd)  # a live descriptor, not a closed (or reused) number
        self.calls.append(fd)
        if self.watch is not None:
            self.seen.append(sorted(os.listdir(self.watch)))
        if self.clock is not None:
            self.clock.now += self.takes
        if self.error is not None and (
            self.fail_on_call is None or self.fail_on_call == len(self.calls)
        ):
            raise self.error


# -- the policy ----------------------------------------------------------------------------


class HeldProbes:
    """Probes the flush wants to start, run when the test says."""

    def __init__(self) -> None:
        self.waiting: list[Callable[[], None]] = []

    def __call__(self, probe: Callable[[], None]) -> None:
        self.waiting.append(probe)

    def run(self) -> None:
        probe = self.waiting.pop(0)
        probe()


def adaptive_flush(
    tmp_path: Path,
) -> tuple[FilesystemFlush, RecordingSyncfs, FakeClock, HeldProbes]:
    clock = FakeClock()
    syncfs = RecordingSyncfs(clock)
    probes = HeldProbes()
    flush = FilesystemFlush(
        syncfs,
        adaptive=True,
        probe_path=str(tmp_path),
        clock=clock,
        slow=0.025,
        retry=1.0,
        start_probe=probes,
        fs_type=lambda fd: EXT4,
    )
    return flush, syncfs, clock, probes


def test_a_slow_syncfs_falls_back_until_a_probe_finds_it_fast(tmp_path: Path) -> None:
    flush, syncfs, clock, probes = adaptive_flush(tmp_path)
    syncfs.takes = 0.001
    flush.flush([5])
    assert flush.active()
    syncfs.takes = 0.2  # another writer's backlog went out with ours
    flush.flush([5])
    assert not flush.active()
    assert probes.waiting == []  # not before a second has passed
    clock.now += 1.5
    assert not flush.active()
    assert len(probes.waiting) == 1
    assert not flush.active()
    assert len(probes.waiting) == 1  # one probe at a time
    probes.run()  # still slow: stay on per-file fsyncs, try again a second later
    assert not flush.active()
    assert probes.waiting == []
    clock.now += 1.5
    syncfs.takes = 0.001
    assert not flush.active()
    calls = len(syncfs.calls)
    probes.run()
    assert len(syncfs.calls) == calls + 1  # the probe syncs the mail root's filesystem
    assert flush.active()


def test_a_failed_syncfs_raises_and_falls_back(tmp_path: Path) -> None:
    flush, syncfs, clock, probes = adaptive_flush(tmp_path)
    syncfs.error = OSError(errno.EIO, "Input/output error")
    with pytest.raises(OSError):
        flush.flush([5])
    assert not flush.active()
    clock.now += 2
    flush.active()
    probes.run()  # the probe fails too
    assert not flush.active()
    syncfs.error = None
    clock.now += 2
    flush.active()
    probes.run()
    assert flush.active()


def test_the_filesystem_mode_never_falls_back() -> None:
    clock = FakeClock()
    syncfs = RecordingSyncfs(clock)
    syncfs.takes = 5.0
    flush = FilesystemFlush(syncfs, adaptive=False, clock=clock)
    flush.flush([5])
    assert flush.active()


# -- the system call -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sysname", "release"),
    [
        ("Linux", "5.16.20"),  # syncfs did not yet report the journal commit's errors
        ("Linux", "5.7.19"),
        ("Linux", "4.19.0-25-amd64"),
        ("Darwin", "23.1.0"),
        ("Linux", "x"),
    ],
)
def test_no_syncfs_where_it_cannot_report_errors(sysname: str, release: str) -> None:
    assert fileio.syncfs_function(sysname, release) is None


def test_syncfs_flushes_a_real_file_and_reports_a_bad_descriptor(tmp_path: Path) -> None:
    syncfs = fileio.syncfs_function("Linux", "6.1.0")
    if syncfs is None:
        pytest.skip("the C library has no syncfs")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fileio.write_all(fd, b"data")
        syncfs(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as raised:
        syncfs(fd)
    assert raised.value.errno == errno.EBADF


# -- the setting ---------------------------------------------------------------------------


def test_the_fsync_setting(tmp_path: Path) -> None:
    assert parse_config({}, "t.toml", tmp_path).fsync == "auto"
    assert parse_config({"fsync": "file"}, "t.toml", tmp_path).fsync == "file"
    with pytest.raises(ConfigError, match="fsync: must be one of auto, file, filesystem"):
        parse_config({"fsync": "never"}, "t.toml", tmp_path)


def test_group_flush_for_each_mode() -> None:
    def fake(fd: int) -> None:
        pass

    assert group_flush("file", "/", False, lambda: fake) is None
    auto = group_flush("auto", "/", False, lambda: fake)
    assert isinstance(auto, FilesystemFlush) and auto.adaptive
    strict = group_flush("filesystem", "/", False, lambda: fake)
    assert isinstance(strict, FilesystemFlush) and not strict.adaptive


def test_without_syncfs_the_master_says_so_and_fsyncs_per_file() -> None:
    with capturedLogs() as events:
        assert group_flush("filesystem", "/", False, lambda: None) is None
        assert group_flush("auto", "/", True, lambda: None) is None  # a worker stays quiet
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1
    assert "per-file fsyncs" in str(warnings[0]["log_format"])


# -- the store -----------------------------------------------------------------------------


class _GroupCommitCase(MaildirTestCase):
    """A store whose group commits use a recorded syncfs; ``boot`` is its boot id."""

    boot: str | None = None

    def make_store(self) -> MaildirStore:
        self.runner = HeldRunner()
        self.clock = FakeClock()
        self.syncfs = RecordingSyncfs(self.clock)
        self.probes = HeldProbes()
        self.fs_type = EXT4
        self.flush = FilesystemFlush(
            self.syncfs,
            adaptive=True,
            probe_path=str(self.base),
            clock=self.clock,
            start_probe=self.probes,
            fs_type=lambda fd: self.fs_type,
        )
        return MaildirStore(
            str(self.root),
            self.runner,
            hostname="test.host",
            fsync=self.fsync,
            group_flush=self.flush,
            boot=self.boot,
        )

    def start(self, data: bytes, *rcpts: Address) -> Deferred[str]:
        sink = self.store.open_delivery(Envelope(None, rcpts or (ALICE,)))
        sink.write(data)
        return sink.finish()

    def warm_up(self) -> None:
        """Create both Maildirs (their directory fsyncs are not the group's)."""
        self.start(b"warm up\n", ALICE, BOB)
        while self.runner.jobs:  # the group, and the retiring of its tmp/ names if any
            self.runner.run_one()
        self.syncfs.calls.clear()
        self.fsync.calls = 0


class SyncfsGroupCommitTests(_GroupCommitCase):
    """Where the boot id is unknown: two syncfs per group, renames into new/."""

    def test_a_group_takes_two_syncfs_and_no_fsync(self) -> None:
        self.warm_up()
        blocker = self.start(b"blocker\n")
        group = [self.start(b"one\n"), self.start(b"two\n", ALICE, BOB), self.start(b"3\n")]
        self.runner.run_one()
        self.successResultOf(blocker)
        self.syncfs.calls.clear()
        self.fsync.calls = 0
        self.syncfs.watch = self.maildir() / "new"
        self.runner.run_one()
        assert len({self.successResultOf(d) for d in group}) == 3
        assert self.fsync.calls == 0
        assert len(self.syncfs.calls) == 2  # one filesystem: before and after the renames
        before, after = self.syncfs.seen
        assert len(before) == 2  # the data is durable before anything reaches new/
        assert len(after) == 5
        assert sorted(p.read_bytes() for p in (self.maildir(BOB) / "new").iterdir()) == [
            b"two\n",
            b"warm up\n",
        ]
        assert os.listdir(self.maildir() / "tmp") == []

    def test_a_failed_first_syncfs_fails_the_whole_group_and_leaves_nothing(self) -> None:
        self.warm_up()
        self.syncfs.error = OSError(errno.EIO, "Input/output error")
        self.syncfs.fail_on_call = 1
        doomed = self.start(b"lost\n", ALICE, BOB)
        self.runner.run_one()
        failure_of(doomed, DeliveryError)
        self.flushLoggedErrors(OSError)  # type: ignore[no-untyped-call]
        for who in (ALICE, BOB):
            assert [p.read_bytes() for p in (self.maildir(who) / "new").iterdir()] == [b"warm up\n"]
            assert os.listdir(self.maildir(who) / "tmp") == []

    def test_a_failed_second_syncfs_rolls_the_renames_back(self) -> None:
        self.warm_up()
        blocker = self.start(b"blocker\n")
        doomed = [self.start(b"a\n"), self.start(b"b\n", BOB)]
        self.runner.run_one()
        self.successResultOf(blocker)
        self.syncfs.calls.clear()
        self.syncfs.error = OSError(errno.EIO, "Input/output error")
        self.syncfs.fail_on_call = 2
        self.runner.run_one()
        for d in doomed:
            failure_of(d, DeliveryError)
        self.flushLoggedErrors(OSError)  # type: ignore[no-untyped-call]
        alice = sorted(p.read_bytes() for p in (self.maildir() / "new").iterdir())
        assert alice == [b"blocker\n", b"warm up\n"]
        assert [p.read_bytes() for p in (self.maildir(BOB) / "new").iterdir()] == [b"warm up\n"]
        assert os.listdir(self.maildir() / "tmp") == []

    def test_a_filesystem_not_known_to_honour_syncfs_gets_per_file_fsyncs(self) -> None:
        self.warm_up()
        self.fs_type = TMPFS  # say, FUSE or NFS: syncfs may not reach the backing store
        self.flush._covered.clear()
        d = self.start(b"one\n")
        self.runner.run_one()
        self.successResultOf(d)
        assert self.syncfs.calls == []
        assert self.fsync.calls == 2  # the file and new/

    def test_after_a_slow_syncfs_groups_use_per_file_fsyncs_until_it_is_fast(self) -> None:
        self.warm_up()
        self.syncfs.takes = 0.5
        d = self.start(b"slow\n")
        self.runner.run_one()
        self.successResultOf(d)
        self.syncfs.takes = 0.0
        calls = len(self.syncfs.calls)
        d = self.start(b"next\n")
        self.runner.run_one()
        self.successResultOf(d)
        assert len(self.syncfs.calls) == calls
        assert self.fsync.calls == 2  # the file and new/
        self.clock.now += 2
        d = self.start(b"during the probe\n")
        self.runner.run_one()
        self.successResultOf(d)
        assert self.fsync.calls == 4
        self.probes.run()
        d = self.start(b"later\n")
        self.runner.run_one()
        self.successResultOf(d)
        assert len(self.syncfs.calls) == calls + 1 + 2  # the probe, then the group's two
        assert self.fsync.calls == 4


BOOT = "0123456789ab"
EARLIER_BOOT = "ba9876543210"


class RecoverableGroupCommitTests(_GroupCommitCase):
    """With a boot id: one syncfs per group, copies hard-linked into new/ under names a
    later boot recovers after a crash."""

    boot = BOOT

    def tmp_names(self, who: Address = ALICE) -> list[str]:
        return sorted(os.listdir(self.maildir(who) / "tmp"))

    def test_a_group_takes_one_syncfs_and_its_copies_keep_a_recoverable_name(self) -> None:
        self.warm_up()
        blocker = self.start(b"blocker\n")
        group = [self.start(b"one\n"), self.start(b"two\n", ALICE, BOB)]
        self.runner.run_one()
        self.successResultOf(blocker)
        self.syncfs.calls.clear()
        self.syncfs.watch = self.maildir() / "new"
        self.runner.run_one()
        assert len({self.successResultOf(d) for d in group}) == 2
        assert self.fsync.calls == 0
        assert len(self.syncfs.calls) == 1
        assert len(self.syncfs.seen[0]) == 2  # new/ untouched when the data became durable
        new = sorted((self.maildir() / "new").iterdir())
        assert sorted(p.read_bytes() for p in new) == [
            b"blocker\n",
            b"one\n",
            b"two\n",
            b"warm up\n",
        ]
        names = self.tmp_names()
        assert len(names) == 2  # the group's copies, still linked: its links are not durable
        for name in names:
            base, mark = name.split(",J=")
            assert mark.startswith(BOOT + "-")
            assert os.path.samefile(self.maildir() / "new" / base, self.maildir() / "tmp" / name)
            assert (self.maildir() / "tmp" / name).read_bytes() in (b"one\n", b"two\n")

    def test_the_tmp_names_go_after_the_next_syncfs_under_load_or_when_idle(self) -> None:
        self.warm_up()
        blocker = self.start(b"blocker\n")
        first = self.start(b"first\n")
        self.runner.run_one()
        self.successResultOf(blocker)
        assert len(self.tmp_names()) == 1  # the blocker's
        self.runner.run_one()  # the next group: its syncfs covers the blocker's link
        self.successResultOf(first)
        names = self.tmp_names()
        assert len(names) == 1 and names[0].split(",J=")[0] in os.listdir(self.maildir() / "new")
        assert len(self.runner.jobs) == 1  # nothing waiting: retire at once
        calls = len(self.syncfs.calls)
        self.runner.run_one()
        assert len(self.syncfs.calls) == calls + 1
        assert self.tmp_names() == []
        assert self.runner.jobs == []
        assert sorted(p.read_bytes() for p in (self.maildir() / "new").iterdir()) == [
            b"blocker\n", b"first\n", b"warm up\n",
        ]  # fmt: skip

    def one_group_on_a_clock(self) -> Clock:
        """Warmed up, a reactor clock for the store, and the group "one" committed."""
        self.warm_up()
        clock = Clock()
        self.store._clock = clock
        self.start(b"one\n")
        self.runner.run_one()
        return clock

    def test_with_a_clock_the_retiring_waits_for_a_quiet_moment(self) -> None:
        from mailgate.store.maildir import RETIRE_DELAY

        clock = self.one_group_on_a_clock()
        assert self.runner.jobs == []  # not at once
        clock.advance(RETIRE_DELAY / 2)
        d = self.start(b"two\n")  # a delivery within the delay ...
        self.runner.run_one()
        self.successResultOf(d)
        assert len(self.tmp_names()) == 1  # ... retired "one" with its own syncfs
        assert len(clock.getDelayedCalls()) == 1  # one timer, whatever the deliveries
        clock.advance(RETIRE_DELAY / 2)  # it fires: "two" waits, at most this long
        assert len(self.runner.jobs) == 1
        self.runner.run_one()
        assert self.tmp_names() == []
        assert clock.getDelayedCalls() == []

    def test_a_copy_that_could_not_be_marked_gets_renames_and_two_syncfs(self) -> None:
        self.warm_up()
        patch(self, self.store, "syncfs_covers", lambda maildir: False)  # say, EMFILE
        d = self.start(b"plain\n")
        self.runner.run_one()
        self.successResultOf(d)
        assert len(self.syncfs.calls) == 2  # acknowledged only once new/ is durable
        assert self.tmp_names() == [] and self.store._linked == []

    def test_a_stop_retires_what_is_pending(self) -> None:
        clock = self.one_group_on_a_clock()
        assert len(self.tmp_names()) == 1 and len(clock.getDelayedCalls()) == 1
        stopping = self.store.retire_pending()
        assert stopping is not None and clock.getDelayedCalls() == []
        self.runner.run_one()
        self.successResultOf(stopping)
        assert self.tmp_names() == []
        assert self.store.retire_pending() is None  # nothing left

    def test_a_delivery_waits_for_a_retiring_in_progress_then_runs(self) -> None:
        self.warm_up()
        self.start(b"one\n")
        self.runner.run_one()
        assert len(self.runner.jobs) == 1  # the retiring
        d = self.start(b"two\n")
        assert len(self.runner.jobs) == 1  # queued behind it, not beside it
        self.runner.run_one()
        assert len(self.runner.jobs) == 1
        self.runner.run_one()
        self.successResultOf(d)

    def test_after_a_failed_syncfs_pending_names_are_left_to_the_next_boot(self) -> None:
        self.warm_up()
        self.start(b"one\n")
        self.runner.run_one()
        self.syncfs.error = OSError(errno.EIO, "Input/output error")
        self.runner.run_one()  # the retiring's syncfs fails
        self.flushLoggedErrors(OSError)  # type: ignore[no-untyped-call]
        (kept,) = self.tmp_names()
        self.syncfs.error = None
        self.flush._per_file = False  # syncfs back (as the probe would find)
        d = self.start(b"two\n")
        self.runner.run_one()
        self.successResultOf(d)
        while self.runner.jobs:
            self.runner.run_one()
        # A later syncfs may succeed without the lost writes: never retired on its word.
        assert self.tmp_names() == [kept]
        drop = self.open(ALICE, self.fresh_store(EARLIER_BOOT))
        assert sorted(m.size for m in drop.messages) == [5, 5, 9]  # "one" not twice
        assert self.tmp_names() == []

    def test_per_file_fsyncs_after_syncfs_groups_retire_their_tmp_names(self) -> None:
        self.warm_up()
        self.start(b"one\n")
        self.runner.run_one()
        self.syncfs.takes = 0.5  # the retiring's syncfs is slow: per-file from now on
        self.runner.run_one()
        self.syncfs.takes = 0.0
        assert self.tmp_names() == []  # that syncfs did succeed
        d = self.start(b"two\n")
        self.runner.run_one()
        self.successResultOf(d)
        assert self.tmp_names() == []
        assert self.fsync.calls == 2  # the file and new/

    def blocker_then_next(self) -> Deferred[str]:
        """A group to ALICE and BOB committed, and one more delivery waiting behind it."""
        self.warm_up()
        blocker = self.start(b"blocker\n", ALICE, BOB)
        d = self.start(b"next\n")
        self.runner.run_one()
        self.successResultOf(blocker)
        return d

    def test_names_go_only_after_a_syncfs_that_followed_their_links(self) -> None:
        d = self.blocker_then_next()
        (alice_copy,) = self.tmp_names()
        assert len(self.tmp_names(BOB)) == 1
        self.syncfs.watch = self.maildir() / "tmp"
        self.runner.run_one()  # the next group
        self.successResultOf(d)
        (seen,) = self.syncfs.seen
        assert alice_copy in seen  # still there when the syncfs covering its link ran
        assert alice_copy not in self.tmp_names()  # gone after it
        assert self.tmp_names(BOB) == []  # every recipient's copy

    def test_a_per_file_group_retires_the_syncfs_groups_before_it(self) -> None:
        d = self.blocker_then_next()
        self.flush._per_file = True  # fell back (say, a slow syncfs elsewhere) ...
        self.flush._next_probe = self.clock.now + 1000  # ... and no probe due yet
        self.runner.run_one()
        self.successResultOf(d)
        assert self.tmp_names() == [] and self.tmp_names(BOB) == []
        assert self.fsync.calls == 2 + 2  # this group's file and new/; then both new/
        assert self.runner.jobs == []

    def test_a_link_that_fails_rolls_back_every_copy(self) -> None:
        self.warm_up()
        real_link = os.link

        def link(src: str, dst: str) -> None:
            if "/bob/" in dst and "/new/" in dst:
                raise OSError(errno.EMLINK, "Too many links")
            real_link(src, dst)

        blocker = self.start(b"blocker\n")
        d = self.start(b"both\n", ALICE, BOB)
        self.runner.run_one()
        self.successResultOf(blocker)
        patch(self, os, "link", link)
        self.runner.run_one()
        failure_of(d, DeliveryError)
        self.flushLoggedErrors(OSError)  # type: ignore[no-untyped-call]
        for who in (ALICE, BOB):
            assert all(b"both" not in p.read_bytes() for p in (self.maildir(who) / "new").iterdir())
        assert not any(
            b"both" in (self.maildir() / "tmp" / n).read_bytes() for n in self.tmp_names()
        )
        assert self.tmp_names(BOB) == []
        # ALICE's new/, then both tmp/: a removal a crash undid would be recovered later.
        assert self.fsync.calls == 3

    def test_a_message_deleted_before_its_name_was_retired_stays_deleted(self) -> None:
        self.warm_up()
        self.start(b"doomed\n")
        self.runner.run_one()
        self.runner.jobs.clear()  # the process is killed before it retires the name
        assert len(self.tmp_names()) == 1
        drop = self.open(ALICE, self.fresh_store())
        doomed = [i for i, m in enumerate(drop.messages) if m.size == 8]
        assert len(doomed) == 1
        assert self.successResultOf(drop.commit(doomed)) == 0
        assert self.tmp_names() == []
        later = self.open(ALICE, self.fresh_store(EARLIER_BOOT))  # after a reboot
        assert [m.size for m in later.messages] == [9]  # "warm up" only

    def test_without_a_boot_id_old_marked_copies_are_kept_not_swept(self) -> None:
        self.seed_copy(b"saved\n")
        old = self.maildir() / "tmp" / self.tmp_names()[0]
        os.utime(old, (1_000_000, 1_000_000))
        with capturedLogs() as events:
            drop = self.open(ALICE, self.fresh_store(None))
        assert len(drop.messages) == 0
        assert old.exists()
        assert any("boot id unknown" in str(e.get("log_format")) for e in events)

    def test_recovery_keeps_the_only_counted_link_of_a_delivered_copy(self) -> None:
        base = self.seed_copy(b"saved\n")
        (copy,) = self.tmp_names()
        os.link(self.maildir() / "tmp" / copy, self.maildir() / "new" / base)
        real_stat = os.stat

        def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
            st = real_stat(path, *args, **kwargs)  # type: ignore[arg-type]
            fields = list(st)
            fields[3] = 1  # st_nlink as after a crash on a journal-less filesystem
            return os.stat_result(fields)

        patch(self, os, "stat", stat)
        with capturedLogs() as events:
            self.fresh_store().recover_all()
        patch(self, os, "stat", real_stat)
        assert self.tmp_names() == [copy]  # unlinking it would free the message
        assert any("run fsck" in str(e.get("log_format")) for e in events)

    def test_recovery_waits_when_cur_cannot_be_listed(self) -> None:
        self.seed_copy(b"saved\n")
        real_listdir = os.listdir

        def listdir(path: str) -> list[str]:
            if str(path).endswith("/cur"):
                raise OSError(errno.EIO, "Input/output error")
            return real_listdir(path)

        patch(self, os, "listdir", listdir)
        self.fresh_store().recover_all()
        patch(self, os, "listdir", real_listdir)
        assert os.listdir(self.maildir() / "new") == []
        assert len(self.tmp_names()) == 1

    def seed_copy(self, data: bytes, boot: str = EARLIER_BOOT, crc: int | None = None) -> str:
        import zlib

        md = self.maildir()
        for sub in ("new", "cur", "tmp"):
            (md / sub).mkdir(parents=True, exist_ok=True)
        base = f"1700000000.M1P2Q3.test.host,S={len(data)},W={len(data) + 1}"
        checksum = zlib.crc32(data) if crc is None else crc
        (md / "tmp" / f"{base},J={boot}-{checksum:08x}").write_bytes(data)
        return base

    def fresh_store(self, boot: str | None = BOOT) -> MaildirStore:
        """The store of a process started later (by default, in the boot BOOT)."""
        return MaildirStore(str(self.root), run_sync, hostname="h", boot=boot)

    def test_a_copy_an_earlier_boot_acknowledged_is_delivered(self) -> None:
        base = self.seed_copy(b"saved\n")
        with capturedLogs() as events:
            drop = self.open(ALICE, self.fresh_store())
        assert [m.size for m in drop.messages] == [7]
        assert drop.open_message(0).read() == b"saved\n"
        assert (self.maildir() / "new" / base).exists()
        assert self.tmp_names() == []
        assert any("recovered {n} messages" in str(e.get("log_format")) for e in events)

    def test_the_master_recovers_every_maildir_at_start_up(self) -> None:
        base = self.seed_copy(b"saved\n")
        (self.root / ".incoming").mkdir()
        (self.root / "example.org" / "nobody").mkdir()  # no Maildir in it
        self.fresh_store().sweep_stale()
        assert (self.maildir() / "new" / base).read_bytes() == b"saved\n"
        assert self.tmp_names() == []

    def test_a_copy_already_in_cur_is_not_delivered_twice(self) -> None:
        base = self.seed_copy(b"saved\n")
        (self.maildir() / "cur" / f"{base}:2,S").write_bytes(b"saved\n")
        drop = self.open(ALICE, self.fresh_store())
        assert len(drop.messages) == 1
        assert self.tmp_names() == []

    def test_a_copy_whose_content_does_not_match_is_dropped(self) -> None:
        self.seed_copy(b"torn\n", crc=12345)
        drop = self.open(ALICE, self.fresh_store())
        assert len(drop.messages) == 0
        assert self.tmp_names() == []

    def test_a_copy_of_this_boot_is_left_to_the_process_writing_it(self) -> None:
        self.seed_copy(b"in flight\n", boot=BOOT)
        drop = self.open(ALICE, self.fresh_store())
        assert len(drop.messages) == 0
        assert len(self.tmp_names()) == 1


def test_the_boot_id_is_twelve_hex_digits_or_unknown(tmp_path: Path) -> None:
    real = fileio.boot_id()
    assert real is None or (len(real) == 12 and int(real, 16) >= 0)
    good = tmp_path / "good"
    good.write_text("0123abcd-ef01-2345-6789-abcdef012345\n")
    assert fileio.boot_id(str(good)) == "0123abcdef01"
    bad = tmp_path / "bad"
    bad.write_text("not an id\n")
    assert fileio.boot_id(str(bad)) is None
    assert fileio.boot_id(str(tmp_path / "missing")) is None


def test_the_default_probe_runs_in_a_thread_of_its_own(tmp_path: Path) -> None:
    clock = FakeClock()
    release = threading.Event()
    probed: list[str] = []

    def syncfs(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            probed.append(threading.current_thread().name)
            release.wait(timeout=10)
        else:
            clock.now += 1.0  # slow

    flush = FilesystemFlush(syncfs, adaptive=True, probe_path=str(tmp_path), clock=clock)
    flush.flush([5])
    clock.now += 5
    assert not flush.active()  # starts the probe, answers for this group at once
    (probe,) = [t for t in threading.enumerate() if t.name == "mailgate-syncfs-probe"]
    assert probe.daemon
    assert not flush.active()  # the probe has not answered yet
    release.set()
    probe.join(timeout=10)
    assert probed == ["mailgate-syncfs-probe"]
    assert flush.active()


def test_a_probe_that_cannot_start_is_tried_again_later(tmp_path: Path) -> None:
    clock = FakeClock()
    syncfs = RecordingSyncfs(clock)
    starts: list[object] = []

    def no_threads(probe: Callable[[], None]) -> None:
        starts.append(probe)
        raise RuntimeError("can't start new thread")

    flush = FilesystemFlush(
        syncfs, adaptive=True, probe_path=str(tmp_path), clock=clock, start_probe=no_threads
    )
    syncfs.takes = 1.0
    flush.flush([5])
    clock.now += 5
    with capturedLogs() as events:
        assert not flush.active()  # no exception reaches the group commit
    assert len(starts) == 1
    assert any("cannot start the syncfs probe" in str(e["log_format"]) for e in events)
    assert not flush.active()
    assert len(starts) == 1  # not at once ...
    clock.now += 2
    assert not flush.active()
    assert len(starts) == 2  # ... but a retry later


def test_the_filesystem_type_is_read_and_kept_per_device(tmp_path: Path) -> None:
    seen: list[int] = []

    def fs_type(fd: int) -> int:
        seen.append(fd)
        return EXT4

    flush = FilesystemFlush(lambda fd: None, adaptive=True, fs_type=fs_type)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        device = os.fstat(fd).st_dev
        assert flush.covers(device, fd) and flush.covers(device, fd)
        assert isinstance(fileio.filesystem_type(fd), int)  # the real statfs answers
    finally:
        os.close(fd)
    assert len(seen) == 1
    assert fileio.filesystem_type(-1) is None
