"""Pure transforms between stored message bytes and the POP3/SMTP wire form.

Stored messages may use LF, CRLF or even bare CR line ends. On the wire every line ends with
CRLF, and a line starting with ``.`` gets one more ``.`` (RFC 1939 3, RFC 5321 4.5.2). The
encoder keeps its state across chunks, so a line that begins exactly at a chunk boundary,
and the very first line of the message, are stuffed too (Twisted's transformChunk is not).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import IO

#: A line starting with "." after a line break. Searched with ``re`` rather than ``in``: for
#: this two-byte needle in ordinary text (a newline every ~80 octets, dots at line ends)
#: ``bytes.__contains__`` runs at ~1 GB/s while sre's literal-prefix scan is ~3x faster, and
#: on LF-stored mail this check was the most expensive step of RETR (profile in
#: benchmarks/README.md).
_DOT_LINE = re.compile(rb"\n\.")


def starts_dot_line(data: bytes, previous: bytes) -> bool:
    """Whether a line beginning with ``.`` starts inside ``data``, which follows the byte
    ``previous`` (b"" at the start of a message), whatever the line ends (LF, CRLF, CR).

    A delivery asks this of every chunk it stores, so that RETR can skip the search when
    the answer was no for the whole message (see the Maildir store's ``,D=0``).
    """
    if data[:1] == b"." and previous in (b"", b"\n", b"\r"):
        return True
    if _DOT_LINE.search(data) is not None:
        return True
    return b"\r" in data and b"\r." in data


class WireEncoder:
    """Stateful stored-bytes -> wire-bytes encoder (CRLF line ends, optional dot-stuffing)."""

    __slots__ = ("_at_line_start", "_pending_cr", "_stuff")

    def __init__(self, stuff: bool = True) -> None:
        self._stuff = stuff
        self._at_line_start = True
        self._pending_cr = False

    def feed(self, data: bytes) -> bytes:
        """Encode the next chunk; may hold back one trailing CR until the next call."""
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._pending_cr = True
        if not data:
            return b""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._stuff:
            if _DOT_LINE.search(data) is not None:
                data = data.replace(b"\n.", b"\n..")
            if self._at_line_start and data[:1] == b".":
                data = b"." + data
        self._at_line_start = data[-1:] == b"\n"
        return data.replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        """Flush: end the last line with CRLF if it is open. The ``.`` terminator is not added."""
        if self._pending_cr:
            self._pending_cr = False
            self._at_line_start = True
            return b"\r\n"
        if not self._at_line_start:
            self._at_line_start = True
            return b"\r\n"
        return b""


def encode_all(chunks: Iterable[bytes], stuff: bool = True) -> bytes:
    """Encode a whole message held in memory (tests, small bounces)."""
    enc = WireEncoder(stuff)
    out = [enc.feed(c) for c in chunks]
    out.append(enc.finish())
    return b"".join(out)


def wire_size_of_file(f: IO[bytes], chunk_size: int = 65536) -> int:
    """Octets a message occupies on the wire with CRLF line ends, before stuffing.

    This is the RFC 1939 size for STAT/LIST; computed with the same encoder RETR uses, so
    the two always agree.
    """
    enc = WireEncoder(stuff=False)
    total = 0
    while chunk := f.read(chunk_size):
        total += len(enc.feed(chunk))
    return total + len(enc.finish())


def lf_wire_size(data: bytes) -> int:
    """Wire size of LF-only text in which every line (including the last) ends with LF."""
    return len(data) + data.count(b"\n")
