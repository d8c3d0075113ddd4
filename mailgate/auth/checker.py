"""The one credential checker behind POP3 and SMTP logins.

Password logins (USER/PASS, PLAIN, LOGIN) and challenge-response logins (APOP, CRAM-MD5)
go through the same checker and the same portal, so the account lookup, the SDPS login-name
forms and the timing rules are identical for every way in.

Argon2id costs ~100 ms of CPU and 64 MiB per verification, so two things keep a login-heavy
load (fetchmail polling every minute, a benchmark) from drowning in it: a short-lived cache
of *successful* verifications (Dovecot's auth cache: keyed by a keyed BLAKE2b of account,
stored hash and presented password, so no password is kept and a password change misses),
a cap on concurrent verifications so memory stays bounded under a login storm, and merging of
identical verifications in flight (sixteen clients logging in as one user at once cost one
Argon2id run, not sixteen queued through the cap).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.auth.passwords import apop_digest, cram_md5_digest
from mailgate.errors import AddressError
from mailgate.interfaces import IDigestResponse, IUserDatabase, ThreadRunner
from mailgate.model import Address, parse_account

PasswordVerifier = Callable[[str, bytes], bool]
#: (stored hash, challenge) -> lower-case hex digest, or None when the scheme cannot do it.
DigestFunction = Callable[[str, bytes], "str | None"]

#: The digest of each challenge-response kind (IDigestResponse.kind).
DEFAULT_DIGESTS: Mapping[str, DigestFunction] = {
    "APOP": apop_digest,
    "CRAM-MD5": cram_md5_digest,
}


def _run_inline(f: Callable[..., object], *args: object, **kwargs: object) -> Deferred[object]:
    return maybeDeferred(f, *args, **kwargs)


def _digest_matches(digest: DigestFunction, stored: str, challenge: bytes, response: bytes) -> bool:
    """Recompute and compare in constant time; a scheme without a secret never matches."""
    expected = digest(stored, challenge)
    if expected is None:
        return False
    return hmac.compare_digest(expected.lower().encode("ascii"), response.lower())


#: How long a successful verification is remembered (Dovecot's auth_cache_ttl is 1 hour).
DEFAULT_CACHE_TTL = 300.0
#: Entries kept at most; the least recently used is dropped first.
DEFAULT_CACHE_SIZE = 10_000


def default_max_verifications() -> int:
    """One Argon2id verification per core: more only adds 64 MiB each, not throughput."""
    return max(1, os.cpu_count() or 1)


class VerificationCache:
    """Remembers successful password verifications for ``ttl`` seconds, LRU-bounded.

    The key is BLAKE2b keyed with a per-process random key over account, stored hash and
    password (length-prefixed, so fields cannot run into each other): the password is never
    stored, the key is useless outside this process, and a changed stored hash (a password
    change) simply misses. Only successes are ever added. The expiry runs from the
    verification, a hit does not extend it.
    """

    def __init__(
        self,
        ttl: float = DEFAULT_CACHE_TTL,
        max_size: int = DEFAULT_CACHE_SIZE,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self._now = now
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, account: str, stored: str, password: bytes) -> bytes:
        """The keyed digest naming this (account, stored hash, password); no password in it."""
        return self._digest(account, stored, password)

    def _digest(self, account: str, stored: str, password: bytes) -> bytes:
        h = hashlib.blake2b(key=self._key, digest_size=32, person=b"mailgate-auth")
        for part in (account.encode("utf-8"), stored.encode("utf-8", "surrogatepass"), password):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()

    def hit(self, account: str, stored: str, password: bytes) -> bool:
        """Whether this exact (account, stored hash, password) verified within the TTL."""
        if self.ttl <= 0 or self.max_size <= 0:
            return False
        key = self._digest(account, stored, password)
        expiry = self._entries.get(key)
        if expiry is None:
            return False
        if expiry <= self._now():
            del self._entries[key]
            return False
        self._entries.move_to_end(key)
        return True

    def add(self, account: str, stored: str, password: bytes) -> None:
        """Remember a successful verification (call only after it succeeded)."""
        if self.ttl <= 0 or self.max_size <= 0:
            return
        key = self._digest(account, stored, password)
        self._entries[key] = self._now() + self.ttl
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


@implementer(ICredentialsChecker)
class PasswordChecker:
    """Checks a login (password or APOP/CRAM-MD5 digest) against the user database.

    The login is normalised to an account address by :func:`parse_account` (a bare name
    gets the default domain; ``user@domain`` and ``user+domain`` for a known domain are the
    SDPS forms); the avatar id is that address, UTF-8 encoded. Verification (Argon2id, tens
    of ms of CPU) runs through ``run_in_thread`` so the reactor never blocks on it, at most
    ``max_verifications`` at a time (the rest wait their turn); successes are remembered for
    ``cache_ttl`` seconds (0 disables the cache) by ``clock`` (monotonic time by default).
    """

    credentialInterfaces = (IUsernamePassword, IDigestResponse)

    def __init__(
        self,
        users: IUserDatabase,
        default_domain: str,
        verify: PasswordVerifier,
        run_in_thread: ThreadRunner | None = None,
        dummy_hash: str | None = None,
        known_domains: Collection[str] = (),
        digests: Mapping[str, DigestFunction] = DEFAULT_DIGESTS,
        fold_local_case: bool = True,
        *,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: IReactorTime | None = None,
        max_verifications: int | None = None,
    ) -> None:
        self._users = users
        self._default_domain = default_domain
        self._verify = verify
        self._run: ThreadRunner = run_in_thread or _run_inline  # type: ignore[assignment]
        self._dummy_hash = dummy_hash
        self._known_domains = frozenset(d.lower() for d in known_domains)
        self._digests = dict(digests)
        self._fold = fold_local_case
        self.cache = VerificationCache(
            cache_ttl, cache_size, clock.seconds if clock is not None else time.monotonic
        )
        self._slots = DeferredSemaphore(max_verifications or default_max_verifications())
        #: Verifications running or queued, by cache key -> the logins waiting for each.
        self._in_flight: dict[bytes, list[Deferred[bool]]] = {}

    def account(self, login: bytes) -> Address:
        """The account a login name means; AddressError/UnicodeDecodeError when malformed."""
        return parse_account(
            login.decode("utf-8"),
            self._default_domain,
            fold_local_case=self._fold,
            known_domains=self._known_domains,
        )

    def requestAvatarId(self, credentials: ICredentials) -> Deferred[bytes | tuple[()]]:
        if IDigestResponse.providedBy(credentials):
            return self._check_digest(credentials)
        if IUsernamePassword.providedBy(credentials):
            return self._check_password(credentials)
        return fail(UnauthorizedLogin("unsupported credentials"))

    def _lookup(self, login: bytes) -> tuple[Address, str | None] | None:
        try:
            address = self.account(login)
        except (UnicodeDecodeError, AddressError):
            return None
        return address, self._users.get_password_hash(address)

    def _check_digest(self, credentials: IDigestResponse) -> Deferred[bytes | tuple[()]]:
        digest = self._digests.get(str(credentials.kind))
        found = self._lookup(bytes(credentials.username))
        if digest is None or found is None:
            return fail(UnauthorizedLogin("unsupported digest kind or malformed login"))
        address, stored = found
        if stored is None:
            # No password hashing to imitate here: a digest costs microseconds either way.
            return fail(UnauthorizedLogin("no such user"))
        d = self._run(
            _digest_matches,
            digest,
            stored,
            bytes(credentials.challenge),
            bytes(credentials.response),
        )
        return d.addCallback(_avatar_id, address)

    def _check_password(self, credentials: IUsernamePassword) -> Deferred[bytes | tuple[()]]:
        found = self._lookup(credentials.username)
        if found is None:
            return fail(UnauthorizedLogin("malformed login name"))
        address, stored = found
        password = credentials.password
        if not isinstance(password, bytes):
            return fail(UnauthorizedLogin("password must be bytes"))
        if stored is None:
            # Spend the same effort on unknown users so timing does not reveal them.
            if self._dummy_hash is None:
                return fail(UnauthorizedLogin("no such user"))
            d = self._verify_limited(self._dummy_hash, password)
            return d.addCallback(lambda _: _avatar_id(False, address))
        account = str(address)
        if self.cache.hit(account, stored, password):
            return succeed(_avatar_id(True, address))
        d = self._verify_shared(account, stored, password)
        return d.addCallback(_avatar_id, address)

    def _verify_shared(self, account: str, stored: str, password: bytes) -> Deferred[bool]:
        """One verification per distinct (account, stored hash, password) in flight.

        Every login gets its own Deferred, so one client dropping (cancelling) does not
        touch the others or the shared verification. Only a completed *success* outlives
        the verification (in the cache); a failure or error is handed to the logins that
        were waiting for it and then forgotten.
        """
        key = self.cache.key(account, stored, password)
        mine: Deferred[bool] = Deferred()
        waiters = self._in_flight.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._in_flight[key] = [mine]

        def settle(result: bool | Failure) -> None:
            waiting = self._in_flight.pop(key, [])
            if result is True:
                self.cache.add(account, stored, password)
            for d in waiting:
                if d.called:  # cancelled by its login
                    continue
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        self._verify_limited(stored, password).addBoth(settle)
        return mine

    def _verify_limited(self, stored: str, password: bytes) -> Deferred[bool]:
        """Verify in the thread runner, holding one of the ``max_verifications`` slots."""

        def run() -> Deferred[bool]:
            d: Deferred[bool] = self._run(self._verify, stored, password)
            return d

        return self._slots.run(run)


def _avatar_id(ok: bool, address: Address) -> bytes:
    if ok:
        return str(address).encode("utf-8")
    raise UnauthorizedLogin("bad credentials")


def plaintext_verify(stored: str, password: bytes) -> bool:
    """Verifier for the in-memory test database, which stores passwords in clear."""
    return hmac.compare_digest(stored.encode("utf-8"), password)


def plaintext_digests() -> Mapping[str, DigestFunction]:
    """APOP/CRAM-MD5 digests for the in-memory test database (passwords in clear)."""
    return {
        "APOP": lambda stored, ts: apop_digest("{PLAIN}" + stored, ts),
        "CRAM-MD5": lambda stored, ch: cram_md5_digest("{PLAIN}" + stored, ch),
    }
