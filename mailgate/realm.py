"""The one realm both protocols log in through.

POP3 asks for an :class:`IMaildrop` (the locked snapshot of the account's Maildir); SMTP
submission and XTND XMIT ask for an :class:`ISubmission` (what this user may send). Both
sending paths get the same object, so they follow the same rules.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, cast

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.errors import RelayDenied, SenderNotOwned, UnknownRecipient
from mailgate.interfaces import (
    IMaildrop,
    IMailStore,
    IMessageSink,
    IOutboundQueue,
    ISubmission,
    ITwoPhaseSink,
    IUserDatabase,
)
from mailgate.model import Address, Envelope


@implementer(IMessageSink)
class SplitSink:
    """One message going to local mailboxes and to the outbound spool at once.

    finish() fires only when every part is durable; if one part fails the others are
    aborted where they still can be, and the failure is reported (the client retries).
    """

    def __init__(self, parts: Sequence[IMessageSink]) -> None:
        self._parts = list(parts)
        self.queue_id: str = parts[-1].queue_id

    def write(self, data: bytes) -> None:
        for part in self._parts:
            part.write(data)

    def finish(self) -> Deferred[str]:
        first, *rest = self._parts
        if len(rest) == 1 and ITwoPhaseSink.providedBy(rest[0]):
            return self._finish_two_phase(first, rest[0])
        # Local copies first: a failure there must not leave remote copies already queued.
        d = first.finish()

        def next_parts(_: str) -> Deferred[str]:
            dl = DeferredList([p.finish() for p in rest], consumeErrors=True)

            def check(results: list[tuple[bool, Any]]) -> str:
                for ok, value in results:
                    if not ok:
                        assert isinstance(value, Failure)
                        value.raiseException()
                return self.queue_id

            return dl.addCallback(check)

        def abort_rest(failure: Failure) -> Failure:
            for p in rest:
                p.abort()
            return failure

        return d.addCallbacks(next_parts, abort_rest)

    def _finish_two_phase(self, local: IMessageSink, remote: IMessageSink) -> Deferred[str]:
        """Spool copy durable first (not yet acted upon), then the local copies, then the
        spool copy made visible. A failure to write either store (a full disk, most
        likely) leaves nothing delivered, so the client's retry delivers nothing twice;
        only a failing rename into incoming/ after the local copies are in can still do
        that."""
        spool = cast(ITwoPhaseSink, remote)

        def local_part(_: None) -> Deferred[str]:
            return local.finish().addErrback(drop_spooled)

        def drop_spooled(failure: Failure) -> Failure:
            spool.abort()
            return failure

        def drop_local(failure: Failure) -> Failure:
            local.abort()
            return failure

        d: Deferred[Any] = spool.prepare()
        d.addErrback(drop_local)  # the spool could not take it: nothing was delivered
        d.addCallback(local_part)
        d.addCallback(lambda _: spool.commit())
        return d.addCallback(lambda _: self.queue_id)

    def abort(self) -> None:
        for part in self._parts:
            part.abort()


@implementer(ISubmission)
class Submission:
    """The sending rights of one session.

    Senders: the account's own address (or the null path). Recipients: existing local
    mailboxes, and remote addresses when an outbound queue exists (the session is
    authenticated, or comes from a trusted network, or it would not have this avatar).
    """

    def __init__(
        self,
        address: Address | None,
        store: IMailStore,
        users: IUserDatabase,
        local_domains: Collection[str],
        queue: IOutboundQueue | None = None,
    ) -> None:
        self.address = address
        self._store = store
        self._users = users
        self._local_domains = frozenset(d.lower() for d in local_domains)
        self._queue = queue

    def is_local(self, address: Address) -> bool:
        return address.domain in self._local_domains

    def check_sender(self, sender: Address | None) -> None:
        if sender is None:
            return  # the null reverse-path (MDNs, Eudora default) is always allowed
        if self.address is None:
            # Trusted-network clients send unauthenticated: any external sender, but a local
            # one only if that account exists.
            if self.is_local(sender) and not self._users.exists(sender.canonical()):
                raise SenderNotOwned("Sender address rejected: no such local user")
            return
        if sender.canonical() != self.address:
            raise SenderNotOwned("Sender address rejected: not owned by user")

    def check_recipient(self, recipient: Address) -> None:
        if self.is_local(recipient):
            if not self._users.exists(recipient.canonical()):
                raise UnknownRecipient("Recipient address rejected: user unknown")
            return
        if self._queue is None:
            raise RelayDenied(
                "Relay access denied: this server delivers to local mailboxes only "
                "(relaying to other domains is not enabled)"
            )

    def open_message(self, envelope: Envelope) -> IMessageSink:
        local: dict[Address, None] = {}
        remote: dict[Address, None] = {}
        for r in envelope.recipients:
            if self.is_local(r):
                local[r.canonical()] = None  # one copy per mailbox, however often named
            else:
                remote[r] = None
        parts: list[IMessageSink] = []
        if local:
            parts.append(self._store.open_delivery(Envelope(envelope.sender, tuple(local))))
        if remote:
            if self._queue is None:
                raise RelayDenied("Relay access denied")
            parts.append(self._queue.open_message(Envelope(envelope.sender, tuple(remote))))
        if len(parts) == 1:
            return parts[0]
        return SplitSink(parts)


@implementer(IRealm)
class MailRealm:
    """Hands out a maildrop (POP3) or a submission avatar (SMTP, XTND XMIT)."""

    def __init__(
        self,
        store: IMailStore,
        users: IUserDatabase,
        local_domains: Collection[str],
        queue: IOutboundQueue | None = None,
    ) -> None:
        self.store = store
        self.users = users
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.queue = queue

    def submission_for(self, address: Address | None) -> Submission:
        """The submission avatar of ``address`` (None: an unauthenticated trusted client)."""
        return Submission(address, self.store, self.users, self.local_domains, self.queue)

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
