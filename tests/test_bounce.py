"""RFC 3464 / 6522 DSNs, parsed back with the email package (D01, D04)."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any

from mailgate.model import Address
from mailgate.queue.bounce import FailedRecipient, build_dsn, header_block, status_from_reply

ALICE = Address("alice", "example.com")
BOB = Address("bob", "remote.example")
CAROL = Address("carol", "other.example")
ORIGINAL = b"From: alice@example.com\nTo: bob@remote.example\nSubject: Lunch\n\nsecret body\n"


def make() -> bytes:
    return build_dsn(
        hostname="mx.example.com",
        sender=ALICE,
        failures=[
            FailedRecipient(
                BOB, "5.1.1", "550 5.1.1 <bob@remote.example>: user unknown", "mx.remote.example"
            ),
            FailedRecipient(CAROL, "4.4.7", "4.4.7 message expired"),
        ],
        original_headers=ORIGINAL,
        arrival=1_700_000_000,
        now=1_700_000_100,
        queue_id="ABC123DEF456",
    )


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_lf_only_and_ascii() -> None:
    data = make()
    assert b"\r" not in data
    data.decode("ascii")


def test_top_level_headers() -> None:
    msg = parse(make())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.com>"
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert msg["Subject"]
    assert msg["Date"]
    assert msg["Message-ID"].endswith("@mx.example.com>")
    assert msg["MIME-Version"] == "1.0"


def test_three_parts_with_delivery_status() -> None:
    msg = parse(make())
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert "bob@remote.example" in parts[0].get_content()
    # message/delivery-status is parsed by email as a list of header blocks
    blocks: list[Any] = parts[1].get_payload()  # type: ignore[assignment]
    assert isinstance(blocks, list)
    per_message, first, second = blocks
    assert per_message["Reporting-MTA"] == "dns; mx.example.com"
    assert per_message["Arrival-Date"]
    assert first["Final-Recipient"] == "rfc822; bob@remote.example"
    assert first["Action"] == "failed"
    assert first["Status"] == "5.1.1"
    assert first["Remote-MTA"] == "dns; mx.remote.example"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.example>: user unknown"
    assert second["Final-Recipient"] == "rfc822; carol@other.example"
    assert second["Status"] == "4.4.7"
    assert second["Remote-MTA"] is None


def test_third_part_has_headers_not_body() -> None:
    raw = make()
    msg = parse(raw)
    third = list(msg.iter_parts())[2]
    text = third.get_payload()
    assert isinstance(text, str)
    assert "Subject: Lunch" in text
    assert b"secret body" not in raw


def test_status_from_reply() -> None:
    assert status_from_reply(550, "5.1.1 user unknown") == "5.1.1"
    assert status_from_reply(550, "user unknown") == "5.0.0"
    assert status_from_reply(451, "try later") == "4.0.0"
    assert status_from_reply(550, "4.1.1 mismatched") == "5.0.0"
    assert status_from_reply(0, "4.4.2 lost connection") == "4.4.2"


def test_hostile_reply_text_cannot_inject_headers() -> None:
    data = build_dsn(
        hostname="h.example",
        sender=ALICE,
        failures=[FailedRecipient(BOB, "5.0.0", "550 bad\r\nX-Injected: yes\x00\xff")],
        original_headers=b"",
        arrival=0,
        now=0,
    )
    assert b"\nX-Injected" not in data


def test_header_block() -> None:
    assert (
        header_block(ORIGINAL)
        == b"From: alice@example.com\nTo: bob@remote.example\nSubject: Lunch\n"
    )
    assert header_block(b"\nbody only\n") == b""
