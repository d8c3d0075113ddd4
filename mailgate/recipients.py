"""Envelope recipients from a message's own header fields (``sendmail -t`` rules).

XTND XMIT has no RCPT command: the recipients are the addresses in To/Cc/Bcc, or, when the
message is being resent (any ``Resent-*`` field), only those in Resent-To/Resent-Cc/
Resent-Bcc. Pure functions: header (name, value) pairs in, :class:`Address` values out.

Each address is parsed by the standard library's RFC 5322 parser
(``email.policy.default``), which knows display names, quoted strings, comments, route
addresses and RFC 2047 words. That parser is quadratic in the length of its input (a 32 KiB
field of comments takes seconds), so a field is first cut into its top-level list items
here (a linear scan that respects quotes, comments, angle brackets and domain literals, and
takes group syntax apart), and only short items, a bounded number of them, reach it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from email.errors import InvalidHeaderDefect, MessageDefect, ObsoleteHeaderDefect
from email.policy import default as _default_policy

from mailgate.errors import AddressError
from mailgate.model import Address

__all__ = [
    "MAX_ITEM_LENGTH",
    "RecipientError",
    "TooManyRecipients",
    "extract_recipients",
    "parse_address_list",
    "recipient_values",
    "split_address_list",
]

#: Longest single list item (display name, comments and address) we hand to the parser.
MAX_ITEM_LENGTH = 400

_PLAIN_FIELDS = ("to", "cc", "bcc")
_RESENT_FIELDS = ("resent-to", "resent-cc", "resent-bcc")
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
# The one defect we repair ourselves: a bare name, qualified with the default domain.
_NO_DOMAIN = "addr-spec local part with no domain"


class RecipientError(ValueError):
    """The recipient fields cannot be turned into an envelope; ``reason`` is client-safe."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooManyRecipients(RecipientError):
    """More recipients (or list items) than the limit allows."""


def recipient_values(fields: Iterable[tuple[str, str]]) -> list[str]:
    """Values of the fields that name recipients, in order.

    sendmail's rule: once any ``Resent-*`` field is present the message is being resent,
    and only the Resent- recipient fields count (the original To/Cc are history).
    """
    pairs = [(name.lower(), value) for name, value in fields]
    resent = any(name.startswith("resent-") for name, _ in pairs)
    wanted = _RESENT_FIELDS if resent else _PLAIN_FIELDS
    return [value for name, value in pairs if name in wanted]


def split_address_list(value: str) -> list[str]:
    """Cut an address-list into its items: mailboxes, and group names (ending in ``:``).

    ``team: a@x, b@y;`` gives ``["team:", "a@x", "b@y"]``; ``undisclosed-recipients:;``
    gives ``["undisclosed-recipients:"]``; empty items are dropped. Separators inside
    quoted strings, comments, ``<...>`` and ``[...]`` do not count. Anything malformed (an
    unclosed quote, a stray ``;``) stays inside its item, for the parser to refuse.
    """
    items: list[str] = []
    current: list[str] = []
    quoted = False
    comment = 0
    angle = False
    literal = False
    group = False
    escaped = False

    def cut() -> None:
        item = "".join(current).strip()
        current.clear()
        if item:
            items.append(item)

    for ch in value:
        if escaped:
            escaped = False
            current.append(ch)
            continue
        if ch == "\\" and (quoted or comment or literal):
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif comment:
            comment += {"(": 1, ")": -1}.get(ch, 0)
        elif ch == "(":
            comment = 1
        elif literal:
            literal = ch != "]"
        elif ch == "[":
            literal = True
        elif ch == '"':
            quoted = True
        elif angle:
            angle = ch != ">"
        elif ch == "<":
            angle = True
        elif ch == ",":
            cut()
            continue
        elif ch == ":" and not group:
            current.append(ch)
            cut()  # the group's name, as its own item ending in ":"
            group = True
            continue
        elif ch == ";" and group:
            cut()
            group = False
            continue
        current.append(ch)
    cut()
    return items


def _defect_ok(defect: MessageDefect) -> bool:
    if isinstance(defect, ObsoleteHeaderDefect):
        return True  # obsolete but unambiguous syntax (empty list elements, routes...)
    return isinstance(defect, InvalidHeaderDefect) and str(defect) == _NO_DOMAIN


def _parse_item(item: str, default_domain: str) -> Address | None:
    """One mailbox item -> its address; None when it holds only a comment."""
    if len(item) > MAX_ITEM_LENGTH:
        raise RecipientError("Recipient address too long")
    group_name = item.endswith(":")
    try:
        # A group's name is checked as the empty group it would be on its own.
        header = _default_policy.header_factory("To", item + ";" if group_name else item)
    except Exception:  # the stdlib parser raises IndexError and friends on some garbage
        raise RecipientError("Malformed recipient address") from None
    defects = getattr(header, "defects", ())
    groups = getattr(header, "groups", ())
    if not all(_defect_ok(d) for d in defects) or len(groups) > 1:
        raise RecipientError("Malformed recipient address")
    if not groups:
        return None
    if group_name:
        if groups[0].display_name is None or groups[0].addresses:
            raise RecipientError("Malformed recipient address")
        return None
    if groups[0].display_name is not None or len(groups[0].addresses) != 1:
        raise RecipientError("Malformed recipient address")
    mailbox = groups[0].addresses[0]
    try:
        if mailbox.domain:
            return Address.parse(mailbox.addr_spec)
        if not _DOT_ATOM.match(mailbox.username):
            raise RecipientError("Malformed recipient address")
        return Address.parse(mailbox.username, default_domain)
    except AddressError:
        raise RecipientError("Malformed recipient address") from None


def parse_address_list(value: str, default_domain: str, max_items: int = 1000) -> list[Address]:
    """Every mailbox in one address-list field, in order (duplicates kept)."""
    items = split_address_list(value)
    if len(items) > max_items:
        raise TooManyRecipients("Too many recipients")
    found: list[Address] = []
    for item in items:
        address = _parse_item(item, default_domain)
        if address is not None:
            found.append(address)
    return found


def extract_recipients(
    fields: Sequence[tuple[str, str]], default_domain: str, max_recipients: int = 100
) -> list[Address]:
    """The envelope recipients of a message, de-duplicated, in order of first mention.

    ``fields`` are the message's (name, unfolded value) header pairs. Bare names get
    ``default_domain``. Domains compare case-insensitively (Address keeps them in lower
    case); local parts are kept as written. Raises :class:`RecipientError` on a malformed
    address and :class:`TooManyRecipients` beyond ``max_recipients`` distinct addresses
    (list items are bounded too, so a header of repeats cannot make parsing expensive).
    """
    budget = 2 * max_recipients + 16
    seen: dict[Address, None] = {}
    for value in recipient_values(fields):
        items = split_address_list(value)
        budget -= len(items)
        if budget < 0:
            raise TooManyRecipients("Too many recipients")
        for item in items:
            address = _parse_item(item, default_domain)
            if address is not None:
                seen[address] = None
        if len(seen) > max_recipients:
            raise TooManyRecipients("Too many recipients")
    return list(seen)
