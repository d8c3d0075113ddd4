# mypy: allow-untyped-calls
"""The shared auth throttle as POP3 and SMTP use it (StringTransport + one shared Clock).

Every session here comes from the same factory, throttle and clock, so "across sessions from
one address" is the real thing: a new protocol instance per connection, one AuthThrottle.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure

from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.auth.throttle import AuthThrottle
from mailgate.interfaces import IAuthThrottle
from mailgate.pop3.server import Pop3Factory, Pop3Server, Pop3Settings
from mailgate.realm import MailRealm
from mailgate.smtp import SmtpFactory, SmtpServer, SmtpSettings
from mailgate.testing import MemoryMailStore, MemoryUserDatabase

IP = "198.51.100.7"
OTHER_IP = "203.0.113.9"
POP3_FAIL = b"-ERR [AUTH] Authentication failed\r\n"
SMTP_FAIL = b"535 5.7.8 Authentication credentials invalid\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def make_portal() -> Portal:
    users = MemoryUserDatabase({"alice@example.com": "secret"})
    realm = MailRealm(MemoryMailStore(), users, ["example.com"])
    return Portal(realm, [PasswordChecker(users, "example.com", plaintext_verify)])


class Client:
    """One connection: a protocol instance on a StringTransport from a given address."""

    def __init__(self, factory: Pop3Factory | SmtpFactory, ip: str, port: int) -> None:
        proto = factory.buildProtocol(IPv4Address("TCP", ip, port))
        assert proto is not None
        self.proto: Pop3Server | SmtpServer = proto
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", ip, port))
        proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, line: bytes) -> bytes:
        return self.send(line + b"\r\n")

    def drop(self) -> None:
        self.proto.connectionLost(Failure(ConnectionError("gone")))

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class Gateway:
    """A POP3 and an SMTP factory sharing one clock and (optionally) one throttle."""

    def __init__(self, throttled: bool = True, max_failures: int = 10) -> None:
        self.clock = Clock()
        self.throttle: IAuthThrottle | None = AuthThrottle(self.clock) if throttled else None
        portal = make_portal()
        self.pop3 = Pop3Factory(
            portal,
            Pop3Settings(
                hostname="mail.example.com",
                allow_plaintext=lambda ip: True,
                max_failures=max_failures,
                throttle=self.throttle,
            ),
            self.clock,
        )
        self.smtp = SmtpFactory(
            portal,
            SmtpSettings(
                hostname="mail.example.com",
                default_domain="example.com",
                require_tls=False,
                allow_plaintext=lambda ip: True,
                max_failures=max_failures,
                throttle=self.throttle,
            ),
            self.clock,
        )
        self._port = 40000

    def _next_port(self) -> int:
        self._port += 1
        return self._port

    def pop3_client(self, ip: str = IP) -> Client:
        return Client(self.pop3, ip, self._next_port())

    def smtp_client(self, ip: str = IP) -> Client:
        c = Client(self.smtp, ip, self._next_port())
        assert c.cmd(b"EHLO client.example").startswith(b"250-")
        return c

    def waits(self, client: Client, seconds: float, expected: bytes) -> None:
        """Nothing is answered until exactly ``seconds`` have passed, then ``expected``."""
        assert client.take() == b""
        self.clock.advance(seconds - 0.01)
        assert client.take() == b""
        self.clock.advance(0.01)
        assert client.take() == expected


def pop3_bad_login(gw: Gateway, c: Client, password: bytes) -> None:
    assert c.cmd(b"USER alice@example.com").startswith(b"+OK")
    assert c.cmd(b"PASS " + password) == b""


def smtp_bad_login(c: Client, password: bytes) -> None:
    assert c.cmd(b"AUTH PLAIN " + b64(b"\0alice@example.com\0" + password)) == b""


@contextmanager
def logged() -> Iterator[list[str]]:
    lines: list[str] = []
    events: Sequence[LogEvent]
    with capturedLogs() as events:
        yield lines
    lines.extend(formatEvent(e) for e in events)


def auth_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "auth failure" in line]


# -- POP3 ------------------------------------------------------------------------------------


def test_pop3_delay_grows_across_sessions_from_one_address() -> None:
    gw = Gateway()
    c = gw.pop3_client()
    pop3_bad_login(gw, c, b"wrong-1")
    gw.waits(c, 2, POP3_FAIL)
    pop3_bad_login(gw, c, b"wrong-2")
    gw.waits(c, 4, POP3_FAIL)
    c.cmd(b"QUIT")
    c2 = gw.pop3_client()  # a new connection, another source port, the same address
    pop3_bad_login(gw, c2, b"wrong-3")
    gw.waits(c2, 8, POP3_FAIL)
    pop3_bad_login(gw, c2, b"wrong-4")
    gw.waits(c2, 15, POP3_FAIL)  # capped


def test_pop3_other_address_is_not_delayed() -> None:
    gw = Gateway()
    c = gw.pop3_client()
    pop3_bad_login(gw, c, b"wrong-1")
    gw.clock.advance(2)
    other = gw.pop3_client(OTHER_IP)
    assert other.cmd(b"USER alice@example.com").startswith(b"+OK")
    assert other.cmd(b"PASS nope") == b""
    gw.waits(other, 2, POP3_FAIL)  # its own first penalty, not the other address's 4 s


def test_pop3_same_wrong_password_does_not_escalate() -> None:
    gw = Gateway()
    c = gw.pop3_client()
    for _ in range(4):
        pop3_bad_login(gw, c, b"stale-password")
        gw.waits(c, 2, POP3_FAIL)


def test_pop3_success_clears_the_address() -> None:
    gw = Gateway()
    c = gw.pop3_client()
    pop3_bad_login(gw, c, b"wrong-1")
    gw.waits(c, 2, POP3_FAIL)
    pop3_bad_login(gw, c, b"wrong-2")
    gw.clock.advance(4)
    assert c.take() == POP3_FAIL
    assert c.cmd(b"USER alice@example.com").startswith(b"+OK")
    assert c.cmd(b"PASS secret").startswith(b"+OK maildrop has")  # success: no delay
    assert gw.throttle is not None and gw.throttle.delay_for(IP) == 0
    c2 = gw.pop3_client()
    pop3_bad_login(gw, c2, b"wrong-3")
    gw.waits(c2, 2, POP3_FAIL)  # back to the first step


def test_pop3_pipelined_commands_wait_in_order() -> None:
    gw = Gateway()
    c = gw.pop3_client()
    out = c.send(b"USER alice@example.com\r\nPASS wrong\r\nNOOP\r\nCAPA\r\n")
    assert out == b"+OK Send your password\r\n"
    gw.clock.advance(1.99)
    assert c.take() == b""
    gw.clock.advance(0.01)
    out = c.take()
    assert out.startswith(POP3_FAIL + b"-ERR Command not valid in this state\r\n+OK Capability")


def test_pop3_drop_during_delay_cancels_the_timer() -> None:
    gw = Gateway()
    c = gw.pop3_client()
    pop3_bad_login(gw, c, b"wrong")
    assert gw.clock.getDelayedCalls()
    c.drop()
    assert gw.clock.getDelayedCalls() == []
    gw.clock.advance(60)
    assert c.take() == b""


def test_pop3_max_failures_close_after_the_delayed_reply() -> None:
    gw = Gateway(max_failures=2)
    c = gw.pop3_client()
    pop3_bad_login(gw, c, b"wrong-1")
    gw.waits(c, 2, POP3_FAIL)
    pop3_bad_login(gw, c, b"wrong-2")
    assert not c.closed  # still waiting
    gw.waits(c, 4, POP3_FAIL)
    assert c.closed


def test_pop3_malformed_sasl_counts_and_is_logged_as_malformed() -> None:
    gw = Gateway()
    c = gw.pop3_client()
    with logged() as lines:
        assert c.cmd(b"AUTH PLAIN " + b64(b"no-nul-separators")) == b""
        gw.waits(c, 2, POP3_FAIL)
    assert auth_lines(lines) == [
        f"mailgate: auth failure: protocol=pop3 rhost={IP} user=- reason=malformed"
    ]


def test_pop3_cancelled_sasl_is_not_a_failure() -> None:
    gw = Gateway()
    c = gw.pop3_client()
    with logged() as lines:
        assert c.cmd(b"AUTH LOGIN").startswith(b"+ ")
        assert c.cmd(b"*") == b"-ERR Authentication cancelled\r\n"
    assert auth_lines(lines) == []
    assert gw.throttle is not None and gw.throttle.delay_for(IP) == 0


@pytest.mark.parametrize("throttled", [True, False])
def test_pop3_failure_log_line_is_exact_and_has_no_password(throttled: bool) -> None:
    gw = Gateway(throttled=throttled)
    c = gw.pop3_client()
    with logged() as lines:
        assert c.cmd(b"USER alice@example.com").startswith(b"+OK")
        reply = c.cmd(b"PASS hunter2hunter2")
        gw.clock.advance(2)
        reply += c.take()
    assert reply == POP3_FAIL
    assert auth_lines(lines) == [
        f"mailgate: auth failure: protocol=pop3 rhost={IP} user=alice@example.com"
        " reason=bad-credentials"
    ]
    assert not any("hunter2" in line for line in lines)


def test_pop3_without_throttle_replies_at_once() -> None:
    gw = Gateway(throttled=False)
    c = gw.pop3_client()
    assert c.cmd(b"USER alice@example.com").startswith(b"+OK")
    assert c.cmd(b"PASS wrong") == POP3_FAIL
    assert gw.clock.getDelayedCalls() != []  # only the idle timer
    assert all(call.getTime() >= 600 for call in gw.clock.getDelayedCalls())


def test_pop3_login_name_cannot_forge_a_second_rhost() -> None:
    gw = Gateway(throttled=False)
    c = gw.pop3_client()
    with logged() as lines:
        assert c.cmd(b"AUTH PLAIN " + b64(b"\0x rhost=192.0.2.1\0wrong")) == POP3_FAIL
    (line,) = auth_lines(lines)
    assert line.count(" rhost=") == 1 and f" rhost={IP} " in line
    assert "user=x\\x20rhost=192.0.2.1 " in line


# -- SMTP ------------------------------------------------------------------------------------


def test_smtp_delay_grows_across_sessions_and_protocols() -> None:
    gw = Gateway()
    c = gw.smtp_client()
    smtp_bad_login(c, b"wrong-1")
    gw.waits(c, 2, SMTP_FAIL)
    smtp_bad_login(c, b"wrong-2")
    gw.waits(c, 4, SMTP_FAIL)
    p = gw.pop3_client()  # the throttle is shared with POP3, per address
    pop3_bad_login(gw, p, b"wrong-3")
    gw.waits(p, 8, POP3_FAIL)
    c2 = gw.smtp_client()
    smtp_bad_login(c2, b"wrong-4")
    gw.waits(c2, 15, SMTP_FAIL)


def test_smtp_same_wrong_password_does_not_escalate() -> None:
    gw = Gateway()
    c = gw.smtp_client()
    for _ in range(3):
        smtp_bad_login(c, b"stale")
        gw.waits(c, 2, SMTP_FAIL)


def test_smtp_success_clears_the_address() -> None:
    gw = Gateway()
    c = gw.smtp_client()
    smtp_bad_login(c, b"wrong-1")
    gw.clock.advance(2)
    assert c.take() == SMTP_FAIL
    ok = c.cmd(b"AUTH PLAIN " + b64(b"\0alice@example.com\0secret"))
    assert ok == b"235 2.7.0 Authentication successful\r\n"
    assert gw.throttle is not None and gw.throttle.delay_for(IP) == 0


def test_smtp_pipelined_commands_wait_in_order() -> None:
    gw = Gateway()
    c = gw.smtp_client()
    assert c.send(b"AUTH PLAIN " + b64(b"\0alice@example.com\0x") + b"\r\nNOOP\r\nQUIT\r\n") == b""
    gw.clock.advance(1.99)
    assert c.take() == b""
    gw.clock.advance(0.01)
    assert c.take() == SMTP_FAIL + b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
    assert c.closed


def test_smtp_drop_during_delay_cancels_the_timer() -> None:
    gw = Gateway()
    c = gw.smtp_client()
    smtp_bad_login(c, b"wrong")
    assert gw.clock.getDelayedCalls()
    c.drop()
    assert gw.clock.getDelayedCalls() == []
    gw.clock.advance(60)
    assert c.take() == b""


def test_smtp_idle_timer_paused_during_delay_and_restarted_after() -> None:
    gw = Gateway()
    c = gw.smtp_client()
    smtp_bad_login(c, b"wrong")
    gw.clock.advance(2)
    assert c.take() == SMTP_FAIL
    gw.clock.advance(599)
    assert not c.closed
    gw.clock.advance(1)
    assert c.take().startswith(b"421 4.4.2")


def test_smtp_max_failures_421_after_the_delay() -> None:
    gw = Gateway(max_failures=2)
    c = gw.smtp_client()
    smtp_bad_login(c, b"wrong-1")
    gw.waits(c, 2, SMTP_FAIL)
    smtp_bad_login(c, b"wrong-2")
    gw.waits(c, 4, b"421 4.7.0 Too many authentication failures\r\n")
    assert c.closed


@pytest.mark.parametrize("throttled", [True, False])
def test_smtp_failure_log_lines_are_exact_and_have_no_password(throttled: bool) -> None:
    gw = Gateway(throttled=throttled)
    c = gw.smtp_client()
    with logged() as lines:
        replies = c.cmd(b"AUTH PLAIN " + b64(b"\0alice@example.com\0Sup3rSecretPw"))
        gw.clock.advance(2)
        replies += c.take() + c.cmd(b"AUTH PLAIN " + b64(b"garbage"))
        gw.clock.advance(4)
        replies += c.take()
    assert auth_lines(lines) == [
        f"mailgate: auth failure: protocol=smtp rhost={IP} user=alice@example.com"
        " reason=bad-credentials",
        f"mailgate: auth failure: protocol=smtp rhost={IP} user=- reason=malformed",
    ]
    assert replies == SMTP_FAIL * 2
    assert not any("Sup3rSecretPw" in line for line in lines)


def test_smtp_cancelled_auth_is_not_a_failure() -> None:
    gw = Gateway()
    c = gw.smtp_client()
    with logged() as lines:
        assert c.cmd(b"AUTH LOGIN").startswith(b"334 ")
        assert c.cmd(b"*") == b"501 5.7.0 Authentication cancelled\r\n"
    assert auth_lines(lines) == []
    assert gw.throttle is not None and gw.throttle.delay_for(IP) == 0
