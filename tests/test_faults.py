# mypy: allow-untyped-calls
"""Fault injection: every action, every-Nth, seeded probability, phases, STLS, config rules."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.config import FaultRule, parse_config
from mailgate.errors import ConfigError
from mailgate.lab.faults import FaultFactory, FaultPolicy
from mailgate.lab.transcript import TranscriptFactory, TranscriptStore, read_events
from mailgate.pop3 import Pop3Factory, Pop3Settings
from mailgate.realm import MailRealm
from mailgate.smtp.server import SmtpFactory, SmtpSettings
from mailgate.testing import MemoryMailStore, MemoryUserDatabase, TLSStringTransport

TLS_CONTEXT = object()


def make_portal() -> Portal:
    users = MemoryUserDatabase({"alice@example.com": "pw"})
    realm = MailRealm(MemoryMailStore(), users, ["example.com"])
    return Portal(realm, [PasswordChecker(users, "example.com", plaintext_verify)])


class WriteLog(TLSStringTransport):
    def __init__(self) -> None:
        super().__init__("192.0.2.9", 4000)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Conn:
    def __init__(self, factory: IProtocolFactory) -> None:
        self.proto: Any = cast(Any, factory).buildProtocol(None)
        self.transport = WriteLog()
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()


def pop3_factory(
    rules: list[FaultRule], clock: Clock, line_time: float = 60.0, **kw: Any
) -> FaultFactory:
    settings = Pop3Settings(
        hostname="mail.example.com",
        tls_context=TLS_CONTEXT,
        allow_plaintext=lambda h: True,
        line_time=line_time,
        min_rate=0.0,
    )
    inner = Pop3Factory(make_portal(), settings, clock)
    return FaultFactory(inner, FaultPolicy(rules, clock, **kw), "pop3")


def smtp_factory(rules: list[FaultRule], clock: Clock, line_time: float = 60.0) -> FaultFactory:
    settings = SmtpSettings(
        hostname="mail.example.com",
        default_domain="example.com",
        tls_context=TLS_CONTEXT,
        require_tls=False,
        allow_plaintext=lambda h: True,
        line_time=line_time,
        min_rate=0.0,
    )
    inner = SmtpFactory(make_portal(), settings, clock)
    return FaultFactory(inner, FaultPolicy(rules, clock), "submission")


ERR = "-ERR [SYS/TEMP] injected"


def test_error_every_nth_counts_across_sessions() -> None:
    clock = Clock()
    factory = pop3_factory([FaultRule("CAPA", "error", reply=ERR, every=2)], clock)
    a, b = Conn(factory), Conn(factory)
    assert a.send(b"CAPA\r\n").startswith(b"+OK Capability list")
    assert b.send(b"CAPA\r\n") == b"-ERR [SYS/TEMP] injected\r\n"  # 2nd on this listener
    assert b.send(b"capa\r\n").startswith(b"+OK Capability list")
    out = a.send(b"CAPA\r\nNOOP\r\n")  # 4th CAPA: injected; NOOP reaches the protocol
    assert out.startswith(b"-ERR [SYS/TEMP] injected\r\n-ERR ")
    assert out.count(b"\r\n") == 2


def test_error_reply_is_one_write_and_protocol_never_sees_the_line() -> None:
    clock = Clock()
    factory = pop3_factory([FaultRule("USER", "error", reply=ERR)], clock)
    c = Conn(factory)
    c.transport.writes.clear()
    assert c.send(b"USER alice\r\n") == b"-ERR [SYS/TEMP] injected\r\n"
    assert c.transport.writes == [b"-ERR [SYS/TEMP] injected\r\n"]
    # The protocol never got USER, so PASS has no preceding USER.
    assert c.send(b"PASS pw\r\n").startswith(b"-ERR")


def test_delay_holds_the_line_and_everything_after_it_in_order() -> None:
    clock = Clock()
    factory = pop3_factory([FaultRule("USER", "delay", seconds=5)], clock)
    c = Conn(factory)
    assert c.send(b"USER alice\r\nCAPA\r\n") == b""
    clock.advance(4.9)
    assert c.take() == b""
    clock.advance(0.1)
    out = c.take()
    assert out.startswith(b"+OK") and b"\r\n+OK Capability list" in out


def test_delay_cancelled_when_client_leaves() -> None:
    clock = Clock()
    c = Conn(pop3_factory([FaultRule("CAPA", "delay", seconds=5)], clock))
    c.send(b"CAPA\r\n")
    c.proto.connectionLost(Failure(ConnectionError("gone")))
    assert not [d for d in clock.getDelayedCalls() if d.active() and d.getTime() == 5]
    clock.advance(10)  # nothing delivered to a closed protocol, no error
    assert c.take() == b""


def test_the_slowloris_watchdog_still_sees_partial_lines_held_back_here() -> None:
    """The fault layer passes only whole lines on; the watchdog must see the drip anyway."""
    clock = Clock()
    smtp = Conn(smtp_factory([FaultRule("NOOP", "delay", seconds=1)], clock, line_time=10))
    pop3 = Conn(pop3_factory([FaultRule("NOOP", "delay", seconds=1)], clock, line_time=10))
    assert smtp.send(b"NOO") == b"" and pop3.send(b"NOO") == b""
    clock.advance(9)
    assert not smtp.transport.disconnecting and not pop3.transport.disconnecting
    clock.advance(1)
    assert smtp.take() == b"421 4.4.2 mail.example.com Error: timeout exceeded\r\n"
    assert smtp.transport.disconnecting
    assert pop3.take() == b"" and pop3.transport.disconnecting


def test_whole_lines_held_by_a_delay_are_not_a_slowloris() -> None:
    clock = Clock()
    c = Conn(pop3_factory([FaultRule("CAPA", "delay", seconds=30)], clock, line_time=10))
    assert c.send(b"CAPA\r\n") == b""
    clock.advance(30)
    assert c.take().startswith(b"+OK Capability list")
    assert not c.transport.disconnecting


def test_drop_closes_without_reply() -> None:
    clock = Clock()
    c = Conn(pop3_factory([FaultRule("QUIT", "drop")], clock))
    assert c.send(b"QUIT\r\nCAPA\r\n") == b""
    assert c.transport.disconnecting
    assert c.send(b"CAPA\r\n") == b""  # nothing more is read


def test_probability_with_seeded_random() -> None:
    clock = Clock()
    rule = FaultRule("CAPA", "error", reply=ERR, probability=0.5)
    factory = pop3_factory([rule], clock, random=random.Random(7).random)
    rng = random.Random(7)
    expected = [rng.random() < 0.5 for _ in range(20)]
    assert any(expected) and not all(expected)
    c = Conn(factory)
    got = [c.send(b"CAPA\r\n") == b"-ERR [SYS/TEMP] injected\r\n" for _ in range(20)]
    assert got == expected


def test_smtp_error_on_mail_and_data_lines_are_not_commands() -> None:
    clock = Clock()
    rules = [
        FaultRule("MAIL", "error", reply="451 4.3.0 injected", every=2),
        FaultRule("QUIT", "drop"),
    ]
    c = Conn(smtp_factory(rules, clock))
    plain = base64.b64encode(b"\0alice@example.com\0pw")
    c.send(b"EHLO client.example\r\n")
    assert c.send(b"AUTH PLAIN " + plain + b"\r\n").startswith(b"235")
    assert c.send(b"MAIL FROM:<alice@example.com>\r\n").startswith(b"250")
    assert c.send(b"RSET\r\n").startswith(b"250")
    assert c.send(b"MAIL FROM:<alice@example.com>\r\n") == b"451 4.3.0 injected\r\n"
    # The server never saw that MAIL: RCPT is out of sequence.
    assert c.send(b"RCPT TO:<alice@example.com>\r\n").startswith(b"503")
    assert c.send(b"MAIL FROM:<alice@example.com>\r\n").startswith(b"250")
    assert c.send(b"RCPT TO:<alice@example.com>\r\n").startswith(b"250")
    assert c.send(b"DATA\r\n").startswith(b"354")
    # A body line that looks like QUIT is message data, not a command.
    assert c.send(b"Subject: x\r\n\r\nQUIT\r\nMAIL FROM:<x@y>\r\n.\r\n").startswith(b"250")
    assert not c.transport.disconnecting
    assert c.send(b"QUIT\r\n") == b""
    assert c.transport.disconnecting


def test_sasl_responses_are_not_commands() -> None:
    clock = Clock()
    c = Conn(pop3_factory([FaultRule("QUIT", "drop")], clock))
    assert c.send(b"AUTH LOGIN\r\n") == b"+ VXNlcm5hbWU6\r\n"
    # "QUIT" here is the client's SASL answer (valid base64): the protocol takes it, no drop.
    assert c.send(b"QUIT\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    assert not c.transport.disconnecting


def test_bytes_pipelined_after_stls_are_discarded() -> None:
    clock = Clock()
    c = Conn(pop3_factory([FaultRule("NOOP", "error", reply=ERR)], clock))
    assert c.send(b"STLS\r\nUSER evil\r\nNOOP\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert c.transport.tls_started == [TLS_CONTEXT]
    # Over "TLS" now: the session starts clean (no USER remembered).
    assert c.send(b"PASS pw\r\n").startswith(b"-ERR")


def test_fault_is_noted_in_the_transcript(tmp_path: Path) -> None:
    clock = Clock()
    store = TranscriptStore(tmp_path, clock)
    factory = TranscriptFactory(
        pop3_factory([FaultRule("CAPA", "error", reply=ERR)], clock), store, "pop3"
    )
    c = Conn(factory)
    c.send(b"CAPA\r\n")
    c.proto.connectionLost(Failure(ConnectionError("bye")))
    (path,) = list(tmp_path.glob("*/*.log"))
    events = read_events(path)
    fault = next(e for e in events if e.get("event") == "fault")
    assert fault["action"] == "error" and fault["command"] == "CAPA"
    assert events[events.index(fault) + 1]["data"] == ERR + "\r\n"


# -- configuration --------------------------------------------------------------------------


def listener(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"protocol": "pop3", "endpoint": "tcp:0", "lab": True}
    base.update(extra)
    return base


def parse(*listeners: dict[str, Any]) -> Any:
    return parse_config({"listeners": list(listeners)}, "lab.toml", Path("/tmp"))


def test_config_accepts_the_documented_shape() -> None:
    cfg = parse(
        listener(
            transcripts=True,
            faults=[
                {"command": "RETR", "action": "error", "reply": ERR, "every": 3},
                {"command": "mail", "action": "delay", "seconds": 5, "probability": 0.5},
                {"command": "QUIT", "action": "drop"},
            ],
        ),
        {"protocol": "submission", "endpoint": "tcp:0", "lab": True, "faults": [
            {"command": "MAIL", "action": "error", "reply": "451 4.3.0 injected"}]},
    )  # fmt: skip
    pop3 = cfg.listeners[0]
    assert pop3.lab and pop3.transcripts
    assert pop3.faults == (
        FaultRule("RETR", "error", reply=ERR, every=3),
        FaultRule("MAIL", "delay", seconds=5.0, probability=0.5),
        FaultRule("QUIT", "drop"),
    )
    assert cfg.listeners[1].faults[0].reply == "451 4.3.0 injected"
    plain = parse({"protocol": "pop3", "endpoint": "tcp:0"}).listeners[0]
    assert not plain.lab and not plain.transcripts and plain.faults == ()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"lab": False, "faults": [{"command": "QUIT", "action": "drop"}]},
            "lab.toml: listeners[0].faults: fault injection needs a lab listener",
        ),
        (
            {"faults": [{"command": "QUIT", "action": "drop", "colour": 1}]},
            "lab.toml: listeners[0].faults[0].colour: unknown key",
        ),
        (
            {"faults": [{"command": "QUIT", "action": "explode"}]},
            "lab.toml: listeners[0].faults[0].action: must be one of delay, error, drop",
        ),
        (
            {"faults": [{"command": "RETR", "action": "error"}]},
            "lab.toml: listeners[0].faults[0].reply: required for action = error",
        ),
        (
            {"faults": [{"command": "RETR", "action": "error", "reply": "451 4.3.0 x"}]},
            "lab.toml: listeners[0].faults[0].reply: must be one printable line",
        ),
        (
            {"faults": [{"command": "RETR", "action": "drop", "reply": ERR}]},
            "lab.toml: listeners[0].faults[0].reply: only action = error",
        ),
        (
            {"faults": [{"command": "RETR", "action": "delay"}]},
            "lab.toml: listeners[0].faults[0].seconds: required for action = delay",
        ),
        (
            {"faults": [{"command": "RETR", "action": "drop", "every": 2, "probability": 0.1}]},
            "lab.toml: listeners[0].faults[0].every: give every or probability, not both",
        ),
        (
            {"faults": [{"command": "RETR", "action": "drop", "probability": 1.5}]},
            "lab.toml: listeners[0].faults[0].probability: must be in (0, 1]",
        ),
        (
            {"faults": [{"command": "RETR 1", "action": "drop"}]},
            "lab.toml: listeners[0].faults[0].command: required",
        ),
        (
            {"faults": ["RETR"]},
            "lab.toml: listeners[0].faults[0]: expected a table",
        ),
        (
            {"transcripts": "yes"},
            "lab.toml: listeners[0].transcripts: expected bool",
        ),
    ],
)
def test_config_rejects(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(listener(**entry))
    assert str(info.value).startswith(message), str(info.value)


def test_smtp_reply_must_be_an_smtp_error() -> None:
    with pytest.raises(ConfigError, match=r"faults\[0\]\.reply"):
        parse(
            {
                "protocol": "submission",
                "endpoint": "tcp:0",
                "lab": True,
                "faults": [{"command": "MAIL", "action": "error", "reply": ERR}],
            }
        )
