"""The queue runner with a fake IRelay, a Clock and a synchronous thread runner."""

from __future__ import annotations

import email
import email.policy
import email.utils
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from mailgate.interfaces import IRelay
from mailgate.model import Address, Envelope
from mailgate.queue.runner import QueueRunner, QueueSettings, retry_delay
from mailgate.queue.spool import Spool
from mailgate.relay.client import RecipientResult
from mailgate.testing import MemoryMailStore

T = TypeVar("T")

ALICE = Address("alice", "example.com")  # local
BOB = Address("bob", "remote.example")
CAROL = Address("carol", "other.example")
MESSAGE = b"From: alice@example.com\nSubject: Lunch\n\n.starts with a dot\nbody\n"


def status_blocks(data: bytes) -> list[Any]:
    """The header blocks of a DSN's message/delivery-status part."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    blocks: Any = list(msg.get_payload())[1].get_payload()
    assert isinstance(blocks, list)
    return blocks


def run_now(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    return maybeDeferred(f, *args, **kwargs)


Script = Callable[[Address], tuple[str, int, str]]


@implementer(IRelay)
class FakeRelay:
    """Answers per recipient from a script; records what it was asked and the bytes it read."""

    def __init__(self) -> None:
        self.script: Script = lambda r: ("sent", 250, "2.0.0 ok")
        self.calls: list[tuple[Address | None, list[Address], bytes]] = []
        self.broken = False
        self.hold: Deferred[Sequence[Any]] | None = None

    def deliver(
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        open_message: Callable[[], IO[bytes]],
    ) -> Deferred[Sequence[Any]]:
        with open_message() as f:
            self.calls.append((sender, list(recipients), f.read()))
        if self.broken:
            return fail(ConnectionError("boom"))
        results = [RecipientResult(r, *self.script(r), "mx.remote.example") for r in recipients]
        if self.hold is not None:
            d, self.hold = self.hold, None
            d.addCallback(lambda _: results)
            return d
        return succeed(results)


class Harness:
    def __init__(self, root: Path, settings: QueueSettings | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.spool = Spool(root, run_now, self.clock)
        self.relay = FakeRelay()
        self.store = MemoryMailStore()
        self.runner = QueueRunner(
            self.spool,
            self.relay,
            self.store,
            lambda a: a.domain == "example.com",
            self.clock,
            "mx.example.com",
            settings or QueueSettings(),
        )

    def submit(
        self, sender: Address | None = ALICE, rcpts: tuple[Address, ...] = (BOB, CAROL)
    ) -> str:
        sink = self.spool.open_message(Envelope(sender, rcpts))
        sink.write(MESSAGE)
        out: list[str] = []
        sink.finish().addCallback(out.append)
        return out[0]

    def state(self, queue_id: str) -> str | None:
        return self.spool.directory.find(queue_id)

    def dsns_for(self, address: Address) -> list[bytes]:
        return [m.data for m in self.store.mailboxes.get(address, [])]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "spool")


def test_retry_schedule_doubles_to_an_hour() -> None:
    s = QueueSettings()
    assert [retry_delay(n, s) for n in range(1, 8)] == [300, 600, 1200, 2400, 3600, 3600, 3600]
    assert retry_delay(500, s) == 3600


def test_all_sent_removes_entry(h: Harness) -> None:
    h.runner.startService()
    queue_id = h.submit()
    assert len(h.relay.calls) == 1
    sender, rcpts, data = h.relay.calls[0]
    assert sender == ALICE and rcpts == [BOB, CAROL] and data == MESSAGE
    assert h.state(queue_id) is None
    assert h.store.delivered == []


def test_temp_failure_then_success_follows_backoff(h: Harness) -> None:
    h.relay.script = lambda r: ("temp", 451, "4.3.0 try later")
    h.runner.startService()
    queue_id = h.submit()
    assert h.state(queue_id) == "deferred"
    entry = h.spool.directory.read_envelope("deferred", queue_id)
    assert entry.attempts == 1
    assert entry.next_attempt == h.clock.seconds() + 300
    assert entry.last_error is not None and "451" in entry.last_error
    h.clock.advance(299)
    assert len(h.relay.calls) == 1, "retried before the 5 minute backoff"
    h.clock.advance(1)
    assert len(h.relay.calls) == 2
    entry = h.spool.directory.read_envelope("deferred", queue_id)
    assert entry.next_attempt == h.clock.seconds() + 600
    h.relay.script = lambda r: ("sent", 250, "ok")
    h.clock.advance(599)
    assert len(h.relay.calls) == 2
    h.clock.advance(1)
    assert len(h.relay.calls) == 3
    assert h.state(queue_id) is None
    assert h.store.delivered == []


def test_sent_recipient_is_never_retried(h: Harness) -> None:
    h.relay.script = lambda r: ("sent", 250, "ok") if r == BOB else ("temp", 451, "later")
    h.runner.startService()
    queue_id = h.submit()
    h.relay.broken = True  # next attempt: the relay blows up entirely
    h.clock.advance(300)
    h.relay.broken = False
    h.relay.script = lambda r: ("sent", 250, "ok")
    h.clock.advance(600)
    assert [c[1] for c in h.relay.calls] == [[BOB, CAROL], [CAROL], [CAROL]]
    assert h.state(queue_id) is None


def test_perm_failure_bounces_into_local_senders_mailbox(h: Harness) -> None:
    """D01 + D06: a DSN with MAIL FROM:<> lands in alice's mailbox."""
    h.relay.script = lambda r: (
        ("perm", 550, "5.1.1 <bob@remote.example>: user unknown")
        if r == BOB
        else ("sent", 250, "ok")
    )
    h.runner.startService()
    queue_id = h.submit()
    assert h.state(queue_id) is None
    assert len(h.store.delivered) == 1
    envelope, data = h.store.delivered[0]
    assert envelope == Envelope(None, (ALICE,))
    assert b"\r" not in data
    status = status_blocks(data)
    rcpt = status[1]
    assert rcpt["Final-Recipient"] == "rfc822; bob@remote.example"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.example>: user unknown"
    assert rcpt["Remote-MTA"] == "dns; mx.remote.example"
    assert len(status) == 2, "only the failed recipient is reported"
    assert len(h.dsns_for(ALICE)) == 1


