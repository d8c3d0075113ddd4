"""Frozen value types shared by every layer."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

from mailgate.errors import AddressError

# Every pattern ends with \Z, not $: "$" also matches before a final newline, and a login
# such as "alice\n" must never pass for "alice".
# Characters allowed in the local part of an account name. Deliberately narrow: account
# names become directory names, so nothing that could traverse or confuse a path is allowed.
_ACCOUNT_LOCAL = re.compile(r"^[A-Za-z0-9!#$&'*+=?^_`{|}~-]+(\.[A-Za-z0-9!#$&'*+=?^_`{|}~-]+)*\Z")
_DOMAIN = re.compile(
    r"^(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
# An envelope local part may be any dot-atom or quoted string (RFC 5321 4.1.2).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"^{_ATEXT}+(\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_ADDRESS_LITERAL = re.compile(r"^\[[\x21-\x5a\x5e-\x7e]+\]\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, order=True)
class Address:
    """An RFC 5321 mailbox: ``local@domain``. The domain is kept in lower case."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @classmethod
    def parse(cls, text: str, default_domain: str | None = None) -> Address:
        """Parse an envelope mailbox (no angle brackets).

        Without ``@`` the default domain is used when given (RFC 6409 4.2 lets a
        submission server qualify addresses); otherwise it is an error.
        """
        if not text or len(text) > 254:
            raise AddressError("address length")
        if _CONTROL.search(text):
            raise AddressError("control character in address")
        if " " in text and not text.startswith('"'):
            raise AddressError("space in address")
        if "@" in text:
            local, _, domain = text.rpartition("@")
        elif default_domain is not None:
            local, domain = text, default_domain
        else:
            raise AddressError("address has no domain")
        if not local or len(local.encode("utf-8")) > 64:
            raise AddressError("bad local part length")
        if not (_DOT_STRING.match(local) or _QUOTED.match(local)):
            raise AddressError("bad local part")
        if not (_DOMAIN.match(domain) or _ADDRESS_LITERAL.match(domain)):
            raise AddressError("bad domain")
        return cls(local, domain.lower())

    def canonical(self, fold_local_case: bool = True) -> Address:
        """The account key: domain lower-cased, local part folded unless configured not to."""
        return Address(self.local.lower() if fold_local_case else self.local, self.domain)


def parse_account(
    login: str,
    default_domain: str,
    fold_local_case: bool = True,
    known_domains: Collection[str] = (),
) -> Address:
    """Turn a login name into an account address, refusing anything path-unsafe.

    The SDPS forms (checklist 0.3) all reach the same account: ``user@domain`` splits at the
    last ``@``; ``user+domain`` splits at the last ``+`` only when ``domain`` is one of
    ``known_domains`` (otherwise ``+`` stays part of the local part); a bare ``user`` gets
    the default domain. Domains compare case-insensitively.
    """
    if not login or len(login) > 255:
        raise AddressError("login length")
    if "@" in login:
        local, _, domain = login.rpartition("@")
    else:
        local, domain = login, default_domain
        head, plus, tail = login.rpartition("+")
        if plus and head and tail.lower() in {d.lower() for d in known_domains}:
            local, domain = head, tail
    if not _ACCOUNT_LOCAL.match(local) or len(local) > 64:
        raise AddressError("login local part")
    if not _DOMAIN.match(domain):
        raise AddressError("login domain")
    return Address(local.lower() if fold_local_case else local, domain.lower())


@dataclass(frozen=True)
class MessageInfo:
    """One message of a POP3 snapshot.

    ``size`` is the exact octet count RETR transmits before byte-stuffing (CRLF line ends).
    """

    uid: str
    size: int
    key: str = field(compare=False, default="")
    #: Delivery time (Unix seconds) when the store knows it; RFC 2449 EXPIRE counts from it.
    delivered: float | None = field(compare=False, default=None)


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of one message. ``sender`` None means the null reverse-path."""

    sender: Address | None
    recipients: tuple[Address, ...]
