"""SASL mechanisms shared verbatim by POP3 AUTH (RFC 5034) and SMTP AUTH (RFC 4954).

A mechanism is a small state machine: ``start(initial_response)`` then ``step(response)``
until it returns credentials. Protocols handle the framing (``+ ``/``334 ``), base64 and
``*`` cancellation through :func:`decode_response`; mechanisms see only decoded bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from zope.interface import implementer

from mailgate.interfaces import IDigestResponse

CANCEL = b"*"


class SaslError(Exception):
    """The client's response is malformed; the exchange fails like bad credentials."""


class Base64Error(SaslError):
    """A response line is not valid base64 (protocols answer a syntax error)."""


class Cancelled(Exception):
    """The client sent ``*``."""


@dataclass(frozen=True)
class Challenge:
    """A server challenge; ``data`` is raw and gets base64-encoded by the protocol."""

    data: bytes


def decode_response(line: bytes) -> bytes:
    """Decode one client response line strictly.

    ``*`` raises :class:`Cancelled`; ``=`` is an empty response (RFC 4954/5034 initial
    response); anything that is not canonical base64 raises :class:`Base64Error`.
    """
    line = line.strip(b" \t")
    if line == CANCEL:
        raise Cancelled()
    if line == b"=":
        return b""
    if not line:
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Base64Error("invalid base64") from e


def encode_challenge(data: bytes) -> bytes:
    """Base64 for a challenge line; an empty challenge is empty text."""
    return base64.b64encode(data)


APOP = "APOP"
CRAM_MD5 = "CRAM-MD5"


@implementer(IDigestResponse)
@dataclass(frozen=True)
class DigestResponse:
    """An APOP or CRAM-MD5 login for the checker: it recomputes ``response`` itself."""

    username: bytes
    challenge: bytes
    response: bytes
    kind: str


#: What a finished exchange hands to ``portal.login``.
Credentials = IUsernamePassword | DigestResponse


def make_challenge(hostname: str, now: float | None = None) -> bytes:
    """A fresh msg-id style challenge ``<random.timestamp@hostname>`` (APOP, CRAM-MD5).

    The random part comes from :mod:`secrets`: a predictable challenge would let a recorded
    digest be replayed (RFC 1939 7, RFC 2195 2).
    """
    stamp = int(time.time() if now is None else now)
    host = "".join(c for c in hostname if c.isascii() and (c.isalnum() or c in ".-")) or "localhost"
    return f"<{secrets.token_hex(8)}.{stamp}@{host}>".encode("ascii")


_HEX_DIGEST = re.compile(rb"^[0-9A-Fa-f]{32}\Z")


def parse_digest_answer(data: bytes) -> tuple[bytes, bytes]:
    """``user SP 32HEX`` (CRAM-MD5 response, APOP arguments) -> (user, lower-case hex).

    The user name is everything before the last space (RFC 2195 allows none in it, but
    being liberal costs nothing), so the digest is always the last word.
    """
    user, sep, digest = data.rpartition(b" ")
    if not sep or not user or len(user) > 255 or not _HEX_DIGEST.match(digest):
        raise SaslError("malformed digest response")
    _utf8(user, "user name")
    return user, digest.lower()


class Mechanism(ABC):
    """One SASL exchange. Create a fresh instance for every AUTH command."""

    name: ClassVar[str]
    #: The password crosses the wire in a recoverable form: offer it only under TLS
    #: unless the policy allows plaintext.
    plaintext: ClassVar[bool] = True

    #: The server speaks first: an initial response is a protocol error (RFC 4954/5034).
    server_first: ClassVar[bool] = False

    @abstractmethod
    def start(self, initial_response: bytes | None) -> Challenge | Credentials:
        """Begin; ``initial_response`` is the decoded initial response or None if absent."""

    @abstractmethod
    def step(self, response: bytes) -> Challenge | Credentials:
        """Take one decoded client response."""


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SaslError(f"{what} is not UTF-8") from e


class Plain(Mechanism):
    """RFC 4616: ``[authzid] NUL authcid NUL passwd``."""

    name = "PLAIN"

    def start(self, initial_response: bytes | None) -> Challenge | Credentials:
        if initial_response is None:
            return Challenge(b"")
        return self.step(initial_response)

    def step(self, response: bytes) -> Challenge | Credentials:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise SaslError("PLAIN needs exactly two NULs")
        authzid, authcid, passwd = parts
        if not authcid or not passwd or len(authcid) > 255 or len(passwd) > 255:
            raise SaslError("PLAIN field length")
        _utf8(authzid, "authzid")
        _utf8(authcid, "authcid")
        _utf8(passwd, "password")
        if authzid and authzid != authcid:
            # Acting for another identity is never allowed.
            raise SaslError("authorization identity differs from authentication identity")
        return UsernamePassword(authcid, passwd)


class Login(Mechanism):
    """The LOGIN mechanism (draft-murchison-sasl-login), with the colon prompts clients expect.

    An initial response carries the user name (MS-XLOGIN), so only the password is asked.
    """

    name = "LOGIN"
    USERNAME_PROMPT = b"Username:"
    PASSWORD_PROMPT = b"Password:"

    def __init__(self) -> None:
        self._username: bytes | None = None

    def start(self, initial_response: bytes | None) -> Challenge | Credentials:
        if initial_response:
            return self.step(initial_response)
        return Challenge(self.USERNAME_PROMPT)

    def step(self, response: bytes) -> Challenge | Credentials:
        if self._username is None:
            if not response or len(response) > 255:
                raise SaslError("LOGIN user name length")
            _utf8(response, "user name")
            self._username = response
            return Challenge(self.PASSWORD_PROMPT)
        if not response or len(response) > 255:
            raise SaslError("LOGIN password length")
        return UsernamePassword(self._username, response)


class CramMD5(Mechanism):
    """RFC 2195: the server sends a challenge, the client ``user SP hex(HMAC-MD5)``.

    Not a plaintext mechanism (the secret never crosses the wire), so it may be offered
    before TLS; but it needs a plaintext-equivalent stored secret, so protocols list it only
    when some account has one.
    """

    name = CRAM_MD5
    plaintext = False
    server_first = True

    def __init__(self, challenge: bytes | None = None) -> None:
        self.challenge = challenge if challenge is not None else make_challenge("localhost")
        self._sent = False

    def start(self, initial_response: bytes | None) -> Challenge | Credentials:
        if initial_response is not None:
            raise SaslError("CRAM-MD5 takes no initial response")
        self._sent = True
        return Challenge(self.challenge)

    def step(self, response: bytes) -> Challenge | Credentials:
        if not self._sent:
            raise SaslError("CRAM-MD5 response before the challenge")
        user, digest = parse_digest_answer(response)
        return DigestResponse(user, self.challenge, digest, CRAM_MD5)


MECHANISMS: dict[str, type[Mechanism]] = {m.name: m for m in (Plain, Login, CramMD5)}


def mechanism(name: str, *, challenge: bytes | None = None) -> Mechanism | None:
    """A fresh mechanism instance for ``name`` (case-insensitive), or None if unknown.

    ``challenge`` is the server challenge for CRAM-MD5 (see :func:`make_challenge`).
    """
    cls = MECHANISMS.get(name.upper())
    if cls is None:
        return None
    if cls is CramMD5:
        return CramMD5(challenge)
    return cls()
