"""Shared pytest setup."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis profiles. "ci" (the default) keeps the suite quick and repeatable (derandomized:
# the same examples every run, so a red CI is never luck); "fuzz" is the long, random run by
# hand: HYPOTHESIS_PROFILE=fuzz .venv/bin/pytest tests/test_fuzz.py
# No deadlines in either: the suite makes no timing assertions.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True)
settings.register_profile(
    "fuzz",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _work_in_a_scratch_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """trial's mktemp() and twistd write relative to the working directory: keep the tree clean."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(old)
