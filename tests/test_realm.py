"""The realm's submission rights and the routing of recipients."""

from __future__ import annotations

import pytest

from mailgate.errors import RelayDenied, SenderNotOwned, UnknownRecipient
from mailgate.model import Address, Envelope
from mailgate.realm import MailRealm
from mailgate.testing import MemoryMailStore, MemoryQueue, MemoryUserDatabase

ALICE = Address("alice", "example.com")
BOB = Address("bob", "example.com")
REMOTE = Address("carol", "remote.example")


def realm(queue: MemoryQueue | None = None) -> tuple[MailRealm, MemoryMailStore]:
    store = MemoryMailStore()
    users = MemoryUserDatabase({"alice@example.com": "a", "bob@example.com": "b"})
    return MailRealm(store, users, ["example.com"], queue), store


def test_sender_must_be_own_address() -> None:
    sub = realm()[0].submission_for(ALICE)
    sub.check_sender(ALICE)
    sub.check_sender(Address("ALICE", "Example.com".lower()))
    sub.check_sender(None)
    with pytest.raises(SenderNotOwned):
        sub.check_sender(BOB)


def test_remote_recipients_need_a_queue() -> None:
    sub = realm()[0].submission_for(ALICE)
    with pytest.raises(RelayDenied):
        sub.check_recipient(REMOTE)
    with pytest.raises(UnknownRecipient):
        sub.check_recipient(Address("nobody", "example.com"))
    realm(MemoryQueue())[0].submission_for(ALICE).check_recipient(REMOTE)


def test_mixed_recipients_go_to_mailbox_and_spool() -> None:
    queue = MemoryQueue()
    r, store = realm(queue)
    sink = r.submission_for(ALICE).open_message(Envelope(ALICE, (BOB, REMOTE, BOB)))
    sink.write(b"Subject: x\n\nhi\n")
    results: list[str] = []
    sink.finish().addCallback(results.append)
    assert results == [sink.queue_id]
    assert [m.data for m in store.mailboxes[BOB]] == [b"Subject: x\n\nhi\n"]
    assert queue.queued == [(Envelope(ALICE, (REMOTE,)), b"Subject: x\n\nhi\n")]


def test_local_failure_aborts_the_spool_copy() -> None:
    queue = MemoryQueue()
    r, store = realm(queue)
    store.fail_deliveries = True
    sink = r.submission_for(ALICE).open_message(Envelope(ALICE, (BOB, REMOTE)))
    sink.write(b"x\n")
    failures: list[object] = []
    sink.finish().addErrback(failures.append)
    assert failures
    assert queue.queued == []


def test_spool_failure_is_reported() -> None:
    queue = MemoryQueue()
    queue.fail = True
    r, _ = realm(queue)
    sink = r.submission_for(ALICE).open_message(Envelope(ALICE, (BOB, REMOTE)))
    failures: list[object] = []
    sink.finish().addErrback(failures.append)
    assert failures
