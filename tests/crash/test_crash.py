"""CI-sized crash run: 10 SIGKILLs of a two-process mailgate, nothing acknowledged is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.crash.harness import run


@pytest.mark.timeout(240)
def test_sigkill_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    report = run(kills=10, workers=2, seed=10, root=tmp_path, out=lambda _: None)
    print(report.summary())
    print(report.details())
    assert report.acknowledged > 20, "the clients hardly got anything through"
    assert report.pop3_drops > 0, "no POP3 session dropped after DELE"
    assert report.lost == []
    assert report.duplicated == []
    assert report.half_written == []
    assert report.orphans == 0, "a worker outlived its SIGKILLed master"
