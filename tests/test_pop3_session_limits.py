# mypy: allow-untyped-calls
"""POP3 per-session bounds: commands per session and invalid ("junk") commands.

Both end the session without UPDATE, so DELE'd messages must still be in the store after.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.logger import capturedLogs, formatEvent

from mailgate.interfaces import IMaildrop
from mailgate.model import Address
from mailgate.pop3 import Pop3Settings
from mailgate.pop3.server import Pop3Profile, State
from mailgate.testing import MemoryMaildrop, MemoryMailStore
from tests.test_pop3_server import ALICE, MSG1, MSG2, Session, with_messages

TOO_MANY_COMMANDS = b"-ERR [SYS/PERM] Too many commands\r\n"
TOO_MANY_INVALID = b"-ERR Too many invalid commands\r\n"


def logged_in(**settings: Any) -> Session:
    s = Session(with_messages(MSG1, MSG2), **settings)
    assert s.login().startswith(b"+OK")
    return s


def assert_closed_without_update(s: Session) -> None:
    assert s.closed
    assert s.state() is State.CLOSED
    s.drop()
    assert len(s.store.mailboxes[ALICE]) == 2  # the DELE was never applied
    assert ALICE not in s.store.locked  # the maildrop lock was released


def test_defaults_are_generous_for_fetchmail_and_strict_for_junk() -> None:
    settings = Pop3Settings(hostname="h")
    assert settings.max_commands == 100_000
    assert settings.max_junk == 10


@pytest.mark.parametrize("kw", [{"max_commands": 0}, {"max_junk": -1}])
def test_bad_limits_refused_at_wiring_time(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Pop3Settings(hostname="h", **kw)  # type: ignore[arg-type]


def test_command_beyond_max_commands_ends_the_session_without_update() -> None:
    s = logged_in(max_commands=5)  # USER and PASS were commands 1 and 2
    assert s.cmd("DELE 1") == b"+OK Message 1 deleted\r\n"
    assert s.cmd("NOOP") == b"+OK\r\n"
    assert s.cmd("STAT").startswith(b"+OK 1 ")  # the fifth: still answered
    assert not s.closed
    assert s.cmd("QUIT") == TOO_MANY_COMMANDS  # the sixth, even QUIT, ends it with no UPDATE
    assert s.transport.writes == [TOO_MANY_COMMANDS]
    assert_closed_without_update(s)


def test_pipelined_commands_after_the_limit_are_never_obeyed() -> None:
    s = logged_in(max_commands=3)
    out = s.send(b"NOOP\r\nDELE 1\r\nQUIT\r\nNOOP\r\n")
    assert out == b"+OK\r\n" + TOO_MANY_COMMANDS
    assert_closed_without_update(s)


def test_max_commands_counts_sasl_continuations() -> None:
    s = Session(max_commands=2)
    assert s.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert s.cmd(base64.b64encode(b"alice")).startswith(b"+ ")
    assert s.cmd(base64.b64encode(b"secret")) == TOO_MANY_COMMANDS
    assert s.closed


def test_too_many_commands_without_resp_codes() -> None:
    s = Session(max_commands=1, profile=Pop3Profile(resp_codes=False))
    assert s.cmd("CAPA").startswith(b"+OK")
    assert s.cmd("CAPA") == b"-ERR Too many commands\r\n"


JUNK_BEFORE_LOGIN = [
    b"FOO",  # unknown verb
    b"RETR 1",  # known verb, wrong state
    b"CAPA x",  # arity
    b"PASS secret",  # PASS without USER
    b"",  # empty line
    b"USER a\x00b",  # NUL
    b"NOOP\rRSET",  # bare CR
    b"USER " + b"a" * 300,  # over-long line
    b"AUTH NOSUCH",  # unknown mechanism
    b"AUTH PLAIN !!!",  # bad base64
]


def test_junk_beyond_max_junk_ends_the_session() -> None:
    s = Session()
    replies = [s.cmd(line) for line in JUNK_BEFORE_LOGIN]
    assert len(replies) == 10
    assert all(r.startswith(b"-ERR ") and r != TOO_MANY_INVALID for r in replies), replies
    assert not s.closed
    with capturedLogs() as events:
        assert s.cmd("XYZZY") == TOO_MANY_INVALID
    assert s.transport.writes == [TOO_MANY_INVALID]
    assert s.closed
    assert any("too many invalid commands" in formatEvent(e) for e in events)


def test_bad_base64_in_a_sasl_continuation_is_junk() -> None:
    s = Session(max_junk=1)
    assert s.cmd("AUTH LOGIN").startswith(b"+ ")
    assert s.cmd("not*base64").startswith(b"-ERR Invalid base64")
    assert s.state() is State.AUTHORIZATION
    assert s.cmd("AUTH LOGIN").startswith(b"+ ")
    assert s.cmd("x" * 13000) == TOO_MANY_INVALID  # an over-long continuation is junk too
    assert s.closed


def test_junk_in_transaction_closes_without_update() -> None:
    s = logged_in(max_junk=2)
    assert s.cmd("DELE 1").startswith(b"+OK")
    assert s.cmd("USER alice").startswith(b"-ERR Command not valid")
    assert s.cmd("LIST x").startswith(b"-ERR Invalid message number")
    assert s.cmd("STAT x") == TOO_MANY_INVALID
    assert_closed_without_update(s)


def test_junk_counter_is_not_reset_by_valid_commands() -> None:
    s = logged_in(max_junk=2)
    assert s.cmd("FOO").startswith(b"-ERR Unknown command")
    assert s.cmd("NOOP") == b"+OK\r\n"
    assert s.cmd("BAR").startswith(b"-ERR Unknown command")
    assert s.cmd("STAT").startswith(b"+OK")
    assert s.cmd("BAZ") == TOO_MANY_INVALID


def test_honest_failures_are_not_junk() -> None:
    s = logged_in(max_junk=0)
    for _ in range(30):
        assert s.cmd("RETR 3") == b"-ERR No such message\r\n"
        assert s.cmd("LIST 99999999999") == b"-ERR No such message\r\n"
    assert s.cmd("DELE 1").startswith(b"+OK")
    for _ in range(30):
        assert s.cmd("DELE 1") == b"-ERR Message 1 already deleted\r\n"
    assert not s.closed
    assert s.cmd("NOOP") == b"+OK\r\n"


def test_failed_logins_and_cancelled_auth_are_not_junk() -> None:
    s = Session(max_junk=0, max_failures=5)
    for _ in range(3):
        assert s.cmd("AUTH PLAIN *").startswith(b"-ERR Authentication cancelled")
        assert s.cmd("AUTH LOGIN").startswith(b"+ ")
        assert s.cmd("*").startswith(b"-ERR Authentication cancelled")
    for _ in range(4):
        assert s.cmd("USER alice").startswith(b"+OK")
        assert s.cmd("PASS wrong").startswith(b"-ERR [AUTH] Authentication failed")
    assert not s.closed
    assert s.login().startswith(b"+OK")


def test_max_junk_zero_closes_on_the_first_invalid_command() -> None:
    s = Session(max_junk=0)
    assert s.cmd("HELO") == TOO_MANY_INVALID
    assert s.closed


def test_line_after_the_closing_reply_in_the_same_packet_is_ignored() -> None:
    s = Session(max_junk=0)
    out = s.send(b"BOGUS\r\nUSER alice\r\nPASS secret\r\n")
    assert out == TOO_MANY_INVALID
    assert s.state() is State.CLOSED


# -- the partial-line watchdog ([limits] line_time, min_rate) ------------------------------


def test_a_dripped_command_is_cut_after_line_time_without_update() -> None:
    s = logged_in(line_time=10.0, min_rate=0.0)
    assert s.cmd("DELE 1") == b"+OK Message 1 deleted\r\n"
    with capturedLogs() as events:
        s.send(b"QUI")
        s.clock.advance(10)
    assert s.take() == b""  # POP3 has no reply for it: the session just ends
    assert_closed_without_update(s)
    text = [formatEvent(e) for e in events]
    assert any("a partial line pending for more than 10.0s" in t for t in text)


def test_starttls_forgets_a_partial_line_pipelined_in_plaintext() -> None:
    s = Session(line_time=10.0, min_rate=0.0)
    assert s.send(b"STLS\r\n\x16\x03").startswith(b"+OK")
    s.clock.advance(30)
    assert not s.closed


def test_pop3_line_time_is_checked_at_wiring_time() -> None:
    with pytest.raises(ValueError):
        Pop3Settings(hostname="h", line_time=0)


class _HeldCommitMaildrop(MemoryMaildrop):
    """UPDATE that takes as long as the test says (a big maildrop on a slow disk)."""

    def commit(self, deleted: Sequence[int]) -> Deferred[int]:
        held: Deferred[int] = Deferred()
        self._store.held.append((held, lambda: MemoryMaildrop.commit(self, deleted)))  # type: ignore[attr-defined]
        return held


class _HeldCommitStore(MemoryMailStore):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Deferred[int], Any]] = []

    def open_maildrop(self, address: Address) -> Deferred[IMaildrop]:
        self.locked.add(address)
        return succeed(_HeldCommitMaildrop(self, address))


def test_no_timer_ends_a_session_while_its_update_commits() -> None:
    store = _HeldCommitStore()
    store.deliver(ALICE, MSG1)
    s = Session(store, line_time=10.0, min_rate=0.0)
    assert s.login().startswith(b"+OK")
    assert s.cmd("DELE 1").startswith(b"+OK")
    s.send(b"QUIT\r\nX")  # a partial line pipelined after QUIT
    assert s.state() is State.UPDATE
    s.clock.advance(10_000)  # past the watchdog's line_time and the idle timeout
    assert not s.closed
    assert ALICE in store.locked  # the commit still owns the lock
    held, finish = store.held.pop()
    held.callback(finish().result)
    assert s.take() == b"+OK mail.example.com signing off\r\n"
    assert s.closed and ALICE not in store.locked and store.mailboxes[ALICE] == []


def test_a_session_dropped_during_update_leaves_the_lock_to_the_commit() -> None:
    store = _HeldCommitStore()
    store.deliver(ALICE, MSG1)
    s = Session(store)
    assert s.login().startswith(b"+OK")
    s.send(b"QUIT\r\n")
    s.drop()
    assert ALICE in store.locked  # not released under the running commit
    held, finish = store.held.pop()
    held.callback(finish().result)
    assert ALICE not in store.locked
