"""Tests for the pure SMTP grammar: commands, paths, parameters, replies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.model import Address
from mailgate.smtp._grammar import (
    SmtpSyntaxError,
    check_rcpt_params,
    ehlo_reply,
    parse_address,
    parse_command,
    parse_mail_params,
    parse_path,
    reply,
)


def test_parse_command() -> None:
    cmd = parse_command(b"mail FROM:<a@b> SIZE=10")
    assert cmd.verb == "MAIL"
    assert cmd.arg == b"FROM:<a@b> SIZE=10"
    assert parse_command(b"QUIT").arg == b""


@pytest.mark.parametrize("line", [b"", b"   ", b"NO\nOP", b"NOOP\r", b"NO\0OP", b"M1L x"])
def test_parse_command_refuses(line: bytes) -> None:
    with pytest.raises(SmtpSyntaxError):
        parse_command(line)


def test_parse_path_forms() -> None:
    assert parse_path(b"FROM:<a@b.example>", "FROM").mailbox == "a@b.example"
    assert parse_path(b"from: <a@b> SIZE=1", "FROM").params == "SIZE=1"
    assert parse_path(b"FROM:<>", "FROM").is_null
    assert parse_path(b"TO:<@r1,@r2:u@d>", "TO").mailbox == "u@d"
    assert parse_path(b"TO:u@d", "TO").mailbox == "u@d"
    assert parse_path(b'TO:<"a>b"@d>', "TO").mailbox == '"a>b"@d'


@pytest.mark.parametrize(
    ("arg", "kind"),
    [
        (b"<a@b>", "syntax"),
        (b"TO:<a@b>", "syntax"),
        (b"FROM:<a@b", "path"),
        (b"FROM:<a@b>junk", "path"),
        (b"FROM:\xff", "path"),
        (b"FROM:", "path"),
    ],
)
def test_parse_path_errors(arg: bytes, kind: str) -> None:
    with pytest.raises(SmtpSyntaxError) as e:
        parse_path(arg, "FROM")
    assert e.value.kind == kind


def test_parse_address() -> None:
    assert parse_address("bob", "example.com") == Address("bob", "example.com")
    assert parse_address("Bob@EXAMPLE.com", None) == Address("Bob", "example.com")
    with pytest.raises(SmtpSyntaxError) as e:
        parse_address("a@@b", "example.com")
    assert e.value.kind == "address"
    with pytest.raises(SmtpSyntaxError) as e:
        parse_address("jörg@example.com", "example.com")
    assert e.value.kind == "utf8"


def test_mail_params() -> None:
    p = parse_mail_params("SIZE=100 BODY=8bitmime AUTH=<>", smtputf8_enabled=False)
    assert (p.size, p.body, p.auth, p.smtputf8) == (100, "8BITMIME", "<>", False)
    assert parse_mail_params("SMTPUTF8", smtputf8_enabled=True).smtputf8
    assert parse_mail_params("AUTH=alice+40example.com", smtputf8_enabled=False).auth


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ("SIZE=abc", "bad-param"),
        ("SIZE", "bad-param"),
        ("BODY=BINARYMIME", "bad-param"),
        ("FOO=bar", "unknown-param"),
        ("SMTPUTF8", "unknown-param"),
        ("SIZE=1 SIZE=2", "bad-param"),
        ("=x", "param-syntax"),
        ("AUTH=a+zz", "bad-param"),
    ],
)
def test_mail_param_errors(params: str, kind: str) -> None:
    with pytest.raises(SmtpSyntaxError) as e:
        parse_mail_params(params, smtputf8_enabled=False)
    assert e.value.kind == kind


def test_rcpt_params_refused() -> None:
    check_rcpt_params("")
    with pytest.raises(SmtpSyntaxError):
        check_rcpt_params("NOTIFY=NEVER")


def test_reply_formatting() -> None:
    assert reply(250, "2.0.0", "Ok") == b"250 2.0.0 Ok\r\n"
    assert reply(334, None, "") == b"334 \r\n"
    assert reply(214, "2.0.0", ["a", "b"]) == b"214-2.0.0 a\r\n214 2.0.0 b\r\n"
    assert ehlo_reply("mx", "", ["PIPELINING", "8BITMIME"]) == (
        b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    )


@given(st.binary(max_size=600))
def test_parsers_never_raise_anything_else(data: bytes) -> None:
    for f in (lambda: parse_command(data), lambda: parse_path(data, "FROM")):
        try:
            f()
        except SmtpSyntaxError:
            pass
    try:
        parse_mail_params(data.decode("latin-1"), smtputf8_enabled=True)
    except SmtpSyntaxError:
        pass
