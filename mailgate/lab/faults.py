"""Fault injection for lab listeners: delay, fail or drop chosen client commands.

Rules (``mailgate.config.FaultRule``, from ``faults = [...]`` on a ``lab = true`` listener) match
the first word of a complete client *command* line. Lines of a SASL exchange and of a message
body (SMTP DATA, XTND XMIT) are never commands: the phase is tracked from the replies (see
:mod:`mailgate.lab.phase`), so a body line starting with ``QUIT`` is never matched.

Actions: ``delay`` holds the line (and every line after it, keeping order) for ``seconds``;
``error`` answers ``reply`` itself, in one write, and the protocol never sees the line;
``drop`` closes the connection without a reply. A rule fires always, on every Nth matching
command (``every``; the counter is per listener, so a retrying client sees the next attempt
succeed), or with a ``probability`` drawn from an injectable random source.

While rules are active the wrapper hands the protocol one command line at a time, so it can
stop at once when the protocol starts TLS: bytes pipelined after STLS/STARTTLS are discarded
here too, never delivered as if they came over TLS.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IProtocol, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from mailgate.config import FaultRule
from mailgate.lab.phase import Phase, PhaseTracker, verb_of

log = Logger()

#: A command line longer than this without CRLF is handed over as is (the protocol's own
#: line-length policy answers it).
MAX_LINE = 65536


class FaultPolicy:
    """A listener's rules with their counters, clock and random source."""

    def __init__(
        self,
        rules: Sequence[FaultRule],
        clock: IReactorTime,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.rules = tuple(rules)
        self.clock = clock
        self.random = random
        self.counts = [0] * len(self.rules)

    def decide(self, verb: str) -> FaultRule | None:
        """The rule that fires for this command, if any (counters advance on every match)."""
        fired: FaultRule | None = None
        for i, rule in enumerate(self.rules):
            if rule.command != verb:
                continue
            self.counts[i] += 1
            if fired is not None:
                continue
            if rule.every is not None:
                hit = self.counts[i] % rule.every == 0
            elif rule.probability is not None:
                hit = self.random() < rule.probability
            else:
                hit = True
            if hit:
                fired = rule
        return fired


class FaultProtocol(ProtocolWrapper):
    """Sits between the transport and the protocol, holding back or answering command lines."""

    factory: FaultFactory

    def __init__(self, factory: FaultFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._tracker = PhaseTracker()
        self._buffer = b""
        self._held: bytes | None = None  # a delayed command line, delivered when the timer fires
        self._timer: IDelayedCall | None = None
        self._paused = False
        self._dropped = False
        self._tls_switch = False
        self._pumping = False
        # The protocol's slowloris watchdog must see partial lines as they arrive, and this
        # layer holds them back until they are whole: feed it from here instead.
        self._line_watch: Any = getattr(wrappedProtocol, "line_watch", None)
        if self._line_watch is not None:
            self._line_watch.fed_in_front = True

    # -- client -> protocol ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._dropped:
            return
        if self._line_watch is not None:
            self._line_watch.received(data)
        self._buffer += data
        self._pump()

    def _blocked(self) -> bool:
        return (
            self._dropped or self._paused or self._timer is not None or self.wrappedProtocol is None
        )

    def _pump(self) -> None:
        if self._pumping:
            return  # re-entered from the protocol (e.g. resumeProducing): the loop goes on
        self._pumping = True
        try:
            self._pump_lines()
        finally:
            self._pumping = False

    def _pump_lines(self) -> None:
        batch: list[bytes] = []  # consecutive non-command lines go over in one call
        while not self._blocked():
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    batch.append(self._buffer)
                    self._buffer = b""
                break
            line, self._buffer = self._buffer[: end + 1], self._buffer[end + 1 :]
            phase = self._tracker.client_line(line)
            if phase is not Phase.COMMAND:
                batch.append(line)
                continue
            self._deliver(batch)
            batch = []
            rule = self.factory.policy.decide(verb_of(line))
            if rule is None:
                self._deliver([line])
            else:
                self._apply(rule, line)
        self._deliver(batch)

    def _deliver(self, lines: list[bytes]) -> None:
        if not lines or self.wrappedProtocol is None or self._dropped:
            return
        self.wrappedProtocol.dataReceived(b"".join(lines))
        if self._tls_switch:
            # Whatever followed the STLS/STARTTLS line arrived in plaintext: never obey it.
            self._tls_switch = False
            self._buffer = b""

    def _apply(self, rule: FaultRule, line: bytes) -> None:
        verb = rule.command
        log.info(
            "lab fault on {listener}: {action} {verb}",
            listener=self.factory.listener,
            action=rule.action,
            verb=verb,
        )
        self._note(action=rule.action, command=verb)
        if rule.action == "delay":
            self._held = line
            self._timer = self.factory.policy.clock.callLater(rule.seconds, self._release)
        elif rule.action == "error":
            self.write((rule.reply or "").encode("ascii") + b"\r\n")
        else:
            self._dropped = True
            self._buffer = b""
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _release(self) -> None:
        self._timer = None
        line, self._held = self._held, None
        if line is not None:
            self._deliver([line])
        self._pump()

    def _note(self, **details: str) -> None:
        note = getattr(self.transport, "note_event", None)
        if callable(note):
            note("fault", **details)

    # -- protocol -> transport ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._tracker.server_data(data)
        super().write(data)  # type: ignore[no-untyped-call]

    def writeSequence(self, data: Any) -> None:
        joined = b"".join(data)
        self._tracker.server_data(joined)
        super().write(joined)  # type: ignore[no-untyped-call]

    def startTLS(self, contextFactory: Any, *args: Any) -> None:
        self._tls_switch = True
        self._buffer = b""
        cast(Any, self.transport).startTLS(contextFactory, *args)

    def pauseProducing(self) -> None:
        self._paused = True
        cast(Any, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        cast(Any, self.transport).resumeProducing()
        self._pump()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._dropped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class FaultFactory(WrappingFactory[FaultProtocol]):
    """Wrap a lab listener's protocol factory with its fault rules.

    Apply it inside a :class:`~mailgate.lab.transcript.TranscriptFactory` (so injected replies
    are recorded) and inside ``TLSMemoryBIOFactory`` for implicit TLS.
    """

    noisy = False

    protocol = FaultProtocol

    def __init__(
        self, wrappedFactory: IProtocolFactory, policy: FaultPolicy, listener: str = ""
    ) -> None:
        super().__init__(wrappedFactory)  # type: ignore[no-untyped-call]
        self.policy = policy
        self.listener = listener
