"""Which phase a client line belongs to, guessed from the bytes both ways (POP3 and SMTP).

Wrappers that sit outside a protocol (transcripts, faults) need to know whether a client line
is a command, a SASL response or message data, without asking the protocol. Replies are
matched to commands in order (a FIFO), so pipelined commands are accounted for.
"""

from __future__ import annotations

import enum
import re
from collections import deque


class Phase(enum.Enum):
    COMMAND = "command"
    SASL = "sasl"
    DATA = "data"


class _Kind(enum.Enum):
    OTHER = 0
    AUTH = 1
    DATA = 2


#: The start of a server reply: POP3 status or continuation, or an SMTP code.
_REPLY = re.compile(rb"(\+OK|-ERR|\+ |\+\r\n|[0-9]{3}[ \-\r])")


def verb_of(line: bytes) -> str:
    """The first word of a command line, upper-cased ('' for a blank or non-ASCII line)."""
    word = line.strip().split(b" ", 1)[0] if line.strip() else b""
    try:
        return word.decode("ascii").upper()
    except UnicodeDecodeError:
        return ""


def is_continuation(data: bytes) -> bool:
    """A SASL challenge: POP3 ``+ ...`` or SMTP ``334 ...``."""
    return data.startswith((b"+ ", b"+\r\n", b"334 ", b"334\r\n"))


class PhaseTracker:
    """Feed it every complete client line and every server write, in wire order."""

    def __init__(self) -> None:
        self.phase = Phase.COMMAND
        self._outstanding: deque[_Kind] = deque()

    def client_line(self, line: bytes) -> Phase:
        """The phase ``line`` belongs to; updates the state for the lines after it."""
        phase = self.phase
        if phase is Phase.DATA:
            if line in (b".\r\n", b".\n"):
                self.phase = Phase.COMMAND
                self._outstanding.append(_Kind.OTHER)  # the reply to end-of-data
            return phase
        if phase is Phase.SASL:
            return phase
        verb = verb_of(line)
        rest = line.strip().split(None, 1)[1:] if verb else []
        if verb == "AUTH" and rest:
            self.phase = Phase.SASL
            self._outstanding.append(_Kind.AUTH)
        elif (verb == "DATA" and not rest) or (
            verb == "XTND" and rest and rest[0].upper().startswith(b"XMIT")
        ):
            self._outstanding.append(_Kind.DATA)
        else:
            self._outstanding.append(_Kind.OTHER)
        return phase

    def server_data(self, data: bytes) -> None:
        """A server write: if it starts a reply, it answers the oldest outstanding command."""
        if not self._outstanding or not _REPLY.match(data):
            return  # the greeting, or the middle of a long multi-line response
        head = self._outstanding[0]
        if head is _Kind.AUTH and is_continuation(data):
            return
        self._outstanding.popleft()
        if head is _Kind.AUTH and self.phase is Phase.SASL:
            self.phase = Phase.COMMAND
        elif head is _Kind.DATA and data.startswith((b"354", b"+OK")):
            self.phase = Phase.DATA
