"""Maildir mailboxes: local delivery and locked POP3 snapshots.

Layout: ``ROOT/<domain>/<local>/Maildir/{new,cur,tmp}`` plus, in each Maildir,
``mailgate.lock`` (the POP3 session lock, ``flock``) and ``mailgate-uidlist`` (stable UIDs).
Every message file name carries ``,S=<file size>,W=<wire size>`` so STAT/LIST never read a
message, and the wire size is what RETR sends (CRLF line ends, before dot-stuffing).

Delivery keeps a message of up to MEMORY_LIMIT octets in memory; ``finish()``, in the thread
runner, writes and fsyncs it in the first recipient's ``tmp/``, hard-links it into the other
recipients' ``tmp/``, renames each into ``new/`` (the Maildir protocol) and fsyncs ``new/``,
for every message waiting at once (group commit; optionally with syncfs, see flush.py).
A larger message streams into a spool file under ``ROOT/.incoming`` (same filesystem),
linked the same way on ``finish()``. Nothing touches the disk on the reactor thread except
buffered writes to that spool file and opening it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import io
import itertools
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import IO, Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from mailgate.errors import (
    AddressError,
    DeliveryError,
    MaildropInUse,
    MaildropUnavailable,
)
from mailgate.fileio import boot_id, write_all
from mailgate.interfaces import IMaildrop, IMailStore, IMessageSink, ThreadRunner
from mailgate.model import Address, Envelope, MessageInfo
from mailgate.store.flush import FilesystemFlush
from mailgate.wire import starts_dot_line, wire_size_of_file

_log = Logger()

LOCK_NAME = "mailgate.lock"
UIDLIST_NAME = "mailgate-uidlist"
SPOOL_NAME = ".incoming"
#: Age after which a leftover partial delivery is garbage (the Maildir rule for tmp/: 36 h).
STALE_AGE = 36 * 3600.0

# Process-wide, so two store instances in one process never produce the same name.
_counter = itertools.count(1)

#: A message up to this size is kept in memory until finish(); larger ones stream to a file.
MEMORY_LIMIT = 64 * 1024

#: Messages whose scan results a store keeps for later logins (about 300 bytes each).
DEFAULT_CACHE_MESSAGES = 500_000

_UNSAFE_CHARS = ("/", "\\", "%", "\x00")
_SIZE_FIELD = re.compile(r",([SW])=(\d+)(?=,|$)")
_OUR_NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.")
_LEADING_SECS = re.compile(r"^(\d+)")
#: A delivery time in a Maildir name: Unix seconds (2001 onwards) then a dot.
_NAME_TIME = re.compile(r"^(\d{10})\.")
#: In the names of our own deliveries: no line of the message starts with "." (RETR and
#: TOP then skip the dot-stuffing search, a third of their CPU per megabyte).
DOT_FREE = ",D=0"
#: MaildirStore's ``boot`` default: this boot's id, read from the kernel.
THIS_BOOT = "this boot"
#: A group-committed copy's name in tmp/: ``<final name>,J=<boot>-<crc32>`` (see
#: :func:`_durable_by_filesystem`). It names the boot that wrote it and the checksum of its
#: content, so that after a crash a later boot can deliver it (see ``_recover``).
_RECOVERABLE = re.compile(r"^(?P<base>.+),J=(?P<boot>[0-9a-f]{12})-(?P<crc>[0-9a-f]{8})\Z")
_DOT_FREE = re.compile(r",D=0(?=,|$)")


def safe_component(part: str) -> str:
    """Refuse a path component that could escape or confuse the mail root."""
    if (
        not part
        or part in (".", "..")
        or part.startswith(".")
        or any(c in part for c in _UNSAFE_CHARS)
    ):
        raise AddressError(f"unsafe mailbox path component {part!r}")
    return part


def _sanitised_host(name: str) -> str:
    """Host part of a Maildir name: no '/', ':' or ',' (they mean something in the name)."""
    out = []
    for c in name or "localhost":
        if c == "/":
            out.append("\\057")
        elif c == ":":
            out.append("\\072")
        elif c == ",":
            out.append("\\054")
        elif 0x21 <= ord(c) < 0x7F and c != "\\":
            out.append(c)
        else:
            out.append(f"\\{ord(c):03o}")
    return "".join(out)


def size_field(base: str, key: str) -> int | None:
    """The ``,S=`` or ``,W=`` value of a Maildir base name, if present."""
    for m in _SIZE_FIELD.finditer(base):
        if m.group(1) == key:
            return int(m.group(2))
    return None


def _delivery_order(base: str) -> tuple[int, int, int, str]:
    """Sort key that puts messages in delivery order, our names first by time then counter."""
    m = _OUR_NAME.match(base)
    if m:
        return (int(m.group(1)), int(m.group(2)), int(m.group(4)), base)
    m = _LEADING_SECS.match(base)
    return (int(m.group(1)) if m else 0, 0, 0, base)


_FIELD_MAX = 2**64 - 1


def _delivery_rank(base: str, _match: Callable[[str], Any] = _OUR_NAME.match) -> int:
    """:func:`_delivery_order` without the base, packed into one int (compares ~2x faster
    than a tuple over 100,000 names). Fields beyond 64 bits, which no real name has, are
    clamped; sort the names first so equal ranks keep the base-name order."""
    m = _match(base)
    if m:
        secs, usec, _, q = m.groups()
        return (int(secs) << 128) | (min(int(usec), _FIELD_MAX) << 64) | min(int(q), _FIELD_MAX)
    m = _LEADING_SECS.match(base)
    return int(m.group(1)) << 128 if m else 0


def in_delivery_order(bases: Collection[str]) -> list[str]:
    """``bases`` sorted by :func:`_delivery_order` (ties by name).

    Names that start with ten digits of seconds and a dot (every name delivered since
    2001) already sort by those seconds as plain strings, so only runs that share a
    second need the full key: 100,000 names sort ~5x faster than through the key alone.
    """
    ordered = sorted(bases)
    result: list[str] = []
    start, count = 0, len(ordered)
    while start < count:
        head = ordered[start][:11]
        if not (len(head) == 11 and head[10] == "." and head[:10].isdigit()):
            return sorted(ordered, key=_delivery_rank)  # other names: the general order
        end = start + 1
        while end < count and ordered[end].startswith(head):
            end += 1
        if end - start == 1:
            result.append(ordered[start])
        else:
            result.extend(sorted(ordered[start:end], key=_delivery_rank))
        start = end
    return result


def _is_candidate(name: str) -> bool:
    return not name.startswith(".") and "\n" not in name and "\r" not in name


@implementer(IMailStore)
class MaildirStore:
    """Maildirs under ``root`` (STATE_DIR/mail). ``fsync`` is injectable so tests can see it."""

    def __init__(
        self,
        root: FilePath[str] | str,
        run_in_thread: ThreadRunner,
        *,
        hostname: str | None = None,
        fsync: Callable[[int], None] = os.fsync,
        group_flush: FilesystemFlush | None = None,
        cache_messages: int = DEFAULT_CACHE_MESSAGES,
        boot: str | None = THIS_BOOT,
        clock: IReactorTime | None = None,
    ) -> None:
        self.root = os.path.abspath(root.path if isinstance(root, FilePath) else root)
        self.spool = os.path.join(self.root, SPOOL_NAME)
        self._run = run_in_thread
        self._host = _sanitised_host(hostname if hostname is not None else socket.gethostname())
        self._fsync = fsync
        #: How a group commit makes its files durable: None is an fsync per file and per
        #: new/ directory; a FilesystemFlush is one syncfs per filesystem (see flush.py).
        self.group_flush = group_flush
        #: This boot's id (fileio.boot_id; None: unknown). Group commits by syncfs need it
        #: to name their copies in tmp/ so that a later boot can recover them.
        self.boot = boot_id() if boot == THIS_BOOT else boot
        #: Copies in tmp/ a syncfs group commit hard-linked into new/, per group: the
        #: devices that group flushed and the tmp/ names. Unlinked once a later syncfs has
        #: made the links durable (see _retire_linked). Only the one commit job in flight
        #: touches it.
        self._linked: list[tuple[frozenset[int], list[str]]] = []
        self._syncfs_covered: dict[str, bool] = {}
        #: Delays retiring when idle (RETIRE_DELAY) so that under load the next group's
        #: syncfs does it; None: at once.
        self._clock = clock
        self._retire_call: IDelayedCall | None = None
        # Maildir -> its last scan (see _MaildirState), least recently used first.
        self._states: OrderedDict[str, _MaildirState] = OrderedDict()
        self._states_lock = threading.Lock()
        self._cached_messages = 0  # messages in all of _states
        self.cache_messages = cache_messages
        #: Small deliveries waiting for the next group commit, and whether one is running.
        self._pending: list[tuple[MaildirDelivery, bytes, int, Deferred[str]]] = []
        self._committing = False
        #: Maildirs this process has seen complete (new, cur, tmp); a failed delivery or
        #: scan forgets them all, so a directory removed meanwhile is made again.
        self._complete: set[str] = set()

    def sweep_stale(self, max_age: float = STALE_AGE, now: float | None = None) -> int:
        """Remove what crashed deliveries left in ``.incoming`` (start-up, master only),
        then recover every Maildir's copies from an earlier boot (see recover_all).

        Only files older than ``max_age`` (36 h, the Maildir convention for tmp/) go, so a
        delivery another process is writing right now is never touched. Returns the count.
        """
        cutoff = (time.time() if now is None else now) - max_age
        removed = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.spool):
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            _log.info(
                "removed {n} stale partial deliveries from {path}", n=removed, path=self.spool
            )
        self.recover_all()
        return removed

    def recover_all(self) -> None:
        """Recover every Maildir's copies from an earlier boot (start-up, master only), so
        that another reader of the Maildirs sees them too; a process also does it for each
        Maildir it first uses (see _recover)."""
        if self.boot is None:
            return
        for domain in _listing(self.root, quiet=True):
            if domain.startswith("."):
                continue
            for local in _listing(os.path.join(self.root, domain), quiet=True):
                maildir = os.path.join(self.root, domain, local, "Maildir")
                if os.path.isdir(os.path.join(maildir, "tmp")):
                    self._sweep_tmp(maildir)

    # -- paths ---------------------------------------------------------------------------

    def maildir_path(self, address: Address) -> str:
        """``ROOT/domain/local/Maildir``; AddressError for anything path-unsafe."""
        path = os.path.join(
            self.root, safe_component(address.domain), safe_component(address.local), "Maildir"
        )
        if not os.path.normpath(path).startswith(self.root + os.sep):
            raise AddressError("mailbox path escapes the mail root")
        return path

    # -- blocking helpers (thread runner only) -------------------------------------------

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def ensure_maildir(self, maildir: str) -> None:
        """Create ``new``, ``cur`` and ``tmp`` on demand, durably (checked once per process
        and Maildir: three stats per login or delivery were a measurable share of both)."""
        if maildir in self._complete:
            return
        if all(os.path.isdir(os.path.join(maildir, sub)) for sub in ("new", "cur", "tmp")):
            self._sweep_tmp(maildir)
            self._complete.add(maildir)
            return
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
        # Make the new directory entries themselves durable, up to the root.
        path = maildir
        while True:
            self.fsync_dir(path)
            if path == self.root or len(path) <= len(self.root):
                break
            path = os.path.dirname(path)
        self._complete.add(maildir)

    def _sweep_tmp(self, maildir: str, max_age: float = STALE_AGE) -> int:
        """Remove what a crash left in ``tmp/`` (files older than 36 h, the Maildir rule),
        once per process and Maildir: a delivery in progress is never that old. Copies an
        earlier boot's group commit marked are recovered instead (see _recover)."""
        cutoff = time.time() - max_age
        removed = 0
        earlier_boot: list[tuple[str, re.Match[str]]] = []
        with contextlib.suppress(OSError), os.scandir(os.path.join(maildir, "tmp")) as it:
            for entry in it:
                mark = _RECOVERABLE.match(entry.name)
                if mark is not None and mark["boot"] != self.boot:
                    if self.boot is None:
                        # Never swept by age: it may be an acknowledged message.
                        _log.error(
                            "cannot tell whether {path} needs recovering: boot id unknown",
                            path=entry.path,
                        )
                    else:
                        earlier_boot.append((entry.path, mark))
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            _log.info("removed {n} stale files from {path}/tmp", n=removed, path=maildir)
        if earlier_boot:
            self._recover(maildir, earlier_boot)
        return removed

    def _recover(self, maildir: str, copies: list[tuple[str, re.Match[str]]]) -> None:
        """Deliver what a syncfs group commit of an earlier boot acknowledged but whose
        link into new/ a crash may have lost: a copy whose checksum holds and whose name is
        in neither new/ nor cur/ is linked into new/. A copy whose content does not match
        was never acknowledged (the crash came during its syncfs) and is removed."""
        new = os.path.join(maildir, "new")
        try:
            present = {name: os.path.join(new, name) for name in _listing(new)}
            cur = os.path.join(maildir, "cur")
            present.update((n.split(":", 1)[0], os.path.join(cur, n)) for n in _listing(cur))
        except OSError as e:  # not knowing what is there would deliver duplicates
            _log.error("cannot recover {path} yet: {error}", path=maildir, error=e)
            return
        recovered = 0
        done: list[str] = []
        for path, mark in copies:
            base = mark["base"]
            try:
                if base in present:
                    if _sole_link(path, present[base]):
                        # Both names, one link counted: a journal-less filesystem after a
                        # crash without fsck. Unlinking either would free the message.
                        _log.error("{path}: link count too low, run fsck", path=path)
                        continue
                else:
                    with open(path, "rb") as f:
                        data = f.read()
                    crc = int(mark["crc"], 16)
                    if size_field(base, "S") == len(data) and zlib.crc32(data) == crc:
                        try:
                            os.link(path, os.path.join(new, base))
                        except FileExistsError:
                            pass  # another process of this boot recovered it
                        recovered += 1
                    else:
                        _log.warn("removing {path}: incomplete, never acknowledged", path=path)
                done.append(path)
            except FileNotFoundError as e:
                if os.path.exists(path):  # not recovered meanwhile: new/ itself is missing
                    _log.error("cannot recover {path}: {error}", path=path, error=e)
            except OSError as e:
                _log.error("cannot recover {path}: {error}", path=path, error=e)
        try:
            if recovered:
                self.fsync_dir(new)  # the links are durable before the tmp/ names go
        except OSError as e:
            _log.error("cannot recover {path} yet: {error}", path=maildir, error=e)
            return
        for path in done:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if recovered:
            _log.info(
                "recovered {n} messages into {path}/new after a crash", n=recovered, path=maildir
            )

    def syncfs_covers(self, maildir: str) -> bool:
        """Whether a syncfs group commit would cover ``maildir`` (kept per Maildir)."""
        known = self._syncfs_covered.get(maildir)
        if known is None:
            flush = self.group_flush
            if flush is None:
                return False
            try:
                fd = os.open(os.path.join(maildir, "tmp"), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    known = flush.covers(os.fstat(fd).st_dev, fd)
                finally:
                    os.close(fd)
            except OSError:
                return False  # asked again next time
            self._syncfs_covered[maildir] = known
        return known

    def forget_maildirs(self) -> None:
        """After an I/O failure: check every Maildir's directories again on next use."""
        self._complete.clear()

    # -- group commit of small deliveries (reactor thread) ----------------------------------

    def commit_small(self, delivery: MaildirDelivery, data: bytes, wire: int) -> Deferred[str]:
        """Deliver a buffered message together with whatever else is waiting.

        One thread hop writes every waiting message, fsyncs each, renames them all into
        new/ and fsyncs each new/ directory once (per-file mode): with many concurrent
        submissions that is one directory fsync for a group, not one per message.
        With a ``group_flush`` the file and directory fsyncs become one syncfs per
        filesystem, whatever the size of the group (see _durable_by_filesystem).
        Only one group is in flight; messages arriving meanwhile form the next one, so the
        group grows with the load and a lone message waits for nothing.
        """
        d: Deferred[str] = Deferred()
        self._pending.append((delivery, data, wire, d))
        if not self._committing:
            self._commit_next()
        return d

    def _commit_next(self) -> None:
        group, self._pending = self._pending[:GROUP_MAX], self._pending[GROUP_MAX:]
        self._committing = True
        jobs = [(delivery, data, wire) for delivery, data, wire, _ in group]
        running: Deferred[list[str | Exception]] = self._run(_commit_group, self, jobs)

        def settle(results: list[str | Exception] | Failure) -> None:
            self._committing = False
            for i, (_, _, _, d) in enumerate(group):
                outcome = results if isinstance(results, Failure) else results[i]
                if isinstance(outcome, str):
                    d.callback(outcome)
                else:
                    d.errback(outcome)
            if self._pending and not self._committing:
                self._commit_next()
            elif self._linked and not self._committing:
                self._retire_soon()

        running.addBoth(settle)

    def retire_pending(self) -> Deferred[None] | None:
        """At shutdown: make the last links durable and drop their tmp/ names now (a
        Deferred for the "before shutdown" trigger), so that no stopped process leaves
        copies a later boot could deliver again."""
        call, self._retire_call = self._retire_call, None
        if call is not None and call.active():
            call.cancel()
        if not self._linked or self._committing:
            return None
        return self._retire_when_idle()

    def _retire_soon(self) -> None:
        """Retire the pending tmp/ names RETIRE_DELAY from now, unless a group is running
        then: meanwhile each group's own syncfs retires its predecessors', so steady
        deliveries take one syncfs per group and at most one more per RETIRE_DELAY."""
        if self._clock is None:
            self._retire_when_idle()
        elif self._retire_call is None:
            self._retire_call = self._clock.callLater(RETIRE_DELAY, self._retire_due)

    def _retire_due(self) -> None:
        self._retire_call = None
        if self._linked and not self._committing:
            self._retire_when_idle()

    def _retire_when_idle(self) -> Deferred[None]:
        """No delivery waiting: make the last group's links durable and drop its tmp/
        names now rather than at the next delivery (see :func:`_retire_linked`)."""
        self._committing = True

        def settle(result: object) -> None:
            self._committing = False
            if isinstance(result, Failure):
                _log.failure("retiring delivered tmp/ names failed", result)
            if self._pending:
                self._commit_next()

        retiring: Deferred[None] = self._run(_retire_linked, self)
        return retiring.addBoth(settle)

    def unique_name(self, file_size: int, wire_size: int, dot_free: bool = False) -> str:
        now = time.time_ns()
        secs, usecs = divmod(now // 1000, 1_000_000)
        return (
            f"{secs}.M{usecs}P{os.getpid()}Q{next(_counter)}.{self._host}"
            f",S={file_size},W={wire_size}{DOT_FREE if dot_free else ''}"
        )

    # -- scan cache (any thread: scans of different maildrops run concurrently) ----------

    def _state_of(self, maildir: str) -> _MaildirState | None:
        with self._states_lock:
            state = self._states.get(maildir)
            if state is not None:
                self._states.move_to_end(maildir)
            return state

    def _remember(self, maildir: str, state: _MaildirState) -> None:
        """Keep the scan for the next login, within ``cache_messages`` messages in all."""
        with self._states_lock:
            old = self._states.pop(maildir, None)
            if old is not None:
                self._cached_messages -= len(old.messages)
            if len(state.messages) > self.cache_messages:
                return
            self._states[maildir] = state
            self._cached_messages += len(state.messages)
            while self._cached_messages > self.cache_messages:
                _, dropped = self._states.popitem(last=False)
                self._cached_messages -= len(dropped.messages)

    # -- IMailStore ----------------------------------------------------------------------

    def open_delivery(self, envelope: Envelope) -> IMessageSink:
        return MaildirDelivery(self, envelope, self._run)

    def open_maildrop(self, address: Address) -> Deferred[IMaildrop]:
        try:
            maildir = self.maildir_path(address)
        except AddressError:
            _log.warn("refusing unsafe mailbox name {address!r}", address=str(address))
            return fail(MaildropUnavailable("unsafe mailbox name"))
        try:
            quick = self._open_unchanged(maildir, address)
        except MaildropInUse as e:
            return fail(e)
        if quick is not None:
            return succeed(quick)
        d: Deferred[IMaildrop] = self._run(self._open_maildrop_blocking, maildir, address)
        return d

    def _open_unchanged(self, maildir: str, address: Address) -> IMaildrop | None:
        """Reactor thread: open a maildrop that provably did not change since its last scan.

        That proof is three stats (new/, cur/ quiet and unchanged; the uidlist unchanged)
        plus the non-blocking lock: less work than the thread hop it replaces (which was
        ~15% of a short POP3 session's CPU). Anything else, including any error, returns
        None and the full open runs in the thread pool as before.
        """
        cached = self._state_of(maildir)
        if cached is None or cached.dirs is None or maildir not in self._complete:
            return None
        try:
            fd = os.open(os.path.join(maildir, LOCK_NAME), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            _lock(fd)
            new, cur = os.path.join(maildir, "new"), os.path.join(maildir, "cur")
            if not cached.unchanged(maildir, _quiet_stamps(new, cur, time.time())):
                os.close(fd)
                return None
            _name_holder(fd)
        except OSError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        self._remember(maildir, cached)
        return MaildirMaildrop(self, maildir, fd, cached.messages, address)

    def _open_maildrop_blocking(self, maildir: str, address: Address) -> IMaildrop:
        try:
            self.ensure_maildir(maildir)
            fd = os.open(os.path.join(maildir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        except OSError as e:
            _log.error("cannot open maildir {maildir}: {error}", maildir=maildir, error=e)
            raise MaildropUnavailable("maildrop cannot be opened") from None
        try:
            _lock(fd)
        except MaildropInUse:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            _log.error("cannot lock maildir {maildir}: {error}", maildir=maildir, error=e)
            raise MaildropUnavailable("maildrop cannot be locked") from None
        try:
            _name_holder(fd)
            # A first scan builds the whole snapshot; later ones reuse most of it.
            first = self._state_of(maildir) is None
            with collection_paused() if first else contextlib.nullcontext():
                messages = _Scanner(self, maildir).scan()
        except (OSError, UnicodeError) as e:
            os.close(fd)
            self.forget_maildirs()
            _log.error("cannot scan maildir {maildir}: {error}", maildir=maildir, error=e)
            raise MaildropUnavailable("maildrop cannot be read") from None
        except BaseException:
            os.close(fd)
            raise
        return MaildirMaildrop(self, maildir, fd, messages, address)


_paused_lock = threading.Lock()
_paused_scans = 0  # scans running with collection paused
_paused_by_us = False  # whether the first of them turned collection off


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection while a scan builds its (acyclic) snapshot.

    A first scan of 100,000 messages allocates ~500,000 objects: CPython's collector then
    runs hundreds of times and traverses the whole heap in its older generations, which in
    a process holding 300,000 other objects was ~20% of the scan (0.60 s became 0.71-0.79).
    The snapshot is acyclic, so reference counting frees what it drops; cyclic garbage the
    other threads make meanwhile waits until collection resumes, when the last concurrent
    first scan ends (unless it was off before). Used for a maildrop's first scan only.
    """
    global _paused_scans, _paused_by_us
    with _paused_lock:
        if _paused_scans == 0:
            _paused_by_us = gc.isenabled()
            gc.disable()
        _paused_scans += 1
    try:
        yield
    finally:
        with _paused_lock:
            _paused_scans -= 1
            if _paused_scans == 0 and _paused_by_us:
                gc.enable()


def _lock(fd: int) -> None:
    """The session lock, without waiting: MaildropInUse if another session holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise MaildropInUse("maildrop locked by another session") from None
        raise


def _name_holder(fd: int) -> None:
    """Write our pid into the lock file for humans, unless it already says so.

    The pid is padded to a fixed width so that a change of holder (with several workers,
    logins alternate between processes) is one overwrite in place: truncating first cost a
    journal transaction per login, a tenth of a session's time in the two-worker profile.
    """
    mine = f"{os.getpid():<10}\n".encode()
    current = os.pread(fd, 32, 0)
    if current != mine:
        if len(current) != len(mine):
            os.ftruncate(fd, 0)
        os.pwrite(fd, mine, 0)


#: What a scan learnt about one message file: (base name, wire size, delivery time).
_Entry = tuple[str, int, float]
#: Identity of the uidlist file: any rewrite (a new inode by rename) or edit changes it.
_Stamp = tuple[int, int, int, int]


class _MaildirState:
    """The last scan of one Maildir, reused by the next login only where still valid.

    Nothing here is trusted blindly: new/ and cur/ are listed on every login (only names
    never seen before are looked at), and the parsed uidlist is reused only while the file's
    (inode, size, mtime, ctime) is unchanged, so another process's rewrite is always read.
    """

    __slots__ = ("by_name", "dirs", "messages", "stamp", "state", "uids")

    def __init__(
        self,
        by_name: dict[str, _Entry],
        stamp: _Stamp | None,
        state: tuple[int, int, dict[str, int]],
        uids: dict[str, int],
        messages: tuple[MessageInfo, ...],
        dirs: tuple[_Stamp, _Stamp] | None = None,
    ) -> None:
        self.by_name = by_name
        self.stamp = stamp
        self.state = state
        self.uids = uids
        self.messages = messages
        #: new/ and cur/ as they were before this scan listed them, kept only when both had
        #: been quiet for QUIET_DIR seconds (see _Scanner.scan); None: list them next time.
        self.dirs = dirs

    def unchanged(self, maildir: str, dirs: tuple[_Stamp, _Stamp] | None) -> bool:
        """Whether this scan still holds: neither directory changed since a listing made
        while both were quiet (``dirs``: their stamps now, None if not quiet), so the same
        files are there, and the uidlist was not rewritten (by another process)."""
        return (
            dirs is not None
            and dirs == self.dirs
            and _stamp(os.path.join(maildir, UIDLIST_NAME)) == self.stamp
        )


#: A directory whose mtime is at least this old when it is listed is trusted to be
#: unchanged while its (inode, size, mtime, ctime) stays the same: far above any file
#: system's timestamp granularity, so a change right after the listing still moves mtime.
QUIET_DIR = 2.0


def _quiet_stamps(new: str, cur: str, now: float) -> tuple[_Stamp, _Stamp] | None:
    """Stamps of new/ and cur/ if neither changed in the last QUIET_DIR seconds."""
    stamps = []
    for path in (new, cur):
        st = os.stat(path)
        if st.st_mtime > now - QUIET_DIR:
            return None
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return stamps[0], stamps[1]


def _stamp(path: str) -> _Stamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _wire_of(base: str) -> int | None:
    """``,W=`` of a base name; the common name (W= last) without a regular expression."""
    i = base.rfind(",W=")
    if i >= 0:
        digits = base[i + 3 :]
        if digits.endswith(DOT_FREE):
            digits = digits[: -len(DOT_FREE)]
        if digits.isdigit() and digits.isascii():
            return int(digits)
    return size_field(base, "W")


class _Scanner:
    """Lists new/ and cur/, fills in missing sizes and maintains the UID list.

    Messages are *not* moved from new/ to cur/ at login. The Maildir spec makes that move
    the job of a reader that wants to record flags; a POP3 server records none, and
    100,000 renames (plus the directory fsyncs) were most of a first login's time on a big
    maildrop. A message in new/ is a valid, unflagged message for every other Maildir
    reader (an IMAP server shows it as recent/unseen, which it still is as far as IMAP
    flags go). UIDs are keyed by base name, so a message keeps its UID wherever it is or
    moves to. Only a foreign name without the ``,S=,W=`` sizes is renamed (into cur/, with
    the sizes appended), as that costs a read of the file anyway and is done only once.

    A later login costs one listing of each directory plus work for what changed since the
    previous scan by this store (no per-message stat or read: the name carries the sizes).
    """

    def __init__(self, store: MaildirStore, maildir: str) -> None:
        self.store = store
        self.maildir = maildir
        self.new = os.path.join(maildir, "new")
        self.cur = os.path.join(maildir, "cur")
        self._taken: set[str] | None = None

    def _with_sizes(self, path: str, base: str) -> str:
        """Append ``,S=``/``,W=`` to a foreign name that lacks W= (reads the file once)."""
        if _wire_of(base) is not None:
            return base
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            wire = wire_size_of_file(f)
        if size_field(base, "S") is None:
            base += f",S={file_size}"
        return base + f",W={wire}"

    def _rename_free(self, src: str, base: str, info: str) -> tuple[str, str]:
        """Rename into cur/ without ever overwriting an existing file.

        The listing of cur/ it checks against is made under the session lock (on first
        need) and kept up to date: only a program ignoring the lock could add a name
        meanwhile, and it would have to pick the very same base name.
        """
        if self._taken is None:
            self._taken = set(os.listdir(self.cur))
        taken = self._taken
        candidate = base
        while True:
            name = f"{candidate}:{info}"
            if name not in taken:
                os.rename(src, f"{self.cur}/{name}")
                taken.add(name)
                return candidate, name
            candidate = f"{base}.Q{next(_counter)}"

    def _delivered(self, base: str, path: str, now: float) -> float:
        """The name's leading seconds (Maildir convention) unless they claim the future."""
        m = _NAME_TIME.match(base)
        if m:
            secs = float(m.group(1))
            if secs <= now + 86400:
                return secs
        try:
            return os.lstat(path).st_mtime
        except OSError:
            return now

    def _regular_names(self, directory: str) -> list[str]:
        """Candidate names of regular files, from the directory's d_type (no stat)."""
        with os.scandir(directory) as it:
            return [
                e.name for e in it if _is_candidate(e.name) and e.is_file(follow_symlinks=False)
            ]

    def _examine(self, sub: str, name: str, now: float) -> tuple[str, _Entry] | None:
        """(key, entry) of a file not seen by the previous scan; None if it vanished."""
        base, sep, info = name.partition(":")
        path = f"{self.maildir}/{sub}/{name}"
        wire = _wire_of(base)
        if wire is None:
            try:
                sized = self._with_sizes(path, base)
                base, name = self._rename_free(path, sized, info if sep else "2,")
            except FileNotFoundError:
                return None  # taken away meanwhile by another program
            sub, path = "cur", f"{self.cur}/{name}"
            wire = _wire_of(base)
            assert wire is not None
        return f"{sub}/{name}", (base, wire, self._delivered(base, path, now))

    def scan(self) -> list[MessageInfo]:
        store = self.store
        cached = store._state_of(self.maildir)
        known = cached.by_name if cached is not None else {}
        now = time.time()
        dirs = _quiet_stamps(self.new, self.cur, now)
        if cached is not None and cached.unchanged(self.maildir, dirs):
            store._remember(self.maildir, cached)
            return list(cached.messages)
        in_new = self._regular_names(self.new)
        if cached is None:
            in_cur = self._regular_names(self.cur)
        else:
            in_cur = [n for n in os.listdir(self.cur) if f"cur/{n}" in known or self._is_regular(n)]
        entries: dict[str, _Entry] = {}  # base name -> entry
        by_name: dict[str, _Entry] = {}  # key ("cur/NAME" or "new/NAME") -> entry
        # cur/ first: if a base is in both (a hard link), the copy with flags wins.
        future = now + 86400
        for sub, names in (("cur", in_cur), ("new", in_new)):
            prefix = sub + "/"
            for name in names:
                key = prefix + name
                entry = known.get(key)
                if entry is None:
                    # The usual name, "<10-digit secs>.<...>,W=<digits>[,D=0][:<flags>]",
                    # inline and without a stat: a call per message was a fifth of a first
                    # login on a big maildrop. Anything else (foreign names): _examine.
                    base = name.partition(":")[0] if ":" in name else name
                    i = base.rfind(",W=")
                    digits = base[i + 3 :]
                    if digits.endswith(DOT_FREE):
                        digits = digits[: -len(DOT_FREE)]
                    if (
                        i > 10
                        and base[10] == "."
                        and digits.isdigit()
                        and digits.isascii()
                        and base[:10].isdigit()
                        and float(base[:10]) <= future
                    ):
                        entry = (base, int(digits), float(base[:10]))
                    else:
                        found = self._examine(sub, name, now)
                        if found is None:
                            continue
                        key, entry = found
                base = entry[0]
                if base in entries:
                    _log.warn("duplicate maildir message {name} ignored", name=key)
                    continue
                entries[base] = entry
                by_name[key] = entry
        moved = self._taken is not None
        if moved:
            store.fsync_dir(self.cur)
            store.fsync_dir(self.new)
        uidlist = UidList(self.maildir, store)
        stamp = _stamp(uidlist.path)
        state = cached.state if cached is not None and stamp == cached.stamp else None
        validity, uids, written = uidlist.assign_cached(entries, state, stamp)
        if written:
            stamp = _stamp(uidlist.path)
        if (
            cached is not None
            and not moved
            and not written
            and state is not None
            and uids == cached.uids
            and by_name.keys() == cached.by_name.keys()
        ):
            messages = cached.messages  # nothing changed since the last scan
        else:
            # Sorting bare ints and building column-wise (map) is ~3x cheaper than sorting
            # (uid, key, entry) tuples and a generator, for 100,000 messages.
            key_of = {uids[e[0]]: key for key, e in by_name.items()}
            order = sorted(key_of)
            keys = [key_of[uid] for uid in order]
            entries_in_order = [by_name[key] for key in keys]
            prefix = f"{validity:08x}"
            messages = tuple(
                map(
                    MessageInfo,
                    [f"{prefix}{uid:08x}" for uid in order],
                    [e[1] for e in entries_in_order],
                    keys,
                    [e[2] for e in entries_in_order],
                )
            )
        new_state = (validity, uidlist.last_next_uid, uids)
        if moved:
            dirs = None  # changed by this very scan
        state_now = _MaildirState(by_name, stamp, new_state, uids, messages, dirs)
        store._remember(self.maildir, state_now)
        return list(messages)

    def _is_regular(self, name: str) -> bool:
        if not _is_candidate(name):
            return False
        try:
            return stat.S_ISREG(os.lstat(os.path.join(self.cur, name)).st_mode)
        except FileNotFoundError:
            return False


class UidList:
    """``mailgate-uidlist``: ``V<validity> N<next uid>`` then ``<uid> <base name>`` lines.

    UIDs are assigned once per message and never reused: ``N`` only grows, and if the file
    is lost or corrupt a new validity makes every new UIDL string differ from the old ones.
    """

    def __init__(self, maildir: str, store: MaildirStore) -> None:
        self.path = os.path.join(maildir, UIDLIST_NAME)
        self.maildir = maildir
        self.store = store
        self.last_next_uid = 1

    def read(self) -> tuple[int, int, dict[str, int]] | None:
        """(validity, next uid, base -> uid); None when missing. ValueError when corrupt."""
        try:
            # File names are bytes: os.listdir hands undecodable ones over as surrogates,
            # and they must round-trip through this file unchanged.
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return None
        m = re.fullmatch(r"V(\d+) N(\d+)", lines[0])
        if not m:
            raise ValueError("bad header")
        validity, next_uid = int(m.group(1)), int(m.group(2))
        known: dict[str, int] = {}
        for line in lines[1:]:
            if not line:
                continue
            uid_text, _, base = line.partition(" ")
            uid = int(uid_text)
            if not base or uid < 1 or uid >= next_uid or base in known:
                raise ValueError("bad entry")
            known[base] = uid
        if len(set(known.values())) != len(known):
            raise ValueError("duplicate uid")
        return validity, next_uid, known

    def _old_validity(self) -> int:
        """The validity of a corrupt file if its header survived, so the new one differs."""
        with contextlib.suppress(OSError, ValueError):
            with open(self.path, "rb") as f:
                m = re.match(rb"V(\d+) ", f.readline())
            if m:
                return int(m.group(1))
        return 0

    def write(self, validity: int, next_uid: int, uids: dict[str, int]) -> None:
        body = [f"V{validity} N{next_uid}\n"]
        base_of = {uid: base for base, uid in uids.items()}
        body.extend([f"{uid} {base_of[uid]}\n" for uid in sorted(base_of)])
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("".join(body))
            f.flush()
            self.store._fsync(f.fileno())
        os.replace(tmp, self.path)
        self.store.fsync_dir(self.maildir)

    def assign(self, entries: dict[str, Any]) -> tuple[int, dict[str, int]]:
        """Give every present base a UID (new ones in delivery order); persist if changed."""
        validity, uids, _ = self.assign_cached(entries, None, None)
        return validity, uids

    def assign_cached(
        self,
        entries: dict[str, Any],
        state: tuple[int, int, dict[str, int]] | None,
        stamp: _Stamp | None,
    ) -> tuple[int, dict[str, int], bool]:
        """:meth:`assign` starting from an already parsed, still valid ``state`` if given;
        also says whether the file was rewritten."""
        floor = 0
        if state is None:
            try:
                state = self.read()
            except (ValueError, UnicodeDecodeError):
                _log.error("corrupt {path}: starting a new UID validity", path=self.path)
                state = None
                floor = self._old_validity() + 1
        known: dict[str, int]
        if state is None:
            validity, next_uid, known = max(int(time.time()), floor), 1, {}
            changed = True
        else:
            validity, next_uid, known = state
            changed = False
        if len(known) == len(entries) and known.keys() == entries.keys():
            uids = known
        else:
            uids = {base: uid for base, uid in known.items() if base in entries}
            changed = changed or len(uids) != len(known)
            for base in in_delivery_order(entries.keys() - uids.keys()):
                uids[base] = next_uid
                next_uid += 1
                changed = True
        self.last_next_uid = next_uid
        if changed:
            self.write(validity, next_uid, uids)
        return validity, uids, changed


@implementer(IMaildrop)
class MaildirMaildrop:
    """A locked snapshot of one Maildir; holds the flock until commit() or release()."""

    def __init__(
        self,
        store: MaildirStore,
        maildir: str,
        lock_fd: int,
        messages: Sequence[MessageInfo],
        account: Address,
    ) -> None:
        self.account = account
        self._store = store
        self._maildir = maildir
        self._lock_fd: int | None = lock_fd
        #: Each key is the file's path relative to the Maildir: ``new/NAME`` or ``cur/NAME``.
        self.messages: Sequence[MessageInfo] = tuple(messages)

    def _find(self, key: str) -> str | None:
        """Path of a message, following a move to cur/ or a flag change by another program."""
        path = os.path.join(self._maildir, key)
        if os.path.lexists(path):
            return path
        base = key.rpartition("/")[2].partition(":")[0]
        for sub in ("cur", "new"):
            directory = os.path.join(self._maildir, sub)
            with contextlib.suppress(OSError):
                for name in os.listdir(directory):
                    if name.partition(":")[0] == base:
                        return os.path.join(directory, name)
        return None

    def open_message(self, index: int) -> IO[bytes]:
        """The message file; RETR reads it on the reactor thread, chunk by chunk.

        Those reads are page-cache copies (~6 ms per 50 MB); the sequential hint doubles
        the kernel's readahead so a cold file is mostly read ahead of the producer rather
        than under it. A thread hop per chunk would cost more than the read itself.
        """
        message = self.messages[index]
        key = message.key
        # Unbuffered: the stream reads whole chunks; a BufferedReader would only copy them.
        try:
            f = _open_unbuffered(f"{self._maildir}/{key}")
        except FileNotFoundError:
            path = self._find(key)
            try:
                if path is None:
                    raise MaildropUnavailable("message vanished") from None
                f = _open_unbuffered(path)
            except OSError:
                raise MaildropUnavailable("message vanished") from None
        except OSError as e:
            _log.error("cannot open message {key}: {error}", key=key, error=e)
            raise MaildropUnavailable("message vanished") from None
        if message.size > _READAHEAD_FROM:
            _sequential(f)
        return f

    def may_have_dot_lines(self, index: int) -> bool:
        """Trusts ``,D=0`` only in a name of mailgate's own form (time.MusecPpidQn.host):
        sent unstuffed, a line "." would end the RETR early."""
        base = self.messages[index].key.rpartition("/")[2].partition(":")[0]
        return not (_DOT_FREE.search(base) and _OUR_NAME.match(base))

    def commit(self, deleted: Sequence[int]) -> Deferred[int]:
        if self._lock_fd is None:
            return fail(MaildropUnavailable("maildrop already released"))
        keys = [self.messages[i].key for i in sorted(set(deleted))]
        if not keys:  # nothing to remove: no thread hop, no listing
            self.release()
            return succeed(0)
        d: Deferred[int] = self._store._run(self._commit_blocking, keys)

        def done(result: int | Failure) -> int | Failure:
            self.release()
            return result

        return d.addBoth(done)

    def _commit_blocking(self, keys: list[str]) -> int:
        """Unlink every file of the deleted messages, wherever it now is.

        One listing of cur/ and new/ finds them all: a file another program moved or
        re-flagged, and a second link of the same base name in the other directory (which
        would otherwise bring the message back at the next login).
        """
        wanted = {key.rpartition("/")[2].partition(":")[0] for key in keys}
        paths: list[str] = []
        for sub in ("cur", "new"):
            directory = os.path.join(self._maildir, sub)
            try:
                names = os.listdir(directory)
            except OSError as e:
                _log.error("cannot list {path}: {error}", path=directory, error=e)
                continue
            paths.extend(
                os.path.join(directory, name) for name in names if name.partition(":")[0] in wanted
            )
        # A copy still linked from tmp/ (its group commit's tmp/ name not yet retired, say
        # the process was killed): gone too, or a later boot would recover the message.
        tmp = os.path.join(self._maildir, "tmp")
        with contextlib.suppress(OSError):
            for name in os.listdir(tmp):
                mark = _RECOVERABLE.match(name)
                if mark is not None and mark["base"] in wanted:
                    paths.append(os.path.join(tmp, name))
        failed = 0
        touched: set[str] = set()
        for path in paths:
            try:
                os.unlink(path)
                touched.add(os.path.dirname(path))
            except FileNotFoundError:
                pass
            except OSError as e:
                failed += 1
                _log.error("cannot delete {path}: {error}", path=path, error=e)
        for directory in sorted(touched):
            try:
                self._store.fsync_dir(directory)
            except OSError as e:
                _log.error("cannot fsync {path}: {error}", path=directory, error=e)
        return failed

    def release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the only fd of this open file drops the flock

    def __del__(self) -> None:
        # A session that vanished without release() must not keep the mailbox locked.
        self.release()


#: Messages larger than this (wire octets) get the sequential-read hint; for a small one
#: the extra syscall costs more than any readahead could save.
_READAHEAD_FROM = 1 << 20


def _open_unbuffered(path: str) -> IO[bytes]:
    return open(path, "rb", buffering=0)


def _listing(directory: str, quiet: bool = False) -> list[str]:
    """The names in ``directory``; none if it does not exist (or, ``quiet``, cannot be
    listed at all); else OSError for other failures."""
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError:
        if quiet:
            return []
        raise


def _sole_link(one: str, other: str) -> bool:
    """Whether two names of one file are counted as a single link."""
    a, b = os.stat(one), os.stat(other)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and a.st_nlink < 2


def _sequential(f: IO[bytes]) -> IO[bytes]:
    """Tell the kernel ``f`` is read front to back (a hint: errors are ignored)."""
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return f


def _publish(staged: list[tuple[str, str]], delivered: list[str], store: MaildirStore) -> None:
    """Rename every staged copy (tmp/ -> new/), then make each new/ durable.

    Every recipient's copy is staged before any becomes visible, so a failure while staging
    shows nobody a message the client will send again.
    """
    for tmp_target, final in staged:
        os.rename(tmp_target, final)
        delivered.append(final)
    for directory in dict.fromkeys(os.path.dirname(final) for final in delivered):
        store.fsync_dir(directory)


def _roll_back(staged: list[tuple[str, str]], delivered: list[str], store: MaildirStore) -> None:
    """Undo a partial delivery durably: unlink every copy, then fsync the new/ directories."""
    # Every tmp/ name too: a copy hard-linked into new/ (_durable_by_filesystem) still
    # has one, and a later boot would otherwise deliver it (see MaildirStore._recover).
    for path in [*delivered, *(t for t, _ in staged)]:
        with contextlib.suppress(OSError):
            os.unlink(path)
    # A marked copy's removal made durable: recovery would deliver what got a 451.
    for directory in dict.fromkeys(os.path.dirname(t) for t, _ in staged if ",J=" in t):
        with contextlib.suppress(OSError):
            store.fsync_dir(directory)
    for directory in dict.fromkeys(os.path.dirname(final) for final in delivered):
        with contextlib.suppress(OSError):
            store.fsync_dir(directory)


#: Seconds without a delivery before a process makes its last links durable by itself.
RETIRE_DELAY = 0.5

#: Messages committed in one group at most (bounds the latency of the last one in it).
GROUP_MAX = 64


class _Staged:
    """One message of a group: its copies in tmp/ and the file whose fsync covers them."""

    __slots__ = ("delivered", "delivery", "fds", "recoverable", "staged")

    def __init__(self, delivery: MaildirDelivery) -> None:
        self.delivery = delivery
        self.staged: list[tuple[str, str]] = []
        self.delivered: list[str] = []
        self.fds: list[int] = []
        #: Whether every copy carries a recovery mark (_RECOVERABLE) in its tmp/ name.
        self.recoverable = False

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _commit_group(
    store: MaildirStore, jobs: list[tuple[MaildirDelivery, bytes, int]]
) -> list[str | Exception]:
    """Thread pool: deliver every job all-or-nothing; each gets its queue id or its error.

    Same order of events as a single delivery, done for the whole group at each step:
    every copy written, every copy made durable, every copy renamed into new/, the
    renames made durable. Nothing is acknowledged (the results only reach the sessions
    after this returns) before its new/ entries are on stable storage, or, with one
    syncfs per group, its tmp/ copies under names a later boot recovers.
    """
    results: list[str | Exception] = [""] * len(jobs)
    live: list[tuple[int, _Staged]] = []

    def fail(i: int, item: _Staged, e: Exception) -> None:
        item.close()
        _roll_back(item.staged, item.delivered, store)
        store.forget_maildirs()
        results[i] = e

    flush = store.group_flush
    by_filesystem = flush is not None and flush.active()
    for i, (delivery, data, wire) in enumerate(jobs):
        item = _Staged(delivery)
        try:
            delivery._stage_small(item, data, wire, by_filesystem)
        except Exception as e:
            fail(i, item, e)
            continue
        live.append((i, item))
    per_fs = _one_fd_per_filesystem(live) if flush is not None and by_filesystem else None
    if (
        flush is not None
        and per_fs is not None
        and all(flush.covers(device, fd) for device, fd in per_fs.items())
    ):
        live = _durable_by_filesystem(store, live, flush, fail, per_fs)
    else:
        live = _durable_by_file(store, live, fail)
        if store._linked:  # back to per-file fsyncs after syncfs groups
            _retire_linked(store)
    for i, item in live:
        results[i] = item.delivery.queue_id
    return results


_Fail = Callable[[int, "_Staged", Exception], None]


def _publish_all(
    live: list[tuple[int, _Staged]], fail: _Fail, publish: Callable[[str, str], None]
) -> list[tuple[int, _Staged]]:
    """``publish`` (os.rename or os.link) every staged copy into new/; an item whose copy
    fails is rolled back by ``fail``. Returns the items that made it."""
    still: list[tuple[int, _Staged]] = []
    for i, item in live:
        try:
            for tmp_target, final in item.staged:
                publish(tmp_target, final)
                item.delivered.append(final)
        except Exception as e:
            fail(i, item, e)
            continue
        still.append((i, item))
    return still


def _unlink_covered(store: MaildirStore, devices: frozenset[int]) -> None:
    """After a syncfs of ``devices``: drop the tmp/ names of earlier groups on them (their
    links into new/ were made before it, so they are durable now)."""
    kept: list[tuple[frozenset[int], list[str]]] = []
    for group_devices, names in store._linked:
        if group_devices <= devices:
            for name in names:
                with contextlib.suppress(OSError):
                    os.unlink(name)
        else:
            kept.append((group_devices, names))
    store._linked = kept


def _retire_linked(store: MaildirStore) -> None:
    """Thread pool, no group in flight: make every pending link durable, then drop the
    tmp/ names. If that fails they stay in tmp/ for the next boot's recovery, which drops
    those whose link did reach new/ (a failed flush is never followed by a retry here,
    see _durable_by_filesystem)."""
    names = [name for _, group in store._linked for name in group]
    maildirs = dict.fromkeys(os.path.dirname(os.path.dirname(n)) for n in names)
    try:
        _flush_new_directories(store, [os.path.join(m, "new") for m in maildirs])
    except OSError as e:
        # Left to the next boot's recovery (see _durable_by_filesystem's failure).
        _log.warn("cannot make delivered links durable: {error}", error=e)
        store._linked = []
        return
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name)
    store._linked = []


def _flush_new_directories(store: MaildirStore, directories: list[str]) -> None:
    """One syncfs per filesystem when it covers them all, else an fsync of each."""
    flush = store.group_flush
    held: dict[int, int] = {}
    try:
        if flush is not None and flush.active():
            for directory in directories:
                try:
                    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # the Maildir was removed: nothing of it to keep
                try:
                    device = os.fstat(fd).st_dev
                except OSError:
                    os.close(fd)
                    raise
                if device in held:
                    os.close(fd)
                else:
                    held[device] = fd
            if all(flush.covers(device, fd) for device, fd in held.items()):
                flush.flush(held.values())
                return
        for directory in directories:
            with contextlib.suppress(FileNotFoundError):
                store.fsync_dir(directory)
    finally:
        for fd in held.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def _durable_by_file(
    store: MaildirStore, live: list[tuple[int, _Staged]], fail: _Fail
) -> list[tuple[int, _Staged]]:
    """fsync every written file, rename, fsync each new/ once."""
    still: list[tuple[int, _Staged]] = []
    for i, item in live:
        try:
            for fd in item.fds:
                store._fsync(fd)
            item.close()
        except Exception as e:
            fail(i, item, e)
            continue
        still.append((i, item))
    live = _publish_all(still, fail, os.rename)
    broken: dict[str, OSError] = {}
    for directory in dict.fromkeys(
        os.path.dirname(final) for _, item in live for final in item.delivered
    ):
        try:
            store.fsync_dir(directory)
        except OSError as e:
            broken[directory] = e
    still = []
    for i, item in live:
        errors = [broken[d] for d in map(os.path.dirname, item.delivered) if d in broken]
        if errors:
            fail(i, item, errors[0])
        else:
            still.append((i, item))
    return still


def _one_fd_per_filesystem(live: list[tuple[int, _Staged]]) -> dict[int, int] | None:
    """Device -> one of the group's open copies on it; None if one cannot be stat'ed."""
    per_fs: dict[int, int] = {}
    try:
        for _, item in live:
            for fd in item.fds:
                per_fs.setdefault(os.fstat(fd).st_dev, fd)
    except OSError:
        return None
    return per_fs


def _durable_by_filesystem(
    store: MaildirStore,
    live: list[tuple[int, _Staged]],
    flush: FilesystemFlush,
    fail: _Fail,
    copies_per_fs: dict[int, int],
) -> list[tuple[int, _Staged]]:
    """One syncfs per filesystem for the copies, then hard links into new/ (with a boot
    id; see docs/multiprocess.md for the recovery); without one, renames and a second
    syncfs for them.

    A failed syncfs cannot say whose data it lost, so it fails the whole group. The
    filesystems are held by duplicates of ``copies_per_fs``: a failing item closes its
    own fds. The copies' fds are closed before the first syncfs, and an error from that
    close (where a filesystem reports a failed write there) fails its message.
    """
    held: list[int] = []
    try:
        for fd in copies_per_fs.values():
            held.append(os.dup(fd))
        still: list[tuple[int, _Staged]] = []
        for i, item in live:
            fds, item.fds = item.fds, []
            error: OSError | None = None
            for fd in fds:
                try:
                    os.close(fd)
                except OSError as e:
                    error = error or e
            if error is not None:
                fail(i, item, error)
            else:
                still.append((i, item))
        live = still
        try:
            flush.flush(held)
        except OSError:
            # A later syncfs may succeed without the writes this one lost: links still
            # pending are left to the next boot's recovery, never retired on its word.
            if store._linked:
                _log.warn("leaving the tmp/ names of delivered messages to recovery")
            store._linked = []
            raise
        if all(item.recoverable for _, item in live):
            # One syncfs is enough: every copy is now on stable storage under a tmp/
            # name a later boot recovers (see MaildirStore._recover). Links, not renames,
            # so that a name survives a crash whichever directory block reaches the disk
            # first; the tmp/ names go once a later syncfs has covered the links.
            devices = frozenset(copies_per_fs)
            _unlink_covered(store, devices)
            live = _publish_all(live, fail, os.link)
            names = [t for _, item in live for t, _ in item.staged]
            if names:
                store._linked.append((devices, names))
        else:
            live = _publish_all(live, fail, os.rename)
            flush.flush(held)
    except Exception as e:
        for i, item in live:
            fail(i, item, e)
        return []
    finally:
        for fd in held:
            with contextlib.suppress(OSError):
                os.close(fd)
    return live


def _create_file(path: str, data: bytes) -> int:
    """Create ``path`` (never overwriting) holding ``data``; the open fd, not yet fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


@implementer(IMessageSink)
class MaildirDelivery:
    """One message being delivered into the Maildirs of the envelope's recipients.

    Errors never escape write(): they are remembered and reported by finish() as a
    DeliveryError (permanent for an unusable recipient name, temporary for I/O).
    """

    def __init__(self, store: MaildirStore, envelope: Envelope, run: ThreadRunner) -> None:
        self._store = store
        self._run = run
        self.envelope = envelope
        self.queue_id = f"{time.time_ns() // 1000:X}P{os.getpid():X}Q{next(_counter):X}"
        self._error: DeliveryError | None = None
        self._file: IO[bytes] | None = None
        self._path: str | None = None
        self._size = 0
        self._newlines = 0
        self._last = b""
        self._saw_cr = False
        self._dot_lines = False  # whether a line starting with "." was written
        self._finished = False
        # Small messages stay in memory and reach the disk in one thread hop in finish().
        self._buffer: list[bytes] | None = []
        self._targets: list[str] = []
        try:
            seen: set[Address] = set()
            for rcpt in envelope.recipients:
                if rcpt not in seen:
                    seen.add(rcpt)
                    self._targets.append(store.maildir_path(rcpt))
        except AddressError:
            _log.warn("refusing delivery to an unsafe mailbox name")
            self._error = DeliveryError("Recipient mailbox name not acceptable", permanent=True)
            return

    def _fail_io(self, what: str, e: OSError) -> None:
        _log.error("{what} for {queue_id}: {error}", what=what, queue_id=self.queue_id, error=e)
        self._error = DeliveryError("Local delivery failed, try again later", permanent=False)
        self._discard()

    def _discard(self) -> None:
        self._buffer = None
        f, self._file = self._file, None
        path, self._path = self._path, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _spill(self) -> None:
        """The message outgrew the buffer: stream it to a spool file from now on.

        This is the one open on the reactor thread, and only for large messages."""
        os.makedirs(self._store.spool, mode=0o700, exist_ok=True)
        fd, self._path = tempfile.mkstemp(prefix=self.queue_id + ".", dir=self._store.spool)
        self._file = os.fdopen(fd, "wb")
        buffered, self._buffer = self._buffer or [], None
        self._file.write(b"".join(buffered))

    def write(self, data: bytes) -> None:
        if self._error is not None or self._finished or not data:
            return
        try:
            if self._buffer is not None and self._size + len(data) <= MEMORY_LIMIT:
                self._buffer.append(data)
            else:
                if self._file is None:
                    self._spill()
                assert self._file is not None
                self._file.write(data)
        except OSError as e:
            self._fail_io("cannot write spool file", e)
            return
        self._size += len(data)
        self._newlines += data.count(b"\n")
        if not self._dot_lines and starts_dot_line(data, self._last):
            self._dot_lines = True
        self._last = data[-1:]
        if b"\r" in data:
            self._saw_cr = True

    def _wire_size(self) -> int:
        """CRLF octets of LF text, plus the CRLF RETR adds to an unterminated last line."""
        extra = 2 if self._size and self._last != b"\n" else 0
        return self._size + self._newlines + extra

    def finish(self) -> Deferred[str]:
        if self._finished:
            return fail(DeliveryError("message already finished", permanent=False))
        self._finished = True
        if self._error is not None:
            self._discard()
            return fail(self._error)
        d: Deferred[str]
        if self._buffer is not None:
            data, self._buffer = b"".join(self._buffer), None
            d = self._store.commit_small(self, data, self._wire_size())
        elif self._file is not None and self._path is not None:
            f, path = self._file, self._path
            self._file = self._path = None
            d = self._run(self._finish_blocking, f, path, self._wire_size())
        else:
            self._discard()
            return fail(DeliveryError("delivery aborted", permanent=False))

        def failed(reason: Failure) -> Failure:
            if isinstance(reason.value, OSError):
                _log.failure("local delivery of {queue_id} failed", reason, queue_id=self.queue_id)
                raise DeliveryError("Local delivery failed, try again later", permanent=False)
            return reason

        return d.addErrback(failed)

    def _finish_blocking(self, f: IO[bytes], path: str, wire: int) -> str:
        store = self._store
        staged: list[tuple[str, str]] = []
        delivered: list[str] = []
        try:
            f.flush()
            store._fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
            f.close()
            if self._saw_cr:  # not LF-only text after all: measure exactly as RETR will send
                with open(path, "rb") as r:
                    wire = wire_size_of_file(r)
            for maildir in self._targets:
                store.ensure_maildir(maildir)
                name = store.unique_name(size, wire, not self._dot_lines)
                tmp_target = os.path.join(maildir, "tmp", name)
                try:
                    os.link(path, tmp_target)
                except OSError:
                    shutil.copyfile(path, tmp_target)
                    with open(tmp_target, "rb") as c:
                        store._fsync(c.fileno())
                staged.append((tmp_target, os.path.join(maildir, "new", name)))
            _publish(staged, delivered, store)
        except BaseException:
            # All or nothing: the client will retry, so do not leave partial deliveries.
            _roll_back(staged, delivered, store)
            store.forget_maildirs()
            raise
        finally:
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
        return self.queue_id

    def _stage_small(self, item: _Staged, data: bytes, wire: int, by_filesystem: bool) -> None:
        """A buffered message, for :func:`_commit_group`: written straight into the first
        recipient's tmp/ (left open for the group's fsync) and hard-linked from there into
        the others' tmp/; ``item`` records each copy, so a failure can be rolled back."""
        store = self._store
        if self._saw_cr:  # not LF-only text after all: measure exactly as RETR will send
            wire = wire_size_of_file(io.BytesIO(data))
        first: str | None = None
        # Named for recovery (see _RECOVERABLE) when a syncfs group commit may acknowledge
        # it before its link into new/ is durable.
        for maildir in self._targets:
            store.ensure_maildir(maildir)
        mark = ""
        if (
            by_filesystem
            and store.boot is not None
            and all(store.syncfs_covers(maildir) for maildir in self._targets)
        ):
            mark = f",J={store.boot}-{zlib.crc32(data):08x}"
            item.recoverable = True
        for maildir in self._targets:
            name = store.unique_name(len(data), wire, not self._dot_lines)
            tmp_target = os.path.join(maildir, "tmp", name + mark)
            final = os.path.join(maildir, "new", name)
            if first is not None:
                try:
                    os.link(first, tmp_target)
                    item.staged.append((tmp_target, final))
                    continue
                except OSError:
                    pass
            item.fds.append(_create_file(tmp_target, data))
            item.staged.append((tmp_target, final))
            first = first or tmp_target

    def abort(self) -> None:
        self._finished = True
        self._discard()
