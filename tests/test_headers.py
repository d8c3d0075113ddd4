"""Tests for header-block parsing and submission fixing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.headers import (
    HeaderSplitter,
    HeaderTooLarge,
    ReceivedInfo,
    fix_headers,
    format_date,
    parse_header_block,
    received_protocol,
)

INFO = ReceivedInfo(
    helo="client.example",
    peer_ip="192.0.2.7",
    hostname="mx.example.com",
    protocol="ESMTPSA",
    queue_id="Q1",
    recipients=("bob@example.com",),
)
NOW = 1700000000.0  # Tue, 14 Nov 2023 22:13:20 +0000


def fixed(message: bytes, info: ReceivedInfo = INFO) -> bytes:
    block, body = parse_header_block(message)
    return fix_headers(block, info, now=lambda: NOW, token=lambda: "tok") + body


def test_values_are_unfolded_and_case_insensitive() -> None:
    block, body = parse_header_block(b"Subject: a\n  b\nTO: x@y\nto: z@w\n\nbody\n")
    assert block.values("subject") == ["a  b"]
    assert block.values("To") == ["x@y", "z@w"]
    assert block.first("cc") is None
    assert body == b"body\n"
    assert block.separated


def test_fix_adds_received_date_message_id_and_removes_bcc_return_path() -> None:
    msg = (
        b"Return-Path: <x@y>\nFrom: a@example.com\nBcc: secret@example.com,\n"
        b" other@example.com\nResent-Bcc: r@example.com\nSubject: hi\n\nBcc: body stays\n"
    )
    out = fixed(msg)
    block, body = parse_header_block(out)
    assert body == b"Bcc: body stays\n"
    assert block.fields[0].name == "Received"
    received = block.fields[0].value
    assert received.startswith("from client.example ([192.0.2.7])")
    assert "by mx.example.com (mailgate) with ESMTPSA id Q1" in received
    assert "for <bob@example.com>;" in received
    assert received.endswith("Tue, 14 Nov 2023 22:13:20 +0000")
    assert not block.has("Bcc") and not block.has("Return-Path") and not block.has("Resent-Bcc")
    assert block.values("Date") == ["Tue, 14 Nov 2023 22:13:20 +0000"]
    assert block.values("Message-ID") == ["<1700000000.tok@mx.example.com>"]
    assert block.values("Subject") == ["hi"]


def test_existing_date_and_message_id_kept_verbatim() -> None:
    msg = b"Date: Mon, 1 Jan 2001 00:00:00 +0100\nMessage-Id: <a@b>\n\nx\n"
    out = fixed(msg)
    assert b"Date: Mon, 1 Jan 2001 00:00:00 +0100\nMessage-Id: <a@b>\n\nx\n" in out
    assert out.count(b"Date:") == 1 and out.lower().count(b"message-id:") == 1


def test_no_for_clause_with_several_recipients() -> None:
    info = ReceivedInfo("h", "2001:db8::1", "mx", "ESMTP", "Q2", ("a@x", "b@x"))
    out = fixed(b"Subject: s\n\nb\n", info)
    assert b" for " not in out
    assert b"([IPv6:2001:db8::1])" in out


def test_body_without_header_gets_separator() -> None:
    out = fixed(b"just text\nmore: text\n")
    block, body = parse_header_block(out)
    assert body == b"just text\nmore: text\n"
    assert block.has("Date")


def test_empty_message() -> None:
    out = fixed(b"")
    block, body = parse_header_block(out)
    assert body == b""
    assert [f.name for f in block.fields] == ["Received", "Date", "Message-ID"]


def test_client_text_cannot_break_received() -> None:
    info = ReceivedInfo("evil) (\x07x", "192.0.2.1", "mx", "ESMTP", "Q3")
    out = fixed(b"\nbody\n", info)
    first_line = out.split(b"\n")[0]
    assert first_line == b"Received: from evil????x ([192.0.2.1])"


def test_received_protocol_names() -> None:
    assert received_protocol(extended=True, tls=True, authenticated=True) == "ESMTPSA"
    assert received_protocol(extended=True, tls=False, authenticated=True) == "ESMTPA"
    assert received_protocol(extended=True, tls=True, authenticated=False) == "ESMTPS"
    assert received_protocol(extended=True, tls=False, authenticated=False) == "ESMTP"
    assert received_protocol(extended=False, tls=False, authenticated=False) == "SMTP"


def test_format_date() -> None:
    assert format_date(0) == "Thu, 01 Jan 1970 00:00:00 +0000"


def test_limits() -> None:
    with pytest.raises(HeaderTooLarge):
        parse_header_block(b"X-A: 1\n" * 11, max_lines=10)
    with pytest.raises(HeaderTooLarge):
        parse_header_block(b"X-A: " + b"y" * 2000, max_bytes=1000)
    splitter = HeaderSplitter(max_bytes=100)
    with pytest.raises(HeaderTooLarge):
        for _ in range(20):
            splitter.feed(b"X-Long: " + b"z" * 10)


def test_message_ending_inside_headers() -> None:
    splitter = HeaderSplitter()
    assert splitter.feed(b"Subject: x\nFrom: y") is None
    block, body = splitter.finish()
    assert block.values("From") == ["y"]
    assert body == b""


_header_line = st.sampled_from(
    [b"Subject: s\n", b"From: a@b\n", b" folded\n", b"Bcc: x\n", b"\n", b"body line\n", b"X:\n"]
)


@given(st.lists(_header_line, max_size=20), st.integers(min_value=1, max_value=9))
def test_splitter_chunking_and_body_preserved(lines: list[bytes], size: int) -> None:
    msg = b"".join(lines)
    whole_block, whole_body = parse_header_block(msg)
    splitter = HeaderSplitter()
    done = None
    pos = 0
    while done is None and pos < len(msg):
        done = splitter.feed(msg[pos : pos + size])
        pos += size
    if done is None:
        block, body = splitter.finish()
    else:
        block, body = done[0], done[1] + msg[pos:]
    assert block == whole_block
    assert body == whole_body
    # Nothing is lost: headers plus separator plus body give the message back.
    sep = b"\n" if block.separated else b""
    assert block.to_bytes() + sep + body == msg
