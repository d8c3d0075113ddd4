"""Per-session wire transcripts: every byte both ways, secrets masked, one JSON line per event.

File: ``STATE_DIR/transcripts/<YYYYMMDD>/<id>.log`` (UTC date of the session start), written
append-only. Each line is one JSON object::

    {"t": 1700000000.123, "dir": "-", "event": "open", "id": "...", "listener": "pop3",
     "peer": "127.0.0.1:50000", "local": "127.0.0.1:1110"}
    {"t": 1700000000.124, "dir": "S", "data": "+OK mail.example.com POP3 server ready\\r\\n"}
    {"t": 1700000000.130, "dir": "C", "data": "PASS ****\\r\\n"}
    {"t": 1700000000.200, "dir": "-", "event": "tls"}
    {"t": 1700000001.000, "dir": "-", "event": "close", "bytes_in": 120, "bytes_out": 900}

``C`` events are one complete client line each (masked); ``S`` events are one server write
each. ``data`` is the bytes decoded as UTF-8 with ``surrogateescape``, so any byte survives
the round trip. ``-`` events are notes: open, tls, fault, close. Masking: ``PASS x`` ->
``PASS ****``; ``APOP user digest`` -> ``APOP user ****``; ``AUTH mech ir`` -> ``AUTH mech ****``;
every client line inside a SASL exchange -> ``****``.

Why a ProtocolWrapper sees plaintext even after STLS/STARTTLS: Twisted's TCP ``startTLS``
inserts the TLS layer *below* ``transport.protocol`` (the outermost wrapper) and routes
``transport.write`` through it, so every wrapper above the socket keeps seeing cleartext. For
implicit TLS the wrapper must sit inside ``TLSMemoryBIOFactory`` (wrap first, then TLS).

Events are buffered in memory and appended in batches (a timer, and at session end), through
an optional thread runner; never one write or fsync per line.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IProtocol, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from mailgate.interfaces import ThreadRunner
from mailgate.lab.phase import Phase, PhaseTracker, verb_of

log = Logger()

MASK = b"****"
#: Longest partial client line kept while waiting for its LF (then recorded as it is).
MAX_PARTIAL_LINE = 65536
_ID = re.compile(r"[0-9]{8}T[0-9]{6}-[0-9a-f]{8}")


# -- masking ------------------------------------------------------------------------------


def _ending(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return b"\r\n"
    return b"\n" if line.endswith(b"\n") else b""


class Masker:
    """Hides passwords and SASL payloads in client lines; watches replies to know the phase."""

    def __init__(self) -> None:
        self.tracker = PhaseTracker()

    def client_line(self, line: bytes) -> bytes:
        """``line`` as it may be stored (its line ending kept)."""
        phase = self.tracker.client_line(line)
        if phase is Phase.SASL:
            return MASK + _ending(line)
        if phase is Phase.DATA:
            return line
        return mask_command(line)

    def server_data(self, data: bytes) -> None:
        self.tracker.server_data(data)


def mask_command(line: bytes) -> bytes:
    """Mask the secret arguments of PASS, APOP and AUTH (with an initial response)."""
    verb = verb_of(line)
    if verb not in ("PASS", "APOP", "AUTH"):
        return line
    end = _ending(line)
    body = line[: len(line) - len(end)]
    words = body.split(b" ")
    if verb == "PASS":
        return words[0] + b" " + MASK + end if len(words) > 1 else line
    # APOP user digest / AUTH mech initial-response: keep two words, mask the rest.
    if len([w for w in words if w]) <= 2:
        return line
    head = [w for w in words if w][:2]
    return b" ".join([*head, MASK]) + end


# -- writing ------------------------------------------------------------------------------


def new_session_id(now: float) -> str:
    """``YYYYMMDDTHHMMSS-xxxxxxxx``: sortable, and the date names its directory."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(4)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(data)


