"""In-memory implementations of mailgate's interfaces, for tests of the layers above them.

They follow the same contracts as the real Maildir store and user database (the contract
tests in ``tests/`` run against both), so the fakes stay honest.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailgate.errors import MaildropInUse
from mailgate.interfaces import (
    IMaildrop,
    IMailStore,
    IMessageSink,
    IOutboundQueue,
    IUserDatabase,
)
from mailgate.model import Address, Envelope, MessageInfo
from mailgate.wire import encode_all


@implementer(IUserDatabase)
class MemoryUserDatabase:
    """Accounts with plaintext passwords, kept in a dict. Tests only."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.passwords: dict[Address, str] = {}
        for name, password in (users or {}).items():
            local, _, domain = name.rpartition("@")
            self.passwords[Address(local, domain)] = password

    def get_password_hash(self, address: Address) -> str | None:
        return self.passwords.get(address)

    def exists(self, address: Address) -> bool:
        return address in self.passwords


class MemoryMessage:
    """A stored message with the UID it was given at delivery."""

    def __init__(self, uid: str, data: bytes, delivered: float | None = None) -> None:
        self.uid = uid
        self.data = data
        #: Delivery time (Unix seconds); None when unknown (EXPIRE then keeps the message).
        self.delivered = delivered


@implementer(IMaildrop)
class MemoryMaildrop:
    """A snapshot over a :class:`MemoryMailStore` mailbox."""

    def __init__(self, store: MemoryMailStore, address: Address) -> None:
        self.account = address
        self._store = store
        self._address = address
        self._snapshot = list(store.mailboxes.get(address, []))
        self.messages: Sequence[MessageInfo] = [
            MessageInfo(m.uid, len(encode_all([m.data], stuff=False)), m.uid, m.delivered)
            for m in self._snapshot
        ]
        self.released = False

    def open_message(self, index: int) -> IO[bytes]:
        return io.BytesIO(self._snapshot[index].data)

    def may_have_dot_lines(self, index: int) -> bool:
        return True

    def commit(self, deleted: Sequence[int]) -> Deferred[int]:
        gone = {self._snapshot[i].uid for i in deleted}
        box = self._store.mailboxes.get(self._address, [])
        self._store.mailboxes[self._address] = [m for m in box if m.uid not in gone]
        self.release()
        return succeed(0)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._store.locked.discard(self._address)


@implementer(IMessageSink)
class MemorySink:
    """Collects a message; delivers it to the store's mailboxes on finish()."""

    def __init__(self, store: MemoryMailStore, envelope: Envelope, queue_id: str) -> None:
        self._store = store
        self.envelope = envelope
        self.queue_id = queue_id
        self._parts: list[bytes] = []
        self.aborted = False
        self.finished = False

    def write(self, data: bytes) -> None:
        assert b"\r" not in data, "sinks take LF line ends only"
        self._parts.append(data)

    def finish(self) -> Deferred[str]:
        if self._store.fail_deliveries:
            return fail(OSError("disk full"))
        data = b"".join(self._parts)
        for rcpt in dict.fromkeys(self.envelope.recipients):  # one copy per mailbox
            self._store.deliver(rcpt, data)
        self.finished = True
        self._store.delivered.append((self.envelope, data))
        return succeed(self.queue_id)

    def abort(self) -> None:
        self.aborted = True


@implementer(IMailStore)
class MemoryMailStore:
    """Mailboxes in a dict, with the same locking rule as the Maildir store."""

    def __init__(self) -> None:
        self.mailboxes: dict[Address, list[MemoryMessage]] = {}
        self.locked: set[Address] = set()
        self.delivered: list[tuple[Envelope, bytes]] = []
        self.fail_deliveries = False
        self._uids = itertools.count(1)

    def deliver(self, address: Address, data: bytes, delivered: float | None = None) -> str:
        """Put a message straight into a mailbox (test setup); returns its UID."""
        uid = f"uid{next(self._uids):06d}"
        self.mailboxes.setdefault(address, []).append(MemoryMessage(uid, data, delivered))
        return uid

    def open_maildrop(self, address: Address) -> Deferred[IMaildrop]:
        if address in self.locked:
            return fail(MaildropInUse(str(address)))
        self.locked.add(address)
        return succeed(MemoryMaildrop(self, address))

    def open_delivery(self, envelope: Envelope) -> IMessageSink:
        return MemorySink(self, envelope, f"Q{next(self._uids):06d}")


@implementer(IOutboundQueue)
class MemoryQueue:
    """An outbound spool in a list: what was queued, and for whom."""

    def __init__(self) -> None:
        self.queued: list[tuple[Envelope, bytes]] = []
        self.fail = False
        self._ids = itertools.count(1)

    def open_message(self, envelope: Envelope) -> IMessageSink:
        return _QueueSink(self, envelope, f"R{next(self._ids):06d}")


@implementer(IMessageSink)
class _QueueSink:
    def __init__(self, queue: MemoryQueue, envelope: Envelope, queue_id: str) -> None:
        self._queue = queue
        self.envelope = envelope
        self.queue_id = queue_id
        self._parts: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert b"\r" not in data, "sinks take LF line ends only"
        self._parts.append(data)

    def finish(self) -> Deferred[str]:
        if self._queue.fail:
            return fail(OSError("spool full"))
        self._queue.queued.append((self.envelope, b"".join(self._parts)))
        return succeed(self.queue_id)

    def abort(self) -> None:
        self.aborted = True


class HeldRunner:
    """A thread runner whose jobs run only when the test says, one at a time: to see what
    happens while work is in the thread pool (caps, merging, grouping, ordering)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((d, f, args))
        return d

    def run_one(self) -> None:
        """Run the oldest job; its Deferred fires with the result or the exception."""
        d, f, args = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport a protocol can STLS/STARTTLS on: startTLS calls are recorded."""

    def __init__(self, peer_host: str = "192.0.2.7", peer_port: int = 40000) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", peer_host, peer_port))  # type: ignore[no-untyped-call]
        self.tls_started: list[object] = []

    def startTLS(self, contextFactory: object) -> None:
        self.tls_started.append(contextFactory)

    def loseWriteConnection(self) -> None:
        self.loseConnection()  # type: ignore[no-untyped-call]

    def getTcpNoDelay(self) -> bool:
        return False

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass
