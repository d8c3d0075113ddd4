# mypy: allow-untyped-calls
"""SMTP idle timer per complete line (slowloris drip) and the strict/lenient parsing profiles."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.model import Address
from mailgate.realm import MailRealm
from mailgate.smtp import SmtpFactory, SmtpProfile, SmtpSettings
from mailgate.smtp._grammar import (
    Parsing,
    SmtpSyntaxError,
    find_line_end,
    parse_command,
    parse_path,
)
from mailgate.testing import MemoryMailStore, MemoryUserDatabase

TIMEOUT = 300
TIMED_OUT = b"421 4.4.2 mx.example.com Error: timeout exceeded\r\n"
BOB = Address("bob", "example.com")


class Session:
    def __init__(self, parsing: str = "normal", **kw: Any) -> None:
        # These tests are about the idle timer: the partial-line watchdog (test_limits.py)
        # is set to fire well after it.
        kw.setdefault("line_time", 10 * TIMEOUT)
        self.clock = Clock()
        self.store = MemoryMailStore()
        users = MemoryUserDatabase({"alice@example.com": "secret", "bob@example.com": "x"})
        realm = MailRealm(self.store, users, ["example.com"])
        portal = Portal(realm, [PasswordChecker(users, "example.com", plaintext_verify)])
        settings = SmtpSettings(
            hostname="mx.example.com",
            default_domain="example.com",
            require_tls=False,
            allow_plaintext=lambda ip: True,
            timeout=TIMEOUT,
            profile=SmtpProfile(parsing=parsing),
            **kw,
        )
        factory = SmtpFactory(portal, settings, self.clock)
        self.proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 5000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 5000))
        self.proto.makeConnection(self.transport)
        assert self.take().startswith(b"220 ")

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, line: bytes) -> bytes:
        return self.send(line + b"\r\n")

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def ready_for_data(self) -> None:
        assert self.cmd(b"EHLO c").startswith(b"250-")
        plain = base64.b64encode(b"\0alice@example.com\0secret")
        assert self.cmd(b"AUTH PLAIN " + plain).startswith(b"235 ")
        assert self.cmd(b"MAIL FROM:<alice@example.com>").startswith(b"250 ")
        assert self.cmd(b"RCPT TO:<bob@example.com>").startswith(b"250 ")
        assert self.cmd(b"DATA").startswith(b"354 ")


# -- idle timer: complete lines only ---------------------------------------------------------


def test_dripping_a_command_one_byte_at_a_time_times_out() -> None:
    s = Session()
    assert s.cmd(b"EHLO c").startswith(b"250-")
    for byte in b"NOOP":  # a byte every 70 s: never a whole line
        assert s.send(bytes([byte])) == b""
        s.clock.advance(70)
    assert not s.closed
    s.clock.advance(TIMEOUT - 4 * 70)  # TIMEOUT after the last complete line
    assert s.take() == TIMED_OUT
    assert s.closed


def test_complete_lines_keep_the_session_alive() -> None:
    s = Session()
    for _ in range(4):
        s.clock.advance(TIMEOUT - 1)
        assert s.cmd(b"NOOP") == b"250 2.0.0 Ok\r\n"
    assert not s.closed


def test_a_line_completed_by_the_last_byte_resets_the_timer() -> None:
    s = Session()
    s.send(b"NOO")
    s.clock.advance(TIMEOUT - 1)
    assert s.send(b"P\r\n") == b"250 2.0.0 Ok\r\n"
    s.clock.advance(TIMEOUT - 1)
    assert not s.closed
    s.clock.advance(1)
    assert s.closed


def test_dripping_an_overlong_line_times_out() -> None:
    s = Session()
    s.send(b"X" * 20000)  # discarded as it comes
    for _ in range(5):
        s.clock.advance(TIMEOUT / 5 - 1)
        s.send(b"X")
    s.clock.advance(5)
    assert s.take() == TIMED_OUT


def test_data_progress_by_whole_lines_keeps_the_session_alive() -> None:
    s = Session()
    s.ready_for_data()
    for i in range(3):
        s.clock.advance(TIMEOUT - 1)
        assert s.send(b"line %d\r\n" % i) == b""
    assert not s.closed
    assert s.send(b".\r\n").startswith(b"250 2.0.0 Ok: queued")


def test_dripping_data_without_line_ends_times_out() -> None:
    s = Session()
    s.ready_for_data()
    assert s.send(b"Subject: x\r\n\r\n") == b""
    for _ in range(5):
        s.clock.advance(TIMEOUT / 5 - 1)
        assert s.send(b"y") == b""
    s.clock.advance(5)
    assert s.take() == TIMED_OUT
    assert s.store.mailboxes.get(BOB, []) == []


# -- parsing profiles: the protocol ----------------------------------------------------------


def test_unknown_parsing_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        SmtpProfile(parsing="sloppy")


@pytest.mark.parametrize(
    "line",
    [b"EHLO  c", b" EHLO c", b"EHLO c ", b"EHLO\tc", b"NOOP ", b"MAIL FROM:<a@example.com>  "],
)
def test_strict_refuses_extra_spaces_and_tabs(line: bytes) -> None:
    s = Session("strict")
    assert s.cmd(line) == b"500 5.5.2 Syntax error\r\n"


def test_strict_still_takes_any_case_and_single_spaces() -> None:
    s = Session("strict")
    assert s.cmd(b"ehlo c").startswith(b"250-mx.example.com")
    assert s.cmd(b"nOoP") == b"250 2.0.0 Ok\r\n"


def test_strict_wants_brackets_right_after_the_colon() -> None:
    s = Session("strict")
    s.cmd(b"EHLO c")
    plain = base64.b64encode(b"\0alice@example.com\0secret")
    assert s.cmd(b"AUTH PLAIN " + plain).startswith(b"235 ")
    assert s.cmd(b"MAIL FROM: <alice@example.com>").startswith(b"501 5.5.2")
    assert s.cmd(b"MAIL FROM:alice@example.com").startswith(b"501 5.5.2")
    assert s.cmd(b"MAIL FROM:<alice@example.com>") == b"250 2.1.0 Sender ok\r\n"
    assert s.cmd(b"RCPT TO: <bob@example.com>").startswith(b"501 5.5.2")


def test_normal_tolerates_spaces_but_not_bare_lf() -> None:
    s = Session()
    assert s.cmd(b" EHLO  c ").startswith(b"250-mx.example.com")
    # A bare LF does not end a command: the whole thing is one (refused) line.
    assert s.send(b"NOOP\nNOOP\r\n") == b"500 5.5.2 Syntax error\r\n"


def test_lenient_ends_commands_at_a_bare_lf() -> None:
    s = Session("lenient")
    assert s.send(b"NOOP\nNOOP  \r\nRSET\n") == b"250 2.0.0 Ok\r\n" * 3
    assert s.send(b"EHLO c\n").startswith(b"250-mx.example.com")


def test_lenient_never_ends_data_at_bare_lf() -> None:
    s = Session("lenient", bare_newline="normalize")
    assert s.send(b"EHLO c\n").startswith(b"250-")
    plain = base64.b64encode(b"\0alice@example.com\0secret")
    assert s.send(b"AUTH PLAIN " + plain + b"\n").startswith(b"235 ")
    assert s.send(b"MAIL FROM:<alice@example.com>\n").startswith(b"250 ")
    assert s.send(b"RCPT TO:<bob@example.com>\n").startswith(b"250 ")
    assert s.send(b"DATA\n").startswith(b"354 ")
    # Neither LF.LF nor CRLF.LF nor LF.CRLF ends the data; the smuggled MAIL stays data.
    assert s.send(b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<x@example.com>\r\n") == b""
    assert s.send(b"a\r\n.\nb\n.\r\nc\r\n") == b""
    assert s.send(b".\r\n").startswith(b"250 2.0.0 Ok: queued")
    (message,) = s.store.mailboxes[BOB]
    assert b"MAIL FROM:<x@example.com>" in message.data


def test_lenient_framing_keeps_line_limits() -> None:
    s = Session("lenient")
    assert s.send(b"NOOP " + b"x" * 600 + b"\n") == b"500 5.5.2 Line too long\r\n"
    assert s.send(b"NOOP\n") == b"250 2.0.0 Ok\r\n"


# -- parsing profiles: the grammar -----------------------------------------------------------


def test_find_line_end() -> None:
    assert find_line_end(b"NOOP\r\nX") == (4, 6)
    assert find_line_end(b"NOOP\nX") == (-1, -1)
    assert find_line_end(b"NOOP\nX", bare_lf=True) == (4, 5)
    assert find_line_end(b"NOOP\r\nX", bare_lf=True) == (4, 6)
    assert find_line_end(b"\nX", bare_lf=True) == (0, 1)
    assert find_line_end(b"NOOP\r", bare_lf=True) == (-1, -1)


@pytest.mark.parametrize("mode", list(Parsing))
def test_parse_command_modes_agree_on_clean_lines(mode: Parsing) -> None:
    cmd = parse_command(b"mail FROM:<a@b.example> SIZE=10", mode)
    assert (cmd.verb, cmd.arg) == ("MAIL", b"FROM:<a@b.example> SIZE=10")
    assert parse_command(b"QUIT", mode).arg == b""


@pytest.mark.parametrize("mode", list(Parsing))
@pytest.mark.parametrize("line", [b"NOOP\nRSET", b"NO\rOP", b"NOOP\0"])
def test_parse_command_refuses_stray_cr_lf_nul_in_every_mode(mode: Parsing, line: bytes) -> None:
    with pytest.raises(SmtpSyntaxError):
        parse_command(line, mode)


def test_parse_path_strict() -> None:
    assert parse_path(b"FROM:<a@b.example> BODY=8BITMIME", "FROM", strict=True).mailbox == (
        "a@b.example"
    )
    assert parse_path(b"FROM:<>", "FROM", strict=True).is_null
    for arg in (b"FROM: <a@b.example>", b"FROM:a@b.example"):
        assert parse_path(arg, "FROM").mailbox == "a@b.example"
        with pytest.raises(SmtpSyntaxError):
            parse_path(arg, "FROM", strict=True)