def test_remote_sender_gets_dsn_queued_with_null_sender(h: Harness) -> None:
    dave = Address("dave", "elsewhere.example")
    h.relay.script = lambda r: ("perm", 550, "5.1.1 no") if r != dave else ("sent", 250, "ok")
    h.runner.startService()
    h.submit(sender=dave, rcpts=(BOB,))
    # The DSN itself went through the queue to dave, with the null sender.
    assert h.relay.calls[-1][0] is None
    assert h.relay.calls[-1][1] == [dave]
    assert b"multipart/report" in h.relay.calls[-1][2]
    assert h.spool.directory.counts()["deferred"] == 0


def test_null_sender_failure_makes_no_dsn(h: Harness) -> None:
    """D02/D05: a bounce (null sender) that fails is dropped, never bounced."""
    h.relay.script = lambda r: ("perm", 550, "5.1.1 no")
    h.runner.startService()
    queue_id = h.submit(sender=None, rcpts=(BOB,))
    assert h.state(queue_id) is None
    assert len(h.relay.calls) == 1
    assert h.store.delivered == []
    assert sum(h.spool.directory.counts().values()) == 0


def test_lifetime_expiry_bounces_remaining(tmp_path: Path) -> None:
    """D03: a remote answering 4xx until the lifetime passes gets Action: failed."""
    h = Harness(tmp_path / "spool", QueueSettings(lifetime=3000))
    h.relay.script = lambda r: ("temp", 451, "4.7.1 greylisted")
    h.runner.startService()
    queue_id = h.submit(rcpts=(BOB,))
    for _ in range(20):
        h.clock.advance(300)
    assert h.state(queue_id) is None
    attempts = len(h.relay.calls)
    assert 3 <= attempts <= 6
    [dsn] = h.dsns_for(ALICE)
    status = status_blocks(dsn)
    assert status[1]["Action"] == "failed"
    assert status[1]["Status"] == "4.4.7"
    assert "451" in status[1]["Diagnostic-Code"]
    h.clock.advance(10_000)
    assert len(h.relay.calls) == attempts


def test_delay_warning_sent_once_then_final_bounce(tmp_path: Path) -> None:
    """[queue] delay_warning: one "Action: delayed" DSN once the message is that old and
    still pending; later attempts send no second one; expiry still bounces."""
    h = Harness(tmp_path / "spool", QueueSettings(delay_warning=1000, lifetime=4000))
    h.relay.script = lambda r: ("temp", 451, "4.7.1 greylisted")
    h.runner.startService()
    queue_id = h.submit(rcpts=(BOB,))
    h.clock.advance(300)  # second attempt, 300 s old
    h.clock.advance(600)  # third attempt, 900 s old: not yet
    assert h.dsns_for(ALICE) == []
    h.clock.advance(1200)  # fourth attempt, 2100 s old
    [warning] = h.dsns_for(ALICE)
    msg = email.message_from_bytes(warning, policy=email.policy.default)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    status = status_blocks(warning)
    assert status[1]["Action"] == "delayed"
    assert status[1]["Status"] == "4.7.1"
    assert "451" in status[1]["Diagnostic-Code"]
    entry = h.spool.directory.read_envelope("deferred", queue_id)
    until = email.utils.parsedate_to_datetime(status[1]["Will-Retry-Until"]).timestamp()
    assert abs(until - (entry.created + 4000)) < 1  # arrival + lifetime
    assert entry.delay_warned
    for _ in range(10):
        h.clock.advance(3600)
    assert h.state(queue_id) is None
    warning_again, final = h.dsns_for(ALICE)
    assert warning_again == warning
    assert status_blocks(final)[1]["Action"] == "failed"
    assert "Will-Retry-Until" not in status_blocks(final)[1]


