"""A reactor-lag probe: how late the reactor runs a timer, for benchmarks.

Anything that blocks the reactor thread (a synchronous disk wait, a long computation, a
lock) delays every timer and every reply behind it; this measures that delay directly.
Every ``interval`` seconds the probe asks the reactor for a call ``interval`` seconds later
and notes how late it came. Once a wall-clock second has passed it reports that second's
worst lag and the number of ticks.

``twistd mailgate`` runs it when ``MAILGATE_LAG_PROBE`` names a directory (the benchmark
runner sets it; workers inherit it): each process appends
``<unix second> <max lag ms> <ticks>`` lines to ``<directory>/lag.<pid>``. It is off by
default because it wakes the process a hundred times a second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

ENV = "MAILGATE_LAG_PROBE"
#: Seconds between ticks: the probe's resolution (epoll waits in whole milliseconds).
INTERVAL = 0.01


class LagProbe:
    """Measures timer lateness on ``clock``; ``report(second, max_lag_s, ticks)`` once per
    wall-clock second that had ticks."""

    def __init__(
        self,
        clock: IReactorTime,
        report: Callable[[int, float, int], None],
        interval: float = INTERVAL,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._report = report
        self._interval = interval
        self._wall = wall
        self._call: IDelayedCall | None = None
        self._due = 0.0
        self._second: int | None = None
        self._worst = 0.0
        self._ticks = 0

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        """Cancel the timer and report the second in progress."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        self._flush()

    def _schedule(self) -> None:
        self._due = self._clock.seconds() + self._interval
        self._call = self._clock.callLater(self._interval, self._tick)

    def _tick(self) -> None:
        lag = max(0.0, self._clock.seconds() - self._due)
        second = int(self._wall())
        if second != self._second:
            self._flush()
            self._second = second
        self._worst = max(self._worst, lag)
        self._ticks += 1
        self._schedule()

    def _flush(self) -> None:
        if self._second is not None and self._ticks:
            self._report(self._second, self._worst, self._ticks)
        self._worst = 0.0
        self._ticks = 0


def install_from_environment(
    reactor: Any, wall: Callable[[], float] = time.time
) -> LagProbe | None:
    """Run a probe in this process if ``MAILGATE_LAG_PROBE`` names a directory."""
    directory = os.environ.get(ENV)
    if not directory:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"lag.{os.getpid()}")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def report(second: int, worst: float, ticks: int) -> None:
        try:
            os.write(fd, f"{second} {worst * 1000:.2f} {ticks}\n".encode("ascii"))
        except OSError:
            pass  # a full disk loses a report line, never the probe or the reactor

    probe = LagProbe(reactor, report, wall=wall)
    reactor.callWhenRunning(probe.start)
    reactor.addSystemEventTrigger("before", "shutdown", probe.stop)
    return probe


def worst_lag_ms(directory: str, start: float, end: float) -> float | None:
    """The worst lag any process reported for a second overlapping [start, end]; None if
    there is no report (no probe, or nothing ran)."""
    worst: float | None = None
    for second, lag in _reports(directory):
        if second + 1 > start and second < end:
            worst = lag if worst is None else max(worst, lag)
    return worst


def latest_report(directory: str) -> int | None:
    """The oldest of the processes' latest reported seconds: every process has reported
    up to that second (None: no report yet)."""
    latest: dict[str, int] = {}
    for name in _names(directory):
        for second, _ in _reports(directory, name):
            latest[name] = max(latest.get(name, second), second)
    return min(latest.values()) if latest else None


def _names(directory: str) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if n.startswith("lag.")]
    except OSError:
        return []


def _reports(directory: str, only: str | None = None) -> list[tuple[int, float]]:
    """(second, worst lag ms) of every well-formed line; unreadable files are skipped."""
    out: list[tuple[int, float]] = []
    for name in [only] if only is not None else _names(directory):
        try:
            with open(os.path.join(directory, name)) as f:
                lines = f.readlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) != 3:
                continue  # a line still being written
            try:
                out.append((int(parts[0]), float(parts[1])))
            except ValueError:
                continue
    return out
