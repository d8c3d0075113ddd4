"""Maildir mailboxes: local delivery and locked POP3 snapshots.

Layout: ``ROOT/<domain>/<local>/Maildir/{new,cur,tmp}`` plus, in each Maildir,
``mailgate.lock`` (the POP3 session lock, ``flock``) and ``mailgate-uidlist`` (stable UIDs).
Every message file name carries ``,S=<file size>,W=<wire size>`` so STAT/LIST never read a
message, and the wire size is what RETR sends (CRLF line ends, before dot-stuffing).

Delivery writes into a spool file under ``ROOT/.incoming`` (same filesystem), and only on
``finish()``, in the thread runner, fsyncs it and hard-links it into each recipient's
``tmp/`` then renames it into ``new/`` (the Maildir protocol), fsyncing the directories.
Blocking work on the reactor thread is limited to buffered writes and opening files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.internet.defer import Deferred, fail
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
from mailgate.interfaces import IMaildrop, IMailStore, IMessageSink, ThreadRunner
from mailgate.model import Address, Envelope, MessageInfo
from mailgate.wire import wire_size_of_file

_log = Logger()

LOCK_NAME = "mailgate.lock"
UIDLIST_NAME = "mailgate-uidlist"
SPOOL_NAME = ".incoming"

# Process-wide, so two store instances in one process never produce the same name.
_counter = itertools.count(1)

_UNSAFE_CHARS = ("/", "\\", "%", "\x00")
_SIZE_FIELD = re.compile(r",([SW])=(\d+)(?=,|$)")
_OUR_NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.")
_LEADING_SECS = re.compile(r"^(\d+)")
#: A delivery time in a Maildir name: Unix seconds (2001 onwards) then a dot.
_NAME_TIME = re.compile(r"^(\d{10})\.")


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


def _delivered(base: str, st: os.stat_result) -> float:
    """When a message arrived: the name's leading seconds (Maildir convention), else mtime.

    POP3 EXPIRE ages messages from this; a name that claims a time in the future (clock
    skew, a foreign writer) is not trusted over the file's own mtime.
    """
    m = _NAME_TIME.match(base)
    if m:
        secs = float(m.group(1))
        if secs <= st.st_mtime + 86400:
            return secs
    return st.st_mtime


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
    ) -> None:
        self.root = os.path.abspath(root.path if isinstance(root, FilePath) else root)
        self.spool = os.path.join(self.root, SPOOL_NAME)
        self._run = run_in_thread
        self._host = _sanitised_host(hostname if hostname is not None else socket.gethostname())
        self._fsync = fsync

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
        """Create ``new``, ``cur`` and ``tmp`` on demand, durably."""
        if all(os.path.isdir(os.path.join(maildir, sub)) for sub in ("new", "cur", "tmp")):
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

    def unique_name(self, file_size: int, wire_size: int) -> str:
        now = time.time_ns()
        secs, usecs = divmod(now // 1000, 1_000_000)
        return (
            f"{secs}.M{usecs}P{os.getpid()}Q{next(_counter)}.{self._host}"
            f",S={file_size},W={wire_size}"
        )

    # -- IMailStore ----------------------------------------------------------------------

    def open_delivery(self, envelope: Envelope) -> IMessageSink:
        return MaildirDelivery(self, envelope, self._run)

    def open_maildrop(self, address: Address) -> Deferred[IMaildrop]:
        try:
            maildir = self.maildir_path(address)
        except AddressError:
            _log.warn("refusing unsafe mailbox name {address!r}", address=str(address))
            return fail(MaildropUnavailable("unsafe mailbox name"))
        d: Deferred[IMaildrop] = self._run(self._open_maildrop_blocking, maildir, address)
        return d

    def _open_maildrop_blocking(self, maildir: str, address: Address) -> IMaildrop:
        try:
            self.ensure_maildir(maildir)
            fd = os.open(os.path.join(maildir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        except OSError as e:
            _log.error("cannot open maildir {maildir}: {error}", maildir=maildir, error=e)
            raise MaildropUnavailable("maildrop cannot be opened") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MaildropInUse("maildrop locked by another session") from None
            _log.error("cannot lock maildir {maildir}: {error}", maildir=maildir, error=e)
            raise MaildropUnavailable("maildrop cannot be locked") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            messages = _Scanner(self, maildir).scan()
        except OSError as e:
            os.close(fd)
            _log.error("cannot scan maildir {maildir}: {error}", maildir=maildir, error=e)
            raise MaildropUnavailable("maildrop cannot be read") from None
        except BaseException:
            os.close(fd)
            raise
        return MaildirMaildrop(self, maildir, fd, messages, address)


class _Scanner:
    """Moves new/ into cur/, fills in missing sizes and maintains the UID list."""

    def __init__(self, store: MaildirStore, maildir: str) -> None:
        self.store = store
        self.maildir = maildir
        self.new = os.path.join(maildir, "new")
        self.cur = os.path.join(maildir, "cur")

    def _regular(self, path: str) -> os.stat_result | None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def _with_sizes(self, path: str, base: str, file_size: int) -> str:
        """Append ``,S=``/``,W=`` to a foreign name that lacks W= (reads the file once)."""
        if size_field(base, "W") is not None:
            return base
        with open(path, "rb") as f:
            wire = wire_size_of_file(f)
        if size_field(base, "S") is None:
            base += f",S={file_size}"
        return base + f",W={wire}"

    def _rename_free(self, src: str, base: str, info: str) -> tuple[str, str]:
        """Rename into cur/ without ever overwriting an existing file."""
        candidate = base
        while True:
            name = f"{candidate}:{info}"
            target = os.path.join(self.cur, name)
            if not os.path.lexists(target):
                os.rename(src, target)
                return candidate, name
            candidate = f"{base}.Q{next(_counter)}"

    def scan(self) -> list[MessageInfo]:
        moved = False
        for name in sorted(os.listdir(self.new), key=_delivery_order):
            path = os.path.join(self.new, name)
            st = self._regular(path) if _is_candidate(name) else None
            if st is None:
                continue
            base, sep, info = name.partition(":")
            self._rename_free(path, self._with_sizes(path, base, st.st_size), info if sep else "2,")
            moved = True
        # base -> (file name in cur, wire size, delivery time)
        entries: dict[str, tuple[str, int, float]] = {}
        for name in os.listdir(self.cur):
            path = os.path.join(self.cur, name)
            st = self._regular(path) if _is_candidate(name) else None
            if st is None:
                continue
            base, sep, info = name.partition(":")
            wire = size_field(base, "W")
            if wire is None:
                sized = self._with_sizes(path, base, st.st_size)
                base, name = self._rename_free(path, sized, info if sep else "2,")
                wire = size_field(base, "W")
                assert wire is not None
                moved = True
            if base in entries:
                _log.warn("duplicate maildir message {name} ignored", name=path)
                continue
            entries[base] = (name, wire, _delivered(base, st))
        if moved:
            self.store.fsync_dir(self.cur)
            self.store.fsync_dir(self.new)
        validity, uids = UidList(self.maildir, self.store).assign(entries)
        return [
            MessageInfo(
                f"{validity:08x}{uid:08x}",
                entries[base][1],
                entries[base][0],
                delivered=entries[base][2],
            )
            for base, uid in sorted(uids.items(), key=lambda item: item[1])
        ]


class UidList:
    """``mailgate-uidlist``: ``V<validity> N<next uid>`` then ``<uid> <base name>`` lines.

    UIDs are assigned once per message and never reused: ``N`` only grows, and if the file
    is lost or corrupt a new validity makes every new UIDL string differ from the old ones.
    """

    def __init__(self, maildir: str, store: MaildirStore) -> None:
        self.path = os.path.join(maildir, UIDLIST_NAME)
        self.maildir = maildir
        self.store = store

    def read(self) -> tuple[int, int, dict[str, int]] | None:
        """(validity, next uid, base -> uid); None when missing. ValueError when corrupt."""
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return None
        m = re.fullmatch(r"V(\d+) N(\d+)", lines[0])
        if not m:
            raise ValueError("bad header")
        validity, next_uid = int(m.group(1)), int(m.group(2))
        known: dict[str, int] = {}
        seen: set[int] = set()
        for line in lines[1:]:
            if not line:
                continue
            uid_text, _, base = line.partition(" ")
            uid = int(uid_text)
            if not base or uid < 1 or uid >= next_uid or uid in seen or base in known:
                raise ValueError("bad entry")
            seen.add(uid)
            known[base] = uid
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
        body.extend(f"{uid} {base}\n" for base, uid in sorted(uids.items(), key=lambda i: i[1]))
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(body))
            f.flush()
            self.store._fsync(f.fileno())
        os.replace(tmp, self.path)
        self.store.fsync_dir(self.maildir)

    def assign(self, entries: dict[str, Any]) -> tuple[int, dict[str, int]]:
        """Give every present base a UID (new ones in delivery order); persist if changed."""
        floor = 0
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
        uids = {base: uid for base, uid in known.items() if base in entries}
        changed = changed or len(uids) != len(known)
        for base in sorted(entries.keys() - uids.keys(), key=_delivery_order):
            uids[base] = next_uid
            next_uid += 1
            changed = True
        if changed:
            self.write(validity, next_uid, uids)
        return validity, uids


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
        self._cur = os.path.join(maildir, "cur")
        self._lock_fd: int | None = lock_fd
        self.messages: Sequence[MessageInfo] = tuple(messages)

    def _find(self, key: str) -> str | None:
        """Path of a message, following a flag change made by another program."""
        path = os.path.join(self._cur, key)
        if os.path.lexists(path):
            return path
        base = key.partition(":")[0]
        with contextlib.suppress(OSError):
            for name in os.listdir(self._cur):
                if name.partition(":")[0] == base:
                    return os.path.join(self._cur, name)
        return None

    def open_message(self, index: int) -> IO[bytes]:
        key = self.messages[index].key
        try:
            return open(os.path.join(self._cur, key), "rb")
        except FileNotFoundError:
            path = self._find(key)
            try:
                if path is not None:
                    return open(path, "rb")
            except OSError:
                pass
        except OSError as e:
            _log.error("cannot open message {key}: {error}", key=key, error=e)
        raise MaildropUnavailable("message vanished")

    def commit(self, deleted: Sequence[int]) -> Deferred[int]:
        if self._lock_fd is None:
            return fail(MaildropUnavailable("maildrop already released"))
        keys = [self.messages[i].key for i in sorted(set(deleted))]
        d: Deferred[int] = self._store._run(self._commit_blocking, keys)

        def done(result: int | Failure) -> int | Failure:
            self.release()
            return result

        return d.addBoth(done)

    def _commit_blocking(self, keys: list[str]) -> int:
        failed = 0
        for key in keys:
            path = self._find(key)
            if path is None:
                continue  # already gone: the goal is reached
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                failed += 1
                _log.error("cannot delete {path}: {error}", path=path, error=e)
        if keys:
            try:
                self._store.fsync_dir(self._cur)
            except OSError as e:
                _log.error("cannot fsync {path}: {error}", path=self._cur, error=e)
        return failed

    def release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the only fd of this open file drops the flock

    def __del__(self) -> None:
        # A session that vanished without release() must not keep the mailbox locked.
        self.release()


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
        self._finished = False
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
        try:
            os.makedirs(store.spool, mode=0o700, exist_ok=True)
            fd, self._path = tempfile.mkstemp(prefix=self.queue_id + ".", dir=store.spool)
            self._file = os.fdopen(fd, "wb")
        except OSError as e:
            self._fail_io("cannot create spool file", e)

    def _fail_io(self, what: str, e: OSError) -> None:
        _log.error("{what} for {queue_id}: {error}", what=what, queue_id=self.queue_id, error=e)
        self._error = DeliveryError("Local delivery failed, try again later", permanent=False)
        self._discard()

    def _discard(self) -> None:
        f, self._file = self._file, None
        path, self._path = self._path, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def write(self, data: bytes) -> None:
        if self._file is None or self._error is not None or not data:
            return
        try:
            self._file.write(data)
        except OSError as e:
            self._fail_io("cannot write spool file", e)
            return
        self._size += len(data)
        self._newlines += data.count(b"\n")
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
        if self._error is not None or self._file is None or self._path is None:
            self._discard()
            return fail(self._error or DeliveryError("delivery aborted", permanent=False))
        f, path = self._file, self._path
        self._file = self._path = None
        d: Deferred[str] = self._run(self._finish_blocking, f, path, self._wire_size())

        def failed(reason: Failure) -> Failure:
            if isinstance(reason.value, OSError):
                _log.failure("local delivery of {queue_id} failed", reason, queue_id=self.queue_id)
                raise DeliveryError("Local delivery failed, try again later", permanent=False)
            return reason

        return d.addErrback(failed)

    def _finish_blocking(self, f: IO[bytes], path: str, wire: int) -> str:
        store = self._store
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
                name = store.unique_name(size, wire)
                tmp_target = os.path.join(maildir, "tmp", name)
                try:
                    os.link(path, tmp_target)
                except OSError:
                    shutil.copyfile(path, tmp_target)
                    with open(tmp_target, "rb") as c:
                        store._fsync(c.fileno())
                final = os.path.join(maildir, "new", name)
                os.rename(tmp_target, final)
                delivered.append(final)
                store.fsync_dir(os.path.join(maildir, "new"))
                store.fsync_dir(os.path.join(maildir, "tmp"))
        except BaseException:
            # All or nothing: the client will retry, so do not leave partial deliveries.
            for final in delivered:
                with contextlib.suppress(OSError):
                    os.unlink(final)
            raise
        finally:
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
        return self.queue_id

    def abort(self) -> None:
        self._finished = True
        self._discard()
