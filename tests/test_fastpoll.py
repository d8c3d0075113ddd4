"""mailgate.fastpoll: the epoll loop without the per-event legacy logging context."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import failure, log

from mailgate import fastpoll


class PipeReader:
    """A minimal selectable on the read end of a pipe that records what happened to it."""

    def __init__(self, reactor: Any, on_read: Any = None) -> None:
        self.reactor = reactor
        self.read_end, self.write_end = os.pipe()
        self.reads: list[bytes] = []
        self.lost: list[failure.Failure] = []
        self.on_read = on_read

    def fileno(self) -> int:
        return self.read_end

    def logPrefix(self) -> str:
        return "PipeReader"

    def doRead(self) -> None:
        self.reads.append(os.read(self.read_end, 100))
        if self.on_read is not None:
            self.on_read()

    def doWrite(self) -> None:
        raise AssertionError("never registered for writing")

    def connectionLost(self, reason: failure.Failure) -> None:
        self.lost.append(reason)
        self.reactor.removeReader(self)

    def close(self) -> None:
        self.reactor.removeReader(self)
        os.close(self.read_end)
        os.close(self.write_end)


@pytest.fixture
def epoll() -> Iterator[Any]:
    reactor: Any = EPollReactor()  # type: ignore[no-untyped-call]
    assert fastpoll.install(reactor)
    yield reactor
    reactor.removeAll()
    reactor._poller.close()


def test_other_reactors_are_left_alone() -> None:
    reactor: Any
    for reactor in (MemoryReactorClock(), Clock()):  # type: ignore[no-untyped-call]
        before = getattr(reactor, "doIteration", None)
        assert not fastpoll.install(reactor)
        assert getattr(reactor, "doIteration", None) == before


def test_ready_descriptor_is_dispatched_without_the_logging_context(
    epoll: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_context(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("callWithLogger used")

    monkeypatch.setattr(log, "callWithLogger", no_context)
    pipe = PipeReader(epoll)
    try:
        epoll.addReader(pipe)
        epoll.doIteration(0)
        assert pipe.reads == []
        os.write(pipe.write_end, b"hello")
        epoll.doIteration(0)
        assert pipe.reads == [b"hello"]
    finally:
        pipe.close()


def one_batch(epoll: Any, bad: PipeReader) -> tuple[PipeReader, list[dict[str, Any]]]:
    """Make ``bad`` and a well-behaved reader ready together, run one iteration; the good
    reader and every error event logged meanwhile."""
    errors: list[dict[str, Any]] = []
    log.addObserver(errors.append)
    good = PipeReader(epoll)
    try:
        for p in (bad, good):
            epoll.addReader(p)
            os.write(p.write_end, b"!")
        epoll.doIteration(0)  # must not raise
    finally:
        log.removeObserver(errors.append)
        bad.close()
        good.close()
    return good, [e for e in errors if e.get("isError")]


def test_failing_handler_is_logged_and_disconnected_loop_goes_on(epoll: Any) -> None:
    bad = PipeReader(epoll, on_read=lambda: 1 / 0)
    good, errors = one_batch(epoll, bad)
    assert len(bad.lost) == 1 and bad.lost[0].check(ZeroDivisionError)  # type: ignore[no-untyped-call]
    assert good.reads == [b"!"] and good.lost == []
    assert errors


def test_exception_from_connection_lost_is_logged_and_the_batch_goes_on(epoll: Any) -> None:
    """_doReadOrWrite does not guard the connectionLost it calls; the loop must."""

    class BadLoss(PipeReader):
        def connectionLost(self, reason: failure.Failure) -> None:
            super().connectionLost(reason)
            raise RuntimeError("broken connectionLost")

    bad = BadLoss(epoll, on_read=lambda: 1 / 0)
    good, errors = one_batch(epoll, bad)
    assert good.reads == [b"!"]
    assert len(bad.lost) == 1
    assert any("broken connectionLost" in str(e.get("failure", "")) for e in errors)


def test_descriptor_removed_earlier_in_the_batch_is_skipped(epoll: Any) -> None:
    """Both are ready in one batch; whichever runs first removes the other."""
    pipes: list[PipeReader] = []
    a = PipeReader(epoll, on_read=lambda: epoll.removeReader(pipes[1]))
    b = PipeReader(epoll, on_read=lambda: epoll.removeReader(pipes[0]))
    pipes += [a, b]
    try:
        for p in pipes:
            epoll.addReader(p)
            os.write(p.write_end, b"!")
        epoll.doIteration(0)
        assert sorted(len(p.reads) for p in pipes) == [0, 1]
    finally:
        a.close()
        b.close()
