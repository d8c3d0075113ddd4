"""RETR streaming: bounded chunks sized to Twisted's per-turn send limit, bytes exact."""

from __future__ import annotations

import io

from twisted.internet.abstract import FileDescriptor

from mailgate.pop3.server import CHUNK_SIZE, MessageStream
from mailgate.wire import encode_all

LINE = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n"


class CountingSource(io.BytesIO):
    """A message file that records the size of every read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        self.reads.append(len(out))
        return out


class Consumer:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.producer: object | None = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def stream(data: bytes) -> tuple[CountingSource, Consumer, list[bool]]:
    source = CountingSource(data)
    consumer = Consumer()
    done: list[bool] = []
    s = MessageStream(source, b"+OK\r\n", consumer, None, done.append)  # type: ignore[arg-type]
    consumer.registerProducer(s, False)
    steps = 0
    while not done:
        s.resumeProducing()
        steps += 1
        assert steps < 10_000
    return source, consumer, done


def test_big_message_is_exact_and_streamed_in_bounded_reads() -> None:
    data = LINE * (3 * 2**20 // len(LINE))  # ~3 MiB of ordinary text
    source, consumer, done = stream(data)
    assert done == [True]
    assert b"".join(consumer.writes) == b"+OK\r\n" + encode_all([data]) + b".\r\n"
    assert max(source.reads) <= CHUNK_SIZE  # memory per step does not grow with the message
    assert len(consumer.writes) >= len(data) // CHUNK_SIZE


def test_each_write_of_text_fits_one_send_of_the_transport() -> None:
    """A pull producer is resumed once the buffer is empty; one write that exceeds
    SEND_LIMIT would cost a second reactor turn for a small remainder."""
    data = LINE * (2**20 // len(LINE))
    _, consumer, _ = stream(data)
    assert all(len(w) <= FileDescriptor.SEND_LIMIT for w in consumer.writes[:-1])
    # and the chunk is not needlessly small either: more than half of a send per turn
    assert all(len(w) > FileDescriptor.SEND_LIMIT // 2 for w in consumer.writes[1:-1])


def test_dot_lines_at_every_chunk_boundary_are_stuffed() -> None:
    body = b"x" * (CHUNK_SIZE - 1) + b"\n"
    data = (body + b".\n") * 3
    _, consumer, _ = stream(data)
    wire = b"".join(consumer.writes)
    assert wire.count(b"\r\n..\r\n") == 3
    assert wire.endswith(b"\r\n..\r\n.\r\n")
