"""Exceptions shared across mailgate's layers.

Protocols translate these into wire replies; nothing here ever reaches a client as text
produced by Python itself.
"""

from __future__ import annotations


class MailgateError(Exception):
    """Base class of every mailgate-specific error."""


class ConfigError(MailgateError):
    """The configuration is invalid; the message names the file and the key."""


class AddressError(MailgateError, ValueError):
    """A mail address or login name is syntactically unacceptable."""


class MaildropInUse(MailgateError):
    """Another session (in this or another process) holds the maildrop lock."""


class MaildropUnavailable(MailgateError):
    """The maildrop cannot be opened right now (I/O error, missing directory...)."""


class DeliveryError(MailgateError):
    """A message or a recipient could not be accepted.

    ``permanent`` tells a 5xx/[SYS/PERM] failure from a 4xx/[SYS/TEMP] one.
    """

    def __init__(self, text: str, *, permanent: bool = True) -> None:
        super().__init__(text)
        self.text = text
        self.permanent = permanent


class UnknownRecipient(DeliveryError):
    """The recipient is in a local domain but has no mailbox."""


class RelayDenied(DeliveryError):
    """The recipient is not local and relaying is not available to this sender."""


class SenderNotOwned(DeliveryError):
    """The authenticated user may not use this envelope sender."""


class UserDatabaseError(MailgateError):
    """The user database file is malformed or cannot be written."""
