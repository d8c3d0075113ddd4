# mypy: allow-untyped-calls
"""The reactor-lag probe the benchmark reads, on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from mailgate.lagprobe import (
    ENV,
    LagProbe,
    install_from_environment,
    latest_report,
    worst_lag_ms,
)


class Wall:
    """A wall clock the test sets (the probe groups its reports by wall-clock second)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def probe() -> tuple[Clock, Wall, list[tuple[int, float, int]], LagProbe]:
    clock, wall = Clock(), Wall()
    reports: list[tuple[int, float, int]] = []
    p = LagProbe(clock, lambda *r: reports.append(r), interval=0.01, wall=wall)
    p.start()
    return clock, wall, reports, p


def test_a_blocked_reactor_shows_as_the_seconds_worst_lag() -> None:
    clock, wall, reports, p = probe()
    for _ in range(10):
        clock.advance(0.01)  # on time
    clock.advance(0.25)  # the reactor was busy for a quarter of a second
    assert reports == []  # the second is still running
    wall.now = 1001.2
    clock.advance(0.01)
    assert len(reports) == 1
    second, worst, ticks = reports[0]
    assert second == 1000 and ticks == 11
    assert worst == pytest.approx(0.24)
    p.stop()
    assert reports[1][0] == 1001 and reports[1][1] == pytest.approx(0.0)


def test_on_time_ticks_report_no_lag_and_stop_leaves_no_timer() -> None:
    clock, _, reports, p = probe()
    for _ in range(50):
        clock.advance(0.01)
    p.stop()
    (second, worst, ticks), *more = reports
    assert (second, ticks, more) == (1000, 50, [])
    assert worst == pytest.approx(0.0)
    assert clock.getDelayedCalls() == []


def test_installed_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert install_from_environment(MemoryReactorClock()) is None
    monkeypatch.setenv(ENV, str(tmp_path / "lag"))
    reactor = MemoryReactorClock()
    assert install_from_environment(reactor, wall=Wall()) is not None
    for hook, args, kw in reactor.whenRunningHooks:
        hook(*args, **kw)
    reactor.advance(0.01)
    reactor.advance(0.3)
    for stop, args, kw in reactor.triggers["before"]["shutdown"]:
        stop(*args, **kw)
    assert reactor.getDelayedCalls() == []
    (written,) = list((tmp_path / "lag").iterdir())
    second, worst, ticks = written.read_text().split()
    assert float(worst) == pytest.approx(290, abs=1) and ticks == "2"
    assert worst_lag_ms(str(tmp_path / "lag"), int(second), int(second) + 1) == float(worst)
    assert worst_lag_ms(str(tmp_path / "lag"), int(second) + 5, int(second) + 9) is None
    assert worst_lag_ms(str(tmp_path / "nothing"), 0, 1e12) is None


def test_unreadable_reports_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "lag.1").write_text("1000 5.00 90\nnot a number 3\n1001 7.5")  # mid-write
    (tmp_path / "lag.2").mkdir()  # not a file
    (tmp_path / "lag.3").write_text("1000 2.00 99\n1001 1.00 98\n")
    assert worst_lag_ms(str(tmp_path), 1000, 1002) == 5.0
    assert latest_report(str(tmp_path)) == 1000  # lag.1 has not reported 1001 yet
