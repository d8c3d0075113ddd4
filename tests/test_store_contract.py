"""One contract, two implementations: MemoryMailStore (the fake) and MaildirStore (the real one).

Keeps the in-memory twin honest: whatever the POP3 and SMTP tests assume about the fake must
hold for the Maildir store too.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial import unittest

from mailgate.errors import MaildropInUse
from mailgate.interfaces import IMaildrop, IMailStore, IMessageSink
from mailgate.model import Address, Envelope
from mailgate.store.maildir import MaildirStore
from mailgate.testing import MemoryMailStore
from mailgate.wire import encode_all

T = TypeVar("T")

ALICE = Address("alice", "example.org")
BOB = Address("bob", "example.org")
SENDER = Address("sender", "example.net")

MESSAGES = [
    b"Subject: one\n\nhello\n",
    b"Subject: two\n\n.leading dot\n..two dots\nno final newline",
    b"",
    b"Subject: three\n\n" + b"x" * 5000 + b"\n.\n",
]


def failure_of(d: Deferred[Any], expected: type[BaseException]) -> BaseException:
    """The exception a Deferred already failed with (trial's failureResultOf is untyped)."""
    box: list[Any] = []
    d.addCallbacks(lambda r: box.append(("ok", r)), lambda f: box.append(("fail", f.value)))
    assert box, "Deferred has not fired"
    kind, value = box[0]
    assert kind == "fail", f"expected {expected.__name__}, got result {value!r}"
    assert isinstance(value, expected), f"expected {expected.__name__}, got {value!r}"
    return value


def temp_dir(case: unittest.TestCase) -> str:
    """A fresh directory outside the working tree, removed after the test."""
    path = tempfile.mkdtemp(prefix="mailgate-test-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def run_sync(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    """A thread runner that runs inline, so Deferreds fire before the call returns."""
    return maybeDeferred(f, *args, **kwargs)


class MailStoreContract:
    """Mixin: subclasses provide make_store(); every test must hold for every store."""

    store: IMailStore

    def make_store(self) -> IMailStore:
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()

    # helpers, typed through the trial TestCase they are mixed into
    def _tc(self) -> unittest.TestCase:
        assert isinstance(self, unittest.TestCase)
        return self

    def deliver(self, data: bytes, *rcpts: Address) -> str:
        sink = self.store.open_delivery(Envelope(SENDER, rcpts or (ALICE,)))
        assert IMessageSink.providedBy(sink)
        # Write in awkward chunks, as the SMTP layer may.
        for i in range(0, len(data), 7):
            sink.write(data[i : i + 7])
        queue_id: str = self._tc().successResultOf(sink.finish())
        assert queue_id == sink.queue_id
        return queue_id

    def open(self, address: Address = ALICE) -> IMaildrop:
        drop: IMaildrop = self._tc().successResultOf(self.store.open_maildrop(address))
        assert IMaildrop.providedBy(drop)
        return drop

    def contents(self, drop: IMaildrop) -> list[bytes]:
        out = []
        for i in range(len(drop.messages)):
            with drop.open_message(i) as f:
                out.append(f.read())
        return out

    # the contract
    def test_provides_interface(self) -> None:
        assert IMailStore.providedBy(self.store)

    def test_empty_maildrop(self) -> None:
        drop = self.open()
        assert list(drop.messages) == []
        drop.release()

    def test_delivered_messages_listed_in_order_with_wire_sizes(self) -> None:
        for data in MESSAGES:
            self.deliver(data)
        drop = self.open()
        assert self.contents(drop) == MESSAGES
        assert [m.size for m in drop.messages] == [
            len(encode_all([data], stuff=False)) for data in MESSAGES
        ]
        drop.release()

    def test_uids_are_unique_and_printable(self) -> None:
        for data in MESSAGES:
            self.deliver(data)
        drop = self.open()
        uids = [m.uid for m in drop.messages]
        assert len(set(uids)) == len(uids)
        for uid in uids:
            assert 1 <= len(uid) <= 70
            assert all(0x21 <= ord(c) <= 0x7E for c in uid)
        drop.release()

    def test_second_session_is_refused_until_release(self) -> None:
        self.deliver(MESSAGES[0])
        drop = self.open()
        failure_of(self.store.open_maildrop(ALICE), MaildropInUse)
        drop.release()
        drop.release()  # idempotent
        again = self.open()
        assert len(again.messages) == 1
        again.release()

    def test_lock_is_per_mailbox(self) -> None:
        drop = self.open(ALICE)
        other = self.open(BOB)
        other.release()
        drop.release()

    def test_commit_releases_the_lock(self) -> None:
        drop = self.open()
        assert self._tc().successResultOf(drop.commit([])) == 0
        self.open().release()

    def test_snapshot_ignores_later_deliveries(self) -> None:
        self.deliver(MESSAGES[0])
        drop = self.open()
        self.deliver(MESSAGES[1])
        assert len(drop.messages) == 1
        assert self.contents(drop) == [MESSAGES[0]]
        assert self._tc().successResultOf(drop.commit([0])) == 0
        after = self.open()
        assert self.contents(after) == [MESSAGES[1]]
        after.release()

    def test_commit_deletes_only_marked(self) -> None:
        for data in MESSAGES[:3]:
            self.deliver(data)
        drop = self.open()
        uids = [m.uid for m in drop.messages]
        assert self._tc().successResultOf(drop.commit([1])) == 0
        after = self.open()
        assert [m.uid for m in after.messages] == [uids[0], uids[2]]
        assert self.contents(after) == [MESSAGES[0], MESSAGES[2]]
        after.release()

    def test_release_changes_nothing(self) -> None:
        for data in MESSAGES[:2]:
            self.deliver(data)
        drop = self.open()
        before = [(m.uid, m.size) for m in drop.messages]
        drop.release()
        again = self.open()
        assert [(m.uid, m.size) for m in again.messages] == before
        assert self.contents(again) == MESSAGES[:2]
        again.release()

    def test_uids_stable_across_sessions(self) -> None:
        self.deliver(MESSAGES[0])
        first = self.open()
        uid0 = first.messages[0].uid
        first.release()
        self.deliver(MESSAGES[1])
        second = self.open()
        assert second.messages[0].uid == uid0
        assert second.messages[1].uid != uid0
        second.release()

    def test_uids_never_reused_after_deletion(self) -> None:
        self.deliver(MESSAGES[0])
        self.deliver(MESSAGES[1])
        drop = self.open()
        old = {m.uid for m in drop.messages}
        assert self._tc().successResultOf(drop.commit([0, 1])) == 0
        self.deliver(MESSAGES[3])
        after = self.open()
        assert len(after.messages) == 1
        assert after.messages[0].uid not in old
        after.release()

    def test_each_recipient_gets_a_copy(self) -> None:
        self.deliver(MESSAGES[0], ALICE, BOB)
        for who in (ALICE, BOB):
            drop = self.open(who)
            assert self.contents(drop) == [MESSAGES[0]]
            drop.release()

    def test_abort_delivers_nothing(self) -> None:
        sink = self.store.open_delivery(Envelope(None, (ALICE,)))
        sink.write(b"Subject: x\n\nbody\n")
        sink.abort()
        drop = self.open()
        assert list(drop.messages) == []
        drop.release()


class MemoryStoreContractTests(MailStoreContract, unittest.TestCase):
    def make_store(self) -> IMailStore:
        return MemoryMailStore()


class MaildirStoreContractTests(MailStoreContract, unittest.TestCase):
    def make_store(self) -> IMailStore:
        return MaildirStore(temp_dir(self), run_sync, hostname="test.host")
