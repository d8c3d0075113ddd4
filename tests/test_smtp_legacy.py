# mypy: allow-untyped-calls
"""SMTP AUTH CRAM-MD5 (RFC 2195), SDPS login forms and the SmtpProfile switches."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest
from twisted.cred.portal import Portal
from twisted.trial import unittest

from mailgate.auth.checker import PasswordChecker
from mailgate.auth.passwords import hash_password, verify_password
from mailgate.realm import MailRealm
from mailgate.smtp import SmtpProfile
from mailgate.smtp._grammar import strip_enhanced
from mailgate.testing import MemoryMailStore, MemoryUserDatabase
from tests.test_smtp_server import TLS_CONTEXT, Session, settings

CRAM_CH = b"<1896.697170952@postoffice.reston.mci.net>"
CRAM_TIM = b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
SECRET = "tanstaaftanstaaf"
ARGON_HASH = hash_password(SECRET, "ARGON2ID")


def answer_as(user: bytes) -> bytes:
    return base64.b64encode(base64.b64decode(CRAM_TIM).replace(b"tim", user, 1))


def portal() -> Portal:
    users = MemoryUserDatabase(
        {
            "tim@example.com": "{PLAIN}" + SECRET,
            "cram@example.com": hash_password(SECRET, "CRAM-MD5"),
            "strong@example.com": ARGON_HASH,
        }
    )
    checker = PasswordChecker(users, "example.com", verify_password, known_domains=["example.com"])
    return Portal(MailRealm(MemoryMailStore(), users, ["example.com"]), [checker])


def legacy(cram: bool = True, **kw: Any) -> Session:
    kw.setdefault("require_tls", False)
    s = Session(
        settings(cram_md5_available=lambda: cram, challenge=lambda h, now: CRAM_CH, **kw),
        portal=portal(),
    )
    return s


class CramMd5Tests(unittest.TestCase):
    def test_rfc2195_vector_before_tls(self) -> None:
        s = legacy()
        ehlo = s.cmd("EHLO c.example")
        # PLAIN/LOGIN need TLS here; CRAM-MD5 does not.
        assert b"250 AUTH CRAM-MD5\r\n" in ehlo
        assert s.cmd("AUTH CRAM-MD5") == b"334 " + base64.b64encode(CRAM_CH) + b"\r\n"
        assert s.cmd(CRAM_TIM) == b"235 2.7.0 Authentication successful\r\n"
        assert s.cmd("MAIL FROM:<tim@example.com>") == b"250 2.1.0 Sender ok\r\n"

    def test_cram_md5_context_and_sdps_forms(self) -> None:
        for login in (b"cram", b"cram@example.com", b"cram+example.com"):
            s = legacy()
            s.cmd("EHLO c.example")
            s.cmd("AUTH CRAM-MD5")
            assert s.cmd(answer_as(login)) == b"235 2.7.0 Authentication successful\r\n"

    def test_refused_for_argon2id_with_the_normal_auth_error(self) -> None:
        s = legacy()
        s.cmd("EHLO c.example")
        s.cmd("AUTH CRAM-MD5")
        assert s.cmd(answer_as(b"strong")) == b"535 5.7.8 Authentication credentials invalid\r\n"

    def test_initial_response_is_a_syntax_error(self) -> None:
        s = legacy()
        s.cmd("EHLO c.example")
        reply = s.cmd(b"AUTH CRAM-MD5 " + CRAM_TIM)
        assert reply.startswith(b"501 5.5.2 ")
        assert s.cmd("NOOP").startswith(b"250")  # not stuck in an exchange

    def test_not_offered_when_no_account_supports_it(self) -> None:
        s = legacy(cram=False)
        assert b"CRAM-MD5" not in s.cmd("EHLO c.example")
        assert s.cmd("AUTH CRAM-MD5") == b"504 5.5.4 Unrecognized authentication type\r\n"

    def test_malformed_answer_fails_like_bad_credentials(self) -> None:
        s = legacy()
        s.cmd("EHLO c.example")
        s.cmd("AUTH CRAM-MD5")
        assert s.cmd(base64.b64encode(b"tim nothex")).startswith(b"535 5.7.8")


class ProfileTests(unittest.TestCase):
    def ehlo_keywords(self, s: Session) -> list[bytes]:
        return [line[4:] for line in s.cmd("EHLO c.example").split(b"\r\n")[1:-1]]

    def test_default_profile_is_unchanged(self) -> None:
        s = legacy(cram=False, allow_plaintext=lambda ip: True)
        assert self.ehlo_keywords(s) == [
            b"PIPELINING",
            b"SIZE 26214400",
            b"8BITMIME",
            b"ENHANCEDSTATUSCODES",
            b"STARTTLS",
            b"AUTH PLAIN LOGIN",
        ]

    def test_everything_hidden(self) -> None:
        profile = SmtpProfile(
            pipelining=False,
            eightbitmime=False,
            size=False,
            enhancedstatuscodes=False,
            starttls=False,
            sasl=("LOGIN",),
        )
        s = legacy(profile=profile, allow_plaintext=lambda ip: True)
        assert self.ehlo_keywords(s) == [b"AUTH LOGIN"]
        assert s.cmd("STARTTLS") == b"500 Command unrecognized\r\n"
        assert s.transport.tls_started == []
        assert s.cmd("AUTH PLAIN") == b"504 Unrecognized authentication type\r\n"
        assert s.cmd("AUTH CRAM-MD5") == b"504 Unrecognized authentication type\r\n"
        s.cmd("AUTH LOGIN")
        s.cmd(base64.b64encode(b"tim"))
        assert s.cmd(base64.b64encode(SECRET.encode())) == b"235 Authentication successful\r\n"
        assert s.cmd("MAIL FROM:<tim@example.com> SIZE=10") == (
            b"555 SIZE parameter not recognized\r\n"
        )
        assert s.cmd("MAIL FROM:<tim@example.com> BODY=8BITMIME") == (
            b"555 BODY parameter not recognized\r\n"
        )
        assert s.cmd("MAIL FROM:<tim@example.com>") == b"250 Sender ok\r\n"

    def test_each_switch_alone(self) -> None:
        for field, keyword in (
            ("pipelining", b"PIPELINING"),
            ("size", b"SIZE 26214400"),
            ("eightbitmime", b"8BITMIME"),
            ("enhancedstatuscodes", b"ENHANCEDSTATUSCODES"),
            ("starttls", b"STARTTLS"),
        ):
            off: dict[str, Any] = {field: False}
            s = legacy(profile=dataclasses.replace(SmtpProfile(), **off))
            keywords = self.ehlo_keywords(s)
            assert keyword not in keywords
            assert len(keywords) == 5, field  # the other four and AUTH CRAM-MD5

    def test_cram_md5_can_be_switched_off_while_available(self) -> None:
        s = legacy(profile=SmtpProfile(sasl=("PLAIN", "LOGIN")))
        assert b"CRAM-MD5" not in s.cmd("EHLO c.example")
        assert s.cmd("AUTH CRAM-MD5").startswith(b"504 ")

    def test_require_tls_without_starttls_is_a_wiring_error(self) -> None:
        with pytest.raises(ValueError):
            settings(require_tls=True, tls_context=TLS_CONTEXT, profile=SmtpProfile(starttls=False))
        with pytest.raises(ValueError):
            SmtpProfile(sasl=("NTLM",))

    def test_strip_enhanced(self) -> None:
        assert strip_enhanced(b"250-2.1.0 a\r\n250 2.1.0 b\r\n") == b"250-a\r\n250 b\r\n"
        assert strip_enhanced(b"250-mail.example 1.2.3 x\r\n") == b"250-mail.example 1.2.3 x\r\n"
