"""Delivery status notifications (RFC 3464 in an RFC 6522 multipart/report), as pure functions.

Values in, LF-ended bytes out (the sink convention). The original message is returned as
``text/rfc822-headers`` only: the sender has the body, and a bounce must stay small.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from mailgate.model import Address

__all__ = [
    "FailedRecipient",
    "build_dsn",
    "header_block",
    "status_from_reply",
]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_MAX_HEADERS = 64 * 1024


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient to report: ``status`` is an RFC 3463 x.y.z code."""

    address: Address
    status: str
    diagnostic: str | None = None
    remote_mta: str | None = None
    action: str = "failed"
    #: For a "delayed" report: when retrying stops (RFC 3464 2.3.9 Will-Retry-Until).
    retry_until: float | None = None


def status_from_reply(code: int | None, text: str | None) -> str:
    """The x.y.z status of an SMTP reply: its enhanced code if it has a matching one.

    ``code`` 0 or None means no reply was received (connection-level); the text decides.
    """
    if text:
        m = _ENHANCED.match(text.strip())
        if m and (not code or str(code)[0] == m.group(1)):
            return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    if code and 400 <= code < 500:
        return "4.0.0"
    return "5.0.0"


def header_block(message: bytes) -> bytes:
    """The header section of an LF-ended message (up to the first empty line), bounded."""
    end = message.find(b"\n\n")
    head = message if end < 0 else message[: end + 1]
    if message.startswith(b"\n"):
        head = b""
    if len(head) > _MAX_HEADERS:
        head = head[:_MAX_HEADERS]
        head = head[: head.rfind(b"\n") + 1]
    return head.replace(b"\r", b"")


def _clean(text: str) -> str:
    """One line of printable ASCII: reply texts come from remote servers."""
    text = " ".join(text.split())
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, UTC))


def build_dsn(
    *,
    hostname: str,
    sender: Address,
    failures: Sequence[FailedRecipient],
    original_headers: bytes,
    arrival: float,
    now: float,
    queue_id: str | None = None,
    token: str | None = None,
) -> bytes:
    """A complete DSN message, to be sent with the null reverse-path to ``sender``."""
    if not failures:
        raise ValueError("a DSN needs at least one recipient")
    token = token or secrets.token_hex(12)
    boundary = f"{token}/{hostname}"
    delayed = all(f.action == "delayed" for f in failures)
    subject = (
        "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    )
    about = f" (queue id {queue_id})" if queue_id else ""

    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{token}.dsn@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        f"This is the mail system at host {hostname}.",
        "",
    ]
    if delayed:
        lines.append(f"Your message{about} could not be delivered yet; it is still being retried.")
    else:
        lines.append(f"Your message{about} could not be delivered to one or more recipients.")
        lines.append("It has not been delivered to the recipients listed below.")
    lines.append("")
    for f in failures:
        reason = _clean(f.diagnostic) if f.diagnostic else f"status {f.status}"
        lines.append(f"<{f.address}>: {reason}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {hostname}",
    ]
    if queue_id:
        lines.append(f"X-Mailgate-Queue-ID: {queue_id}")
    lines.append(f"Arrival-Date: {_date(arrival)}")
    for f in failures:
        lines += [
            "",
            f"Final-Recipient: rfc822; {f.address}",
            f"Action: {f.action}",
            f"Status: {f.status}",
        ]
        if f.remote_mta:
            lines.append(f"Remote-MTA: dns; {_clean(f.remote_mta)}")
        if f.diagnostic:
            lines.append(f"Diagnostic-Code: smtp; {_clean(f.diagnostic)}")
        lines.append(f"Last-Attempt-Date: {_date(now)}")
        if f.retry_until is not None and f.action == "delayed":
            lines.append(f"Will-Retry-Until: {_date(f.retry_until)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered Message Headers",
        "",
    ]
    text = "\n".join(lines).encode("ascii") + b"\n"
    headers = header_block(original_headers)
    if headers and not headers.endswith(b"\n"):
        headers += b"\n"
    return text + headers + f"\n--{boundary}--\n".encode("ascii")
