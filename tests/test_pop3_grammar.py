"""Tests for the pure POP3 grammar: command parsing, replies, line framing, TOP cutting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.pop3._grammar import (
    MAX_STATUS_LINE,
    TOO_LONG,
    LineFramer,
    Pop3SyntaxError,
    ResponseCode,
    TopLimiter,
    capabilities,
    continuation,
    echo,
    err,
    multiline,
    ok,
    parse_command,
    parse_line_count,
    parse_message_number,
)
from mailgate.wire import WireEncoder, encode_all

# -- commands ---------------------------------------------------------------------------


def test_verb_is_case_insensitive_and_rest_is_verbatim() -> None:
    cmd = parse_command(b"pAsS  a b c ")
    assert cmd.verb == "PASS"
    assert cmd.rest == b" a b c "


def test_args_split_on_runs_of_spaces() -> None:
    assert parse_command(b"LIST  1").args() == [b"1"]
    assert parse_command(b"TOP 1   2").args() == [b"1", b"2"]
    assert parse_command(b"STAT").args() == []


@pytest.mark.parametrize(
    "line",
    [b"", b"LIST\n1", b"LIST 1\r", b"NO\rOP", b"US\0ER x", b"USER a\nPASS b", b"\x01FOO"],
)
def test_malformed_lines_are_refused(line: bytes) -> None:
    with pytest.raises(Pop3SyntaxError):
        parse_command(line)


def test_overlong_verb_is_refused() -> None:
    with pytest.raises(Pop3SyntaxError):
        parse_command(b"X" * 17)


@pytest.mark.parametrize(
    ("arg", "count", "index"), [(b"1", 2, 0), (b"2", 2, 1), (b"0002", 2, 1), (b"10", 10, 9)]
)
def test_message_numbers(arg: bytes, count: int, index: int) -> None:
    assert parse_message_number(arg, count) == index


@pytest.mark.parametrize(
    "arg",
    [
        b"0",
        b"000",
        b"3",
        b"-1",
        b"+1",
        b"x",
        b"1x",
        b"",
        b" 1",
        b"99999999999999999999999",
        b"\xd9\xa1",
    ],
)
def test_bad_message_numbers(arg: bytes) -> None:
    with pytest.raises(Pop3SyntaxError):
        parse_message_number(arg, 2)


def test_line_counts() -> None:
    assert parse_line_count(b"0") == 0
    assert parse_line_count(b"007") == 7
    assert parse_line_count(b"9" * 100) >= 10**18
    for bad in (b"-1", b"x", b"", b"+2"):
        with pytest.raises(Pop3SyntaxError):
            parse_line_count(bad)


@given(st.binary(max_size=300))
def test_parse_command_never_raises_anything_else(line: bytes) -> None:
    try:
        cmd = parse_command(line)
    except Pop3SyntaxError:
        return
    assert cmd.verb.isascii() and cmd.verb == cmd.verb.upper()


@given(st.binary(max_size=40), st.integers(min_value=0, max_value=1000))
def test_parse_message_number_total(arg: bytes, count: int) -> None:
    try:
        index = parse_message_number(arg, count)
    except Pop3SyntaxError:
        return
    assert 0 <= index < count


# -- replies ----------------------------------------------------------------------------


def test_status_lines() -> None:
    assert ok() == b"+OK\r\n"
    assert ok("hi") == b"+OK hi\r\n"
    assert err("nope") == b"-ERR nope\r\n"
    assert err("locked", ResponseCode.IN_USE) == b"-ERR [IN-USE] locked\r\n"
    assert err("x", ResponseCode.SYS_TEMP).startswith(b"-ERR [SYS/TEMP] ")


def test_status_lines_are_bounded_and_printable() -> None:
    line = err("a" * 2000 + "\r\nINJECTED")
    assert len(line) == MAX_STATUS_LINE
    assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1


def test_echo_truncates_and_sanitises() -> None:
    assert echo(b"abc") == "abc"
    assert len(echo(b"x" * 400)) == 40
    assert echo(b"a\x00b\xffc") == "a?b?c"


def test_multiline_stuffs_and_terminates() -> None:
    assert multiline(ok("x"), [b"1 2", b".hidden"]) == b"+OK x\r\n1 2\r\n..hidden\r\n.\r\n"
    assert multiline(ok(), []) == b"+OK\r\n.\r\n"


def test_continuation() -> None:
    assert continuation(b"") == b"+ \r\n"
    assert continuation(b"VXNlcm5hbWU6") == b"+ VXNlcm5hbWU6\r\n"


def test_capabilities_before_tls_without_plaintext() -> None:
    tags = capabilities(plaintext_ok=False, mechanisms=[], stls=True, implementation=None)
    assert tags == [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"STLS"]


def test_capabilities_with_plaintext_and_implementation() -> None:
    tags = capabilities(
        plaintext_ok=True, mechanisms=["PLAIN", "LOGIN"], stls=False, implementation="mg"
    )
    assert b"USER" in tags and b"SASL PLAIN LOGIN" in tags
    assert b"IMPLEMENTATION mg" in tags and b"STLS" not in tags
    for legacy in (b"PIPELINE", b"CELERITY", b"AUSPEX", b"POTENCE"):
        assert legacy not in tags


# -- line framing -----------------------------------------------------------------------


def drain(framer: LineFramer) -> list[object]:
    out: list[object] = []
    while (item := framer.next_line()) is not None:
        out.append(item)
    return out


def test_framer_splits_on_crlf_only() -> None:
    f = LineFramer(255)
    f.feed(b"STAT\r\nLIST\n1\r\nNO")
    assert drain(f) == [b"STAT", b"LIST\n1"]
    f.feed(b"OP\r")
    assert drain(f) == []
    f.feed(b"\n")
    assert drain(f) == [b"NOOP"]


def test_framer_limit_counts_crlf() -> None:
    f = LineFramer(10)
    f.feed(b"x" * 8 + b"\r\n" + b"y" * 9 + b"\r\n")
    assert drain(f) == [b"x" * 8, TOO_LONG]


def test_framer_discards_overlong_line_with_bounded_memory() -> None:
    f = LineFramer(20)
    for _ in range(100):
        f.feed(b"z" * 1000)
        assert drain(f) == []
        assert f.buffered <= 20
    f.feed(b"\r")
    assert drain(f) == []
    f.feed(b"\nCAPA\r\n")
    assert drain(f) == [TOO_LONG, b"CAPA"]


def test_framer_clear_drops_everything() -> None:
    f = LineFramer(255)
    f.feed(b"USER mallory\r\nPASS x\r\n")
    f.clear()
    assert drain(f) == [] and f.buffered == 0


@given(st.lists(st.binary(min_size=0, max_size=50), max_size=20), st.data())
def test_framer_reassembles_any_chunking(lines: list[bytes], data: st.DataObject) -> None:
    lines = [line.replace(b"\r", b"").replace(b"\n", b"") for line in lines]
    stream = b"".join(line + b"\r\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    f = LineFramer(1000)
    out: list[object] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        f.feed(stream[prev:cut])
        prev = cut
        out += drain(f)
    assert out == lines


# -- TOP --------------------------------------------------------------------------------

MESSAGE = b"Subject: s\nFrom: a\n\n.one\ntwo\nthree\nfour\nfive\n"


def top_reference(stored: bytes, k: int) -> bytes:
    """TOP computed the obvious, in-memory way."""
    wire = encode_all([stored])
    lines = wire.split(b"\r\n")[:-1]
    out: list[bytes] = []
    i = 0
    while i < len(lines) and lines[i] != b"":
        out.append(lines[i])
        i += 1
    if i < len(lines):
        out.append(b"")
        out += lines[i + 1 : i + 1 + k]
    return b"".join(x + b"\r\n" for x in out)


def run_top(stored: bytes, k: int, chunks: list[int]) -> bytes:
    enc = WireEncoder()
    lim = TopLimiter(k)
    out = b""
    pos = 0
    for size in [*chunks, len(stored)]:
        out += lim.feed(enc.feed(stored[pos : pos + size]))
        pos += size
        if lim.done:
            return out
    return out + lim.feed(enc.finish())


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, b"Subject: s\r\nFrom: a\r\n\r\n"),
        (2, b"Subject: s\r\nFrom: a\r\n\r\n..one\r\ntwo\r\n"),
        (1000000, encode_all([MESSAGE])),
    ],
)
def test_top_variants(k: int, expected: bytes) -> None:
    assert run_top(MESSAGE, k, []) == expected
    assert run_top(MESSAGE, k, [1] * len(MESSAGE)) == expected


def test_top_of_headers_only_message_is_whole_message() -> None:
    assert run_top(b"Subject: x\nFrom: y", 3, []) == b"Subject: x\r\nFrom: y\r\n"


@given(
    st.lists(st.sampled_from([b"a", b".", b"\n", b"\r\n", b"\r", b"H: v"]), max_size=30),
    st.integers(0, 8),
    st.lists(st.integers(1, 7), max_size=10),
)
def test_top_matches_reference_for_any_chunking(
    parts: list[bytes], k: int, chunks: list[int]
) -> None:
    stored = b"".join(parts)
    assert run_top(stored, k, chunks) == top_reference(stored, k)
