"""The durable outbound spool: plain directories and JSON, state changes by atomic rename.

Layout under ``STATE_DIR/spool`` (Postfix's queue model, made inspectable)::

    tmp/<id>/                   being written by a sink; never acknowledged, removed on start
    incoming/<id>/              new or released entries, to be tried now
    active/<id>/                being delivered by the runner
    deferred/<id>/              waiting for ``next_attempt``
    hold/<id>/                  parked by the administrator
    corrupt/<id>/               unreadable entries, kept for a human to look at

Each entry is one directory holding ``message`` (LF line ends, as the sink got it) and
``envelope.json``. Renaming the entry directory moves message and envelope together, so a
state change is atomic; every change is fsynced (file and directories) before it counts.

:class:`SpoolDirectory` is the blocking, reactor-free half (the admin CLI uses it directly);
:class:`Spool` adds the thread runner and implements :class:`IOutboundQueue`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.errors import MailgateError
from mailgate.interfaces import IMessageSink, IOutboundQueue, ITwoPhaseSink, ThreadRunner
from mailgate.model import Address, Envelope

__all__ = [
    "QUEUE_STATES",
    "CorruptEntry",
    "EntryNotFound",
    "QueueEntry",
    "RecipientState",
    "Spool",
    "SpoolDirectory",
    "SpoolSink",
]

_log = Logger()

QUEUE_STATES = ("incoming", "active", "deferred", "hold", "corrupt")
TMP = "tmp"
MESSAGE_NAME = "message"
ENVELOPE_NAME = "envelope.json"
FORMAT_VERSION = 1

_ID = re.compile(r"^[0-9A-Z]{8,40}\Z")


class EntryNotFound(MailgateError):
    """No queue entry with this id (in the states looked at)."""


class CorruptEntry(MailgateError):
    """The entry's envelope is unreadable or its message file is missing."""


def is_queue_id(text: str) -> bool:
    """Whether ``text`` has the shape of an id we generate (so it is a safe path component)."""
    return bool(_ID.match(text))


def _address_to_json(address: Address | None) -> str | None:
    return None if address is None else f"{address.local}@{address.domain}"


def _address_from_json(value: object) -> Address | None:
    if value is None:
        return None
    if not isinstance(value, str) or "@" not in value:
        raise CorruptEntry("bad address")
    local, _, domain = value.rpartition("@")
    if not local or not domain:
        raise CorruptEntry("bad address")
    return Address(local, domain)


@dataclass
class RecipientState:
    """One recipient's progress: ``pending`` (to try), ``sent``, or ``failed`` (permanent).

    ``notified`` tells whether the sender has been told about a failure (a DSN was made or
    the sender was null), so a crash between recording and bouncing loses no DSN.
    """

    address: Address
    status: str = "pending"
    code: int | None = None
    text: str | None = None
    remote_mta: str | None = None
    notified: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "address": _address_to_json(self.address),
            "status": self.status,
            "code": self.code,
            "text": self.text,
            "remote_mta": self.remote_mta,
            "notified": self.notified,
        }

    @classmethod
    def from_json(cls, data: object) -> RecipientState:
        if not isinstance(data, dict):
            raise CorruptEntry("recipient is not an object")
        address = _address_from_json(data.get("address"))
        status = data.get("status")
        code = data.get("code")
        text = data.get("text")
        remote = data.get("remote_mta")
        notified = data.get("notified", False)
        if address is None or status not in ("pending", "sent", "failed"):
            raise CorruptEntry("bad recipient")
        if code is not None and not isinstance(code, int):
            raise CorruptEntry("bad code")
        if (text is not None and not isinstance(text, str)) or (
            remote is not None and not isinstance(remote, str)
        ):
            raise CorruptEntry("bad text")
        return cls(address, status, code, text, remote, bool(notified))


