"""The seams between mailgate's layers.

Protocols know only these interfaces and twisted.cred; storage, credentials and delivery
provide them. Every interface has an in-memory implementation in :mod:`mailgate.testing`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol, TypeVar

from twisted.cred.credentials import ICredentials
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from mailgate.model import Address, Envelope

T = TypeVar("T")


class ThreadRunner(Protocol):
    """Runs blocking work (hashing, fsync) off the reactor thread."""

    def __call__(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]: ...


class IMaildrop(Interface):
    """A POP3 user's locked maildrop, as a snapshot taken at login.

    Message numbers in the protocol are ``index + 1`` into ``messages``; the snapshot never
    changes during a session, whatever is delivered meanwhile.
    """

    messages = Attribute("Sequence[MessageInfo]: the snapshot, in delivery order")
    account = Attribute("Address: whose maildrop this is (XTND XMIT sends as this account)")

    def open_message(index: int) -> IO[bytes]:
        """Open the stored bytes of message ``index`` (any line ends; the caller normalises).

        Like a regular file, ``read(n)`` returns fewer than ``n`` bytes only at the end.
        """

    def may_have_dot_lines(index: int) -> bool:
        """False only when the store knows no line of message ``index`` starts with ``.``
        (then RETR and TOP need not search for lines to dot-stuff); True when unsure."""

    def commit(deleted: Sequence[int]) -> Deferred[int]:
        """Remove these messages for good (POP3 UPDATE) and release the lock.

        Fires with the number of messages that could not be removed.
        """

    def release() -> None:
        """Release the lock without changing anything. Safe to call more than once."""


class IMessageSink(Interface):
    """Receives one message being submitted and makes it durable."""

    queue_id = Attribute("str: identifier of this message in logs and replies")

    def write(data: bytes) -> None:
        """Append message bytes. Lines end with a bare LF (``\\n``), never CR."""

    def finish() -> Deferred[str]:
        """Make the message durable for every recipient (fsynced), then fire with queue_id."""

    def abort() -> None:
        """Throw away everything written; nothing is delivered."""


class ITwoPhaseSink(IMessageSink):
    """A sink whose message can be made durable first and visible (acted upon) later, so a
    message split between two stores is committed in both or in neither as far as a
    failure of writing can tell."""

    def prepare() -> Deferred[None]:
        """Make the message durable (fsynced) without anything acting on it yet."""

    def commit() -> Deferred[str]:
        """Make a prepared message visible; fires with queue_id. abort() still discards a
        prepared message that was never committed."""


class ISubmission(Interface):
    """What a logged-in sender (SMTP AUTH, XTND XMIT, or a trusted network) may do."""

    address = Attribute("Address | None: the authenticated account, None when unauthenticated")

    def check_sender(sender: Address | None) -> None:
        """Raise :class:`~mailgate.errors.SenderNotOwned` unless this user may use ``sender``."""

    def check_recipient(recipient: Address) -> None:
        """Raise UnknownRecipient or RelayDenied unless ``recipient`` is acceptable."""

    def open_message(envelope: Envelope) -> IMessageSink:
        """Start storing one message for this envelope."""


class IUserDatabase(Interface):
    """Where accounts and their password hashes live."""

    def get_password_hash(address: Address) -> str | None:
        """The stored password hash of this account, or None when there is no such account."""

    def exists(address: Address) -> bool:
        """Whether the account exists (used to accept or refuse local recipients)."""


class IMailStore(Interface):
    """Maildrops of every account, and local delivery into them."""

    def open_maildrop(address: Address) -> Deferred[IMaildrop]:
        """Lock and snapshot the account's maildrop.

        Fails with MaildropInUse when another session holds it, MaildropUnavailable on I/O
        trouble.
        """

    def open_delivery(envelope: Envelope) -> IMessageSink:
        """Start a message to be delivered to the (local) recipients of ``envelope``."""


class IOutboundQueue(Interface):
    """The durable spool of messages for remote recipients (the Postfix queue model)."""

    def open_message(envelope: Envelope) -> IMessageSink:
        """Spool one message; its finish() fires only once message and envelope are fsynced."""


class IRelay(Interface):
    """Transmits one spooled message to the next hop (a smarthost or the domain's MX)."""

    def deliver(
        sender: Address | None, recipients: Sequence[Address], open_message: Callable[[], IO[bytes]]
    ) -> Deferred[Sequence[Any]]:
        """Try every recipient; fire with one result per recipient (delivered/temp/perm)."""


class IDigestResponse(ICredentials):
    """A challenge-response login (APOP, CRAM-MD5): the password never crosses the wire.

    The checker recomputes the digest from the stored plaintext-equivalent secret; accounts
    whose scheme keeps only a one-way hash fail like a wrong password.
    """

    username = Attribute("bytes: the login name as the client sent it")
    challenge = Attribute("bytes: what the server sent (APOP timestamp, CRAM-MD5 challenge)")
    response = Attribute("bytes: the client's hex digest, as sent")
    kind = Attribute('str: "APOP" or "CRAM-MD5"')


class IAuthThrottle(Interface):
    """The brute-force brake shared by every protocol that checks passwords (Dovecot's anvil).

    Per client address: each failed login makes the next failure reply wait longer, growing
    to a cap; a repeat of the very same wrong credentials does not escalate; a success clears
    it. Protocols call ``failed`` then delay their failure reply by ``delay_for``.
    """

    def fingerprint(secret: bytes) -> bytes:
        """A keyed, per-process digest of a presented secret; never the secret itself."""

    def delay_for(peer_ip: str) -> float:
        """Seconds the failure reply to this client must wait now (0 for none)."""

    def failed(peer_ip: str, login: str, secret_fingerprint: bytes) -> None:
        """Count one failed login from ``peer_ip`` (no escalation for a repeated attempt)."""

    def succeeded(peer_ip: str) -> None:
        """A login from ``peer_ip`` succeeded: forget its failures."""

    def log_failure(protocol: str, peer_ip: str, login: str, reason: str) -> None:
        """Log one failed login in the single fail2ban-friendly line format."""
