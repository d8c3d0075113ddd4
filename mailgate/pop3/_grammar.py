"""Pure POP3 parsing and formatting: bytes in, values out; values in, bytes out.

Nothing here touches a transport, a clock or a maildrop, so every rule of RFC 1939/2449
line handling can be tested (and fuzzed) on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

CRLF = b"\r\n"
#: RFC 2449 section 4: a command line is at most 255 octets including the CRLF.
MAX_COMMAND_LINE = 255
#: AUTH command and continuation lines may be longer (mirrors RFC 4954's 12288).
MAX_AUTH_LINE = 12288
#: RFC 2449 section 4: the first line of a response is at most 512 octets including CRLF.
MAX_STATUS_LINE = 512
#: How much client text we ever echo back in a reply.
MAX_ECHO = 40


class Pop3SyntaxError(ValueError):
    """A command or argument is malformed; ``reply`` is the text after ``-ERR``.

    ``junk`` says whether it counts towards the session's invalid-command limit: a
    malformed line does, a well-formed request for a message that does not exist does not
    (a client racing a concurrent UPDATE makes that mistake honestly).
    """

    def __init__(self, reply: str, *, junk: bool = True) -> None:
        super().__init__(reply)
        self.reply = reply
        self.junk = junk


@dataclass(frozen=True)
class Command:
    """One parsed command line.

    ``verb`` is upper-cased ASCII; ``rest`` is everything after the first SP, verbatim
    (PASS needs it untouched); :meth:`args` splits it for every other command.
    """

    verb: str
    rest: bytes

    def args(self) -> list[bytes]:
        """Arguments separated by one or more SP (``LIST  1`` has one argument)."""
        return [a for a in self.rest.split(b" ") if a]


class Parsing(Enum):
    """How forgiving the command parser is (a listener's capability profile picks one).

    NORMAL is mailgate's own behaviour: runs of SP between words and trailing SP are fine,
    lines end with CRLF only. STRICT emulates a picky server: exactly one SP between words,
    nothing trailing. LENIENT emulates an old forgiving one: leading SP is ignored too, and a
    bare LF ends a line like CRLF.
    """

    STRICT = "strict"
    NORMAL = "normal"
    LENIENT = "lenient"


def parse_command(line: bytes, parsing: Parsing = Parsing.NORMAL) -> Command:
    """Split a command line (without its CRLF) into verb and argument text.

    Bare CR, bare LF and NUL are refused anywhere in the line: a lone CR or LF would let a
    client smuggle a second command past a proxy, and NUL has no business in POP3.
    """
    if parsing is Parsing.LENIENT:
        line = line.lstrip(b" ")
    if not line:
        raise Pop3SyntaxError("Empty command")
    if b"\r" in line or b"\n" in line or b"\0" in line:
        raise Pop3SyntaxError("Invalid character in command line")
    verb, sep, rest = line.partition(b" ")
    if not verb or len(verb) > 16 or not _VERB.match(verb):
        raise Pop3SyntaxError("Unknown command")
    upper = verb.decode("ascii").upper()
    if parsing is Parsing.STRICT and sep:
        # PASS keeps its argument verbatim (spaces may be part of the password).
        spaced = upper != "PASS" and (rest.startswith(b" ") or rest.endswith(b" ") or b"  " in rest)
        if not rest or spaced:
            raise Pop3SyntaxError("Invalid command syntax")
    return Command(upper, rest)


def parse_message_number(arg: bytes, count: int) -> int:
    """A 1-based message number (``1*DIGIT``, leading zeros allowed) -> 0-based index."""
    if not arg.isdigit():  # bytes.isdigit is ASCII-only: no signs, no Unicode digits
        raise Pop3SyntaxError("Invalid message number")
    stripped = arg.lstrip(b"0")
    if not stripped or len(stripped) > len(str(count)):
        raise Pop3SyntaxError("No such message", junk=False)
    number = int(stripped)
    if number > count:
        raise Pop3SyntaxError("No such message", junk=False)
    return number - 1


def parse_line_count(arg: bytes) -> int:
    """TOP's non-negative line count; absurdly large values mean "the whole body"."""
    if not arg.isdigit():
        raise Pop3SyntaxError("Invalid line count")
    stripped = arg.lstrip(b"0")
    if len(stripped) > 18:
        return 10**18
    return int(stripped or b"0")


#: A verb: visible ASCII only (the length is checked apart).
_VERB = re.compile(rb"[\x21-\x7e]+\Z")


def _printable(text: str) -> str:
    """``text`` with anything but printable ASCII replaced by "?" (one C-level check for
    the usual all-printable reply text; this runs for every status line)."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)


def echo(data: bytes) -> str:
    """Client text made safe to quote in a reply: ASCII printable, at most MAX_ECHO chars."""
    text = _printable(data.decode("ascii", "replace"))
    if len(text) > MAX_ECHO:
        text = text[: MAX_ECHO - 3] + "..."
    return text


def _status(indicator: str, text: str) -> bytes:
    line = indicator if not text else f"{indicator} {_printable(text)}"
    raw = line.encode("ascii")[: MAX_STATUS_LINE - len(CRLF)]
    return raw + CRLF


def ok(text: str = "") -> bytes:
    """A ``+OK`` status line, CRLF-terminated, at most 512 octets."""
    return _status("+OK", text)


class ResponseCode(Enum):
    """RFC 2449 section 8 / RFC 3206 extended response codes we emit."""

    AUTH = "AUTH"
    IN_USE = "IN-USE"
    LOGIN_DELAY = "LOGIN-DELAY"
    SYS_TEMP = "SYS/TEMP"
    SYS_PERM = "SYS/PERM"


def err(text: str, code: ResponseCode | None = None) -> bytes:
    """A ``-ERR [CODE] text`` status line, CRLF-terminated, at most 512 octets."""
    if code is not None:
        text = f"[{code.value}] {text}"
    return _status("-ERR", text)


def stuff_line(line: bytes) -> bytes:
    """One data line of a multi-line response, dot-stuffed, with CRLF."""
    if line.startswith(b"."):
        line = b"." + line
    return line + CRLF


def multiline(status: bytes, lines: Iterable[bytes]) -> bytes:
    """A whole multi-line response (status line, stuffed data lines, ``.``) as one buffer."""
    return status + b"".join(stuff_line(x) for x in lines) + b"." + CRLF


def continuation(challenge_b64: bytes) -> bytes:
    """A SASL continuation: ``+ `` then base64 (an empty challenge is exactly ``+ ``)."""
    return b"+ " + challenge_b64 + CRLF


def capabilities(
    *,
    plaintext_ok: bool,
    mechanisms: Sequence[str],
    stls: bool,
    implementation: str | None,
    xtnd_xmit: bool = False,
    top: bool = True,
    uidl: bool = True,
    user: bool = True,
    resp_codes: bool = True,
    pipelining: bool = True,
    login_delay: int | None = None,
    expire: int | str | None = None,
) -> list[bytes]:
    """The CAPA tags for one session (RFC 2449, 2595, 3206, 5034).

    ``mechanisms`` are those usable right now; ``implementation`` is shown only after login
    (the caller passes None before), so an anonymous prober learns nothing of the software.
    ``xtnd_xmit`` adds the experimental ``XTND XMIT`` tag (off unless configured, like
    qpopper, which never listed it). ``top``/``uidl``/``user``/``resp_codes``/``pipelining``
    come from the listener's capability profile; ``login_delay`` (seconds) and ``expire``
    (days or ``"NEVER"``) are listed only when configured.
    """
    tags = []
    if top:
        tags.append(b"TOP")
    if uidl:
        tags.append(b"UIDL")
    if plaintext_ok and user:
        tags.append(b"USER")
    if mechanisms:
        tags.append(("SASL " + " ".join(mechanisms)).encode("ascii"))
    if resp_codes:
        tags += [b"RESP-CODES", b"AUTH-RESP-CODE"]
    if pipelining:
        tags.append(b"PIPELINING")
    if login_delay is not None:
        tags.append(f"LOGIN-DELAY {int(login_delay)}".encode("ascii"))
    if expire is not None:
        tags.append(f"EXPIRE {expire if isinstance(expire, int) else 'NEVER'}".encode("ascii"))
    if stls:
        tags.append(b"STLS")
    if implementation:
        tags.append(("IMPLEMENTATION " + _printable(implementation)[:200]).encode("ascii"))
    if xtnd_xmit:
        tags.append(b"XTND XMIT")
    return tags


#: XTND subcommands we know, with their (minimum, maximum) argument counts.
XTND_SUBCOMMANDS: dict[str, tuple[int, int]] = {"xmit": (0, 0), "xlst": (1, 2)}
# RFC 5322 3.6.8 field name: printable US-ASCII except ":".
_FIELD_NAME = frozenset(range(0x21, 0x7F)) - {ord(":")}


@dataclass(frozen=True)
class XtndCommand:
    """A parsed ``XTND sub [args]``: ``sub`` lower-cased, ``args`` verbatim."""

    sub: str
    args: tuple[bytes, ...]


def parse_xtnd(args: Sequence[bytes], enabled: Iterable[str]) -> XtndCommand:
    """Check an XTND command line's arguments, with qpopper's exact error texts.

    The subcommand is case-insensitive; a known but disabled one is as unknown as a
    made-up one, so a client cannot tell the feature exists.
    """
    if not args:
        raise Pop3SyntaxError("Too few arguments for the xtnd command.")
    sub = args[0].decode("ascii", "replace").lower()
    bounds = XTND_SUBCOMMANDS.get(sub)
    if bounds is None or sub not in set(enabled):
        raise Pop3SyntaxError(f'Unknown command: "xtnd {echo(args[0].lower())}".')
    low, high = bounds
    rest = tuple(args[1:])
    if len(rest) < low:
        raise Pop3SyntaxError(f"Too few arguments for the xtnd {sub} command.")
    if len(rest) > high:
        raise Pop3SyntaxError(f"Too many arguments for the xtnd {sub} command.")
    return XtndCommand(sub, rest)


def parse_field_name(arg: bytes) -> str:
    """An XLST header field name (RFC 5322 ftext), e.g. ``Message-Id``."""
    if not arg or len(arg) > 76 or any(c not in _FIELD_NAME for c in arg):
        raise Pop3SyntaxError("Invalid header field name")
    return arg.decode("ascii")


class _TooLong:
    """Sentinel: a line exceeded the framer's limit and has been discarded."""

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG = _TooLong()


class LineFramer:
    """Splits received bytes into CRLF-terminated lines with bounded memory.

    Unlike Twisted's LineReceiver, an over-long line never disconnects: its bytes are dropped
    as they arrive, and once its CRLF shows up :data:`TOO_LONG` is returned in its place, so
    the client gets exactly one error, in order, and the session continues. Bare CR and LF
    stay inside a line for the parser to refuse.
    """

    def __init__(self, limit: int = MAX_AUTH_LINE, bare_lf: bool = False) -> None:
        #: Longest acceptable line, CRLF included.
        self.limit = limit
        #: A bare LF ends a line too (lenient parsing); a CR before it is dropped.
        self.bare_lf = bare_lf
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def clear(self) -> None:
        """Forget everything buffered (STLS: pipelined plaintext must never be processed)."""
        self._buffer.clear()
        self._discarding = False

    def take(self) -> bytes:
        """Hand over everything buffered, unframed (XTND XMIT reads the message raw)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    @property
    def buffered(self) -> int:
        """Octets waiting to be framed."""
        return len(self._buffer)

    def next_line(self) -> bytes | _TooLong | None:
        """The next complete line without its CRLF, TOO_LONG, or None if more data is needed."""
        buf = self._buffer
        if self.bare_lf:
            lf = buf.find(b"\n")
            # end: where the line's content stops; after: where the next line starts.
            end, after = (lf - 1, lf + 1) if lf > 0 and buf[lf - 1] == 0x0D else (lf, lf + 1)
        else:
            end = buf.find(CRLF)
            after = end + 2
        if self._discarding:
            if end < 0:
                # Keep a trailing CR: it may be the first half of the CRLF we wait for.
                keep = 1 if buf.endswith(b"\r") else 0
                del buf[: len(buf) - keep]
                return None
            del buf[:after]
            self._discarding = False
            return TOO_LONG
        if end >= 0:
            if end + 2 > self.limit:
                del buf[:after]
                return TOO_LONG
            line = bytes(buf[:end])
            del buf[:after]
            return line
        content = len(buf) - (1 if buf.endswith(b"\r") else 0)
        if content > self.limit - 2:
            self._discarding = True
            keep = 1 if buf.endswith(b"\r") else 0
            del buf[: len(buf) - keep]
        return None


class TopLimiter:
    """Cuts a wire-encoded message after its headers, blank line and ``k`` body lines.

    Input must be :class:`mailgate.wire.WireEncoder` output (CRLF line ends, never split
    between two chunks). Stuffing does not disturb the count: a stuffed line is never blank.
    """

    __slots__ = ("_at_line_start", "_in_headers", "_remaining", "done")

    def __init__(self, body_lines: int) -> None:
        self._remaining = body_lines
        self._in_headers = True
        self._at_line_start = True
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` that belongs to the TOP response; sets ``done`` at the end."""
        if self.done:
            return b""
        pos = 0
        n = len(data)
        while pos < n:
            if self._in_headers and self._at_line_start and data.startswith(CRLF, pos):
                self._in_headers = False
                pos += 2
                if self._remaining <= 0:
                    self.done = True
                    return data[:pos]
                continue
            end = data.find(CRLF, pos)
            if end < 0:
                self._at_line_start = False
                return data
            pos = end + 2
            self._at_line_start = True
            if not self._in_headers:
                self._remaining -= 1
                if self._remaining <= 0:
                    self.done = True
                    return data[:pos]
        return data
