"""The durable spool: entry creation, fsync before acknowledgement, state moves, recovery."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from mailgate.model import Address, Envelope
from mailgate.queue.spool import (
    QUEUE_STATES,
    CorruptEntry,
    EntryNotFound,
    QueueEntry,
    Spool,
    SpoolDirectory,
    is_queue_id,
)

T = TypeVar("T")

ALICE = Address("alice", "example.com")
BOB = Address("bob", "remote.example")
CAROL = Address("carol", "other.example")


def run_now(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    return maybeDeferred(f, *args, **kwargs)


def result_of(d: Deferred[T]) -> T:
    out: list[T] = []
    d.addCallback(out.append)
    assert out, "deferred did not fire synchronously"
    return out[0]


def spooled(
    spool: Spool,
    data: bytes = b"Subject: hi\n\nbody\n",
    sender: Address | None = ALICE,
    rcpts: tuple[Address, ...] = (BOB, CAROL),
) -> str:
    sink = spool.open_message(Envelope(sender, rcpts))
    sink.write(data)
    return result_of(sink.finish())


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    clock = Clock()
    clock.advance(1_700_000_000)
    return Spool(tmp_path / "spool", run_now, clock)


def test_layout_created(spool: Spool) -> None:
    for state in (*QUEUE_STATES, "tmp"):
        assert (spool.directory.root / state).is_dir()


def test_finish_lands_in_incoming_with_json_envelope(spool: Spool) -> None:
    seen: list[str] = []
    spool.add_listener(seen.append)
    queue_id = spooled(spool)
    assert seen == [queue_id]
    assert is_queue_id(queue_id)
    entry_dir = spool.directory.root / "incoming" / queue_id
    assert (entry_dir / "message").read_bytes() == b"Subject: hi\n\nbody\n"
    data = json.loads((entry_dir / "envelope.json").read_text())
    assert data["sender"] == "alice@example.com"
    assert [r["address"] for r in data["recipients"]] == [
        "bob@remote.example",
        "carol@other.example",
    ]
    assert all(r["status"] == "pending" for r in data["recipients"])
    assert data["attempts"] == 0
    assert data["created"] == 1_700_000_000
    assert os.listdir(spool.directory.root / "tmp") == []


def test_null_sender_round_trips(spool: Spool) -> None:
    queue_id = spooled(spool, sender=None)
    entry = spool.directory.read_envelope("incoming", queue_id)
    assert entry.sender is None
    assert [r.address for r in entry.recipients] == [BOB, CAROL]


def test_nothing_visible_and_nothing_acknowledged_before_fsync(tmp_path: Path) -> None:
    """finish() fires only after the thread work (fsync + rename) completed."""
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    held: list[Deferred[Any]] = []

    def later(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        calls.append((f, args))
        held.append(d)
        return d

    spool = Spool(tmp_path / "spool", later, Clock())
    synced: list[int] = []
    spool.directory._fsync = synced.append
    sink = spool.open_message(Envelope(ALICE, (BOB,)))
    sink.write(b"x\n")
    fired: list[str] = []
    sink.finish().addCallback(fired.append)
    assert fired == []
    assert spool.directory.ids("incoming") == []
    f, args = calls[0]
    f(*args)
    assert synced, "no fsync before acknowledgement"
    assert spool.directory.ids("incoming") == [sink.queue_id]
    held[0].callback(None)
    assert fired == [sink.queue_id]


def test_abort_removes_temp_files(spool: Spool) -> None:
    sink = spool.open_message(Envelope(ALICE, (BOB,)))
    sink.write(b"partial")
    sink.abort()
    assert os.listdir(spool.directory.root / "tmp") == []
    assert spool.directory.counts() == dict.fromkeys(QUEUE_STATES, 0)


def test_ids_are_unique(spool: Spool) -> None:
    ids = {spool.directory.new_id(5.0) for _ in range(200)}
    assert len(ids) == 200
    assert all(is_queue_id(i) and "/" not in i for i in ids)


def test_state_moves_and_admin_operations(spool: Spool) -> None:
    d = spool.directory
    queue_id = spooled(spool)
    d.hold(queue_id)
    assert d.find(queue_id) == "hold"
    with pytest.raises(EntryNotFound):
        d.retry(queue_id)  # not deferred
    d.release(queue_id)
    assert d.find(queue_id) == "incoming"
    d.move(queue_id, "incoming", "deferred")
    d.retry(queue_id)
    assert d.find(queue_id) == "incoming"
    d.move(queue_id, "incoming", "deferred")
    other = spooled(spool)
    d.move(other, "incoming", "deferred")
    assert d.flush() == 2
    assert sorted(d.ids("incoming")) == sorted([queue_id, other])
    d.delete(queue_id)
    assert d.find(queue_id) is None
    assert not (d.root / "incoming" / queue_id).exists()
    with pytest.raises(EntryNotFound):
        d.delete(queue_id)
    with pytest.raises(EntryNotFound):
        d.hold("../../etc")


def test_restart_recovers_active_and_drops_unfinished(tmp_path: Path) -> None:
    clock = Clock()
    spool = Spool(tmp_path / "spool", run_now, clock)
    queue_id = spooled(spool)
    spool.directory.move(queue_id, "incoming", "active")
    entry = spool.directory.read_envelope("active", queue_id)
    entry.recipients[0].status = "sent"
    spool.directory.write_envelope(spool.directory.entry_dir("active", queue_id), entry)
    unfinished = spool.open_message(Envelope(ALICE, (BOB,)))
    unfinished.write(b"never finished")
    # "restart": a new Spool over the same directory
    again = Spool(tmp_path / "spool", run_now, Clock())
    assert again.directory.recover() == 1
    assert again.directory.ids("active") == []
    assert again.directory.ids("incoming") == [queue_id]
    assert os.listdir(again.directory.root / "tmp") == []
    recovered = again.directory.read_envelope("incoming", queue_id)
    assert [r.status for r in recovered.recipients] == ["sent", "pending"]


@pytest.mark.parametrize(
    "damage",
    ["bad-json", "no-message", "wrong-shape"],
)
def test_corrupt_entries_detected(spool: Spool, damage: str) -> None:
    queue_id = spooled(spool)
    entry_dir = spool.directory.root / "incoming" / queue_id
    if damage == "bad-json":
        (entry_dir / "envelope.json").write_text("{not json")
    elif damage == "no-message":
        (entry_dir / "message").unlink()
    else:
        (entry_dir / "envelope.json").write_text(json.dumps({"version": 1, "recipients": 3}))
    with pytest.raises(CorruptEntry):
        spool.directory.read_envelope("incoming", queue_id)
    spool.directory.mark_corrupt("incoming", queue_id, "test")
    assert spool.directory.find(queue_id) == "corrupt"


def test_envelope_json_has_no_pickle_and_is_plain(spool: Spool) -> None:
    queue_id = spooled(spool)
    raw = (spool.directory.root / "incoming" / queue_id / "envelope.json").read_bytes()
    data = json.loads(raw)
    assert QueueEntry.from_json(queue_id, data).to_json() == data


def test_directory_usable_without_reactor(tmp_path: Path) -> None:
    d = SpoolDirectory(tmp_path / "spool")
    d.ensure()
    assert d.counts() == dict.fromkeys(QUEUE_STATES, 0)
