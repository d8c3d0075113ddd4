"""The one credential checker behind POP3 and SMTP logins.

Password logins (USER/PASS, PLAIN, LOGIN) and challenge-response logins (APOP, CRAM-MD5)
go through the same checker and the same portal, so the account lookup, the SDPS login-name
forms and the timing rules are identical for every way in.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection, Mapping

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred
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


@implementer(ICredentialsChecker)
class PasswordChecker:
    """Checks a login (password or APOP/CRAM-MD5 digest) against the user database.

    The login is normalised to an account address by :func:`parse_account` (a bare name
    gets the default domain; ``user@domain`` and ``user+domain`` for a known domain are the
    SDPS forms); the avatar id is that address, UTF-8 encoded. Verification (Argon2id, tens
    of ms of CPU) runs through ``run_in_thread`` so the reactor never blocks on it.
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
    ) -> None:
        self._users = users
        self._default_domain = default_domain
        self._verify = verify
        self._run: ThreadRunner = run_in_thread or _run_inline  # type: ignore[assignment]
        self._dummy_hash = dummy_hash
        self._known_domains = frozenset(d.lower() for d in known_domains)
        self._digests = dict(digests)
        self._fold = fold_local_case

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
        if stored is None:
            # Spend the same effort on unknown users so timing does not reveal them.
            if self._dummy_hash is None:
                return fail(UnauthorizedLogin("no such user"))
            d = self._run(self._verify, self._dummy_hash, password)
            return d.addCallback(lambda _: _avatar_id(False, address))
        return self._run(self._verify, stored, password).addCallback(_avatar_id, address)


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
