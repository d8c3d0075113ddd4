"""The one realm both protocols log in through.

POP3 asks for an :class:`IMaildrop` (the locked snapshot of the account's Maildir); SMTP
submission and XTND XMIT ask for an :class:`ISubmission` (what this user may send).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mailgate.errors import RelayDenied, SenderNotOwned, UnknownRecipient
from mailgate.interfaces import IMaildrop, IMailStore, IMessageSink, ISubmission, IUserDatabase
from mailgate.model import Address, Envelope


@implementer(ISubmission)
class Submission:
    """The sending rights of one session: own addresses as sender, local recipients only."""

    def __init__(
        self,
        address: Address | None,
        store: IMailStore,
        users: IUserDatabase,
        local_domains: Collection[str],
    ) -> None:
        self.address = address
        self._store = store
        self._users = users
        self._local_domains = frozenset(d.lower() for d in local_domains)

    def check_sender(self, sender: Address | None) -> None:
        if sender is None:
            return  # the null reverse-path (MDNs, Eudora default) is always allowed
        if self.address is None:
            # Trusted-network clients send unauthenticated; they may use local-domain senders
            # only if such an account exists... or any external address.
            if sender.domain in self._local_domains and not self._users.exists(sender.canonical()):
                raise SenderNotOwned("Sender address rejected: no such local user")
            return
        if sender.canonical() != self.address:
            raise SenderNotOwned("Sender address rejected: not owned by user")

    def check_recipient(self, recipient: Address) -> None:
        if recipient.domain in self._local_domains:
            if not self._users.exists(recipient.canonical()):
                raise UnknownRecipient("Recipient address rejected: user unknown")
            return
        raise RelayDenied(
            "Relay access denied: this server delivers to local mailboxes only "
            "(relaying to other domains is not enabled)"
        )

    def open_message(self, envelope: Envelope) -> IMessageSink:
        # One copy per mailbox, however often the client named it.
        recipients = tuple(dict.fromkeys(r.canonical() for r in envelope.recipients))
        local = Envelope(envelope.sender, recipients)
        return self._store.open_delivery(local)


@implementer(IRealm)
class MailRealm:
    """Hands out a maildrop (POP3) or a submission avatar (SMTP, XTND XMIT)."""

    def __init__(
        self, store: IMailStore, users: IUserDatabase, local_domains: Collection[str]
    ) -> None:
        self.store = store
        self.users = users
        self.local_domains = frozenset(d.lower() for d in local_domains)

    def submission_for(self, address: Address | None) -> Submission:
        """The submission avatar of ``address`` (None: an unauthenticated trusted client)."""
        return Submission(address, self.store, self.users, self.local_domains)

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> Deferred[tuple[Any, Any, Callable[[], None]]]:
        assert isinstance(avatarId, bytes)
        local, _, domain = avatarId.decode("utf-8").rpartition("@")
        address = Address(local, domain)
        for iface in interfaces:
            if iface is IMaildrop:
                d = self.store.open_maildrop(address)

                def wrap(drop: IMaildrop) -> tuple[Any, Any, Callable[[], None]]:
                    return (IMaildrop, drop, drop.release)

                return d.addCallback(wrap)
            if iface is ISubmission:
                return succeed((ISubmission, self.submission_for(address), lambda: None))
        raise NotImplementedError("no supported avatar interface requested")
