"""How a group commit makes its messages durable: one syncfs(2) per filesystem.

A group of N small deliveries made durable file by file costs N file fsyncs plus one per
``new/`` directory, each a separate write of an inode and a device cache flush. One
``syncfs`` of the filesystem covers every file and directory of the group at once: the
group needs two (the copies in ``tmp/``, then their renames into ``new/``), whatever N is.
Every message is still on stable storage before its acknowledgement.

The price is that a syncfs also writes whatever else is dirty on that filesystem. With the
mail root on a filesystem of its own that is only mail; next to a busy writer (a backup, a
database) an acknowledgement could wait for that writer's backlog. The adaptive mode (the
``fsync = "auto"`` default) watches for it: a syncfs slower than ``slow`` seconds sends the
process back to per-file fsyncs for ``back_off`` seconds, then it tries again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from twisted.logger import Logger

_log = Logger()

#: A syncfs this slow (seconds) means someone else's backlog: per-file fsyncs for a while.
SLOW = 0.025
#: How long (seconds) a slow or failed syncfs keeps the process on per-file fsyncs.
BACK_OFF = 30.0


class FilesystemFlush:
    """Flush the filesystems a group commit wrote to; thread-safe enough for the pool
    (one group in flight per store, and a lost back-off update only delays a back-off)."""

    def __init__(
        self,
        syncfs: Callable[[int], None],
        *,
        adaptive: bool,
        clock: Callable[[], float] = time.monotonic,
        slow: float = SLOW,
        back_off: float = BACK_OFF,
    ) -> None:
        self._syncfs = syncfs
        self.adaptive = adaptive
        self._clock = clock
        self._slow = slow
        self._back_off = back_off
        self._per_file_until = float("-inf")

    def active(self) -> bool:
        """Whether the next group should use syncfs (else per-file fsyncs)."""
        return not self.adaptive or self._clock() >= self._per_file_until

    def flush(self, fds: Iterable[int]) -> None:
        """syncfs each fd's filesystem (one fd per filesystem); OSError if any fails."""
        start = self._clock()
        try:
            for fd in fds:
                self._syncfs(fd)
        except OSError as e:
            if self.adaptive:
                self._per_file_until = self._clock() + self._back_off
                _log.warn(
                    "syncfs failed ({error}); per-file fsyncs for {seconds:.0f} s",
                    error=e,
                    seconds=self._back_off,
                )
            raise
        took = self._clock() - start
        if self.adaptive and took > self._slow:
            self._per_file_until = self._clock() + self._back_off
            _log.info(
                "syncfs took {ms:.0f} ms (other writers on the mail filesystem); "
                "per-file fsyncs for {seconds:.0f} s",
                ms=took * 1000,
                seconds=self._back_off,
            )
