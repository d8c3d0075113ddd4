# mypy: allow-untyped-calls
"""SMTP per-session bounds: commands per session, junk commands, and the header limits of DATA.

Every limit is answered with its proper reply; the DATA limits only after the final dot, so
the session stays in step with the client.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred

from mailgate.smtp import SmtpSettings
from mailgate.smtp.server import State
from tests.test_smtp_server import HOST, PLAIN_ALICE, Session, codes, settings, submit

TOO_MANY_COMMANDS = f"421 4.7.0 {HOST} Too many commands\r\n".encode()
TOO_MANY_ERRORS = f"421 4.7.0 {HOST} Error: too many errors\r\n".encode()


def test_defaults() -> None:
    s = SmtpSettings(hostname="h", default_domain="d")
    assert s.max_commands == 10_000
    assert s.max_junk == 20


@pytest.mark.parametrize("kw", [{"max_commands": 0}, {"max_junk": -1}])
def test_bad_limits_refused_at_wiring_time(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        settings(**kw)


def test_command_beyond_max_commands_is_refused_and_closes() -> None:
    s = Session(settings(max_commands=3, require_tls=False))
    assert codes(s.cmd("NOOP")) == ["250 2.0.0"]
    assert codes(s.cmd("NOOP")) == ["250 2.0.0"]
    assert codes(s.cmd("RSET")) == ["250 2.0.0"]
    assert not s.closed
    s.transport.writes.clear()
    assert s.cmd("QUIT") == TOO_MANY_COMMANDS
    assert s.transport.writes == [TOO_MANY_COMMANDS]
    assert s.closed
    assert s.proto.state is State.CLOSED


def test_data_lines_are_not_commands_and_pipelined_excess_is_dropped() -> None:
    s = Session(settings(max_commands=9))
    s.login()  # EHLO, STARTTLS, EHLO, AUTH: 4 commands
    body = b"Subject: x\r\n\r\n" + b"line\r\n" * 50 + b".\r\n"
    out = submit(s, body)  # MAIL, RCPT, DATA: 7; fifty data lines count for nothing
    assert codes(out) == ["250 2.0.0"]
    assert len(s.store.delivered) == 1
    out = s.send(b"NOOP\r\nNOOP\r\nMAIL FROM:<alice@example.com>\r\nNOOP\r\n")
    assert out == b"250 2.0.0 Ok\r\n" * 2 + TOO_MANY_COMMANDS
    assert s.closed


def test_over_long_lines_count_as_commands() -> None:
    s = Session(settings(max_commands=2, require_tls=False, max_junk=100))
    assert codes(s.cmd(b"NOOP " + b"x" * 600)) == ["500 5.5.2"]
    assert codes(s.send(b"NOOP " + b"x" * 20000)) == []  # discarding: no reply yet
    assert codes(s.send(b"\r\n")) == ["500 5.5.2"]
    assert s.cmd("NOOP") == TOO_MANY_COMMANDS


def test_auth_responses_count_as_commands() -> None:
    s = Session(settings(max_commands=4))
    s.starttls()  # EHLO, STARTTLS
    s.cmd("EHLO c.example")
    assert codes(s.cmd("AUTH PLAIN")) == ["334"]
    assert s.cmd(PLAIN_ALICE) == TOO_MANY_COMMANDS


JUNK = [
    b"FOO",  # unknown verb
    b"",  # empty line
    b"NOOP\x00",  # NUL
    b"RCPT TO:<bob@example.com>",  # out of sequence
    b"DATA",  # out of sequence
    b"EHLO",  # missing argument
    b"RSET x",  # argument where none belongs
    b"NOOP " + b"x" * 600,  # over-long line
    b"AUTH",  # AUTH syntax
    b"AUTH PLAIN !!!",  # bad base64
]


def test_junk_beyond_max_junk_is_answered_421_and_closes() -> None:
    s = Session(settings(max_junk=len(JUNK) + 2))
    s.login()
    replies = [s.cmd(line) for line in JUNK]
    assert all(r[:1] == b"5" for r in replies), replies
    assert codes(s.cmd("MAIL FROM:<alice@example.com> FOO=1")) == ["555 5.5.4"]
    assert codes(s.cmd("MAIL FROM:<<<")) == ["501 5.1.7"]
    assert not s.closed
    assert codes(s.cmd("HELP ME")) == ["214 2.0.0"]  # a valid command between
    s.transport.writes.clear()
    assert s.cmd("BOGUS") == TOO_MANY_ERRORS
    assert s.transport.writes == [TOO_MANY_ERRORS]
    assert s.closed


def test_junk_inside_an_auth_exchange_closes() -> None:
    s = Session(settings(max_junk=1))
    s.starttls()
    s.cmd("EHLO c.example")
    assert codes(s.cmd("AUTH LOGIN")) == ["334"]
    assert codes(s.cmd("%%%")) == ["501 5.5.2"]
    assert codes(s.cmd("AUTH LOGIN")) == ["334"]
    assert s.cmd(b"A" * 13000) == TOO_MANY_ERRORS  # over-long AUTH response
    assert s.closed


def test_junk_during_a_transaction_aborts_it() -> None:
    s = Session(settings(max_junk=0))
    s.login()
    assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["250 2.1.0"]
    assert codes(s.cmd("RCPT TO:<bob@example.com>")) == ["250 2.1.5"]
    assert s.send(b"MAIL FROM:<alice@example.com>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n") == (
        TOO_MANY_ERRORS
    )
    assert s.store.delivered == []


def test_policy_refusals_and_failed_logins_are_not_junk() -> None:
    s = Session(settings(max_junk=0, max_failures=10))
    for _ in range(5):
        assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["530 5.7.0"]  # STARTTLS first
    s.starttls()
    s.cmd("EHLO c.example")
    for _ in range(5):
        assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["530 5.7.0"]  # AUTH first
        assert codes(s.cmd("AUTH NOSUCH")) == ["504 5.5.4"]
        assert codes(s.cmd("AUTH PLAIN *")) == ["501 5.7.0"]  # cancelled
        assert codes(s.cmd(b"AUTH PLAIN " + b"AGFsaWNlAHdyb25n")) == ["535 5.7.8"]
    assert codes(s.cmd(b"AUTH PLAIN " + PLAIN_ALICE)) == ["235 2.7.0"]
    for _ in range(5):
        assert codes(s.cmd("MAIL FROM:<mallory@example.com>")) == ["553 5.7.1"]  # not owned
    assert codes(s.cmd("MAIL FROM:<alice@example.com>")) == ["250 2.1.0"]
    for _ in range(5):
        assert codes(s.cmd("RCPT TO:<nobody@example.com>"))[0].startswith("55")
    assert codes(s.cmd("DATA")) == ["503 5.5.1"]  # every recipient refused: not junk
    assert not s.closed


# -- item 2 of the issue: header limits answered after the final dot --------------------


def test_header_count_limit_is_answered_after_the_final_dot_and_stays_in_step() -> None:
    s = Session(settings(max_header_lines=5))
    s.login()
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(10))
    assert s.cmd("MAIL FROM:<alice@example.com>").startswith(b"250")
    assert s.cmd("RCPT TO:<bob@example.com>").startswith(b"250")
    assert s.cmd("DATA").startswith(b"354")
    assert s.send(b"Subject: x\r\n" + fields) == b""  # no early reply: mid-message
    out = s.send(b"\r\nbody\r\n.\r\nNOOP\r\n")
    assert out == b"552 5.3.4 Message header size exceeds limit\r\n250 2.0.0 Ok\r\n"
    assert s.store.delivered == []


def test_header_size_limit_with_an_endless_folded_field() -> None:
    s = Session(settings(max_header_bytes=2048))
    s.login()
    body = b"Subject: x\r\n" + b" folded continuation\r\n" * 500 + b"\r\nbody\r\n.\r\n"
    out = submit(s, body)
    assert out == b"552 5.3.4 Message header size exceeds limit\r\n"
    assert s.store.delivered == []
    assert codes(s.cmd("NOOP")) == ["250 2.0.0"]


def test_message_without_a_blank_line_over_the_header_limit() -> None:
    s = Session(settings(max_header_lines=3))
    s.login()
    out = submit(s, b"".join(b"X-%d: v\r\n" % i for i in range(10)) + b".\r\n")
    assert out == b"552 5.3.4 Message header size exceeds limit\r\n"
    assert s.store.delivered == []


# -- the partial-line watchdog ([limits] line_time, min_rate) ------------------------------

TIMED_OUT = f"421 4.4.2 {HOST} Error: timeout exceeded\r\n".encode()


def test_a_dripped_command_is_cut_after_line_time_with_421() -> None:
    s = Session(settings(line_time=10.0, min_rate=0.0))
    assert s.send(b"EHL") == b""
    s.clock.advance(9)
    assert s.send(b"O") == b"" and not s.closed
    s.clock.advance(1)  # the window opened with the first byte, 10 s ago
    assert s.take() == TIMED_OUT
    assert s.closed and s.proto.state is State.CLOSED
    assert s.send(b" c.example\r\n") == b""  # nothing after the cut is obeyed
    s.proto.connectionLost()
    assert [c for c in s.clock.getDelayedCalls() if c.active()] == []


def test_a_dripped_message_is_cut_inside_data_too() -> None:
    s = Session(settings(line_time=10.0, min_rate=100.0))
    s.login()
    assert s.cmd("MAIL FROM:<alice@example.com>").startswith(b"250")
    assert s.cmd("RCPT TO:<bob@example.com>").startswith(b"250")
    assert s.cmd("DATA").startswith(b"354")
    assert s.send(b"Subject: x\r\n\r\nno end") == b""  # a partial line
    s.clock.advance(5)
    assert s.send(b"y") == b""
    s.clock.advance(5)  # 7 bytes of it in 10 s: under 100 bytes/s
    assert s.take() == TIMED_OUT
    assert s.closed
    assert s.store.delivered == []  # the cut message is not delivered


def test_complete_lines_never_open_the_window() -> None:
    s = Session(settings(line_time=10.0, min_rate=0.0))
    for _ in range(5):
        assert s.cmd("NOOP").startswith(b"250")
        s.clock.advance(9.9)
    assert not s.closed
    assert [c for c in s.clock.getDelayedCalls() if c.active()] != []  # the idle timer only


def test_line_time_is_checked_at_wiring_time() -> None:
    with pytest.raises(ValueError):
        settings(line_time=0)
    with pytest.raises(ValueError):
        settings(min_rate=-1)


def test_starttls_forgets_a_partial_line_pipelined_in_plaintext() -> None:
    s = Session(settings(line_time=10.0, min_rate=0.0))
    assert s.cmd("EHLO c.example").startswith(b"250-")
    assert s.send(b"STARTTLS\r\nEHL") == b"220 2.0.0 Ready to start TLS\r\n"
    s.clock.advance(30)
    assert not s.closed


def test_the_window_does_not_run_while_a_busy_session_stopped_reading() -> None:
    """Pipelined input beyond the pending-input bound pauses reading: the rest of the
    partial line cannot arrive then, so it must not count against the client."""
    s = Session(settings(line_time=10.0, min_rate=0.0, max_commands=100_000))
    s.login()
    s.cmd("MAIL FROM:<alice@example.com>")
    s.cmd("RCPT TO:<bob@example.com>")
    s.cmd("DATA")
    pending: Deferred[str] = Deferred()
    sink = s.proto._sink
    assert sink is not None
    sink.finish = lambda: pending  # type: ignore[method-assign]
    s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")  # the 250 waits for the delivery
    s.send(b"NOOP\r\n" * 50_000 + b"NOO")  # far past the bound, ending in a partial line
    assert s.transport.producerState == "paused"
    s.clock.advance(100)
    assert not s.closed
    pending.callback("Q42")  # reading resumes; the partial line's window starts again
    assert s.transport.producerState == "producing"
    s.take()
    s.clock.advance(9)
    assert not s.closed
    s.clock.advance(1)
    assert s.take().endswith(TIMED_OUT) and s.closed
