# mypy: allow-untyped-calls
"""The one PasswordChecker: passwords, APOP and CRAM-MD5 digests, SDPS login names."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailgate.auth.checker import PasswordChecker, plaintext_digests, plaintext_verify
from mailgate.auth.passwords import hash_password, verify_password
from mailgate.model import Address
from mailgate.sasl import APOP, CRAM_MD5, DigestResponse
from mailgate.testing import HeldRunner, MemoryUserDatabase

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


class CountingVerify:
    """verify_password that counts real verifications (what the cache is there to save)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, stored: str, password: bytes) -> bool:
        self.calls += 1
        return verify_password(stored, password)


class VerificationCacheTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.users = MemoryUserDatabase(
            {
                "ann@example.com": hash_password("right", "SSHA512"),
                "bob@example.com": "{PLAIN}bobpw",
            }
        )
        self.verify = CountingVerify()
        self.checker = PasswordChecker(self.users, "example.com", self.verify, clock=self.clock)

    def login(self, name: bytes, password: bytes, checker: PasswordChecker | None = None) -> Any:
        results: list[Any] = []
        (checker or self.checker).requestAvatarId(UsernamePassword(name, password)).addBoth(
            results.append
        )
        assert len(results) == 1
        if isinstance(results[0], bytes):
            return results[0]
        results[0].trap(UnauthorizedLogin)
        return None

    def test_success_is_cached_until_the_ttl(self) -> None:
        assert self.login(b"ann", b"right") == b"ann@example.com"
        assert self.login(b"ANN@example.com", b"right") == b"ann@example.com"
        assert self.verify.calls == 1  # second login: no verification
        self.clock.advance(299)
        assert self.login(b"ann", b"right") == b"ann@example.com"
        assert self.verify.calls == 1
        self.clock.advance(2)  # 301 s after the verification: a hit does not extend it
        assert self.login(b"ann", b"right") == b"ann@example.com"
        assert self.verify.calls == 2

    def test_failures_are_never_cached_and_wrong_password_misses(self) -> None:
        assert self.login(b"ann", b"wrong") is None
        assert self.login(b"ann", b"wrong") is None
        assert self.verify.calls == 2
        assert len(self.checker.cache) == 0
        assert self.login(b"ann", b"right") == b"ann@example.com"
        # A cached success never lets another password in.
        assert self.login(b"ann", b"wrong") is None
        assert self.login(b"ann", b"") is None

    def test_password_change_misses_the_cache(self) -> None:
        assert self.login(b"bob", b"bobpw") == b"bob@example.com"
        self.users.passwords[Address("bob", "example.com")] = "{PLAIN}newpw"
        assert self.login(b"bob", b"bobpw") is None
        assert self.login(b"bob", b"newpw") == b"bob@example.com"
        del self.users.passwords[Address("bob", "example.com")]
        assert self.login(b"bob", b"newpw") is None

    def test_cache_is_per_account(self) -> None:
        self.users.passwords[Address("eve", "example.com")] = "{PLAIN}bobpw"
        assert self.login(b"bob", b"bobpw") == b"bob@example.com"
        assert self.login(b"eve", b"bobpw") == b"eve@example.com"
        assert self.verify.calls == 2

    def test_cache_keeps_no_password_and_is_bounded(self) -> None:
        checker = PasswordChecker(self.users, "example.com", self.verify, cache_size=2)
        for i in range(5):
            self.users.passwords[Address(f"u{i}", "example.com")] = f"{{PLAIN}}pw{i}"
            assert self.login(f"u{i}".encode(), f"pw{i}".encode(), checker) is not None
        assert len(checker.cache) == 2
        assert all(b"pw" not in key for key in checker.cache._entries)
        calls = self.verify.calls
        assert self.login(b"u4", b"pw4", checker) is not None  # most recent: kept
        assert self.login(b"u0", b"pw0", checker) is not None  # oldest: evicted
        assert self.verify.calls == calls + 1

    def test_ttl_zero_disables_the_cache(self) -> None:
        checker = PasswordChecker(self.users, "example.com", self.verify, cache_ttl=0)
        self.login(b"bob", b"bobpw", checker)
        self.login(b"bob", b"bobpw", checker)
        assert self.verify.calls == 2

    def test_concurrent_verifications_are_capped(self) -> None:
        runner = HeldRunner()
        checker = PasswordChecker(
            self.users,
            "example.com",
            verify_password,
            runner,
            dummy_hash="{PLAIN}x",
            max_verifications=2,
            cache_ttl=0,
        )
        self.users.passwords[Address("cat", "example.com")] = "{PLAIN}catpw"
        results: list[Any] = []
        for name in (b"bob", b"ann", b"nobody", b"cat"):
            pw = {b"bob": b"bobpw", b"cat": b"catpw"}.get(name, b"right")
            checker.requestAvatarId(UsernamePassword(name, pw)).addBoth(results.append)
        assert len(runner.jobs) == 2  # two in the thread pool, two waiting
        runner.run_one()
        assert len(runner.jobs) == 2  # a finished one lets the next in
        runner.run_one()
        runner.run_one()
        assert len(runner.jobs) == 1
        runner.run_one()
        assert runner.jobs == []
        assert results[0] == b"bob@example.com" and results[3] == b"cat@example.com"
        assert results[1] == b"ann@example.com"
        results[2].trap(UnauthorizedLogin)  # unknown user: dummy verification, still a failure

    def held_checker(self, **kwargs: Any) -> tuple[PasswordChecker, HeldRunner]:
        runner = HeldRunner()
        checker = PasswordChecker(
            self.users, "example.com", self.verify, runner, max_verifications=2, **kwargs
        )
        return checker, runner

    def request(self, checker: PasswordChecker, name: bytes, password: bytes) -> list[Any]:
        results: list[Any] = []
        checker.requestAvatarId(UsernamePassword(name, password)).addBoth(results.append)
        return results

    def test_identical_logins_in_flight_share_one_verification(self) -> None:
        checker, runner = self.held_checker()
        same = [self.request(checker, name, b"right") for name in (b"ann", b"ANN@example.com")]
        same += [self.request(checker, b"ann", b"right") for _ in range(14)]
        assert len(runner.jobs) == 1  # sixteen logins, one verification
        other_pw = self.request(checker, b"ann", b"wrong")
        other_user = self.request(checker, b"bob", b"bobpw")
        assert len(runner.jobs) == 2  # a different key is not merged (and waits for a slot)
        assert all(r == [] for r in same)
        runner.run_one()
        assert [r[0] for r in same] == [b"ann@example.com"] * 16
        assert self.verify.calls == 1
        assert len(runner.jobs) == 2  # the slot went to the next distinct verification
        runner.run_one()
        runner.run_one()
        other_pw[0].trap(UnauthorizedLogin)
        assert other_user == [b"bob@example.com"]
        assert checker._in_flight == {}

    def test_merged_failure_reaches_every_waiter_and_is_then_forgotten(self) -> None:
        checker, runner = self.held_checker()
        waiting = [self.request(checker, b"ann", b"wrong") for _ in range(3)]
        assert len(runner.jobs) == 1
        runner.run_one()
        for r in waiting:
            r[0].trap(UnauthorizedLogin)
        # Completed failures are not shared: the next identical attempt verifies again.
        again = self.request(checker, b"ann", b"wrong")
        assert len(runner.jobs) == 1 and again == []
        runner.run_one()
        again[0].trap(UnauthorizedLogin)
        assert self.verify.calls == 2
        assert len(checker.cache) == 0

    def test_merged_error_reaches_every_waiter(self) -> None:
        def broken(stored: str, password: bytes) -> bool:
            raise RuntimeError("boom")

        runner = HeldRunner()
        checker = PasswordChecker(self.users, "example.com", broken, runner)
        waiting = [self.request(checker, b"bob", b"bobpw") for _ in range(2)]
        held = runner.jobs.pop(0)[0]
        held.errback(RuntimeError("boom"))
        for r in waiting:
            r[0].trap(RuntimeError)
        assert checker._in_flight == {}

    def test_a_cancelled_login_leaves_the_shared_verification_to_the_others(self) -> None:
        checker, runner = self.held_checker()
        first = checker.requestAvatarId(UsernamePassword(b"ann", b"right"))
        first_results: list[Any] = []
        first.addBoth(first_results.append)
        second = self.request(checker, b"ann", b"right")
        first.cancel()  # the first client went away
        first_results[0].trap(CancelledError)
        assert len(runner.jobs) == 1
        runner.run_one()
        assert second == [b"ann@example.com"]
        assert len(checker.cache) == 1  # the success still counts for later logins

    def test_a_verifier_error_releases_its_slot(self) -> None:
        def broken(stored: str, password: bytes) -> bool:
            raise RuntimeError("boom")

        checker = PasswordChecker(self.users, "example.com", broken, max_verifications=1)
        for _ in range(3):
            results: list[Any] = []
            checker.requestAvatarId(UsernamePassword(b"bob", b"bobpw")).addBoth(results.append)
            assert len(results) == 1
            results[0].trap(RuntimeError)


def test_new_argon2_hashes_use_dovecots_parameters_and_old_ones_still_verify() -> None:
    from argon2 import PasswordHasher, Type

    from mailgate.auth.passwords import DUMMY_HASH

    new = hash_password("pw", "ARGON2ID")
    assert "$m=65536,t=3,p=1$" in new
    assert "$m=32768,t=4,p=1$" in hash_password("pw", "ARGON2I")
    # Unknown users cost what a newly set password costs.
    assert DUMMY_HASH.split("$")[3] == new.split("$")[3]
    old = "{ARGON2ID}" + PasswordHasher(type=Type.ID, parallelism=4).hash("pw")
    assert "p=4" in old
    assert verify_password(old, b"pw")
    assert not verify_password(old, b"pw2")