@dataclass
class QueueEntry:
    """The JSON envelope of one spooled message."""

    queue_id: str
    sender: Address | None
    recipients: list[RecipientState]
    created: float
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: The sender has had the (one) "delayed" DSN for this message.
    delay_warned: bool = False

    @property
    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == "pending"]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "id": self.queue_id,
            "sender": _address_to_json(self.sender),
            "recipients": [r.to_json() for r in self.recipients],
            "created": self.created,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
            "delay_warned": self.delay_warned,
        }

    @classmethod
    def from_json(cls, queue_id: str, data: object) -> QueueEntry:
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise CorruptEntry("unknown envelope format")
        recipients = data.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            raise CorruptEntry("no recipients")
        created = data.get("created")
        attempts = data.get("attempts", 0)
        next_attempt = data.get("next_attempt", 0.0)
        last_error = data.get("last_error")
        delay_warned = data.get("delay_warned", False)  # absent in older envelopes
        if not isinstance(created, int | float) or not isinstance(next_attempt, int | float):
            raise CorruptEntry("bad times")
        if (
            not isinstance(attempts, int)
            or (last_error is not None and not isinstance(last_error, str))
            or not isinstance(delay_warned, bool)
        ):
            raise CorruptEntry("bad counters")
        return cls(
            queue_id,
            _address_from_json(data.get("sender")),
            [RecipientState.from_json(r) for r in recipients],
            float(created),
            attempts,
            float(next_attempt),
            last_error,
            delay_warned=delay_warned,
        )


