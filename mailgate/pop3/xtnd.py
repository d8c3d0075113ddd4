"""XTND XMIT (send a message through the POP3 session) and XTND XLST (list one header).

XMIT is qpopper's "POP send" as Eudora used it: the client sends a whole RFC 5322 message,
dot-stuffed and ended by ``.``; the server takes the recipients from its To/Cc/Bcc fields
(``sendmail -t``) and sends it as the logged-in account. Here the message flows through the
same pieces as SMTP DATA (:class:`DataReader` for the smuggling-safe end of data,
:class:`HeaderSplitter` and :func:`fix_headers` for the header block) into the same
:class:`ISubmission` avatar, so both ways of sending follow one set of rules.

Only the header block is ever buffered: once it is complete the recipients are checked,
the sink is opened, and the body streams straight into it. A refusal is decided as early
as possible but reported only after the final ``.``, because POP3 has no way to interrupt
a client in the middle of its data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgate.dataread import BareNewline, DataReader, DataStatus, LongLines
from mailgate.errors import DeliveryError
from mailgate.headers import (
    MAX_HEADER_BYTES,
    MAX_HEADER_LINES,
    HeaderBlock,
    HeaderSplitter,
    HeaderTooLarge,
    ReceivedInfo,
    fix_headers,
)
from mailgate.interfaces import IMessageSink, ISubmission
from mailgate.model import Address, Envelope
from mailgate.pop3._grammar import ResponseCode, err, ok
from mailgate.recipients import RecipientError, extract_recipients, parse_address_list

__all__ = [
    "RECEIVED_PROTOCOL",
    "XmitPolicy",
    "XmitReceiver",
    "first_header_lines",
]

log = Logger()

#: The ``with`` atom of the Received: field (RFC 5321 allows any atom there).
RECEIVED_PROTOCOL = "XTND-XMIT"
SENT = ok("Message sent successfully")
#: How much of a stored message XLST reads looking for the end of its header block.
XLST_READ_LIMIT = MAX_HEADER_BYTES


@dataclass(frozen=True)
class XmitPolicy:
    """The submission limits XMIT applies (the same meaning as the SMTP settings)."""

    hostname: str
    default_domain: str = "localhost"
    max_size: int = 26214400
    max_recipients: int = 100
    bare_newline: str = "normalize"
    long_lines: str = "reject"
    enforce_from: bool = False
    max_header_lines: int = MAX_HEADER_LINES
    max_header_bytes: int = MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        BareNewline(self.bare_newline)  # ValueError on a bad policy name
        LongLines(self.long_lines)
        if self.max_size <= 0 or self.max_recipients <= 0:
            raise ValueError("XTND XMIT limits must be positive")


class _Refused(Exception):
    """The message will be refused with ``reply``; ``reason`` goes to the log."""

    def __init__(self, reply: bytes, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


def _perm(text: str) -> _Refused:
    return _Refused(err(text, ResponseCode.SYS_PERM), text)


_STATUS_TEXT = {
    DataStatus.TOO_BIG: "Message too large",
    DataStatus.BARE_NEWLINE: "Message contains bare CR or LF",
    DataStatus.LINE_TOO_LONG: "Line too long",
}


class XmitReceiver:
    """Receives one XTND XMIT message and hands it to the submission avatar.

    Feed it the raw bytes after ``+OK Start sending message.``; :meth:`feed` returns None
    while the message goes on and the bytes after the final ``.`` once it ended (they are
    POP3 commands again). Then :meth:`finish` gives a Deferred of the one reply line, which
    never fails. :meth:`abort` (connection lost, autologout) throws everything away.
    """

    def __init__(
        self,
        submission: ISubmission,
        account: Address,
        policy: XmitPolicy,
        *,
        peer: str,
        peer_ip: str,
        now: Callable[[], float],
    ) -> None:
        self._submission = submission
        self._account = account
        self._policy = policy
        self._peer = peer
        self._peer_ip = peer_ip
        self._now = now
        self._reader = DataReader(
            self._content,
            bare_newline=policy.bare_newline,
            long_lines=policy.long_lines,
            max_size=policy.max_size,
            keep_unescaped_dots=True,
        )
        self._splitter = HeaderSplitter(policy.max_header_lines, policy.max_header_bytes)
        self._sink: IMessageSink | None = None
        self._refusal: _Refused | None = None
        self._recipients: list[Address] = []
        self._finishing = False

    @property
    def size(self) -> int:
        """Octets received so far, counted as SMTP SIZE counts them (CRLF, unstuffed)."""
        return self._reader.size

    def feed(self, data: bytes) -> bytes | None:
        """More raw message bytes; None while the data goes on, else what followed it."""
        return self._reader.feed(data)

    # -- content, as the reader unstuffs it ------------------------------------------------

    def _content(self, data: bytes) -> None:
        if self._refusal is None:
            self._store(lambda: self._splitter.feed(data), data)

    def _store(
        self, split: Callable[[], tuple[HeaderBlock, bytes] | None], data: bytes = b""
    ) -> None:
        """Pass content on: headers to the splitter until complete, then to the sink."""
        try:
            if self._splitter.block is None:
                done = split()
                if done is None:
                    return
                block, body = done
                data = self._start(block) + body
            assert self._sink is not None
            self._sink.write(data)
        except _Refused as e:
            self._refuse(e)
        except HeaderTooLarge:
            self._refuse(_perm("Message header too large"))
        except Exception:
            log.failure(
                "POP3 XTND XMIT store failed for {account} from {peer}",
                account=str(self._account),
                peer=self._peer,
            )
            self._refuse(
                _Refused(err("Unable to send message", ResponseCode.SYS_TEMP), "store failed")
            )

    def _refuse(self, refusal: _Refused) -> None:
        if self._refusal is None:
            self._refusal = refusal
        self._abort_sink()

    def _start(self, block: HeaderBlock) -> bytes:
        """Header block complete: check everything, open the sink, return the fixed block."""
        policy = self._policy
        fields = [(f.name, f.value) for f in block.fields]
        try:
            recipients = extract_recipients(fields, policy.default_domain, policy.max_recipients)
        except RecipientError as e:
            raise _perm(e.reason) from None
        if not recipients:
            raise _perm("No recipients in To, Cc or Bcc")
        if policy.enforce_from:
            self._check_from(block)
        for rcpt in recipients:
            try:
                self._submission.check_recipient(rcpt)
            except DeliveryError as e:
                raise self._delivery_refusal(e, f"{e.text}: <{rcpt}>") from None
        try:
            sink = self._submission.open_message(Envelope(self._account, tuple(recipients)))
        except DeliveryError as e:
            raise self._delivery_refusal(e, e.text) from None
        self._sink = sink
        self._recipients = recipients
        info = ReceivedInfo(
            helo="",
            peer_ip=self._peer_ip,
            hostname=policy.hostname,
            protocol=RECEIVED_PROTOCOL,
            queue_id=str(sink.queue_id),
            recipients=[str(r) for r in recipients],
        )
        return fix_headers(block, info, now=self._now)

    def _check_from(self, block: HeaderBlock) -> None:
        """enforce_from: every From: mailbox must be one this account may send as."""
        for value in block.values("From"):
            try:
                senders = parse_address_list(value, self._policy.default_domain, 16)
            except RecipientError:
                raise _perm("From address rejected: malformed") from None
            for sender in senders:
                try:
                    self._submission.check_sender(sender)
                except DeliveryError as e:
                    raise self._delivery_refusal(e, f"From {e.text}: <{sender}>") from None

    @staticmethod
    def _delivery_refusal(e: DeliveryError, text: str) -> _Refused:
        text = " ".join(text.split()) or "Rejected"
        code = ResponseCode.SYS_PERM if e.permanent else ResponseCode.SYS_TEMP
        return _Refused(err(text, code), text)

    # -- the end ---------------------------------------------------------------------------

    def finish(self) -> Deferred[bytes]:
        """The message ended: make it durable (or refuse it); fires with the reply line."""
        self._finishing = True
        reader = self._reader
        ok_so_far = reader.status is DataStatus.OK and self._refusal is None
        if ok_so_far and self._splitter.block is None:
            # The message ended inside its header block (or had no body at all).
            self._store(self._splitter.finish)
        refusal = self._refusal
        if reader.status is not DataStatus.OK:
            refusal = _perm(_STATUS_TEXT[reader.status])
        if refusal is not None:
            self._abort_sink()
            log.info(
                "POP3 XTND XMIT refused for {account} from {peer}: {reason} (size {size})",
                account=str(self._account),
                peer=self._peer,
                reason=refusal.reason,
                size=reader.size,
            )
            return succeed(refusal.reply)
        if reader.unescaped_dots:
            log.info(
                "POP3 XTND XMIT from {peer}: client sent {n} unescaped leading dots (kept)",
                peer=self._peer,
                n=reader.unescaped_dots,
            )
        sink, self._sink = self._sink, None
        assert sink is not None
        recipients = self._recipients
        size = reader.size

        def sent(queue_id: str) -> bytes:
            log.info(
                "POP3 XTND XMIT queued id={qid} account={account} to={rcpts} size={size} "
                "peer={peer}",
                qid=queue_id,
                account=str(self._account),
                rcpts=",".join(str(r) for r in recipients),
                size=size,
                peer=self._peer,
            )
            return SENT

        def failed(failure: Failure) -> bytes:
            log.failure(
                "POP3 XTND XMIT queueing failed for {account} from {peer}",
                failure,
                account=str(self._account),
                peer=self._peer,
            )
            e = failure.value
            if isinstance(e, DeliveryError) and e.permanent:
                return err("Unable to send message", ResponseCode.SYS_PERM)
            return err("Unable to send message", ResponseCode.SYS_TEMP)

        # From here on the sink belongs to finish(); a lost connection must not abort it.
        d: Deferred[str] = maybeDeferred(sink.finish)
        return d.addCallbacks(sent, failed)

    def abort(self) -> None:
        """Connection lost or autologout before the end: nothing is sent."""
        if not self._finishing:
            if self._sink is not None:
                log.info(
                    "POP3 XTND XMIT from {peer} abandoned mid-message ({account})",
                    peer=self._peer,
                    account=str(self._account),
                )
            self._abort_sink()

    def _abort_sink(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            try:
                sink.abort()
            except Exception:
                log.failure("POP3 XTND XMIT sink abort failed")


def first_header_lines(
    source: IO[bytes], name: str, limit: int = XLST_READ_LIMIT
) -> Sequence[bytes]:
    """The first ``name:`` field of a stored message's header block, as physical lines.

    The name must match exactly (case-insensitively, optional WSP before the colon), so
    ``Message-Id`` never matches ``Message-Idx``. Lines come without their line ends; an
    empty sequence means the field is absent. At most ``limit`` octets are read.
    """
    data = b""
    while len(data) < limit:
        chunk = source.read(min(16384, limit - len(data)))
        if not chunk:
            break
        data += chunk
        if b"\n\n" in data or b"\r\n\r\n" in data or b"\r\r" in data:
            break
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    splitter = HeaderSplitter(MAX_HEADER_LINES, limit + 1)
    try:
        done = splitter.feed(text)
        block, _ = done if done is not None else splitter.finish()
    except HeaderTooLarge:
        return ()
    key = name.lower()
    for field in block.fields:
        if field.name.lower() == key:
            return field.raw.rstrip(b"\n").split(b"\n")
    return ()
