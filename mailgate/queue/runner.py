"""The queue runner: takes spooled entries through delivery attempts, retries and bounces.

One entry's attempt::

    incoming|deferred --rename--> active --deliver pending recipients--> record results
        --> bounce unnotified failures --> all done: remove | otherwise: deferred (backoff)

Results are written to the envelope (fsynced) before anything else happens, so a recipient
once recorded as ``sent`` is never tried again, whatever fails afterwards. All file work goes
through the spool's thread runner; the clock is injected.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgate.interfaces import IMailStore, IRelay
from mailgate.model import Address, Envelope
from mailgate.queue.bounce import FailedRecipient, build_dsn, header_block, status_from_reply
from mailgate.queue.spool import CorruptEntry, EntryNotFound, QueueEntry, Spool

__all__ = ["QueueRunner", "QueueSettings", "RecipientOutcome", "retry_delay"]

_log = Logger()

_HEADER_READ = 64 * 1024
_COPY_CHUNK = 64 * 1024


class RecipientOutcome(Protocol):
    """What an IRelay reports per recipient (the relay's RecipientResult has this shape)."""

    @property
    def recipient(self) -> Address: ...
    @property
    def status(self) -> str: ...  # "sent" | "temp" | "perm"
    @property
    def code(self) -> int: ...
    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class QueueSettings:
    """Retry schedule and limits (checklist 3: ``queue.lifetime`` 5 days)."""

    first_retry: float = 300.0
    max_retry: float = 3600.0
    lifetime: float = 5 * 86400.0
    max_concurrent: int = 10
    rescan_interval: float = 30.0
    #: Seconds after arrival at which a sender whose message is still deferred gets one
    #: "delayed" DSN (RFC 3464 Action: delayed); 0 never sends one, as Postfix's default.
    delay_warning: float = 0.0


def retry_delay(attempts: int, settings: QueueSettings) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: 5 min doubling to 1 h."""
    exponent = max(attempts - 1, 0)
    if exponent > 30:
        return settings.max_retry
    return float(min(settings.first_retry * (2**exponent), settings.max_retry))


class QueueRunner(Service):
    """Delivers what is in the spool, with bounded concurrency, retries and DSNs."""

    def __init__(
        self,
        spool: Spool,
        relay: IRelay,
        store: IMailStore,
        is_local: Callable[[Address], bool],
        clock: IReactorTime,
        hostname: str,
        settings: QueueSettings | None = None,
    ) -> None:
        self.spool = spool
        self.relay = relay
        self.store = store
        self.is_local = is_local
        self.clock = clock
        self.hostname = hostname
        self.settings = settings or QueueSettings()
        self._waiting: deque[tuple[str, str]] = deque()
        self._known: set[str] = set()  # waiting or in flight
        self._in_flight: dict[str, Deferred[Any]] = {}
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None
        self._scanning = False
        self._rescan_requested = False
        self._stopped = True
        self._recovered = False
        self._recovery_waiters: list[Deferred[None]] = []

    # -- service lifecycle -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopped = False
        self.spool.add_listener(self._new_entry)
        d = self.spool.call(self.spool.directory.recover)

        def recovered(count: int) -> None:
            if count:
                _log.info("queue: {count} interrupted entries back in incoming/", count=count)

        d.addCallbacks(recovered, lambda f: _log.failure("queue: recovery failed", f))
        d.addBoth(lambda _: self._recovery_done())

    def _recovery_done(self) -> Deferred[None]:
        waiters, self._recovery_waiters = self._recovery_waiters, []
        self._recovered = True
        for waiter in waiters:
            waiter.callback(None)
        return self.scan()

    def when_recovered(self) -> Deferred[None]:
        """Fires once start-up recovery (which empties tmp/) is over: other processes may
        write spool entries only after it (the multi-process master waits on this)."""
        d: Deferred[None] = Deferred()
        if self._recovered:
            d.callback(None)
        else:
            self._recovery_waiters.append(d)
        return d

    def stopService(self) -> Deferred[None] | None:
        self._stopped = True
        self.spool.remove_listener(self._new_entry)
        self._cancel_timer()
        self._waiting.clear()
        self._known = set(self._in_flight)
        super().stopService()  # type: ignore[no-untyped-call]
        return None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- scheduling ------------------------------------------------------------------

    def _new_entry(self, queue_id: str) -> None:
        if not self._stopped:
            self._enqueue("incoming", queue_id)

    def _enqueue(self, state: str, queue_id: str) -> None:
        if queue_id in self._known:
            return
        self._known.add(queue_id)
        self._waiting.append((state, queue_id))
        self._pump()

    def _pump(self) -> None:
        while (
            not self._stopped
            and self._waiting
            and len(self._in_flight) < self.settings.max_concurrent
        ):
            state, queue_id = self._waiting.popleft()
            attempt: Deferred[Any] = maybeDeferred(self._attempt, state, queue_id)
            self._in_flight[queue_id] = attempt
            attempt.addErrback(self._attempt_failed, queue_id)
            attempt.addBoth(self._attempt_done, queue_id)

    def _attempt_failed(self, failure: Failure, queue_id: str) -> None:
        _log.failure("queue {queue_id}: attempt failed", failure, queue_id=queue_id)

    def _attempt_done(self, _: object, queue_id: str) -> None:
        self._in_flight.pop(queue_id, None)
        self._known.discard(queue_id)
        self._pump()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _schedule(self, when: float) -> None:
        """Make sure a scan happens no later than ``when`` (and no later than the rescan)."""
        if self._stopped:
            return
        now = self.clock.seconds()
        when = max(min(when, now + self.settings.rescan_interval), now)
        if self._timer is not None and self._timer.active() and self._timer_at is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.clock.callLater(when - now, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = None
        self.scan()

    def _scan_blocking(self, now: float) -> tuple[list[str], list[str], float | None]:
        directory = self.spool.directory
        due: list[str] = []
        earliest: float | None = None
        for queue_id in directory.ids("deferred"):
            try:
                entry = directory.read_envelope("deferred", queue_id)
            except EntryNotFound:
                continue
            except CorruptEntry as e:
                directory.mark_corrupt("deferred", queue_id, str(e))
                continue
            if entry.next_attempt <= now:
                due.append(queue_id)
            elif earliest is None or entry.next_attempt < earliest:
                earliest = entry.next_attempt
        return directory.ids("incoming"), due, earliest

    def scan(self) -> Deferred[None]:
        """Look at incoming/ and deferred/ on disk; pick up what is due (also CLI changes)."""
        if self._stopped:
            return Deferred.fromCoroutine(_noop())
        if self._scanning:
            self._rescan_requested = True
            return Deferred.fromCoroutine(_noop())
        self._scanning = True
        d = self.spool.call(self._scan_blocking, self.clock.seconds())

        def scanned(result: tuple[list[str], list[str], float | None]) -> None:
            incoming, due, earliest = result
            for queue_id in incoming:
                self._enqueue("incoming", queue_id)
            for queue_id in due:
                self._enqueue("deferred", queue_id)
            self._schedule(earliest if earliest is not None else float("inf"))

        def finished(_: object) -> None:
            self._scanning = False
            if self._rescan_requested:
                self._rescan_requested = False
                self.scan()

        d.addCallbacks(scanned, lambda f: _log.failure("queue: scan failed", f))
        d.addBoth(finished)
        return d

    # -- one attempt -----------------------------------------------------------------

    def _take(self, state: str, queue_id: str) -> QueueEntry | None:
        """Blocking: move the entry to active/ and read it (corrupt ones go to corrupt/)."""
        directory = self.spool.directory
        try:
            directory.move(queue_id, state, "active")
        except EntryNotFound:
            return None  # deleted, held or taken meanwhile
        try:
            return directory.read_envelope("active", queue_id)
        except CorruptEntry as e:
            directory.mark_corrupt("active", queue_id, str(e))
            return None

    @inlineCallbacks
    def _attempt(self, state: str, queue_id: str) -> Any:
        spool = self.spool
        entry = yield spool.call(self._take, state, queue_id)
        if entry is None:
            return
        assert isinstance(entry, QueueEntry)
        pending = entry.pending
        if pending:
            yield self._deliver(entry, pending)
            entry.attempts += 1
            now = self.clock.seconds()
            if entry.pending and now - entry.created >= self.settings.lifetime:
                for r in entry.pending:
                    r.status = "failed"
                    detail = f" (last error: {r.code} {r.text})" if r.code else ""
                    r.text = f"4.4.7 message expired after {entry.attempts} attempts{detail}"
                    r.code = r.code if r.code and r.code >= 400 else 450
            if self._delay_warning_due(entry, now):
                try:
                    yield self._warn_delay(entry)
                except Exception:
                    # Not marked as warned: the next attempt tries again.
                    _log.failure(
                        "queue {queue_id}: could not create the delay DSN", queue_id=queue_id
                    )
                else:
                    # Recorded with the envelope write below; a crash in between sends
                    # the notice again after restart (as with bounces and `notified`).
                    entry.delay_warned = True
            yield spool.call(
                spool.directory.write_envelope, spool.directory.entry_dir("active", queue_id), entry
            )
        bounce_failed = False
        if any(r.status == "failed" and not r.notified for r in entry.recipients):
            try:
                yield self._bounce(entry)
            except Exception:
                # Keep the entry: the next attempt retries the DSN (recorded results stay).
                _log.failure("queue {queue_id}: could not create the DSN", queue_id=queue_id)
                bounce_failed = True
            else:
                yield spool.call(
                    spool.directory.write_envelope,
                    spool.directory.entry_dir("active", queue_id),
                    entry,
                )
        if entry.pending or bounce_failed:
            entry.next_attempt = self.clock.seconds() + retry_delay(entry.attempts, self.settings)
            yield spool.call(self._defer_blocking, entry)
            _log.info(
                "queue {queue_id}: deferred, {n} recipient(s) pending, next attempt in {delay}s",
                queue_id=queue_id,
                n=len(entry.pending),
                delay=round(entry.next_attempt - self.clock.seconds()),
            )
            self._schedule(entry.next_attempt)
        else:
            yield spool.call(spool.directory.remove, "active", queue_id)
            _log.info("queue {queue_id}: done", queue_id=queue_id)

    def _defer_blocking(self, entry: QueueEntry) -> None:
        directory = self.spool.directory
        directory.write_envelope(directory.entry_dir("active", entry.queue_id), entry)
        directory.move(entry.queue_id, "active", "deferred")

    @inlineCallbacks
    def _deliver(self, entry: QueueEntry, pending: Sequence[Any]) -> Any:
        """Try every pending recipient once and record the outcome on the entry."""
        directory = self.spool.directory
        queue_id = entry.queue_id

        def open_message() -> IO[bytes]:
            return directory.open_message("active", queue_id)

        local = [r for r in pending if self.is_local(r.address)]
        remote = [r for r in pending if not self.is_local(r.address)]
        if local:
            try:
                yield self._deliver_local(entry, [r.address for r in local])
            except Exception as e:
                _log.failure("queue {queue_id}: local delivery failed", queue_id=queue_id)
                for r in local:
                    r.code, r.text = 451, "4.3.0 local delivery failed"
                entry.last_error = f"local delivery: {type(e).__name__}"
            else:
                for r in local:
                    r.status, r.code, r.text = "sent", 250, "2.0.0 delivered locally"
        if not remote:
            return
        by_address = {r.address: r for r in remote}
        try:
            results = yield self.relay.deliver(
                entry.sender, [r.address for r in remote], open_message
            )
        except Exception:
            _log.failure("queue {queue_id}: relay failed", queue_id=queue_id)
            results = []
        seen: set[Address] = set()
        for result in results:
            state = by_address.get(result.recipient)
            if state is None or result.recipient in seen:
                continue
            seen.add(result.recipient)
            state.code = int(result.code)
            state.text = str(result.text)
            state.remote_mta = getattr(result, "remote_mta", None)
            if result.status == "sent":
                state.status = "sent"
            elif result.status == "perm":
                state.status = "failed"
            else:
                reply = f"{result.code} {result.text}" if result.code else result.text
                entry.last_error = f"<{result.recipient}>: {reply}"
        for address, state in by_address.items():
            if address not in seen:
                state.code, state.text = 451, "4.3.0 delivery attempt failed"
                entry.last_error = f"<{address}>: no result from relay"

    def _copy_blocking(self, queue_id: str, sink_write: Callable[[bytes], None]) -> None:
        with self.spool.directory.open_message("active", queue_id) as f:
            while chunk := f.read(_COPY_CHUNK):
                sink_write(chunk.replace(b"\r", b""))

    @inlineCallbacks
    def _deliver_local(self, entry: QueueEntry, recipients: list[Address]) -> Any:
        sink = self.store.open_delivery(Envelope(entry.sender, tuple(recipients)))
        chunks: list[bytes] = []
        try:
            yield self.spool.call(self._copy_blocking, entry.queue_id, chunks.append)
            for chunk in chunks:
                sink.write(chunk)
        except BaseException:
            sink.abort()
            raise
        yield sink.finish()

    def _read_headers_blocking(self, queue_id: str) -> bytes:
        with self.spool.directory.open_message("active", queue_id) as f:
            return header_block(f.read(_HEADER_READ))

    def _delay_warning_due(self, entry: QueueEntry, now: float) -> bool:
        after = self.settings.delay_warning
        return (
            after > 0
            and not entry.delay_warned
            and bool(entry.pending)
            and now - entry.created >= after
        )

    @inlineCallbacks
    def _warn_delay(self, entry: QueueEntry) -> Any:
        """One "delayed" DSN for the recipients still pending (never to a null sender)."""
        if entry.sender is None:
            return
        yield self._send_dsn(entry, entry.pending, "delayed")

    @inlineCallbacks
    def _bounce(self, entry: QueueEntry) -> Any:
        """Tell the sender about every failure not yet reported (one DSN per entry and run)."""
        failed = [r for r in entry.recipients if r.status == "failed" and not r.notified]
        if entry.sender is None:
            _log.warn(
                "queue {queue_id}: {n} recipient(s) failed for a null-sender message; "
                "no DSN is sent for it",
                queue_id=entry.queue_id,
                n=len(failed),
            )
        else:
            yield self._send_dsn(entry, failed, "failed")
        for r in failed:
            r.notified = True

    @inlineCallbacks
    def _send_dsn(self, entry: QueueEntry, recipients: Sequence[Any], action: str) -> Any:
        """Deliver a DSN about ``recipients`` to the entry's (non-null) sender."""
        assert entry.sender is not None
        try:
            headers = yield self.spool.call(self._read_headers_blocking, entry.queue_id)
        except Exception:
            headers = b""
        failures = []
        for r in recipients:
            status = status_from_reply(r.code, r.text)
            if action == "delayed" and not status.startswith("4."):
                status = "4.0.0"  # still being retried: transient by definition
            failures.append(
                FailedRecipient(
                    r.address,
                    status,
                    f"{r.code} {r.text}" if r.code else r.text,
                    r.remote_mta,
                    action,
                    # Retrying goes on until the first attempt after this time (as Postfix's
                    # maximal_queue_lifetime), so this is when the last retry is due.
                    entry.created + self.settings.lifetime if action == "delayed" else None,
                )
            )
        dsn = build_dsn(
            hostname=self.hostname,
            sender=entry.sender,
            failures=failures,
            original_headers=headers,
            arrival=entry.created,
            now=self.clock.seconds(),
            queue_id=entry.queue_id,
        )
        envelope = Envelope(None, (entry.sender,))
        if self.is_local(entry.sender):
            sink = self.store.open_delivery(envelope)
        else:
            sink = self.spool.open_message(envelope)
        try:
            sink.write(dsn)
        except BaseException:
            sink.abort()
            raise
        dsn_id = yield sink.finish()
        _log.info(
            "queue {queue_id}: DSN {dsn_id} ({action}) for {n} recipient(s) sent to <{sender}>",
            queue_id=entry.queue_id,
            dsn_id=dsn_id,
            action=action,
            n=len(failures),
            sender=str(entry.sender),
        )


async def _noop() -> None:
    return None
