"""How a group commit makes its messages durable: one syncfs(2) per filesystem.

A group of N small deliveries made durable file by file costs N file fsyncs plus one per
``new/`` directory, each a separate write of an inode and a device cache flush. One
``syncfs`` of the filesystem covers every file and directory of the group at once: the
group needs one (its copies in ``tmp/``, named so that a later boot recovers them, see
``maildir._durable_by_filesystem``), whatever N is. Every message is still on stable
storage before its acknowledgement.

The price is that a syncfs also writes whatever else is dirty on that filesystem. With the
mail root on a filesystem of its own that is only mail; next to a busy writer (a backup, a
database) an acknowledgement could wait for that writer's backlog. The adaptive mode (the
``fsync = "auto"`` default) watches for it: a syncfs slower than ``slow`` seconds sends the
process back to per-file fsyncs, and a probe off the delivery path (a syncfs of the mail
root in a thread of its own, at most once a ``retry`` seconds, acknowledging nothing) says
when syncfs is fast again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable

from twisted.logger import Logger

from mailgate.fileio import filesystem_type

_log = Logger()

#: A syncfs this slow (seconds) means someone else's backlog: per-file fsyncs for a while.
SLOW = 0.025
#: Seconds between two probes while on per-file fsyncs.
RETRY = 1.0


#: Filesystems (statfs f_type) whose syncfs writes back and commits everything an fsync of
#: each file and directory would: ext2/3/4, XFS, Btrfs, F2FS. Not FUSE (only virtiofs
#: passes syncfs to its daemon), NFS or CIFS (an fsync there is a request to the server,
#: a syncfs may not be), nor anything unknown: those keep per-file fsyncs.
FILESYSTEMS = frozenset({0xEF53, 0x58465342, 0x9123683E, 0xF2F52010})


def _in_daemon_thread(probe: Callable[[], None]) -> None:
    threading.Thread(target=probe, name="mailgate-syncfs-probe", daemon=True).start()


class FilesystemFlush:
    """Flush the filesystems a group commit wrote to; thread-safe enough for the pool
    (one group in flight per store, and a lost update only delays a switch)."""

    def __init__(
        self,
        syncfs: Callable[[int], None],
        *,
        adaptive: bool,
        probe_path: str = ".",
        clock: Callable[[], float] = time.monotonic,
        slow: float = SLOW,
        retry: float = RETRY,
        start_probe: Callable[[Callable[[], None]], None] = _in_daemon_thread,
        fs_type: Callable[[int], int | None] = filesystem_type,
    ) -> None:
        self._syncfs = syncfs
        self.adaptive = adaptive
        self._probe_path = probe_path
        self._clock = clock
        self._slow = slow
        self._retry = retry
        self._start_probe = start_probe
        self._fs_type = fs_type
        self._covered: dict[int, bool] = {}
        self._per_file = False
        self._probing = False
        self._next_probe = 0.0

    def active(self) -> bool:
        """Whether the next group should use syncfs (else per-file fsyncs). Never raises."""
        if not self._per_file:
            return True
        if not self._probing and self._clock() >= self._next_probe:
            self._probing = True
            try:
                self._start_probe(self._probe)
            except Exception as e:  # e.g. no thread to be had: try again later
                self._probing = False
                self._next_probe = self._clock() + self._retry
                _log.warn("cannot start the syncfs probe: {error}", error=e)
        return False

    def covers(self, device: int, fd: int) -> bool:
        """Whether syncfs is known to make ``device`` (``fd`` is open on it) durable (see
        FILESYSTEMS); the answer is kept per device."""
        known = self._covered.get(device)
        if known is None:
            known = self._covered[device] = self._fs_type(fd) in FILESYSTEMS
        return known

    def flush(self, fds: Iterable[int]) -> None:
        """syncfs each fd's filesystem (one fd per filesystem); OSError if any fails."""
        start = self._clock()
        try:
            for fd in fds:
                self._syncfs(fd)
        except OSError as e:
            self._fall_back(f"syncfs failed ({e})")
            raise
        took = self._clock() - start
        if took > self._slow:
            self._fall_back(
                f"syncfs took {took * 1000:.0f} ms (other writers on the mail filesystem)"
            )

    def _fall_back(self, why: str) -> None:
        if not self.adaptive or self._per_file:
            return
        self._per_file = True
        self._next_probe = self._clock() + self._retry
        _log.info("{why}; per-file fsyncs until syncfs is fast again", why=why)

    def _probe(self) -> None:
        """Off the delivery path: time one syncfs of the mail root's filesystem."""
        try:
            fd = os.open(self._probe_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                start = self._clock()
                self._syncfs(fd)
                # Half the threshold to come back: no flapping on a disk near it.
                fast = self._clock() - start <= self._slow / 2
            finally:
                os.close(fd)
        except OSError:
            fast = False
        if fast:
            self._per_file = False
            _log.info("syncfs is fast again: one syncfs per group commit")
        else:
            self._next_probe = self._clock() + self._retry
        self._probing = False
