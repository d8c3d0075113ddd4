"""Pure SMTP parsing and formatting: bytes in, values out; values in, bytes out.

Nothing here touches a transport, a clock or an avatar, so every RFC 5321/1870/6152/4954
rule about command lines, paths and parameters is testable on its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from mailgate.errors import AddressError
from mailgate.model import Address

__all__ = [
    "MAX_AUTH_LINE",
    "MAX_COMMAND_LINE",
    "Command",
    "MailParams",
    "Parsing",
    "Path",
    "SmtpSyntaxError",
    "ehlo_reply",
    "find_line_end",
    "parse_address",
    "parse_command",
    "parse_mail_params",
    "parse_path",
    "reply",
]

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
MAX_COMMAND_LINE = 512
#: RFC 4954 4: AUTH command and response lines may take up to 12288 octets.
MAX_AUTH_LINE = 12288

_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*\Z")
# RFC 3461 4: xtext is printable ASCII except "+" and "=", plus "+XX" hex escapes.
_XTEXT = re.compile(r"^([\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")


class SmtpSyntaxError(ValueError):
    """Something the client sent is malformed; the protocol picks the reply from ``kind``."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


class Parsing(Enum):
    """How forgiving the command parser is (the listener's SmtpProfile picks one).

    The same three modes as POP3's. NORMAL is mailgate's own behaviour: leading, trailing and
    repeated SP or HTAB around the verb and argument are fine, lines end with CRLF only.
    STRICT emulates a picky server: exactly one SP between words, nothing leading or
    trailing, no HTAB, and MAIL FROM:/RCPT TO: paths in angle brackets right
    after the colon. LENIENT emulates an old forgiving one: a bare LF also ends a command
    line. Verbs are case-insensitive in every mode (RFC 5321 2.4), and the end of DATA is
    CRLF.CRLF in every mode.
    """

    STRICT = "strict"
    NORMAL = "normal"
    LENIENT = "lenient"


def find_line_end(buffer: bytes, bare_lf: bool = False) -> tuple[int, int]:
    """Where the first command line in ``buffer`` ends: (content end, next line start).

    (-1, -1) while no line end has arrived. Only CRLF ends a line unless ``bare_lf``
    (lenient parsing), where an LF ends it too and a CR right before that LF is dropped.
    """
    if bare_lf:
        lf = buffer.find(b"\n")
        if lf < 0:
            return -1, -1
        return (lf - 1 if lf > 0 and buffer[lf - 1] == 0x0D else lf), lf + 1
    end = buffer.find(b"\r\n")
    return (end, end + 2) if end >= 0 else (-1, -1)


@dataclass(frozen=True)
class Command:
    """One command line: upper-cased verb and the argument text after the first space."""

    verb: str
    arg: bytes


def parse_command(line: bytes, parsing: Parsing = Parsing.NORMAL) -> Command:
    """Split a command line (without CRLF) into verb and argument.

    NUL and stray CR/LF are refused in every mode: they have no place in a command and a
    lone LF could hide a second command from whatever sits between the client and us.
    """
    if b"\r" in line or b"\n" in line or b"\0" in line:
        raise SmtpSyntaxError("line", "Invalid character in command line")
    if parsing is Parsing.STRICT:
        verb, sep, arg = line.partition(b" ")
        spaced = not arg or arg[:1] == b" " or arg[-1:] == b" " or b"  " in arg
        if b"\t" in line or line[:1] == b" " or (sep and spaced):
            raise SmtpSyntaxError("line", "Syntax error")
    else:
        verb, _, arg = line.strip(b" \t").partition(b" ")
        arg = arg.strip(b" \t")
    if not verb or len(verb) > 16 or not verb.isalpha() or not verb.isascii():
        raise SmtpSyntaxError("verb", "Command unrecognized")
    return Command(verb.decode("ascii").upper(), arg)


@dataclass(frozen=True)
class Path:
    """A parsed ``FROM:<...>``/``TO:<...>`` argument: the mailbox text and the parameters."""

    mailbox: str
    params: str

    @property
    def is_null(self) -> bool:
        return self.mailbox == ""