def _inline(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


class TranscriptStore:
    """Creates session recorders writing under ``directory`` (STATE_DIR/transcripts)."""

    def __init__(
        self,
        directory: Path,
        clock: IReactorTime,
        run_in_thread: ThreadRunner | None = None,
        flush_delay: float = 1.0,
        new_id: Callable[[float], str] = new_session_id,
    ) -> None:
        self.directory = Path(directory)
        self.clock = clock
        self.run_in_thread: ThreadRunner = run_in_thread or _inline
        self.flush_delay = flush_delay
        self.new_id = new_id

    def open_session(self, listener: str, peer: str, local: str) -> SessionRecorder:
        now = self.clock.seconds()
        session_id = self.new_id(now)
        path = self.directory / session_id[:8] / f"{session_id}.log"
        recorder = SessionRecorder(self, session_id, path)
        recorder.event("-", event="open", id=session_id, listener=listener, peer=peer, local=local)
        return recorder


class SessionRecorder:
    """One session's events: buffered, appended in batches, one batch in flight at a time."""

    def __init__(self, store: TranscriptStore, session_id: str, path: Path) -> None:
        self.store = store
        self.id = session_id
        self.path = path
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        self._pending: list[bytes] = []
        self._timer: IDelayedCall | None = None
        self._writing = False
        #: Fires when the last batch after close() is on disk (tests, shutdown).
        self.done: Deferred[None] = Deferred()

    def event(self, direction: str, data: bytes | None = None, **extra: Any) -> None:
        if self.closed:
            return
        record: dict[str, Any] = {"t": round(self.store.clock.seconds(), 6), "dir": direction}
        if data is not None:
            record["data"] = _text(data)
        record.update(extra)
        self._pending.append(json.dumps(record).encode("ascii") + b"\n")
        if self._timer is None and not self._writing:
            self._timer = self.store.clock.callLater(self.store.flush_delay, self._flush)

    def client(self, line: bytes, size: int) -> None:
        self.bytes_in += size
        self.event("C", line)

    def server(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.event("S", data)

    def close(self) -> None:
        if self.closed:
            return
        self.event("-", event="close", bytes_in=self.bytes_in, bytes_out=self.bytes_out)
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._flush()

    def _flush(self) -> None:
        self._timer = None
        if self._writing:
            return  # the running batch schedules the next one when it ends
        if not self._pending:
            if self.closed and not self.done.called:
                self.done.callback(None)
            return
        batch, self._pending = b"".join(self._pending), []
        self._writing = True
        d = self.store.run_in_thread(_append, self.path, batch)
        d.addErrback(self._failed)
        d.addBoth(self._written)

    def _failed(self, failure: Failure) -> None:
        log.failure("cannot write transcript {path}", failure, path=str(self.path))

    def _written(self, _: object) -> None:
        self._writing = False
        if self.closed:
            self._flush()
        elif self._pending and self._timer is None:
            self._timer = self.store.clock.callLater(self.store.flush_delay, self._flush)


# -- the protocol wrapper -----------------------------------------------------------------


def _address(addr: object) -> str:
    host = getattr(addr, "host", None)
    return f"{host}:{getattr(addr, 'port', '')}" if host is not None else str(addr)


class TranscriptProtocol(ProtocolWrapper):
    """Records the plaintext both ways, then passes everything on unchanged."""

    factory: TranscriptFactory

    def __init__(self, factory: TranscriptFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self.recorder: SessionRecorder | None = None
        self._masker = Masker()
        self._partial = b""

    def makeConnection(self, transport: Any) -> None:
        # Before the wrapped protocol's connectionMade, which sends the greeting.
        self.recorder = self.factory.store.open_session(
            self.factory.listener, _address(transport.getPeer()), _address(transport.getHost())
        )
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        if self.recorder is not None:
            buffer = self._partial + data
            start = 0
            while (end := buffer.find(b"\n", start)) >= 0:
                line = buffer[start : end + 1]
                self.recorder.client(self._masker.client_line(line), len(line))
                start = end + 1
            self._partial = buffer[start:]
            if len(self._partial) > MAX_PARTIAL_LINE:
                # A client that never ends its line (a binary flood): record what came as
                # one event and start again, so memory and copying stay bounded.
                line = self._partial
                self.recorder.client(self._masker.client_line(line), len(line))
                self._partial = b""
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def write(self, data: bytes) -> None:
        self._record_server(data)
        super().write(data)  # type: ignore[no-untyped-call]

    def writeSequence(self, data: Any) -> None:
        self._record_server(b"".join(data))
        super().writeSequence(data)  # type: ignore[no-untyped-call]

    def _record_server(self, data: bytes) -> None:
        if self.recorder is not None and data:
            self._masker.server_data(data)
            self.recorder.server(data)

    def startTLS(self, contextFactory: Any, *args: Any) -> None:
        if self.recorder is not None:
            self.recorder.event("-", event="tls")
        cast(Any, self.transport).startTLS(contextFactory, *args)

    def note_event(self, event: str, **extra: Any) -> None:
        """Lets an inner lab wrapper (faults) put a note in this transcript."""
        if self.recorder is not None:
            self.recorder.event("-", event=event, **extra)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.recorder is not None:
            if self._partial:
                line = self._masker.client_line(self._partial)
                self.recorder.client(line, len(self._partial))
                self._partial = b""
            self.recorder.close()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class TranscriptFactory(WrappingFactory[TranscriptProtocol]):
    """Wrap a listener's protocol factory so every session is recorded.

    For implicit TLS apply it *before* ``TLSMemoryBIOFactory`` so it records plaintext.
    """

    noisy = False

    protocol = TranscriptProtocol

    def __init__(self, wrappedFactory: IProtocolFactory, store: TranscriptStore, listener: str):
        super().__init__(wrappedFactory)  # type: ignore[no-untyped-call]
        self.store = store
        self.listener = listener


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscriptSummary:
    id: str
    listener: str
    peer: str
    start: float
    duration: float
    bytes_in: int
    bytes_out: int
    path: Path


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of one file; a torn last line (a crash mid-append) is skipped."""
    events = []
    with path.open("rb") as f:
        for raw in f:
            try:
                value = json.loads(raw)
            except ValueError:
                continue
            if isinstance(value, dict) and "t" in value and "dir" in value:
                events.append(value)
    return events


def _files(directory: Path) -> Iterator[Path]:
    if not directory.is_dir():
        return
    for day in sorted(directory.iterdir()):
        if day.is_dir() and day.name.isdigit():
            yield from sorted(day.glob("*.log"))


def summarize(path: Path, events: list[dict[str, Any]]) -> TranscriptSummary:
    opened = next((e for e in events if e.get("event") == "open"), {})
    closed = next((e for e in events if e.get("event") == "close"), None)
    start = float(events[0]["t"]) if events else 0.0
    end = float(events[-1]["t"]) if events else 0.0
    if closed is not None:
        bytes_in, bytes_out = int(closed.get("bytes_in", 0)), int(closed.get("bytes_out", 0))
    else:  # still open, or the process died: count what was recorded
        sizes = {"C": 0, "S": 0}
        for e in events:
            if e["dir"] in sizes:
                sizes[e["dir"]] += len(str(e.get("data", "")).encode("utf-8", "surrogateescape"))
        bytes_in, bytes_out = sizes["C"], sizes["S"]
    return TranscriptSummary(
        id=str(opened.get("id", path.stem)),
        listener=str(opened.get("listener", "?")),
        peer=str(opened.get("peer", "?")),
        start=start,
        duration=end - start,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        path=path,
    )


def list_transcripts(directory: Path) -> list[TranscriptSummary]:
    return [summarize(p, read_events(p)) for p in _files(Path(directory))]


def find_transcript(directory: Path, session_id: str) -> Path:
    """The file of ``session_id`` (or of the one session whose id starts with it)."""
    directory = Path(directory)
    if _ID.fullmatch(session_id):
        path = directory / session_id[:8] / f"{session_id}.log"
        if path.is_file():
            return path
    if session_id and "/" not in session_id:
        matches = [p for p in _files(directory) if p.stem.startswith(session_id)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise LookupError(f"{session_id!r} matches {len(matches)} transcripts")
    raise LookupError(f"no transcript {session_id!r}")


def _stamp(t: float, with_date: bool = False) -> str:
    base = time.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S", time.gmtime(t))
    return f"{base}.{int(t * 1000) % 1000:03d}"


def _printable(text: str) -> str:
    """One display line: control characters and undecodable bytes shown as escapes."""
    out = []
    for ch in text:
        if ch == "\t" or (ch >= " " and ch != "\x7f" and not 0xDC80 <= ord(ch) <= 0xDCFF):
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(f"\\x{ord(ch):02x}")
    return "".join(out)


def _display_lines(data: str) -> list[str]:
    """Split on CRLF (or a bare LF) and escape whatever else is odd, e.g. a bare CR."""
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [_printable(line[:-1] if line.endswith("\r") else line) for line in lines]


def format_list(summaries: list[TranscriptSummary]) -> str:
    rows = [("ID", "LISTENER", "PEER", "START (UTC)", "DURATION", "BYTES IN/OUT")]
    for s in summaries:
        rows.append(
            (
                s.id,
                s.listener,
                s.peer,
                _stamp(s.start, with_date=True)[:19],
                f"{s.duration:.1f}s",
                f"{s.bytes_in}/{s.bytes_out}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() + "\n"
        for r in rows
    )


def format_show(events: list[dict[str, Any]]) -> str:
    """Readable form: ``HH:MM:SS.mmm C: line`` / ``S: line`` / ``-- note``."""
    out: list[str] = []
    for e in events:
        stamp = _stamp(float(e["t"]))
        direction = e["dir"]
        if direction in ("C", "S"):
            for line in _display_lines(str(e.get("data", ""))) or [""]:
                out.append(f"{stamp} {direction}: {line}\n")
            continue
        note = str(e.get("event", "note"))
        if note == "open":
            out.append(
                f"{_stamp(float(e['t']), with_date=True)} -- session {e.get('id', '?')} on "
                f"{e.get('listener', '?')} from {e.get('peer', '?')} to {e.get('local', '?')}\n"
            )
        elif note == "close":
            out.append(
                f"{stamp} -- closed ({e.get('bytes_in', '?')} bytes in, "
                f"{e.get('bytes_out', '?')} bytes out)\n"
            )
        elif note == "tls":
            out.append(f"{stamp} -- TLS started\n")
        else:
            details = " ".join(
                f"{k}={_printable(str(v))}" for k, v in e.items() if k not in ("t", "dir", "event")
            )
            out.append(f"{stamp} -- {note} {details}".rstrip() + "\n")
    return "".join(out)