class SpoolDirectory:
    """Blocking operations on the spool directories; safe to use without a reactor.

    Every method here may block (fsync): the server calls them through its thread runner.
    """

    def __init__(self, root: Path, fsync: Callable[[int], None] = os.fsync) -> None:
        self.root = Path(root)
        self._fsync = fsync

    # -- low level -------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the state directories (idempotent)."""
        for name in (TMP, *QUEUE_STATES):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def entry_dir(self, state: str, queue_id: str) -> Path:
        if state not in QUEUE_STATES and state != TMP:
            raise ValueError(state)
        if not is_queue_id(queue_id):
            raise EntryNotFound(queue_id)
        return self.root / state / queue_id

    def new_id(self, now: float) -> str:
        """A unique, path-safe id: arrival time in hex (sorts by age) and 40 random bits."""
        while True:
            candidate = f"{int(now * 1000) & 0xFFFFFFFFFFF:011X}{secrets.token_hex(5).upper()}"
            if self.find(candidate) is None and not (self.root / TMP / candidate).exists():
                return candidate

    def write_envelope(self, directory: Path, entry: QueueEntry) -> None:
        """Replace ``envelope.json`` atomically (temp file, fsync, rename, fsync dir)."""
        tmp = directory / (ENVELOPE_NAME + ".tmp")
        data = json.dumps(entry.to_json(), indent=1, sort_keys=True).encode("utf-8")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            self._fsync(f.fileno())
        os.replace(tmp, directory / ENVELOPE_NAME)
        self.fsync_dir(directory)

    def read_envelope(self, state: str, queue_id: str) -> QueueEntry:
        """Load an entry's envelope; CorruptEntry when it is unusable."""
        directory = self.entry_dir(state, queue_id)
        if not directory.is_dir():
            raise EntryNotFound(queue_id)
        if not (directory / MESSAGE_NAME).is_file():
            raise CorruptEntry("message file missing")
        try:
            raw = (directory / ENVELOPE_NAME).read_bytes()
        except FileNotFoundError:
            raise CorruptEntry("envelope missing") from None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise CorruptEntry("envelope is not valid JSON") from None
        return QueueEntry.from_json(queue_id, data)

    def move(self, queue_id: str, src: str, dst: str) -> None:
        """Atomically move an entry between states; EntryNotFound if it is not in ``src``."""
        try:
            os.rename(self.entry_dir(src, queue_id), self.entry_dir(dst, queue_id))
        except FileNotFoundError:
            raise EntryNotFound(queue_id) from None
        self.fsync_dir(self.root / dst)
        self.fsync_dir(self.root / src)

    def remove(self, state: str, queue_id: str) -> None:
        """Delete an entry: first rename it out of its state (atomic), then remove the files."""
        trash = self.root / TMP / f"{queue_id}.del"
        try:
            os.rename(self.entry_dir(state, queue_id), trash)
        except FileNotFoundError:
            raise EntryNotFound(queue_id) from None
        self.fsync_dir(self.root / state)
        shutil.rmtree(trash, ignore_errors=True)

    def ids(self, state: str) -> list[str]:
        """Ids in one state, oldest first (ids begin with the arrival time)."""
        try:
            names = os.listdir(self.root / state)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_queue_id(n))

    def find(self, queue_id: str) -> str | None:
        """The state an entry is in, or None."""
        if not is_queue_id(queue_id):
            return None
        for state in QUEUE_STATES:
            if (self.root / state / queue_id).is_dir():
                return state
        return None

    def open_message(self, state: str, queue_id: str) -> IO[bytes]:
        return open(self.entry_dir(state, queue_id) / MESSAGE_NAME, "rb")

    def message_size(self, state: str, queue_id: str) -> int:
        try:
            return (self.entry_dir(state, queue_id) / MESSAGE_NAME).stat().st_size
        except FileNotFoundError:
            return 0

    def mark_corrupt(self, state: str, queue_id: str, reason: str) -> None:
        """Park an unreadable entry in corrupt/ and log it; never raises for a vanished one."""
        _log.error(
            "queue {queue_id}: corrupt entry in {state}/ ({reason}), moved to corrupt/",
            queue_id=queue_id,
            state=state,
            reason=reason,
        )
        with contextlib.suppress(EntryNotFound, OSError):
            self.move(queue_id, state, "corrupt")

    # -- entry creation (the sink's blocking half) -----------------------------------

    def commit_new(self, queue_id: str, entry: QueueEntry) -> None:
        """Write the envelope next to the written message, fsync all, rename into incoming/."""
        self.prepare_new(queue_id, entry)
        self.publish_new(queue_id)

    def prepare_new(self, queue_id: str, entry: QueueEntry) -> None:
        """The durable half of :meth:`commit_new`: envelope written, everything fsynced,
        still in tmp/ (where nothing acts on it and a restart removes it)."""
        directory = self.root / TMP / queue_id
        self.write_envelope(directory, entry)
        self.fsync_dir(self.root / TMP)

    def publish_new(self, queue_id: str) -> None:
        """The visible half of :meth:`commit_new`: the prepared entry renamed into incoming/."""
        os.rename(self.root / TMP / queue_id, self.entry_dir("incoming", queue_id))
        self.fsync_dir(self.root / "incoming")

    # -- recovery and administration -------------------------------------------------

    def recover(self) -> int:
        """On start: drop unfinished temp entries, put entries left in active/ back in
        incoming/ (recipients recorded as sent stay sent). Returns how many came back."""
        self.ensure()
        for name in os.listdir(self.root / TMP):
            shutil.rmtree(self.root / TMP / name, ignore_errors=True)
        count = 0
        for queue_id in self.ids("active"):
            with contextlib.suppress(EntryNotFound):
                self.move(queue_id, "active", "incoming")
                count += 1
        return count

    def _admin_move(self, queue_id: str, sources: tuple[str, ...], dst: str) -> str:
        state = self.find(queue_id)
        if state is None:
            raise EntryNotFound(f"no such queue entry: {queue_id}")
        if state not in sources:
            raise EntryNotFound(f"queue entry {queue_id} is in {state}, not in {'/'.join(sources)}")
        self.move(queue_id, state, dst)
        return state

    def hold(self, queue_id: str) -> None:
        """Park an entry (incoming or deferred) until released."""
        self._admin_move(queue_id, ("incoming", "deferred"), "hold")

    def release(self, queue_id: str) -> None:
        """Put a held entry back for an immediate attempt."""
        self._admin_move(queue_id, ("hold",), "incoming")

    def retry(self, queue_id: str) -> None:
        """Try a deferred entry now."""
        self._admin_move(queue_id, ("deferred",), "incoming")

    def delete(self, queue_id: str) -> None:
        """Remove an entry from whatever state it is in (no DSN)."""
        state = self.find(queue_id)
        if state is None:
            raise EntryNotFound(f"no such queue entry: {queue_id}")
        self.remove(state, queue_id)

    def flush(self) -> int:
        """Move every deferred entry to incoming/; returns how many moved."""
        count = 0
        for queue_id in self.ids("deferred"):
            with contextlib.suppress(EntryNotFound):
                self.move(queue_id, "deferred", "incoming")
                count += 1
        return count

    def counts(self) -> dict[str, int]:
        return {state: len(self.ids(state)) for state in QUEUE_STATES}


