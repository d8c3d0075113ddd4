"""The shared brute-force throttle: delays, repeats, expiry, memory bound, the log line."""

from __future__ import annotations

import re

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger, formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailgate.auth.throttle import (
    AuthThrottle,
    deferred_failure,
    failure_line,
    log_field,
    peer_key,
)
from mailgate.interfaces import IAuthThrottle

FAILREGEX = re.compile(
    r"^.*mailgate: auth failure: protocol=\S+ rhost=(?P<host>\S+) user=\S* reason=\S+$"
)


def throttle(clock: Clock | None = None, **kwargs: object) -> AuthThrottle:
    return AuthThrottle(clock or Clock(), **kwargs)  # type: ignore[arg-type]


def fail(t: AuthThrottle, ip: str, login: str = "alice", secret: bytes = b"x") -> float:
    t.failed(ip, login, t.fingerprint(secret))
    return t.delay_for(ip)


def test_provides_the_interface() -> None:
    assert verifyObject(IAuthThrottle, throttle())


def test_delay_grows_from_two_seconds_doubling_to_fifteen() -> None:
    t = throttle()
    assert t.delay_for("203.0.113.7") == 0.0
    delays = [fail(t, "203.0.113.7", secret=b"guess%d" % i) for i in range(6)]
    assert delays == [2.0, 4.0, 8.0, 15.0, 15.0, 15.0]


def test_repeat_of_the_same_wrong_credentials_does_not_escalate() -> None:
    t = throttle()
    assert fail(t, "203.0.113.7", "alice", b"old-password") == 2.0
    assert fail(t, "203.0.113.7", "alice", b"old-password") == 2.0
    assert fail(t, "203.0.113.7", "alice", b"old-password") == 2.0
    # Same password for another login, or another password: that is guessing.
    assert fail(t, "203.0.113.7", "bob", b"old-password") == 4.0
    assert fail(t, "203.0.113.7", "alice", b"other") == 8.0


def test_addresses_are_independent_and_success_clears() -> None:
    t = throttle()
    fail(t, "203.0.113.7", secret=b"a")
    fail(t, "203.0.113.7", secret=b"b")
    assert t.delay_for("198.51.100.1") == 0.0
    t.succeeded("203.0.113.7")
    assert t.delay_for("203.0.113.7") == 0.0
    assert fail(t, "203.0.113.7", secret=b"c") == 2.0


def test_ipv4_mapped_ipv6_is_the_same_client() -> None:
    t = throttle()
    fail(t, "::ffff:203.0.113.7", secret=b"a")
    assert t.delay_for("203.0.113.7") == 2.0
    assert peer_key("::FFFF:203.0.113.7") == "203.0.113.7"
    assert peer_key("fe80::1%eth0") == "fe80::1"
    assert peer_key("not-an-ip") == "not-an-ip"


def test_exempt_networks_are_never_delayed() -> None:
    t = throttle(exempt=lambda ip: ip.startswith("10."))
    for i in range(5):
        assert fail(t, "10.1.2.3", secret=b"%d" % i) == 0.0
    assert len(t) == 0
    assert fail(t, "192.0.2.1") == 2.0


def test_failures_are_forgotten_after_a_quiet_period() -> None:
    clock = Clock()
    t = throttle(clock, forget_after=600.0)
    fail(t, "203.0.113.7", secret=b"a")
    fail(t, "203.0.113.7", secret=b"b")
    clock.advance(599)
    assert t.delay_for("203.0.113.7") == 4.0
    clock.advance(1)
    assert t.delay_for("203.0.113.7") == 0.0
    assert fail(t, "203.0.113.7", secret=b"c") == 2.0


def test_memory_is_bounded_least_recent_forgotten_first() -> None:
    t = throttle(max_peers=100)
    for i in range(1000):
        fail(t, f"10.0.{i // 256}.{i % 256}")
    assert len(t) == 100
    assert t.delay_for("10.0.0.0") == 0.0  # the oldest went first
    assert t.delay_for("10.0.3.231") == 2.0  # the newest (i = 999) is kept


def test_fingerprint_is_keyed_per_process_and_not_the_secret() -> None:
    a, b = throttle(), throttle()
    fp = a.fingerprint(b"hunter2")
    assert fp == a.fingerprint(b"hunter2")
    assert fp != a.fingerprint(b"hunter3")
    assert fp != b.fingerprint(b"hunter2")  # another key
    assert b"hunter2" not in fp and len(fp) == 16


def test_deferred_failure_waits_on_the_clock() -> None:
    clock = Clock()
    fired: list[str] = []
    d = deferred_failure(clock, 4.0, "-ERR")
    d.addCallback(fired.append)
    clock.advance(3.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == ["-ERR"]
    assert clock.getDelayedCalls() == []


def test_deferred_failure_zero_delay_fires_at_once() -> None:
    fired: list[int] = []
    deferred_failure(Clock(), 0.0, 7).addCallback(fired.append)
    assert fired == [7]


def test_deferred_failure_cancel_cancels_the_timer() -> None:
    clock = Clock()
    d: Deferred[str] = deferred_failure(clock, 15.0, "x")
    errors: list[object] = []

    def record(f: Failure) -> None:
        errors.append(f.check(CancelledError))  # type: ignore[no-untyped-call]

    d.addErrback(record)
    d.cancel()
    assert errors == [CancelledError]
    assert clock.getDelayedCalls() == []


def test_failure_line_matches_the_documented_failregex() -> None:
    line = failure_line("pop3", "203.0.113.7", "alice@example.com", "bad-credentials")
    assert line == (
        "mailgate: auth failure: protocol=pop3 rhost=203.0.113.7 "
        "user=alice@example.com reason=bad-credentials"
    )
    m = FAILREGEX.match("2026-01-01T00:00:00+0000 [mailgate.auth#warn] " + line)
    assert m is not None and m.group("host") == "203.0.113.7"


def test_a_hostile_login_cannot_forge_the_host() -> None:
    line = failure_line("smtp", "::ffff:192.0.2.9", "x rhost=198.51.100.1\r\nfake", "bad")
    m = FAILREGEX.match(line)
    assert m is not None and m.group("host") == "192.0.2.9"
    assert "\n" not in line and "\r" not in line and line.count(" rhost=") == 1
    assert log_field("") == "-"
    assert log_field("a" * 500).endswith("...") and len(log_field("a" * 500)) == 131
    assert log_field("\\é") == "\\x5c\\xe9"


def test_log_failure_emits_one_line_never_the_password() -> None:
    events: list[LogEvent] = []
    t = throttle(logger=Logger(namespace="mailgate.auth", observer=events.append))  # type: ignore[arg-type]
    t.log_failure("smtp", "203.0.113.7", "bob", "bad-credentials")
    assert len(events) == 1
    text = formatEvent(events[0])
    assert text == (
        "mailgate: auth failure: protocol=smtp rhost=203.0.113.7 user=bob reason=bad-credentials"
    )
    assert events[0]["log_level"].name == "warn"
