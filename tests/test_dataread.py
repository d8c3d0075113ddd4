"""Tests for the incremental DATA reader (end of data, unstuffing, smuggling, limits)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.dataread import DataReader, DataStatus
from mailgate.wire import encode_all


def read(chunks: list[bytes], **kwargs: object) -> tuple[bytes, bytes | None, DataReader]:
    """Feed chunks until the end; returns (content, rest-or-None, reader)."""
    out: list[bytes] = []
    reader = DataReader(out.append, **kwargs)  # type: ignore[arg-type]
    rest: bytes | None = None
    for i, chunk in enumerate(chunks):
        rest = reader.feed(chunk)
        if rest is not None:
            rest += b"".join(chunks[i + 1 :])
            break
    return b"".join(out), rest, reader


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def test_simple_message_and_pipelined_rest() -> None:
    content, rest, reader = read([b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n"])
    assert content == b"Subject: x\n\nhello\n"
    assert rest == b"QUIT\r\n"
    assert reader.status is DataStatus.OK
    assert reader.size == len(b"Subject: x\r\n\r\nhello\r\n")


def test_terminator_at_very_start_is_empty_message() -> None:
    content, rest, _ = read([b".\r\nNOOP\r\n"])
    assert content == b""
    assert rest == b"NOOP\r\n"


def test_unstuffing() -> None:
    content, rest, _ = read([b"..x\r\n..\r\n...\r\n.\r\n"])
    assert content == b".x\n.\n..\n"
    assert rest == b""


def test_bytewise_feeding_gives_same_result() -> None:
    data = b"a\r\n..b\r\n\r\n.\r\nNOOP\r\n"
    assert read(bytewise(data))[:2] == read([data])[:2]


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n"],
)
def test_smuggling_sequences_never_end_data(smuggle: bytes) -> None:
    data = b"hello" + smuggle + b"MAIL FROM:<evil@x>\r\n"
    for mode in ("normalize", "reject"):
        _, rest, _ = read([data], bare_newline=mode)
        assert rest is None, (smuggle, mode)
        _, rest, _ = read(bytewise(data), bare_newline=mode)
        assert rest is None, (smuggle, mode)


def test_normalize_keeps_dot_line_as_content() -> None:
    content, rest, reader = read([b"hello\n.\nMAIL FROM:<e@x>\nDATA\r\n.\r\n"])
    assert rest == b""
    assert reader.status is DataStatus.OK
    assert content == b"hello\n.\nMAIL FROM:<e@x>\nDATA\n"
    # and it goes back out stuffed
    assert encode_all([content]) == b"hello\r\n..\r\nMAIL FROM:<e@x>\r\nDATA\r\n"


def test_bare_cr_normalized_to_line_end() -> None:
    content, _, _ = read([b"a\rb\r\n.\r\n"])
    assert content == b"a\nb\n"


def test_reject_mode_reads_to_real_end_and_reports() -> None:
    content, rest, reader = read([b"a\nb\r\nc\r\n.\r\nNOOP\r\n"], bare_newline="reject")
    assert rest == b"NOOP\r\n"
    assert reader.status is DataStatus.BARE_NEWLINE
    assert b"c" not in content  # nothing emitted after the problem


def test_cr_crlf_dot_crlf_is_the_real_end() -> None:
    # The octets CR LF . CR LF are there, preceded by a bare CR line: that is the end.
    content, rest, _ = read([b"a\r\r\n.\r\nX"])
    assert rest == b"X"
    assert content == b"a\n\n"


def test_long_line_rejected_but_stream_stays_in_step() -> None:
    data = b"x" * 20000 + b"\r\nQUIT\r\n.\r\nNOOP\r\n"
    content, rest, reader = read([data[i : i + 999] for i in range(0, len(data), 999)])
    assert rest == b"NOOP\r\n"
    assert reader.status is DataStatus.LINE_TOO_LONG
    assert content == b""


def test_line_limit_boundary() -> None:
    ok = b"x" * 998 + b"\r\n.\r\n"
    assert read([ok])[2].status is DataStatus.OK
    too_long = b"x" * 999 + b"\r\n.\r\n"
    assert read([too_long])[2].status is DataStatus.LINE_TOO_LONG
    content, _, reader = read([too_long], long_lines="accept")
    assert reader.status is DataStatus.OK
    assert content == b"x" * 999 + b"\n"


def test_size_limit_counts_crlf_and_keeps_reading() -> None:
    body = b"abc\r\n" * 10  # 50 octets
    assert read([body + b".\r\n"], max_size=50)[2].status is DataStatus.OK
    _, rest, reader = read([body + b".\r\nNOOP\r\n"], max_size=49)
    assert reader.status is DataStatus.TOO_BIG
    assert rest == b"NOOP\r\n"
    assert reader.size == 50


def test_pending_cr_at_chunk_end_after_terminator_is_kept() -> None:
    reader = DataReader(lambda _: None)
    assert reader.feed(b"a\r\n.\r\nNOOP\r") == b"NOOP\r"


def test_feed_after_end_is_an_error() -> None:
    reader = DataReader(lambda _: None)
    assert reader.feed(b".\r\n") == b""
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


def test_policy_names_are_validated() -> None:
    with pytest.raises(ValueError):
        DataReader(lambda _: None, bare_newline="maybe")


# -- properties ------------------------------------------------------------------------

_SMUGGLE = [b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n"]
_pieces = st.lists(
    st.one_of(
        st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"x", b"\r\n.", *_SMUGGLE]),
        st.binary(max_size=8).map(lambda b: b.replace(b"\r\n.\r\n", b"")),
    ),
    max_size=40,
)


def _without_terminator(data: bytes) -> bytes:
    while b"\r\n.\r\n" in data or data.startswith(b".\r\n"):
        data = data.replace(b"\r\n.\r\n", b"\r\n").removeprefix(b".\r\n")
    return data


@given(_pieces, st.sampled_from(["normalize", "reject"]))
def test_data_without_the_octet_terminator_never_ends(pieces: list[bytes], mode: str) -> None:
    data = _without_terminator(b"".join(pieces))
    _, rest, _ = read([data], bare_newline=mode)
    assert rest is None


@given(_pieces, st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=10))
def test_chunking_never_changes_the_result(pieces: list[bytes], sizes: list[int]) -> None:
    data = b"".join(pieces) + b"\r\n.\r\nNEXT"
    whole = read([data], max_size=60)
    chunks: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        chunks.append(data[pos : pos + n])
        pos += n
        i += 1
    split = read(chunks, max_size=60)
    if whole[2].status is DataStatus.OK:
        assert split[0] == whole[0]
    assert split[1] == whole[1]
    assert split[2].status is whole[2].status
    assert split[2].size == whole[2].size


@given(_pieces)
def test_end_is_first_octet_terminator(pieces: list[bytes]) -> None:
    data = b"".join(pieces) + b"\r\n.\r\nTAIL"
    _, rest, _ = read([data])
    assert rest is not None
    consumed = len(data) - len(rest)
    expected = 3 if data.startswith(b".\r\n") else data.find(b"\r\n.\r\n") + 5
    assert consumed == expected


_lf_text = st.lists(
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=20,
).map(lambda lines: b"".join(line + b"\n" for line in lines))


@given(_lf_text, st.integers(min_value=1, max_value=13))
def test_stuff_unstuff_round_trip(content: bytes, size: int) -> None:
    wire = encode_all([content]) + b".\r\n"
    chunks = [wire[i : i + size] for i in range(0, len(wire), size)]
    out, rest, reader = read(chunks, long_lines="accept")
    assert rest == b""
    assert out == content
    assert reader.size == len(encode_all([content], stuff=False))


@given(_pieces, st.integers(min_value=1, max_value=64), st.sampled_from(["normalize", "reject"]))
def test_fast_path_agrees_with_line_loop(pieces: list[bytes], size: int, mode: str) -> None:
    data = b"".join(pieces) + b"\r\n" + b"plain line\r\n" * 5 + b".\r\nNEXT"
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    fast = read(chunks, bare_newline=mode, line_limit=40)

    class Slow(DataReader):
        def _fast(self, data: bytes, out: list[bytes]) -> bool:
            return False

    out: list[bytes] = []
    slow = Slow(out.append, bare_newline=mode, line_limit=40)
    rest = None
    for i, chunk in enumerate(chunks):
        rest = slow.feed(chunk)
        if rest is not None:
            rest += b"".join(chunks[i + 1 :])
            break
    assert fast[1] == rest
    assert fast[2].status is slow.status
    assert fast[2].size == slow.size
    if slow.status is DataStatus.OK:
        assert fast[0] == b"".join(out)


class CountingReader(DataReader):
    """Counts how often the per-piece slow path runs (the benchmark's 427,200 calls)."""

    content_calls = 0

    def _content(self, data: bytes, out: list[bytes], newlines: int | None = None) -> None:
        self.content_calls += 1
        super()._content(data, out, newlines)


_LINE = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n"


def test_whole_message_with_terminator_in_one_chunk_takes_the_fast_path() -> None:
    out: list[bytes] = []
    reader = CountingReader(out.append)
    body = b"Subject: x\r\n\r\n" + _LINE * 128
    assert reader.feed(body + b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert b"".join(out) == body.replace(b"\r\n", b"\n")
    assert reader.content_calls <= 2  # not one per line
    assert reader.size == len(body)


def test_stuffed_lines_only_cost_their_own_line() -> None:
    out: list[bytes] = []
    reader = CountingReader(out.append)
    body = (_LINE * 50 + b"..dot\r\n") * 4 + _LINE * 50
    assert reader.feed(body + b".\r\n") == b""
    assert b"".join(out) == body.replace(b"\r\n..", b"\r\n.").replace(b"\r\n", b"\n")
    assert reader.content_calls <= 4 * 3 + 2


def test_fast_path_in_tcp_sized_chunks() -> None:
    out: list[bytes] = []
    reader = CountingReader(out.append)
    wire = (_LINE * 200) + b".\r\n"
    chunks = [wire[i : i + 1460] for i in range(0, len(wire), 1460)]
    rest = None
    for chunk in chunks:
        rest = reader.feed(chunk)
    assert rest == b""
    assert b"".join(out) == (_LINE * 200).replace(b"\r\n", b"\n")
    assert reader.content_calls <= 2 * len(chunks)
