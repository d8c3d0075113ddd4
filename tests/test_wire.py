"""Tests for the stored-bytes -> wire encoder."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailgate.wire import WireEncoder, encode_all, starts_dot_line, wire_size_of_file


def test_first_line_dot_is_stuffed() -> None:
    assert encode_all([b".hidden\nx\n"]) == b"..hidden\r\nx\r\n"


def test_dot_line_at_chunk_boundary_is_stuffed() -> None:
    assert encode_all([b"a\n", b".\n", b"b\n"]) == b"a\r\n..\r\nb\r\n"


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    assert encode_all([b"a\r", b"\nb\r", b"\n"]) == b"a\r\nb\r\n"


def test_bare_cr_becomes_crlf() -> None:
    assert encode_all([b"a\rb"]) == b"a\r\nb\r\n"


def test_missing_final_newline_is_added() -> None:
    assert encode_all([b"abc"]) == b"abc\r\n"


def test_empty_message_stays_empty() -> None:
    assert encode_all([]) == b""


def test_no_stuffing_mode_for_sizes() -> None:
    enc = WireEncoder(stuff=False)
    assert enc.feed(b".x\n") + enc.finish() == b".x\r\n"


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_chunking_never_changes_output(data: bytes, size: int) -> None:
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    assert encode_all(chunks) == encode_all([data])


@given(st.binary(max_size=300))
def test_output_has_only_crlf_and_no_unstuffed_dot_lines(data: bytes) -> None:
    out = encode_all([data])
    assert out.replace(b"\r\n", b"").count(b"\r") == 0
    assert out.replace(b"\r\n", b"").count(b"\n") == 0
    for line in out.split(b"\r\n"):
        assert line != b"."


@given(st.binary(max_size=300))
def test_unstuffing_restores_normalised_text(data: bytes) -> None:
    out = encode_all([data])
    lines = out.split(b"\r\n")[:-1] if out else []
    unstuffed = [ln[1:] if ln.startswith(b".") else ln for ln in lines]
    assert b"\r\n".join(unstuffed) + (b"\r\n" if lines else b"") == encode_all([data], stuff=False)


@given(st.binary(max_size=300))
def test_file_size_matches_unstuffed_output(data: bytes) -> None:
    import io

    assert wire_size_of_file(io.BytesIO(data), chunk_size=7) == len(encode_all([data], False))


def _reference(data: bytes) -> bytes:
    """Line by line, the obvious way: split on CRLF/CR/LF, stuff, end each line with CRLF."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not text:
        return b""
    lines = text.split(b"\n")
    if text.endswith(b"\n"):
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


#: Mail-like bytes: the characters the fast paths look for, often, and next to each other.
_MAILISH = st.lists(st.sampled_from([b"\n", b".", b"\r", b"a", b"..", b"\n.", b"x y"])).map(
    b"".join
)


@given(_MAILISH, st.integers(min_value=1, max_value=9))
def test_chunked_encoding_matches_the_line_by_line_reference(data: bytes, size: int) -> None:
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    assert encode_all(chunks) == _reference(data)


def test_large_lf_chunk_with_and_without_dot_lines() -> None:
    body = b"The quick brown fox jumps over the lazy dog.\n" * 2000
    enc = WireEncoder()
    assert enc.feed(body) == body.replace(b"\n", b"\r\n")
    assert enc.feed(b"x\n.dot\n") == b"x\r\n..dot\r\n"
    assert enc.feed(b".\n") == b"..\r\n"  # the previous chunk ended a line


def _dot_lines_seen(chunks: list[bytes]) -> bool:
    previous = b""
    seen = False
    for chunk in chunks:
        seen = seen or starts_dot_line(chunk, previous)
        previous = chunk[-1:] or previous
    return seen


@given(_MAILISH, st.integers(min_value=1, max_value=9))
def test_a_message_without_dot_lines_needs_no_stuffing(data: bytes, size: int) -> None:
    """What a delivery records (``,D=0``) is exactly when RETR may skip stuffing: chunk by
    chunk, starts_dot_line finds a dot line whenever stuffing would change the wire bytes."""
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    if not _dot_lines_seen(chunks):
        assert encode_all([data], stuff=False) == encode_all([data])


def test_dot_lines_under_every_line_end() -> None:
    assert starts_dot_line(b".first", b"")
    assert starts_dot_line(b"a\n.b", b"x")
    assert starts_dot_line(b"a\r\n.b", b"x")
    assert starts_dot_line(b"a\r.b", b"x")  # a bare CR ends a line too
    assert starts_dot_line(b".b", b"\n")  # the line began in the previous chunk
    assert starts_dot_line(b".b", b"\r")
    assert not starts_dot_line(b".b", b"a")
    assert not starts_dot_line(b"end of sentence. next\n", b"")
