"""Incremental reader for the SMTP DATA (and POP3 XTND XMIT) message body.

Bytes in, in any chunking; unstuffed content with bare LF line ends out, plus the point
where the data ended so pipelined bytes after the terminator go back to the command parser.

End of data is exactly CR LF "." CR LF (or "." CR LF at the very start). A "." line ended by
a bare LF or bare CR, or a "." line following a line that ended with a bare LF or CR, is
content: this is what keeps SMTP smuggling (CVE-2023-51764 and friends) out. The reader keeps
at most one pending CR and a handful of counters, never a whole line, so an over-long line
or a huge message cannot make it hold unbounded memory or lose its place in the stream.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

__all__ = [
    "LINE_LIMIT",
    "BareNewline",
    "DataReader",
    "DataStatus",
    "LongLines",
]

#: RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
LINE_LIMIT = 1000

_NEWLINE = re.compile(rb"\r\n|\r|\n")
#: Where a line starts with a dot. sre's literal scan finds this 3-byte needle about 3x
#: faster than ``bytes.find`` in ordinary text (see mailgate/wire.py).
_CRLF_DOT = re.compile(rb"\r\n\.")


class BareNewline(enum.Enum):
    """What to do with a bare LF or bare CR inside the data."""

    #: Treat it as a line end (stored as LF); it never takes part in ending the data.
    NORMALIZE = "normalize"
    #: Keep reading to the real end, then report :attr:`DataStatus.BARE_NEWLINE`.
    REJECT = "reject"


class LongLines(enum.Enum):
    """What to do with a line longer than :data:`LINE_LIMIT` octets including CRLF."""

    REJECT = "reject"
    ACCEPT = "accept"


class DataStatus(enum.Enum):
    """The verdict on a finished message (the first problem found wins)."""

    OK = "ok"
    TOO_BIG = "too_big"
    BARE_NEWLINE = "bare_newline"
    LINE_TOO_LONG = "line_too_long"


class DataReader:
    """Feed raw DATA bytes; content goes to ``emit`` with LF line ends, unstuffed.

    ``feed`` returns None while the data continues, and the bytes that followed the
    terminator (possibly empty) once it was seen. ``size`` counts content octets with CRLF
    line ends (RFC 1870), which is what ``max_size`` limits. After the first problem
    nothing more is emitted (the caller throws the message away) but reading goes on to
    the real end, so the session stays in step with the client.
    """

    def __init__(
        self,
        emit: Callable[[bytes], None],
        *,
        bare_newline: BareNewline | str = BareNewline.NORMALIZE,
        long_lines: LongLines | str = LongLines.REJECT,
        max_size: int | None = None,
        line_limit: int = LINE_LIMIT,
        keep_unescaped_dots: bool = False,
    ) -> None:
        self._emit = emit
        # qpopper 4's XTND XMIT rule: only ".." loses a dot; ".foo" (a client that did not
        # stuff) is kept as sent. SMTP (RFC 5321 4.5.2) drops the first dot of every line.
        self._keep_unescaped = keep_unescaped_dots
        #: Lines that began with a single "." and were kept verbatim (keep_unescaped_dots).
        self.unescaped_dots = 0
        self._bare = BareNewline(bare_newline)
        self._long = LongLines(long_lines)
        self._max_size = max_size
        # Octets a line may hold before its CRLF.
        self._max_line = line_limit - 2
        self.size = 0
        self.status = DataStatus.OK
        self.done = False
        self._pending_cr = False
        # Octets of the current line seen so far (as sent, before unstuffing).
        self._line_len = 0
        # The current line so far is exactly one "." that has not been emitted yet.
        self._dot_held = False
        # The previous line ended with CRLF, or nothing has been read yet.
        self._after_crlf = True

    def _fail(self, status: DataStatus) -> None:
        if self.status is DataStatus.OK:
            self.status = status

    def _text(self, seg: bytes, out: list[bytes]) -> None:
        """Octets inside the current line (no CR or LF among them)."""
        if not seg:
            return
        if self._line_len == 0 and seg[:1] == b".":
            # Either a stuffed line (drop the dot), a lone "." (content or the end)...
            self._dot_held = True
            self._line_len = 1
            seg = seg[1:]
            if not seg:
                return
        if self._dot_held:
            # ...now known to be a stuffed line: the held dot is dropped.
            self._dot_held = False
            if self._keep_unescaped and seg[:1] != b".":
                self.unescaped_dots += 1
                self._content(b".", out)
        self._line_len += len(seg)
        if self._line_len > self._max_line and self._long is LongLines.REJECT:
            self._fail(DataStatus.LINE_TOO_LONG)
        self._content(seg, out)

    def _content(self, data: bytes, out: list[bytes], newlines: int | None = None) -> None:
        """Count (in CRLF octets) and pass on content, unless the message already failed.
        ``newlines``: the number of LFs in ``data``, when the caller already knows it."""
        self.size += len(data) + (data.count(b"\n") if newlines is None else newlines)
        if self._max_size is not None and self.size > self._max_size:
            self._fail(DataStatus.TOO_BIG)
        if self.status is DataStatus.OK:
            out.append(data)

    def _line_end(self, term: bytes, out: list[bytes]) -> bool:
        """A line ended with ``term``; True when this was the end of the data."""
        crlf = term == b"\r\n"
        if self._dot_held and self._line_len == 1:
            self._dot_held = False
            if crlf and self._after_crlf:
                return True
            # A "." line that does not end the data is content, kept as ".".
            self._content(b".", out)
        if not crlf and self._bare is BareNewline.REJECT:
            self._fail(DataStatus.BARE_NEWLINE)
        self._content(b"\n", out)
        self._line_len = 0
        self._after_crlf = crlf
        return False

    def _fast(self, data: bytes, out: list[bytes]) -> bool:
        """Whole chunk at C speed when it is plain CRLF text: no dot at a line start, no
        bare CR/LF, no over-long line. Anything else (including the end) takes the line loop,
        which gives the same result.

        ``feed`` never passes a chunk holding CRLF "." (it cuts just before the dot), so
        only a dot at the very start needs a look here.
        """
        if self._dot_held or (self._line_len == 0 and data[:1] == b"."):
            return False
        text = data.replace(b"\r\n", b"\n")
        pairs = len(data) - len(text)
        # Every CR was part of a CRLF and every LF too: no bare line ends.
        if pairs == 0 or b"\r" in text or text.count(b"\n") != pairs:
            return False
        if self._line_len + len(text) > self._max_line:  # only then can a line be too long
            lines = text.split(b"\n")
            longest = max(self._line_len + len(lines[0]), *map(len, lines[1:]))
            if longest > self._max_line:
                return False
            self._line_len = len(lines[-1])
        else:
            self._line_len = len(text) - text.rfind(b"\n") - 1
        self._content(text, out, pairs)
        self._after_crlf = True
        return True

    def _slow(self, data: bytes, out: list[bytes]) -> int | None:
        """The reference line loop over ``data`` (which never ends inside a CRLF); the
        offset just after the terminator, or None when the data goes on."""
        pos = 0
        for m in _NEWLINE.finditer(data):
            self._text(data[pos : m.start()], out)
            pos = m.end()
            if self._line_end(m.group(), out):
                return pos
        self._text(data[pos:], out)
        return None

    def feed(self, data: bytes) -> bytes | None:
        """Take the next chunk; None while the data goes on, else the bytes after the end.

        The chunk is cut at every CRLF followed by a dot: the runs of plain CRLF text between
        those points go through the fast path, and only a line starting with a dot (a
        stuffed line or the terminator) takes the line loop. A chunk that holds a whole
        message plus its terminator, the common case, is then mostly handled at C speed.
        """
        if self.done:
            raise RuntimeError("DataReader fed after the end of data")
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            # It may be the first half of a CRLF: decide when the next octet arrives.
            data = data[:-1]
            self._pending_cr = True
        out: list[bytes] = []
        rest: bytes | None = None
        pos, size = 0, len(data)
        while pos < size:
            if self._dot_held or (self._line_len == 0 and data[pos] == 0x2E):  # "."
                # A line starting with a dot: the line loop, up to and with its line end.
                m = _NEWLINE.search(data, pos)
                cut = m.end() if m else size
            else:
                found = _CRLF_DOT.search(data, pos)
                cut = size if found is None else found.start() + 2
                if self._fast(data[pos:cut], out):
                    pos = cut
                    continue
            end = self._slow(data[pos:cut], out)
            if end is not None:
                self.done = True
                rest = data[pos + end :] + (b"\r" if self._pending_cr else b"")
                self._pending_cr = False
                break
            pos = cut
        if out:
            self._emit(b"".join(out))
        return rest