@implementer(ITwoPhaseSink)
class SpoolSink:
    """Writes one message into ``tmp/<id>/message``; finish() makes it durable in incoming/
    (or prepare() durable in tmp/, then commit() moves it to incoming/)."""

    def __init__(self, spool: Spool, envelope: Envelope, queue_id: str) -> None:
        self.queue_id = queue_id
        self._spool = spool
        self._envelope = envelope
        self._dir = spool.directory.root / TMP / queue_id
        self._dir.mkdir()
        self._file: IO[bytes] | None = open(self._dir / MESSAGE_NAME, "wb")  # noqa: SIM115
        self._done = False
        self._prepared = False

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError("sink already finished")
        self._file.write(data)

    def _prepare_blocking(self, file: IO[bytes], entry: QueueEntry) -> None:
        try:
            file.flush()
            self._spool.directory._fsync(file.fileno())
        finally:
            file.close()
        self._spool.directory.prepare_new(self.queue_id, entry)

    def _failed(self, f: Failure) -> Failure:
        _log.failure("queue {queue_id}: could not spool message", f, queue_id=self.queue_id)
        shutil.rmtree(self._dir, ignore_errors=True)
        return f

    def _take(self) -> tuple[IO[bytes], QueueEntry]:
        file, self._file = self._file, None
        if file is None or self._done:
            raise ValueError("sink already finished")
        self._done = True
        now = self._spool.clock.seconds()
        entry = QueueEntry(
            self.queue_id,
            self._envelope.sender,
            [RecipientState(r) for r in self._envelope.recipients],
            created=now,
            next_attempt=now,
        )
        return file, entry

    def _notify(self, _: None) -> str:
        self._spool.notify(self.queue_id)
        return self.queue_id

    def prepare(self) -> Deferred[None]:
        d: Deferred[None] = self._spool.run_in_thread(self._prepare_blocking, *self._take())
        d.addCallback(lambda _: setattr(self, "_prepared", True))
        return d.addErrback(self._failed)

    def commit(self) -> Deferred[str]:
        if not self._prepared:
            raise ValueError("sink not prepared")
        self._prepared = False
        d = self._spool.run_in_thread(self._spool.directory.publish_new, self.queue_id)
        return d.addCallbacks(self._notify, self._failed)

    def _finish_blocking(self, file: IO[bytes], entry: QueueEntry) -> None:
        self._prepare_blocking(file, entry)
        self._spool.directory.publish_new(self.queue_id)

    def finish(self) -> Deferred[str]:
        """Both halves in one thread hop, when nothing else has to happen in between."""
        d = self._spool.run_in_thread(self._finish_blocking, *self._take())
        return d.addCallbacks(self._notify, self._failed)

    def abort(self) -> None:
        if self._prepared:  # durable in tmp/ but never committed: discard it
            self._prepared = False
            shutil.rmtree(self._dir, ignore_errors=True)
            return
        if self._done:
            return
        self._done = True
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self._dir, ignore_errors=True)


@implementer(IOutboundQueue)
class Spool:
    """The spool as the server sees it: sinks, thread-run operations, and a new-mail hook."""

    def __init__(self, root: Path, run_in_thread: ThreadRunner, clock: IReactorTime) -> None:
        self.directory = SpoolDirectory(root)
        self.directory.ensure()
        self.run_in_thread = run_in_thread
        self.clock = clock
        self._listeners: list[Callable[[str], None]] = []

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(queue_id)`` whenever a new entry lands in incoming/."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[str], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def notify(self, queue_id: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(queue_id)
            except Exception:
                _log.failure("queue listener failed")

    def open_message(self, envelope: Envelope) -> IMessageSink:
        if not envelope.recipients:
            raise ValueError("an envelope needs at least one recipient")
        queue_id = self.directory.new_id(self.clock.seconds())
        return SpoolSink(self, envelope, queue_id)

    def call(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run one blocking SpoolDirectory operation in the thread runner."""
        return self.run_in_thread(f, *args)