def test_delay_warning_off_by_default_and_never_to_null_sender(tmp_path: Path) -> None:
    for settings, sender in ((QueueSettings(), ALICE), (QueueSettings(delay_warning=60), None)):
        h = Harness(tmp_path / f"spool-{sender}", settings)
        h.relay.script = lambda r: ("temp", 451, "4.3.0 later")
        h.runner.startService()
        queue_id = h.submit(sender=sender, rcpts=(BOB,))
        for _ in range(5):
            h.clock.advance(3600)
        assert h.state(queue_id) == "deferred"
        assert h.store.delivered == []
        assert len(h.relay.calls) == 6  # nothing but the message itself went out


def test_delay_warning_that_fails_is_tried_again(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", QueueSettings(delay_warning=60))
    h.relay.script = lambda r: ("temp", 451, "4.3.0 later")
    h.runner.startService()
    queue_id = h.submit(rcpts=(BOB,))
    h.store.fail_next = True  # type: ignore[attr-defined]
    broken = h.store.open_delivery

    def failing(envelope: Envelope) -> Any:
        if getattr(h.store, "fail_next", False):
            h.store.fail_next = False  # type: ignore[attr-defined]
            raise OSError("disk full")
        return broken(envelope)

    h.store.open_delivery = failing  # type: ignore[method-assign]
    h.clock.advance(300)
    assert h.dsns_for(ALICE) == []
    assert not h.spool.directory.read_envelope("deferred", queue_id).delay_warned
    h.clock.advance(600)
    assert len(h.dsns_for(ALICE)) == 1


def test_relay_crash_defers_without_losing(h: Harness) -> None:
    h.relay.broken = True
    h.runner.startService()
    queue_id = h.submit()
    assert h.state(queue_id) == "deferred"
    entry = h.spool.directory.read_envelope("deferred", queue_id)
    assert [r.status for r in entry.recipients] == ["pending", "pending"]


def test_local_recipient_in_spool_delivered_to_store(h: Harness) -> None:
    h.runner.startService()
    h.submit(sender=BOB, rcpts=(ALICE, CAROL))
    assert h.relay.calls[0][1] == [CAROL]
    assert h.dsns_for(ALICE) == [MESSAGE]


def test_bounded_concurrency(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", QueueSettings(max_concurrent=2))
    holds: list[Deferred[Sequence[Any]]] = []
    relay = h.relay
    original = relay.deliver

    def slow(
        sender: Address | None, rcpts: Sequence[Address], open_message: Callable[[], IO[bytes]]
    ) -> Deferred[Sequence[Any]]:
        d: Deferred[Sequence[Any]] = Deferred()
        holds.append(d)
        relay.hold = d
        return original(sender, rcpts, open_message)

    relay.deliver = slow  # type: ignore[method-assign,assignment]
    h.runner.startService()
    ids = [h.submit(rcpts=(BOB,)) for _ in range(5)]
    assert h.runner.in_flight == 2
    assert len(holds) == 2
    holds[0].callback([])
    assert len(holds) == 3
    while len([d for d in holds if not d.called]):
        next(d for d in holds if not d.called).callback([])
    assert len(holds) == 5
    assert all(h.state(i) is None for i in ids)


def test_restart_resumes_interrupted_and_cli_changes(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool")
    h.relay.script = lambda r: ("temp", 451, "later")
    queue_id = h.submit(rcpts=(BOB,))  # runner not started: stays in incoming
    h.spool.directory.move(queue_id, "incoming", "active")  # "crashed mid-delivery"
    h.relay.script = lambda r: ("sent", 250, "ok")
    h.runner.startService()
    assert h.state(queue_id) is None
    assert len(h.relay.calls) == 1
    # An entry released by the CLI (directly on disk) is noticed by the rescan timer.
    h.relay.script = lambda r: ("temp", 451, "later")
    other = h.submit(rcpts=(BOB,))
    h.spool.directory.move(other, "deferred", "hold")
    h.spool.directory.release(other)
    h.relay.script = lambda r: ("sent", 250, "ok")
    h.clock.advance(30)
    assert h.state(other) is None


def test_corrupt_entry_moved_aside_runner_continues(h: Harness) -> None:
    bad = h.submit()
    (h.spool.directory.root / "incoming" / bad / "envelope.json").write_text("][")
    good = h.submit()
    h.runner.startService()
    assert h.state(bad) == "corrupt"
    assert h.state(good) is None


def test_dsn_failure_keeps_entry_for_retry(h: Harness) -> None:
    h.relay.script = lambda r: ("perm", 550, "5.1.1 no")
    h.store.fail_deliveries = True
    h.runner.startService()
    queue_id = h.submit(rcpts=(BOB,))
    assert h.state(queue_id) == "deferred"
    h.store.fail_deliveries = False
    h.clock.advance(300)
    assert h.state(queue_id) is None
    assert len(h.dsns_for(ALICE)) == 1
    assert len(h.relay.calls) == 1, "a failed recipient is not tried again"
