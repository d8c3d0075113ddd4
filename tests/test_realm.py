"""The realm's submission rights and the routing of recipients."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mailgate.errors import RelayDenied, SenderNotOwned, UnknownRecipient
from mailgate.model import Address, Envelope
from mailgate.queue.spool import Spool
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


def send(
    r: MailRealm, data: bytes | None, rcpts: tuple[Address, ...] = (BOB, REMOTE)
) -> tuple[Any, list[str], list[object]]:
    """Submit as alice; the sink, its results and its failures (one of them gets filled)."""
    sink = r.submission_for(ALICE).open_message(Envelope(ALICE, rcpts))
    if data is not None:
        sink.write(data)
    results: list[str] = []
    failures: list[object] = []
    sink.finish().addCallbacks(results.append, failures.append)
    return sink, results, failures


def test_mixed_recipients_go_to_mailbox_and_spool() -> None:
    queue = MemoryQueue()
    r, store = realm(queue)
    sink, results, _ = send(r, b"Subject: x\n\nhi\n", (BOB, REMOTE, BOB))
    assert results == [sink.queue_id]
    assert [m.data for m in store.mailboxes[BOB]] == [b"Subject: x\n\nhi\n"]
    assert queue.queued == [(Envelope(ALICE, (REMOTE,)), b"Subject: x\n\nhi\n")]


def test_local_failure_aborts_the_spool_copy() -> None:
    queue = MemoryQueue()
    r, store = realm(queue)
    store.fail_deliveries = True
    _, _, failures = send(r, b"x\n")
    assert failures
    assert queue.queued == []


def test_spool_failure_is_reported() -> None:
    queue = MemoryQueue()
    queue.fail = True
    r, _ = realm(queue)
    _, _, failures = send(r, None)
    assert failures


def spool_realm(tmp_path: Path) -> tuple[MailRealm, MemoryMailStore, Spool]:
    from twisted.internet.defer import maybeDeferred
    from twisted.internet.task import Clock

    store = MemoryMailStore()
    users = MemoryUserDatabase({"alice@example.com": "a", "bob@example.com": "b"})
    spool = Spool(tmp_path / "spool", maybeDeferred, Clock())
    return MailRealm(store, users, ["example.com"], spool), store, spool


def leftovers(spool: Spool) -> list[str]:
    return os.listdir(spool.directory.root / "tmp")


def test_split_message_with_a_real_spool_lands_in_both(tmp_path: Path) -> None:
    r, store, spool = spool_realm(tmp_path)
    sink, results, _ = send(r, b"hi\n")
    assert results == [sink.queue_id]
    assert [m.data for m in store.mailboxes[BOB]] == [b"hi\n"]
    assert spool.directory.ids("incoming") == [sink.queue_id]
    assert leftovers(spool) == []


def test_spool_write_failure_delivers_no_local_copy(tmp_path: Path) -> None:
    """A retry after this failure must not give bob a second copy: so bob got none."""
    r, store, spool = spool_realm(tmp_path)

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    spool.directory._fsync = full_disk
    _, _, failures = send(r, b"hi\n")
    assert failures
    assert store.mailboxes.get(BOB, []) == []
    assert spool.directory.ids("incoming") == []
    assert leftovers(spool) == []


def test_local_failure_discards_the_prepared_spool_copy(tmp_path: Path) -> None:
    r, store, spool = spool_realm(tmp_path)
    store.fail_deliveries = True
    _, _, failures = send(r, b"hi\n")
    assert failures
    assert spool.directory.ids("incoming") == []
    assert leftovers(spool) == []
