"""The one credential checker behind POP3 and SMTP logins."""

from __future__ import annotations

from collections.abc import Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred
from zope.interface import implementer

from mailgate.errors import AddressError
from mailgate.interfaces import IUserDatabase, ThreadRunner
from mailgate.model import parse_account

PasswordVerifier = Callable[[str, bytes], bool]


def _run_inline(f: Callable[..., object], *args: object, **kwargs: object) -> Deferred[object]:
    return maybeDeferred(f, *args, **kwargs)


@implementer(ICredentialsChecker)
class PasswordChecker:
    """Checks a login name and password against the user database.

    The login is normalised to an account address (a bare name gets the default domain);
    the avatar id is that address, UTF-8 encoded. Verification (Argon2id, tens of ms of
    CPU) runs through ``run_in_thread`` so the reactor never blocks on it.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        users: IUserDatabase,
        default_domain: str,
        verify: PasswordVerifier,
        run_in_thread: ThreadRunner | None = None,
        dummy_hash: str | None = None,
    ) -> None:
        self._users = users
        self._default_domain = default_domain
        self._verify = verify
        self._run: ThreadRunner = run_in_thread or _run_inline  # type: ignore[assignment]
        self._dummy_hash = dummy_hash

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes | tuple[()]]:
        try:
            login = credentials.username.decode("utf-8")
            address = parse_account(login, self._default_domain)
        except (UnicodeDecodeError, AddressError):
            return fail(UnauthorizedLogin("malformed login name"))
        stored = self._users.get_password_hash(address)
        password = credentials.password

        def verified(ok: bool) -> bytes:
            if ok and stored is not None:
                return str(address).encode("utf-8")
            raise UnauthorizedLogin("bad credentials")

        if stored is None:
            # Spend the same effort on unknown users so timing does not reveal them.
            if self._dummy_hash is None:
                return fail(UnauthorizedLogin("no such user"))
            dummy = self._dummy_hash
            return self._run(self._verify, dummy, password).addCallback(lambda _: verified(False))
        return self._run(self._verify, stored, password).addCallback(verified)


def plaintext_verify(stored: str, password: bytes) -> bool:
    """Verifier for the in-memory test database, which stores passwords in clear."""
    import hmac

    return hmac.compare_digest(stored.encode("utf-8"), password)
