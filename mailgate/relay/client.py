"""The outbound SMTP client and the IRelay that routes spooled mail to the next hop.

:class:`SmtpClientProtocol` runs one transaction on one connection. It is written on
LineReceiver rather than twisted.mail.smtp's clients, whose transformChunk misses dot-stuffing
of the first line and of lines at chunk boundaries (checklist 4.11): the body is streamed from
the spool file through :class:`~mailgate.wire.WireEncoder`. Replies are matched to commands
through a queue of expected phases (so PIPELINING is the same code path) and dispatched by a
phase -> handler table. Every outcome is per recipient; a broken connection makes every
recipient without a final answer a temporary failure (never "sent" unless the server said
so after the final dot).
"""

from __future__ import annotations

import base64
import enum
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, clientFromString
from twisted.internet.interfaces import (
    IDelayedCall,
    IPullProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.errors import DeliveryError
from mailgate.interfaces import IRelay, ThreadRunner
from mailgate.model import Address
from mailgate.relay.mx import MXResolver, mail_hosts
from mailgate.wire import WireEncoder

__all__ = [
    "TLS_POLICIES",
    "AttemptOutcome",
    "ClientTimeouts",
    "RecipientResult",
    "Reply",
    "SmtpClientProtocol",
    "SmtpRelay",
    "Transaction",
    "endpoint_host",
    "scan_message",
]

_log = Logger()

TLS_POLICIES = ("none", "opportunistic", "required")
_REPLY = re.compile(r"^([2-5][0-9][0-9])(?:([ -])(.*))?$")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's outcome: ``status`` is "sent", "temp" or "perm"."""

    recipient: Address
    status: str
    code: int
    text: str
    remote_mta: str | None = None


@dataclass(frozen=True)
class Reply:
    """One complete (possibly multi-line) SMTP reply; ``lines`` exclude the code."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(line.strip() for line in self.lines if line.strip())

    @property
    def status(self) -> str:
        if 200 <= self.code < 300:
            return "sent"
        return "perm" if self.code >= 500 else "temp"


@dataclass(frozen=True)
class ClientTimeouts:
    """RFC 5321 4.5.3.2 client timeouts, in seconds (checklist 4.10)."""

    greeting: float = 300.0
    command: float = 300.0  # EHLO, STARTTLS, AUTH, MAIL, RCPT
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 60.0


@dataclass(frozen=True)
class Transaction:
    """What to send: the message is opened (and read in chunks) only after DATA's 354."""

    sender: Address | None
    recipients: tuple[Address, ...]
    open_message: Callable[[], IO[bytes]]
    size: int | None = None
    eight_bit: bool = False


@dataclass
class AttemptOutcome:
    """Results of one connection; ``try_next`` when no transaction was reached there."""

    results: list[RecipientResult]
    try_next: bool = False


class Phase(enum.Enum):
    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    AUTH_USER = "AUTH LOGIN user"
    AUTH_PASS = "AUTH LOGIN password"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    DATA_END = "end of data"
    QUIT = "QUIT"


def scan_message(open_message: Callable[[], IO[bytes]]) -> tuple[int, bool]:
    """Blocking: the message's wire size (CRLF line ends) and whether it has 8-bit bytes."""
    encoder = WireEncoder(stuff=False)
    size = 0
    eight_bit = False
    with open_message() as f:
        while chunk := f.read(_CHUNK):
            if not eight_bit and any(b > 0x7F for b in chunk):
                eight_bit = True
            size += len(encoder.feed(chunk))
    return size + len(encoder.finish()), eight_bit


def _path(address: Address | None) -> str:
    return "<>" if address is None else f"<{address}>"


@implementer(IPullProducer)
class _BodySender:
    """Streams the message file through the dot-stuffing encoder, then ``.``CRLF."""

    def __init__(self, protocol: SmtpClientProtocol, file: IO[bytes]) -> None:
        self._protocol = protocol
        self._file: IO[bytes] | None = file
        self._encoder = WireEncoder(stuff=True)

    def resumeProducing(self) -> None:
        file = self._file
        transport: Any = self._protocol.transport
        if file is None or transport is None:
            return
        while True:
            try:
                chunk = file.read(_CHUNK)
            except OSError:
                self.stopProducing()
                self._protocol.body_failed()
                return
            if not chunk:
                self.stopProducing()
                transport.write(self._encoder.finish() + b".\r\n")
                transport.unregisterProducer()
                self._protocol.body_sent()
                return
            out = self._encoder.feed(chunk)
            if out:
                transport.write(out)
                self._protocol.body_progress()
                return

    def stopProducing(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SmtpClientProtocol(LineReceiver):
    """One SMTP client session delivering one :class:`Transaction`.

    :attr:`done` fires with the :class:`AttemptOutcome` when the connection has closed (after
    QUIT, a timeout or a failure), so nothing of the session outlives it.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 4096

    def __init__(
        self,
        *,
        ehlo_name: str,
        transaction: Transaction,
        clock: IReactorTime,
        remote_name: str,
        tls_policy: str = "opportunistic",
        tls_creator: Any = None,
        auth: tuple[str, str] | None = None,
        timeouts: ClientTimeouts | None = None,
    ) -> None:
        if tls_policy not in TLS_POLICIES:
            raise ValueError(f"unknown TLS policy {tls_policy!r}")
        self.ehlo_name = ehlo_name
        self.txn = transaction
        self.clock = clock
        self.remote_name = remote_name
        self.tls_policy = tls_policy
        self.tls_creator = tls_creator
        self.auth = auth
        self.timeouts = timeouts or ClientTimeouts()
        self.done: Deferred[AttemptOutcome] = Deferred()
        self.extensions: dict[str, str] = {}
        self.tls_active = False
        self._tls_started = False
        self._tls_declined = False
        self._authenticated = False
        self._expect: deque[Phase] = deque()
        self._pending_lines: list[str] = []
        self._timer: IDelayedCall | None = None
        self._results: dict[Address, RecipientResult] = {}
        self._accepted: list[Address] = []
        self._rcpt_index = 0
        self._mail_reply: Reply | None = None
        self._pipelining = False
        self._reached_transaction = False
        self._finished = False
        self._outcome: AttemptOutcome | None = None
        self._quitting = False
        self._sender: _BodySender | None = None
        self._handlers: dict[Phase, Callable[[Reply], None]] = {
            Phase.GREETING: self._on_greeting,
            Phase.EHLO: self._on_ehlo,
            Phase.HELO: self._on_helo,
            Phase.STARTTLS: self._on_starttls,
            Phase.AUTH: self._on_auth,
            Phase.AUTH_USER: self._on_auth_user,
            Phase.AUTH_PASS: self._on_auth_pass,
            Phase.MAIL: self._on_mail,
            Phase.RCPT: self._on_rcpt,
            Phase.DATA: self._on_data,
            Phase.DATA_END: self._on_data_end,
            Phase.QUIT: self._on_quit,
        }

    # -- plumbing --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._expect.append(Phase.GREETING)
        self._set_timeout(self.timeouts.greeting)

    def _abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _set_timeout(self, seconds: float) -> None:
        self._cancel_timeout()
        self._timer = self.clock.callLater(seconds, self._timed_out)

    def _cancel_timeout(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        waiting = self._expect[0].value if self._expect else "data"
        self._fail_remaining(0, f"4.4.2 timeout waiting for the reply to {waiting}")
        self._abort()

    def _send(self, lines: Sequence[str], phases: Sequence[Phase], timeout: float) -> None:
        """Send commands in ONE write and expect one reply per phase, in order."""
        self._expect.extend(phases)
        assert self.transport is not None
        self.transport.write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))
        self._set_timeout(timeout)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        m = _REPLY.match(text)
        if m is None or not self._expect:
            self._protocol_error("4.5.0 unexpected or malformed reply from server")
            return
        self._pending_lines.append(m.group(3) or "")
        if m.group(2) == "-":
            return
        reply = Reply(int(m.group(1)), tuple(self._pending_lines))
        self._pending_lines = []
        phase = self._expect.popleft()
        self._cancel_timeout()
        if self._expect:
            self._set_timeout(self.timeouts.command)
        self._handlers[phase](reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocol_error("4.5.0 reply line too long")

    def _protocol_error(self, text: str) -> None:
        self._fail_remaining(0, text)
        self._abort()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timeout()
        if self._sender is not None:
            self._sender.stopProducing()
            self._sender = None
        if self._tls_started and not self._reached_transaction:
            text = f"4.7.5 TLS negotiation with {self.remote_name} failed or was refused"
        else:
            text = f"4.4.2 lost connection with {self.remote_name}"
        self._fail_remaining(0, text)
        if not self.done.called and self._outcome is not None:
            self.done.callback(self._outcome)

    # -- results ---------------------------------------------------------------------

    def _result(self, rcpt: Address, status: str, code: int, text: str) -> None:
        if rcpt not in self._results:
            self._results[rcpt] = RecipientResult(rcpt, status, code, text, self.remote_name)

    def _fail_remaining(self, code: int, text: str, status: str = "temp") -> None:
        """Give every recipient without a final result this one, and report (once)."""
        for rcpt in self.txn.recipients:
            self._result(rcpt, status, code, text)
        self._finish()

    def _finish(self) -> None:
        """Freeze the outcome; :attr:`done` fires once the connection is closed."""
        if self._finished:
            return
        self._finished = True
        results = [self._results[r] for r in self.txn.recipients]
        self._outcome = AttemptOutcome(results, try_next=not self._reached_transaction)

    def _quit(self) -> None:
        """Results are known: say goodbye politely, but never wait long for it."""
        if self._quitting or self.transport is None:
            return
        self._quitting = True
        self._send(["QUIT"], [Phase.QUIT], self.timeouts.quit)

    def _give_up(self, code: int, text: str, status: str = "temp") -> None:
        self._fail_remaining(code, text, status)
        self._quit()

    def _on_quit(self, reply: Reply) -> None:
        self._cancel_timeout()
        if self.transport is not None:
            self.transport.loseConnection()

    # -- session setup ---------------------------------------------------------------

    def _on_greeting(self, reply: Reply) -> None:
        if reply.code != 220:
            self._give_up(reply.code, reply.text)
            return
        self._send([f"EHLO {self.ehlo_name}"], [Phase.EHLO], self.timeouts.command)

    def _on_ehlo(self, reply: Reply) -> None:
        if reply.code == 250:
            self.extensions = {}
            for line in reply.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params.strip()
            self._after_hello()
        elif reply.code >= 500 and not self.tls_active:
            self._send([f"HELO {self.ehlo_name}"], [Phase.HELO], self.timeouts.command)
        else:
            self._give_up(reply.code, reply.text)

    def _on_helo(self, reply: Reply) -> None:
        if reply.code != 250:
            self._give_up(reply.code, reply.text)
            return
        self.extensions = {}
        self._after_hello()

    def _after_hello(self) -> None:
        want_tls = self.tls_policy != "none" and not self.tls_active and not self._tls_declined
        if want_tls:
            if "STARTTLS" in self.extensions and self.tls_creator is not None:
                self._send(["STARTTLS"], [Phase.STARTTLS], self.timeouts.command)
                return
            if self.tls_policy == "required":
                self._give_up(0, f"4.7.4 TLS is required but {self.remote_name} does not offer it")
                return
        if self.auth is not None and not self._authenticated:
            self._start_auth()
            return
        self._start_transaction()

    def _on_starttls(self, reply: Reply) -> None:
        if reply.code != 220:
            if self.tls_policy == "required":
                self._give_up(reply.code, reply.text)
                return
            self._tls_declined = True
            self._after_hello()
            return
        # Nothing the server sent in plaintext after 220 may be taken as a reply.
        self.clearLineBuffer()  # type: ignore[no-untyped-call]
        self._pending_lines = []
        assert self.transport is not None
        self._tls_started = True
        self.transport.startTLS(self.tls_creator)  # type: ignore[attr-defined]
        self.tls_active = True
        self.extensions = {}
        self._send([f"EHLO {self.ehlo_name}"], [Phase.EHLO], self.timeouts.command)

    def _start_auth(self) -> None:
        assert self.auth is not None
        if not self.tls_active and self.tls_policy != "none":
            self._give_up(0, "4.7.0 not sending credentials over an unencrypted connection")
            return
        mechanisms = {m.upper() for m in self.extensions.get("AUTH", "").split()}
        user, password = self.auth
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            self._send([f"AUTH PLAIN {token}"], [Phase.AUTH], self.timeouts.command)
        elif "LOGIN" in mechanisms:
            self._send(["AUTH LOGIN"], [Phase.AUTH_USER], self.timeouts.command)
        else:
            self._give_up(0, f"4.7.0 {self.remote_name} offers no usable AUTH mechanism")

    def _on_auth_user(self, reply: Reply) -> None:
        if reply.code != 334 or self.auth is None:
            self._on_auth(reply)
            return
        token = base64.b64encode(self.auth[0].encode()).decode("ascii")
        self._send([token], [Phase.AUTH_PASS], self.timeouts.command)

    def _on_auth_pass(self, reply: Reply) -> None:
        if reply.code != 334 or self.auth is None:
            self._on_auth(reply)
            return
        token = base64.b64encode(self.auth[1].encode()).decode("ascii")
        self._send([token], [Phase.AUTH], self.timeouts.command)

    def _on_auth(self, reply: Reply) -> None:
        if reply.code == 235:
            self._authenticated = True
            self._start_transaction()
            return
        # Never bounce mail for our own credential problem: it is temporary for the sender.
        self._give_up(0, f"4.7.0 authentication failed: {reply.code} {reply.text}")

    # -- the mail transaction ------------------------------------------------------------

    def _start_transaction(self) -> None:
        mail = f"MAIL FROM:{_path(self.txn.sender)}"
        if "SIZE" in self.extensions and self.txn.size is not None:
            mail += f" SIZE={self.txn.size}"
        if self.txn.eight_bit and "8BITMIME" in self.extensions:
            mail += " BODY=8BITMIME"
        self._pipelining = "PIPELINING" in self.extensions
        if self._pipelining:
            rcpts = [f"RCPT TO:{_path(r)}" for r in self.txn.recipients]
            self._send(
                [mail, *rcpts],
                [Phase.MAIL] + [Phase.RCPT] * len(rcpts),
                self.timeouts.command,
            )
        else:
            self._send([mail], [Phase.MAIL], self.timeouts.command)

    def _on_mail(self, reply: Reply) -> None:
        self._reached_transaction = True
        if reply.code != 250:
            self._mail_reply = reply
            if not self._pipelining:
                self._give_up(reply.code, reply.text, reply.status)
            return
        if not self._pipelining:
            self._send_rcpt()

    def _send_rcpt(self) -> None:
        rcpt = self.txn.recipients[self._rcpt_index]
        self._send([f"RCPT TO:{_path(rcpt)}"], [Phase.RCPT], self.timeouts.command)

    def _on_rcpt(self, reply: Reply) -> None:
        rcpt = self.txn.recipients[self._rcpt_index]
        self._rcpt_index += 1
        if self._mail_reply is None:
            if reply.code in (250, 251):
                self._accepted.append(rcpt)
            else:
                self._result(rcpt, "perm" if reply.code >= 500 else "temp", reply.code, reply.text)
        if self._rcpt_index < len(self.txn.recipients):
            if not self._pipelining:
                self._send_rcpt()
            return
        if self._mail_reply is not None:
            m = self._mail_reply
            self._give_up(m.code, m.text, m.status)
        elif self._accepted:
            self._send(["DATA"], [Phase.DATA], self.timeouts.data_init)
        else:
            self._finish()
            self._quit()

    def _on_data(self, reply: Reply) -> None:
        if reply.code != 354:
            self._give_up(reply.code, reply.text, reply.status if reply.code >= 400 else "temp")
            return
        try:
            file = self.txn.open_message()
        except OSError:
            _log.failure("relay: cannot open the spooled message")
            self._fail_remaining(0, "4.3.0 local error reading the message")
            self._abort()
            return
        self._sender = _BodySender(self, file)
        self._set_timeout(self.timeouts.data_block)
        transport: Any = self.transport
        transport.registerProducer(self._sender, False)

    def body_progress(self) -> None:
        self._set_timeout(self.timeouts.data_block)

    def body_sent(self) -> None:
        self._sender = None
        self._expect.append(Phase.DATA_END)
        self._set_timeout(self.timeouts.data_end)

    def body_failed(self) -> None:
        self._sender = None
        self._fail_remaining(0, "4.3.0 local error reading the message")
        self._abort()

    def _on_data_end(self, reply: Reply) -> None:
        status = reply.status
        for rcpt in self._accepted:
            self._result(rcpt, status, reply.code, reply.text)
        self._finish()
        self._quit()


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], SmtpClientProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> SmtpClientProtocol:
        return self._build()


def endpoint_host(description: str) -> str | None:
    """The host named in a client endpoint string like ``tcp:mail.example:587``."""
    parts = re.split(r"(?<!\\):", description)
    positional = [p for p in parts[1:] if "=" not in p]
    for p in parts[1:]:
        key, sep, value = p.partition("=")
        if sep and key == "host":
            return value.replace("\\:", ":")
    return positional[0].replace("\\:", ":") if positional else None


@implementer(IRelay)
class SmtpRelay:
    """Delivers to a smarthost, or per recipient domain to its MX hosts in preference order.

    TLS policy: ``none`` never starts TLS; ``opportunistic`` uses STARTTLS when offered
    (encryption without certificate verification, like Postfix ``may``); ``required``
    insists on STARTTLS with a certificate verified for the host name against ``ca_file``
    (or the platform's trust store).
    """

    def __init__(
        self,
        reactor: Any,
        hostname: str,
        smarthost: str | None = None,
        tls: str = "opportunistic",
        ca_file: Path | None = None,
        auth: tuple[str, str] | None = None,
        resolver: MXResolver | None = None,
        *,
        mx_port: int = 25,
        timeouts: ClientTimeouts | None = None,
        run_in_thread: ThreadRunner | None = None,
    ) -> None:
        if tls not in TLS_POLICIES:
            raise ValueError(f"unknown TLS policy {tls!r}")
        self.reactor = reactor
        self.hostname = hostname
        self.smarthost = smarthost
        self.tls = tls
        self.auth = auth
        self.mx_port = mx_port
        self.timeouts = timeouts or ClientTimeouts()
        self._resolver = resolver
        self._trust: ssl.Certificate | None = (
            ssl.Certificate.loadPEM(Path(ca_file).read_bytes()) if ca_file is not None else None
        )
        self._run_in_thread = run_in_thread

    def _resolver_or_default(self) -> MXResolver:
        if self._resolver is None:
            from twisted.names import client

            self._resolver = client.Resolver(  # type: ignore[no-untyped-call]
                resolv="/etc/resolv.conf", reactor=self.reactor
            )
        return self._resolver

    def _tls_creator(self, host: str) -> Any:
        if self.tls == "none":
            return None
        if self.tls == "required":
            return ssl.optionsForClientTLS(host, trustRoot=self._trust)
        return ssl.CertificateOptions()

    def _scan(self, open_message: Callable[[], IO[bytes]]) -> Deferred[tuple[int, bool]]:
        if self._run_in_thread is not None:
            return self._run_in_thread(scan_message, open_message)
        from twisted.internet.threads import deferToThreadPool

        pool = self.reactor.getThreadPool()
        d: Deferred[tuple[int, bool]] = deferToThreadPool(
            self.reactor, pool, scan_message, open_message
        )
        return d

    @inlineCallbacks
    def deliver(
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        open_message: Callable[[], IO[bytes]],
    ) -> Any:
        """Fire with one :class:`RecipientResult` per recipient, in the given order."""
        recipients = list(dict.fromkeys(recipients))
        try:
            size, eight_bit = yield self._scan(open_message)
        except Exception:
            _log.failure("relay: cannot read the spooled message")
            return [
                RecipientResult(r, "temp", 0, "4.3.0 local error reading the message")
                for r in recipients
            ]
        groups: dict[str, list[Address]] = {}
        for r in recipients:
            groups.setdefault("" if self.smarthost else r.domain, []).append(r)
        batches = yield gatherResults(
            [
                self._deliver_group(domain, tuple(rcpts), sender, open_message, size, eight_bit)
                for domain, rcpts in groups.items()
            ]
        )
        by_rcpt = {res.recipient: res for batch in batches for res in batch}
        return [by_rcpt[r] for r in recipients]

    @inlineCallbacks
    def _deliver_group(
        self,
        domain: str,
        recipients: tuple[Address, ...],
        sender: Address | None,
        open_message: Callable[[], IO[bytes]],
        size: int,
        eight_bit: bool,
    ) -> Any:
        txn = Transaction(sender, recipients, open_message, size, eight_bit)
        hops: list[tuple[str, IStreamClientEndpoint]] = []
        if self.smarthost is not None:
            host = endpoint_host(self.smarthost) or self.smarthost
            hops.append((host, clientFromString(self.reactor, self.smarthost)))  # type: ignore[no-untyped-call]
        else:
            try:
                hosts = yield mail_hosts(self._resolver_or_default(), domain)
            except DeliveryError as e:
                code = 556 if "null MX" in e.text else (550 if e.permanent else 451)
                status = "perm" if e.permanent else "temp"
                return [RecipientResult(r, status, code, e.text) for r in recipients]
            for host in hosts:
                hops.append((host, HostnameEndpoint(self.reactor, host, self.mx_port)))
        outcome = AttemptOutcome([])
        for host, endpoint in hops:
            outcome = yield self._attempt(host, endpoint, txn)
            if not outcome.try_next:
                break
        return outcome.results

    def _attempt(
        self, host: str, endpoint: IStreamClientEndpoint, txn: Transaction
    ) -> Deferred[AttemptOutcome]:
        def build() -> SmtpClientProtocol:
            return SmtpClientProtocol(
                ehlo_name=self.hostname,
                transaction=txn,
                clock=self.reactor,
                remote_name=host,
                tls_policy=self.tls,
                tls_creator=self._tls_creator(host),
                auth=self.auth,
                timeouts=self.timeouts,
            )

        d = endpoint.connect(_ClientFactory(build))

        def connected(proto: Any) -> Deferred[AttemptOutcome]:
            assert isinstance(proto, SmtpClientProtocol)
            return proto.done

        def not_connected(f: Failure) -> AttemptOutcome:
            _log.info("relay: cannot connect to {host}: {why}", host=host, why=f.getErrorMessage())
            text = f"4.4.1 connection to {host} failed"
            return AttemptOutcome(
                [RecipientResult(r, "temp", 0, text, host) for r in txn.recipients], True
            )

        result: Deferred[AttemptOutcome] = d.addCallback(connected)
        return result.addErrback(not_connected)