def parse_path(arg: bytes, keyword: str, strict: bool = False) -> Path:
    """Parse ``FROM:<path> params`` (or ``TO:``).

    A space after the colon and a missing pair of angle brackets are tolerated (old clients
    send both) unless ``strict``; a source route ``<@a,@b:user@d>`` is dropped as RFC 5321
    4.1.1.3 allows. Non-UTF-8 octets are a syntax error.
    """
    try:
        text = arg.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SmtpSyntaxError("path", "Invalid octets in address") from e
    head = keyword.upper() + ":"
    if text[: len(head)].upper() != head:
        raise SmtpSyntaxError("syntax", f"Syntax: {keyword.upper()}:<address>")
    text = text[len(head) :]
    if strict and not text.startswith("<"):
        raise SmtpSyntaxError("syntax", f"Syntax: {keyword.upper()}:<address>")
    text = text.lstrip(" ")
    if text.startswith("<"):
        end = _closing_bracket(text)
        if end < 0:
            raise SmtpSyntaxError("path", "Missing '>' in address")
        mailbox, params = text[1:end], text[end + 1 :]
        if params and not params.startswith(" "):
            raise SmtpSyntaxError("path", "Junk after address")
    else:
        mailbox, _, params = text.partition(" ")
        if not mailbox:
            raise SmtpSyntaxError("path", "Missing address")
    if mailbox.startswith("@"):
        _route, colon, mailbox = mailbox.partition(":")
        if not colon:
            raise SmtpSyntaxError("path", "Bad source route")
    return Path(mailbox, params.strip(" "))


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path, skipping quoted strings in the local part."""
    quoted = False
    escaped = False
    for i, ch in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def parse_address(mailbox: str, default_domain: str | None) -> Address:
    """An envelope mailbox as an :class:`Address`; bare names get ``default_domain``."""
    if not mailbox.isascii():
        raise SmtpSyntaxError("utf8", "Non-ASCII address")
    try:
        return Address.parse(mailbox, default_domain)
    except AddressError as e:
        raise SmtpSyntaxError("address", "Bad address syntax") from e


@dataclass(frozen=True)
class MailParams:
    """The ESMTP parameters of MAIL FROM that mailgate understands."""

    size: int | None = None
    body: str | None = None
    auth: str | None = None
    smtputf8: bool = False


def _split_params(params: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for item in params.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key):
            raise SmtpSyntaxError("param-syntax", "Bad parameter syntax")
        if eq and (not value or not value.isascii()):
            raise SmtpSyntaxError("param-syntax", "Bad parameter syntax")
        out.append((key.upper(), value if eq else None))
    return out


def parse_mail_params(
    params: str,
    *,
    smtputf8_enabled: bool,
    size_enabled: bool = True,
    body_enabled: bool = True,
) -> MailParams:
    """Validate MAIL FROM parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 4954 AUTH, SMTPUTF8).

    SIZE and BODY count as offered only when the EHLO reply listed SIZE/8BITMIME.
    Raises SmtpSyntaxError with kind ``unknown-param`` for parameters not offered,
    ``bad-param`` for bad values of known ones and ``param-syntax`` for junk.
    """
    size: int | None = None
    body: str | None = None
    auth: str | None = None
    utf8 = False
    seen: set[str] = set()
    for key, value in _split_params(params):
        if key in seen:
            raise SmtpSyntaxError("bad-param", f"Duplicate {key} parameter")
        seen.add(key)
        if key == "SIZE" and size_enabled:
            if value is None or not value.isdigit() or len(value) > 20:
                raise SmtpSyntaxError("bad-param", "Bad SIZE parameter")
            size = int(value)
        elif key == "BODY" and body_enabled:
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise SmtpSyntaxError("bad-param", "Unsupported BODY type")
            body = value.upper()
        elif key == "AUTH":
            if value is None or not (value == "<>" or _XTEXT.match(value)):
                raise SmtpSyntaxError("bad-param", "Bad AUTH parameter")
            auth = value
        elif key == "SMTPUTF8" and smtputf8_enabled:
            if value is not None:
                raise SmtpSyntaxError("bad-param", "SMTPUTF8 takes no value")
            utf8 = True
        else:
            raise SmtpSyntaxError("unknown-param", f"{key} parameter not recognized")
    return MailParams(size, body, auth, utf8)


def check_rcpt_params(params: str) -> None:
    """RCPT TO takes no parameters here (DSN is not offered)."""
    for key, _ in _split_params(params):
        raise SmtpSyntaxError("unknown-param", f"{key} parameter not recognized")


def reply(code: int, enhanced: str | None, text: str | Sequence[str]) -> bytes:
    """One whole reply, every line carrying the code (and the enhanced code when given)."""
    lines = [text] if isinstance(text, str) else list(text) or [""]
    code_text = f"{enhanced} " if enhanced else ""
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{code_text}{line}")
    return ("\r\n".join(out) + "\r\n").encode("utf-8")


_ENHANCED = re.compile(rb"^([0-9]{3}[ -])[245]\.[0-9]{1,3}\.[0-9]{1,3} ", re.MULTILINE)


def strip_enhanced(data: bytes) -> bytes:
    """A reply without its RFC 3463 enhanced codes (for a profile not offering them)."""
    return _ENHANCED.sub(rb"\1", data)


def ehlo_reply(hostname: str, greeting: str, keywords: Sequence[str]) -> bytes:
    """The multi-line EHLO reply: hostname line, then one keyword per line."""
    return reply(250, None, [f"{hostname} {greeting}".rstrip(), *keywords])
