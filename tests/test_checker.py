# mypy: allow-untyped-calls
"""The one PasswordChecker: passwords, APOP and CRAM-MD5 digests, SDPS login names."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial import unittest

from mailgate.auth.checker import PasswordChecker, plaintext_digests, plaintext_verify
from mailgate.auth.passwords import hash_password, verify_password
from mailgate.sasl import APOP, CRAM_MD5, DigestResponse
from mailgate.testing import MemoryUserDatabase

APOP_TS = b"<1896.697170952@dbc.mtview.ca.us>"
APOP_DIGEST = b"c4c9334bac560ecc979e58001b3e22fb"
CRAM_CH = b"<1896.697170952@postoffice.reston.mci.net>"
CRAM_DIGEST = b"b913a602c7eda7a495b4e6e7334d3890"


class Runner:
    """A thread runner double that records what would have left the reactor thread."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        return maybeDeferred(f, *args, **kwargs)


class CheckerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.users = MemoryUserDatabase(
            {
                "tim@example.com": "{PLAIN}tanstaaf",
                "cram@example.com": hash_password("tanstaaftanstaaf", "CRAM-MD5"),
                "plain2195@example.com": "{PLAIN}tanstaaftanstaaf",
                "strong@example.com": hash_password("tanstaaftanstaaf", "ARGON2ID"),
            }
        )
        self.runner = Runner()
        self.checker = PasswordChecker(
            self.users,
            "example.com",
            verify_password,
            self.runner,
            known_domains=["example.com", "other.example"],
        )

    def avatar(self, credentials: Any) -> bytes | None:
        results: list[Any] = []
        self.checker.requestAvatarId(credentials).addBoth(results.append)
        assert len(results) == 1
        if isinstance(results[0], bytes):
            return results[0]
        results[0].trap(UnauthorizedLogin)
        return None

    def test_apop_rfc1939_vector(self) -> None:
        creds = DigestResponse(b"tim", APOP_TS, APOP_DIGEST, APOP)
        assert self.avatar(creds) == b"tim@example.com"
        assert self.runner.calls == 1  # the digest runs through the thread runner

    def test_apop_digest_in_upper_case_is_accepted(self) -> None:
        creds = DigestResponse(b"tim", APOP_TS, APOP_DIGEST.upper(), APOP)
        assert self.avatar(creds) == b"tim@example.com"

    def test_apop_wrong_digest_or_other_timestamp_fails(self) -> None:
        assert self.avatar(DigestResponse(b"tim", APOP_TS, b"0" * 32, APOP)) is None
        other = b"<1896.697170953@dbc.mtview.ca.us>"
        assert self.avatar(DigestResponse(b"tim", other, APOP_DIGEST, APOP)) is None

    def test_cram_md5_rfc2195_vector_with_plain_and_cram_md5_hashes(self) -> None:
        for login in (b"plain2195", b"cram"):
            creds = DigestResponse(login, CRAM_CH, CRAM_DIGEST, CRAM_MD5)
            assert self.avatar(creds) == login + b"@example.com"

    def test_cram_md5_refused_for_a_one_way_hash(self) -> None:
        creds = DigestResponse(b"strong", CRAM_CH, CRAM_DIGEST, CRAM_MD5)
        assert self.avatar(creds) is None
        # ...while its password still works.
        assert self.avatar(UsernamePassword(b"strong", b"tanstaaftanstaaf")) == (
            b"strong@example.com"
        )

    def test_apop_refused_for_a_cram_md5_context(self) -> None:
        # A {CRAM-MD5} entry is no clear secret: APOP cannot be computed from it.
        digest = hashlib.md5(APOP_TS + b"tanstaaftanstaaf").hexdigest().encode()
        assert self.avatar(DigestResponse(b"cram", APOP_TS, digest, APOP)) is None

    def test_unknown_user_and_unknown_kind_fail(self) -> None:
        assert self.avatar(DigestResponse(b"nobody", APOP_TS, APOP_DIGEST, APOP)) is None
        assert self.avatar(DigestResponse(b"tim", APOP_TS, APOP_DIGEST, "DIGEST-MD5")) is None
        assert self.avatar(DigestResponse(b"../tim", APOP_TS, APOP_DIGEST, APOP)) is None

    def test_sdps_forms_reach_the_same_account_for_every_credential_kind(self) -> None:
        for login in (b"tim", b"tim@example.com", b"tim+example.com", b"TIM+Example.COM"):
            assert self.avatar(DigestResponse(login, APOP_TS, APOP_DIGEST, APOP)) == (
                b"tim@example.com"
            )
            assert self.avatar(UsernamePassword(login, b"tanstaaf")) == b"tim@example.com"
        # "+" before a domain that is not configured is part of the local part.
        assert self.avatar(UsernamePassword(b"tim+elsewhere.example", b"tanstaaf")) is None

    def test_plaintext_digests_for_the_memory_database(self) -> None:
        users = MemoryUserDatabase({"tim@example.com": "tanstaaftanstaaf"})
        checker = PasswordChecker(
            users, "example.com", plaintext_verify, digests=plaintext_digests()
        )
        results: list[Any] = []
        checker.requestAvatarId(DigestResponse(b"tim", CRAM_CH, CRAM_DIGEST, CRAM_MD5)).addBoth(
            results.append
        )
        assert results == [b"tim@example.com"]
        expected = hmac.new(b"tanstaaftanstaaf", CRAM_CH, "md5").hexdigest().encode()
        assert expected == CRAM_DIGEST
