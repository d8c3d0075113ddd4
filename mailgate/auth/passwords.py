"""Password hashing in Dovecot's ``{SCHEME}data`` notation.

Users are stored as ``{ARGON2ID}$argon2id$...`` by default, so a mailgate user file can be
read by Dovecot tooling and vice versa. Verification never raises on a corrupt or unknown
stored value: a broken entry must fail the login, not crash the session. New schemes are
added by registering one verifier (and, if they can be produced, one hasher) in the tables
at the bottom of this module.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from argon2 import PasswordHasher, Type
from argon2.exceptions import Argon2Error, InvalidHashError

# argon2-cffi's defaults are RFC 9106's "low memory" recommendation (t=3, m=64 MiB, p=4).
_ARGON2ID = PasswordHasher(type=Type.ID)
_ARGON2I = PasswordHasher(type=Type.I)

# A hash of a random secret nobody knows, made with the same parameters as hash_password():
# verifying against it costs what a real verification costs, so unknown users cannot be told
# apart from wrong passwords by timing.
DUMMY_HASH = (
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$0+hCFT1Y1a41qUGVFEGhdQ"
    "$7GmV1BrQFyUo4l2eSTzyatBv7DV8uUKkjEGC2Vz7WGs"
)

DEFAULT_SCHEME = "ARGON2ID"


def split_scheme(stored: str) -> tuple[str, str] | None:
    """``"{ARGON2ID}$argon2id$..."`` -> ``("ARGON2ID", "$argon2id$...")``; None if malformed."""
    if not stored.startswith("{"):
        return None
    end = stored.find("}")
    if end <= 1:
        return None
    return stored[1:end].upper(), stored[end + 1 :]


def scheme_of(stored: str) -> str | None:
    """The upper-case scheme name of a stored hash, or None when it has no ``{SCHEME}``."""
    parts = split_scheme(stored)
    return parts[0] if parts else None


def plaintext_secret(stored: str) -> bytes | None:
    """The clear secret for plaintext-equivalent schemes (what APOP/CRAM-MD5 need), else None."""
    parts = split_scheme(stored)
    if parts is None or parts[0] not in _PLAINTEXT_SCHEMES:
        return None
    return parts[1].encode("utf-8")


def hash_password(password: str, scheme: str = DEFAULT_SCHEME) -> str:
    """Hash ``password`` for storage; raises ValueError for a scheme we cannot produce."""
    name = scheme.upper()
    hasher = _HASHERS.get(name)
    if hasher is None:
        raise ValueError(f"unsupported password scheme {scheme!r}")
    return "{" + name + "}" + hasher(password)


def verify_password(stored: str, password: bytes) -> bool:
    """Whether ``password`` matches ``stored``. False (never an exception) for bad stored data."""
    try:
        parts = split_scheme(stored)
        if parts is None:
            return False
        verifier = _VERIFIERS.get(parts[0])
        if verifier is None:
            return False
        return verifier(parts[1], password)
    except Exception:  # a corrupt entry must fail the login, never the session
        return False


def _argon2_verifier(hasher: PasswordHasher, prefix: str) -> Callable[[str, bytes], bool]:
    def verify(encoded: str, password: bytes) -> bool:
        # The scheme label must agree with the encoded hash's own type.
        if not encoded.startswith(prefix):
            return False
        try:
            return hasher.verify(encoded, password)
        except (Argon2Error, InvalidHashError, ValueError):
            return False

    return verify


def _plain_verify(secret: str, password: bytes) -> bool:
    return hmac.compare_digest(secret.encode("utf-8"), password)


def _plain_hash(password: str) -> str:
    if "\n" in password or "\r" in password:
        raise ValueError("a password cannot contain a line break")
    return password


_PLAINTEXT_SCHEMES = frozenset({"PLAIN", "CLEAR"})

_VERIFIERS: dict[str, Callable[[str, bytes], bool]] = {
    "ARGON2ID": _argon2_verifier(_ARGON2ID, "$argon2id$"),
    "ARGON2I": _argon2_verifier(_ARGON2I, "$argon2i$"),
    "PLAIN": _plain_verify,
    "CLEAR": _plain_verify,
}

_HASHERS: dict[str, Callable[[str], str]] = {
    "ARGON2ID": _ARGON2ID.hash,
    "ARGON2I": _ARGON2I.hash,
    "PLAIN": _plain_hash,
    "CLEAR": _plain_hash,
}
