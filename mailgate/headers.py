"""Header-block handling for message submission (RFC 6409 8, RFC 5321 4.4, RFC 3848).

Pure functions over LF-line-ended bytes: split the header block off the start of a message
(incrementally, with caller-chosen bounds), read field values, and produce the fixed block a
submission server passes on: a new ``Received:`` on top, ``Date:``/``Message-ID:`` added
when missing, ``Bcc:``/``Return-Path:`` removed. The body is never touched.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_HEADER_LINES",
    "HeaderBlock",
    "HeaderField",
    "HeaderSplitter",
    "HeaderTooLarge",
    "ReceivedInfo",
    "fix_headers",
    "format_date",
    "make_message_id",
    "parse_header_block",
    "received_protocol",
]

MAX_HEADER_LINES = 1000
MAX_HEADER_BYTES = 256 * 1024

# RFC 5322 3.6.8: field names are printable US-ASCII except ":".
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# What may appear in a Received: comment or atom taken from the client.
_UNSAFE = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e]")


class HeaderTooLarge(ValueError):
    """The header block exceeds the bounds the caller set."""


@dataclass(frozen=True)
class HeaderField:
    """One header field as it was sent: ``raw`` holds every physical line, LF-ended."""

    name: str
    raw: bytes

    @property
    def value(self) -> str:
        """The unfolded value (RFC 5322 2.2.3), outer whitespace stripped.

        Octets that are not UTF-8 come out as U+FFFD; the raw bytes stay untouched.
        """
        _, _, value = self.raw.partition(b":")
        unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", value).rstrip(b"\r\n")
        return unfolded.strip(b" \t").decode("utf-8", "replace")


@dataclass(frozen=True)
class HeaderBlock:
    """The parsed header block of a message.

    ``separated`` tells whether an empty line ended it; when it is False the body started
    with a line that was not a header field (or the message had no body), and a writer must
    put an empty line back between the header block and that body.
    """

    fields: tuple[HeaderField, ...]
    separated: bool = True

    def values(self, name: str) -> list[str]:
        """Unfolded values of every field called ``name`` (case-insensitive), in order."""
        key = name.lower()
        return [f.value for f in self.fields if f.name.lower() == key]

    def first(self, name: str) -> str | None:
        """The first value of ``name``, or None."""
        found = self.values(name)
        return found[0] if found else None

    def has(self, name: str) -> bool:
        """Whether a field called ``name`` is present."""
        key = name.lower()
        return any(f.name.lower() == key for f in self.fields)

    def without(self, names: Iterable[str]) -> HeaderBlock:
        """A copy with every field of these names dropped."""
        keys = {n.lower() for n in names}
        return HeaderBlock(
            tuple(f for f in self.fields if f.name.lower() not in keys), self.separated
        )

    def to_bytes(self) -> bytes:
        """The fields as stored (no separating empty line)."""
        return b"".join(f.raw for f in self.fields)


class HeaderSplitter:
    """Incrementally separate the header block from the body of an LF-ended message.

    ``feed`` returns None until the block is complete, then ``(block, body_start)``, where
    ``body_start`` is the rest of that chunk (later chunks are all body and do not belong
    here). ``finish`` completes a message that ended inside its header block. Holds at most
    ``max_bytes`` plus one chunk.
    """

    def __init__(
        self, max_lines: int = MAX_HEADER_LINES, max_bytes: int = MAX_HEADER_BYTES
    ) -> None:
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._lines: list[bytes] = []
        self._partial = b""
        self._size = 0
        self.block: HeaderBlock | None = None

    def _complete(self, separated: bool) -> HeaderBlock:
        fields: list[HeaderField] = []
        for line in self._lines:
            if line[:1] in (b" ", b"\t"):
                last = fields[-1]
                fields[-1] = HeaderField(last.name, last.raw + line)
            else:
                m = _FIELD.match(line)
                assert m is not None
                fields.append(HeaderField(m.group(1).decode("ascii"), line))
        self.block = HeaderBlock(tuple(fields), separated)
        self._lines = []
        return self.block

    def feed(self, data: bytes) -> tuple[HeaderBlock, bytes] | None:
        """Take more message bytes (bare LF line ends)."""
        if self.block is not None:
            raise RuntimeError("HeaderSplitter fed after the header block ended")
        buf = self._partial + data
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            line = buf[pos : nl + 1]
            if line == b"\n":
                return self._complete(True), buf[nl + 1 :]
            is_continuation = line[:1] in (b" ", b"\t") and bool(self._lines)
            if not is_continuation and not _FIELD.match(line):
                # Not a header field: the body starts here, with no empty line before it.
                return self._complete(False), buf[pos:]
            self._lines.append(line)
            self._size += len(line)
            if len(self._lines) > self._max_lines or self._size > self._max_bytes:
                raise HeaderTooLarge("header block too large")
            pos = nl + 1
        self._partial = buf[pos:]
        if len(self._partial) + self._size > self._max_bytes:
            raise HeaderTooLarge("header line too large")
        return None

    def finish(self) -> tuple[HeaderBlock, bytes]:
        """The message ended: whatever is pending completes the block or starts the body."""
        if self.block is not None:
            raise RuntimeError("HeaderSplitter finished twice")
        partial, self._partial = self._partial, b""
        if partial:
            done = self.feed(partial + b"\n")
            if done is not None:
                block, body = done
                # The newline was ours, not the client's: give the body back as sent.
                return block, body[:-1] if body.endswith(b"\n") else body
        return self._complete(False), b""


def parse_header_block(
    message: bytes, max_lines: int = MAX_HEADER_LINES, max_bytes: int = MAX_HEADER_BYTES
) -> tuple[HeaderBlock, bytes]:
    """Split a whole LF-ended message held in memory into its header block and body."""
    splitter = HeaderSplitter(max_lines, max_bytes)
    done = splitter.feed(message)
    return done if done is not None else splitter.finish()


def received_protocol(*, extended: bool, tls: bool, authenticated: bool) -> str:
    """The ``with`` keyword of RFC 3848: ESMTP plus S for TLS and A for AUTH."""
    if not extended:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


#: The last second formatted and its text: a busy server stamps many messages per second
#: (Received: and Date:), and formatting took a fifth of fixing a message's header.
_last_date: tuple[int, str] = (-1, "")


def format_date(when: float) -> str:
    """An RFC 5322 date-time in UTC, e.g. ``Tue, 14 Nov 2023 10:00:00 +0000``."""
    global _last_date
    second = int(when // 1)
    last = _last_date  # one read: another thread may replace it meanwhile
    if last[0] == second:
        return last[1]
    text = format_datetime(datetime.fromtimestamp(second, UTC))
    _last_date = (second, text)
    return text


def make_message_id(hostname: str, when: float, token: str | None = None) -> str:
    """A globally unique ``<...@hostname>`` (time plus 96 random bits)."""
    rand = token if token is not None else secrets.token_hex(12)
    return f"<{int(when)}.{rand}@{hostname}>"


def _clean(text: str, limit: int = 255) -> str:
    """Client-supplied text made safe inside a Received: comment."""
    return _UNSAFE.sub("?", text)[:limit] or "unknown"


@dataclass(frozen=True)
class ReceivedInfo:
    """What the ``Received:`` trace field records about one submission."""

    helo: str
    peer_ip: str
    hostname: str
    protocol: str
    queue_id: str
    recipients: Sequence[str] = ()


def _received(info: ReceivedInfo, when: float) -> bytes:
    ip = info.peer_ip
    literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
    # No HELO name at all (POP3 XTND XMIT has none): the address literal stands alone.
    origin = f"{_clean(info.helo)} ({literal})" if info.helo else literal
    lines = [
        f"Received: from {origin}",
        f"\tby {info.hostname} (mailgate) with {_clean(info.protocol, 32)} id {info.queue_id}",
    ]
    if len(info.recipients) == 1:
        lines.append(f"\tfor <{_clean(info.recipients[0], 320)}>")
    lines[-1] += ";"
    lines.append(f"\t{format_date(when)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


REMOVED_FIELDS = ("Bcc", "Return-Path")


def fix_headers(
    block: HeaderBlock,
    info: ReceivedInfo,
    *,
    now: Callable[[], float] = time.time,
    token: Callable[[], str] = lambda: secrets.token_hex(12),
    remove_resent_bcc: bool = True,
) -> bytes:
    """The header block to store, ending with the empty line that separates the body.

    Existing ``Date:`` and ``Message-ID:`` are kept as they are; missing ones are added at
    the end of the block. ``now`` is the injectable clock behind both dates.
    """
    when = now()
    removed = (*REMOVED_FIELDS, "Resent-Bcc") if remove_resent_bcc else REMOVED_FIELDS
    kept = block.without(removed)
    parts = [_received(info, when), kept.to_bytes()]
    if not kept.has("Date"):
        parts.append(f"Date: {format_date(when)}\n".encode("ascii"))
    if not kept.has("Message-ID"):
        msgid = make_message_id(info.hostname, when, token())
        parts.append(f"Message-ID: {msgid}\n".encode("ascii"))
    parts.append(b"\n")
    return b"".join(parts)
