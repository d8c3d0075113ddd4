"""SASL mechanisms shared verbatim by POP3 AUTH (RFC 5034) and SMTP AUTH (RFC 4954).

A mechanism is a small state machine: ``start(initial_response)`` then ``step(response)``
until it returns credentials. Protocols handle the framing (``+ ``/``334 ``), base64 and
``*`` cancellation through :func:`decode_response`; mechanisms see only decoded bytes.
"""

from __future__ import annotations

import base64
import binascii
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from twisted.cred.credentials import IUsernamePassword, UsernamePassword

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


class Mechanism(ABC):
    """One SASL exchange. Create a fresh instance for every AUTH command."""

    name: ClassVar[str]
    #: The password crosses the wire in a recoverable form: offer it only under TLS
    #: unless the policy allows plaintext.
    plaintext: ClassVar[bool] = True

    @abstractmethod
    def start(self, initial_response: bytes | None) -> Challenge | IUsernamePassword:
        """Begin; ``initial_response`` is the decoded initial response or None if absent."""

    @abstractmethod
    def step(self, response: bytes) -> Challenge | IUsernamePassword:
        """Take one decoded client response."""


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SaslError(f"{what} is not UTF-8") from e


class Plain(Mechanism):
    """RFC 4616: ``[authzid] NUL authcid NUL passwd``."""

    name = "PLAIN"

    def start(self, initial_response: bytes | None) -> Challenge | IUsernamePassword:
        if initial_response is None:
            return Challenge(b"")
        return self.step(initial_response)

    def step(self, response: bytes) -> Challenge | IUsernamePassword:
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

    def start(self, initial_response: bytes | None) -> Challenge | IUsernamePassword:
        if initial_response:
            return self.step(initial_response)
        return Challenge(self.USERNAME_PROMPT)

    def step(self, response: bytes) -> Challenge | IUsernamePassword:
        if self._username is None:
            if not response or len(response) > 255:
                raise SaslError("LOGIN user name length")
            _utf8(response, "user name")
            self._username = response
            return Challenge(self.PASSWORD_PROMPT)
        if not response or len(response) > 255:
            raise SaslError("LOGIN password length")
        return UsernamePassword(self._username, response)


MECHANISMS: dict[str, type[Mechanism]] = {m.name: m for m in (Plain, Login)}


def mechanism(name: str) -> Mechanism | None:
    """A fresh mechanism instance for ``name`` (case-insensitive), or None if unknown."""
    cls = MECHANISMS.get(name.upper())
    return cls() if cls is not None else None
