"""The POP3 server protocol (RFC 1939, 2449, 2595, 3206, 5034) and its factory.

The protocol is a thin adapter: framing and formatting live in :mod:`._grammar`, logins go
only through the cred portal, and the mailbox is an opaque :class:`IMaildrop` avatar.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import IO, Any, cast

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import LoginFailed
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IOpenSSLServerConnectionCreator,
    IPullProducer,
    IReactorTime,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate import sasl
from mailgate.authlog import deferred_failure, failure_line
from mailgate.errors import MaildropInUse, MaildropUnavailable
from mailgate.headers import MAX_HEADER_BYTES, MAX_HEADER_LINES
from mailgate.interfaces import IAuthThrottle, IMaildrop, ISubmission, ThreadRunner
from mailgate.model import Address, MessageInfo
from mailgate.pop3._grammar import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    Command,
    LineFramer,
    Parsing,
    Pop3SyntaxError,
    ResponseCode,
    TopLimiter,
    capabilities,
    continuation,
    echo,
    err,
    multiline,
    ok,
    parse_command,
    parse_field_name,
    parse_line_count,
    parse_message_number,
    parse_xtnd,
)
from mailgate.pop3.xtnd import XmitPolicy, XmitReceiver, first_header_lines
from mailgate.session import (
    ClockedTimeout,
    PartialLineWatch,
    close_now,
    log_line,
    set_no_delay,
    write_now,
)
from mailgate.wire import WireEncoder

log = Logger()

PLAINTEXT_DISALLOWED = "Plaintext authentication disallowed on non-secure connection"
#: Bytes read from a message per producer step. The transport is resumed only once its
#: buffer is empty and sends at most 128 KiB (Twisted's SEND_LIMIT) per reactor turn, so a
#: chunk whose wire form (LF -> CRLF, typically +1-3 %) stays under 128 KiB costs one turn:
#: 96 KiB measured ~15 % more MB/s and less CPU per MB than 64 KiB; 128 KiB and up spill
#: a small remainder into a second turn (see benchmarks/README.md, "RETR streaming").
CHUNK_SIZE = 96 * 1024
#: Unprocessed input we buffer while busy before we stop reading from the socket.
MAX_BACKLOG = 65536


class _XlstReadError(Exception):
    """XTND XLST could not read message ``index`` (0-based)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _never(host: str) -> bool:
    return False


def _nobody() -> bool:
    return False


#: Seconds in a day, for EXPIRE.
DAY = 86400


@dataclass(frozen=True)
class Pop3Profile:
    """What one listener offers, so a lab can emulate an old or a picky server.

    A disabled command answers exactly like an unknown one and is not listed in CAPA. The
    defaults are mailgate's normal behaviour. ``apop`` and ``CRAM-MD5`` in ``sasl`` are
    further subject to some account having a plaintext-equivalent secret.
    """

    stls: bool = True
    apop: bool = True
    #: SASL mechanisms that may be offered (those unknown to mailgate.sasl are refused).
    sasl: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")
    user: bool = True
    top: bool = True
    uidl: bool = True
    pipelining: bool = True
    #: The XTND family (each subcommand is still switched by its own setting).
    xtnd: bool = True
    #: RFC 2449 response codes: off means no RESP-CODES/AUTH-RESP-CODE tags and no
    #: ``[CODE]`` in any reply.
    resp_codes: bool = True
    #: "normal", "strict" or "lenient" (see :class:`mailgate.pop3._grammar.Parsing`).
    parsing: str = "normal"

    #: :class:`Parsing` for ``parsing``.
    parsing_mode: Parsing = field(init=False, repr=False, compare=False)
    _offered: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = [m for m in self.sasl if m.upper() not in sasl.MECHANISMS]
        if unknown:
            raise ValueError(f"unknown SASL mechanism {unknown[0]!r}")
        # Derived once, not per connection (the profile is immutable).
        object.__setattr__(self, "parsing_mode", Parsing(self.parsing))  # ValueError if bad
        object.__setattr__(self, "_offered", frozenset(m.upper() for m in self.sasl))

    def offers_mechanism(self, name: str) -> bool:
        return name.upper() in self._offered


class LoginTimes:
    """When each account last logged in successfully, for LOGIN-DELAY (RFC 2449 6.8).

    Kept in memory, so it is per process: with several worker processes a client can log
    in once per process within the delay. Entries older than the longest delay asked for
    are pruned as logins come in, so memory stays bounded by the active accounts.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}

    def too_soon(self, account: str, delay: float) -> bool:
        last = self._last.get(account)
        return last is not None and self._clock.seconds() - last < delay

    def record(self, account: str, delay: float) -> None:
        now = self._clock.seconds()
        if len(self._last) > 1024:
            self._last = {a: t for a, t in self._last.items() if now - t < delay}
        self._last[account] = now


@dataclass(frozen=True)
class Pop3Settings:
    """Per-listener POP3 policy, built by the composition root from the configuration."""

    hostname: str
    #: Autologout after this many idle seconds (the config enforces the RFC 1939 floor).
    timeout: float = 600
    #: An IOpenSSLServerConnectionCreator / CertificateOptions, None when TLS is not set up.
    tls_context: object | None = None
    #: The listener is POP3S: TLS from the first byte, STLS never offered nor accepted.
    implicit_tls: bool = False
    #: Given the peer's IP, may cleartext logins (USER/PASS, PLAIN, LOGIN) be used without TLS?
    allow_plaintext: Callable[[str], bool] = _never
    #: Failed logins tolerated in one session before the connection is closed.
    max_failures: int = 3
    #: Shown in CAPA IMPLEMENTATION, after login only.
    implementation: str = "mailgate"
    #: XTND XMIT: send a message as the logged-in account (qpopper/Eudora "POP send").
    xtnd_xmit: bool = False
    #: Refuse XTND XMIT on a connection without TLS.
    xtnd_xmit_require_tls: bool = False
    #: List ``XTND XMIT`` in CAPA (TRANSACTION state only); qpopper never did.
    xtnd_advertise: bool = False
    #: XTND XLST header [n]: one header field of every (or one) message.
    xtnd_xlst: bool = False
    #: The domain given to bare recipient names in an XMIT message.
    default_domain: str = "localhost"
    #: XMIT message limits, with the same meaning as the SMTP submission settings.
    max_size: int = 26214400
    max_recipients: int = 100
    bare_newline: str = "normalize"
    long_lines: str = "reject"
    #: XMIT: refuse a From: address the account may not send as.
    enforce_from: bool = False
    max_header_lines: int = MAX_HEADER_LINES
    max_header_bytes: int = MAX_HEADER_BYTES
    #: What this listener offers (STLS, APOP, SASL mechanisms, TOP, UIDL, parsing...).
    profile: Pop3Profile = field(default_factory=Pop3Profile)
    #: Asked once per connection: may APOP succeed for some account (a clear secret is
    #: stored)? Only then does the greeting carry a timestamp. E.g.
    #: ``lambda: users.any_hash(passwords.supports_apop)``.
    apop_available: Callable[[], bool] = _nobody
    #: Likewise for CRAM-MD5 (``users.any_hash(passwords.supports_cram_md5)``).
    cram_md5_available: Callable[[], bool] = _nobody
    #: (hostname, now) -> a fresh ``<random.time@host>`` APOP timestamp / CRAM-MD5 challenge.
    challenge: Callable[[str, float], bytes] = sasl.make_challenge
    #: Where XTND XLST reads its headers (one file per message): the thread pool in the
    #: service; inline by default, which is what the in-memory tests want.
    run_in_thread: ThreadRunner = maybeDeferred
    #: RFC 2449 LOGIN-DELAY in seconds: advertised and enforced; None = neither.
    login_delay: int | None = None
    #: RFC 2449 EXPIRE: days after which messages are deleted at QUIT (0: retrieved ones),
    #: or "NEVER" (advertised only); None advertises nothing and deletes nothing.
    expire: int | str | None = None
    #: SDPS ``*ENV n`` in TRANSACTION (fetchmail/getmail read the envelope from it).
    sdps_env: bool = False
    #: The brute-force brake shared with SMTP (per client address); None: no delays, but
    #: every failed login is still logged in the fail2ban line format.
    throttle: IAuthThrottle | None = None
    #: Command lines (SASL continuations included) one session may send; the next one is
    #: answered ``-ERR [SYS/PERM] Too many commands`` and the session closed without UPDATE.
    #: Generous: fetchmail on a big maildrop sends two or three commands per message.
    max_commands: int = 100_000
    #: Invalid command lines tolerated per session (Dovecot closes after 10): unknown or
    #: disabled verbs, verbs in the wrong state, syntax and arity errors, over-long lines,
    #: bad base64 in SASL. Not junk: a wrong message number, a failed login (``max_failures``
    #: counts those), a policy refusal. The next one is answered ``-ERR Too many invalid
    #: commands`` and the session closed without UPDATE.
    max_junk: int = 10
    #: A partial line pending longer than this many seconds ends the session (closed
    #: without a reply or UPDATE), unless it grows at ``min_rate`` bytes/s (PartialLineWatch).
    line_time: float = 60.0
    min_rate: float = 100.0

    def __post_init__(self) -> None:
        self.xmit_policy()  # ValueError now, at wiring time, on a bad XMIT policy
        if self.max_commands <= 0 or self.max_junk < 0:
            raise ValueError("max_commands must be positive and max_junk not negative")
        if self.line_time <= 0 or self.min_rate < 0:
            raise ValueError("line_time must be positive and min_rate not negative")
        if self.login_delay is not None and self.login_delay < 0:
            raise ValueError("login_delay must not be negative")
        if isinstance(self.expire, str):
            if self.expire != "NEVER":
                raise ValueError("expire must be a number of days or NEVER")
        elif self.expire is not None and self.expire < 0:
            raise ValueError("expire must not be negative")

    def xmit_policy(self) -> XmitPolicy:
        """The XMIT limits of this listener (validated when the policy is built)."""
        return XmitPolicy(
            hostname=self.hostname,
            default_domain=self.default_domain,
            max_size=self.max_size,
            max_recipients=self.max_recipients,
            bare_newline=self.bare_newline,
            long_lines=self.long_lines,
            enforce_from=self.enforce_from,
            max_header_lines=self.max_header_lines,
            max_header_bytes=self.max_header_bytes,
        )


class State(Enum):
    """Where a session is; only the handler table decides what each state accepts."""

    AUTHORIZATION = auto()
    SASL = auto()  # an AUTH exchange waits for a continuation line
    TRANSACTION = auto()
    XMIT = auto()  # XTND XMIT: input is message data up to the final "."
    UPDATE = auto()  # QUIT in TRANSACTION: the commit is running
    CLOSED = auto()


@implementer(IPullProducer)
class MessageStream:
    """Streams one message (RETR) or its top (TOP) to the transport in bounded chunks.

    A pull producer: the transport asks for the next chunk only when its buffer drained,
    so a large message never sits in memory. The status line rides in the first write and
    the terminating ``.`` in the last.
    """

    def __init__(
        self,
        source: IO[bytes],
        status: bytes,
        consumer: IConsumer,
        top_lines: int | None,
        done: Callable[[bool], None],
        chunk_size: int = CHUNK_SIZE,
        stuff: bool = True,
    ) -> None:
        self._source = source
        self._prefix = status
        self._consumer = consumer
        # stuff=False only for a message known to have no line starting with ".".
        self._encoder = WireEncoder(stuff=stuff)
        self._limiter = TopLimiter(top_lines) if top_lines is not None else None
        self._done = done
        self._chunk_size = chunk_size
        self._finished = False
        #: Whether the consumer has us registered, as whoever made us is expected to do;
        #: a message sent in one go (see Pop3Server._start_stream) never is.
        self.registered = True

    def resumeProducing(self) -> None:
        if self._finished:
            return
        try:
            data = self._source.read(self._chunk_size)
            # A Maildir message is a regular file never written after delivery: a short
            # read is its end, so "." joins this write without a second read to confirm.
            eof = len(data) < self._chunk_size
            out = self._encoder.feed(data) if data else b""
            if self._limiter is not None:
                out = self._limiter.feed(out)
                if self._limiter.done:
                    eof = True
            if eof:
                if self._limiter is None:
                    out += self._encoder.finish()
                elif not self._limiter.done:
                    out += self._limiter.feed(self._encoder.finish())
                out += b".\r\n"
        except Exception:
            log.failure("POP3 could not read a message while sending it")
            self._finish(False)
            return
        payload = self._prefix + out
        self._prefix = b""
        if payload:
            write_now(self._consumer, payload)
        if eof:
            self._finish(True)

    def stopProducing(self) -> None:
        """The connection went away: just let go of the file."""
        if not self._finished:
            self._finished = True
            self._source.close()

    @property
    def finished(self) -> bool:
        return self._finished

    def _finish(self, success: bool) -> None:
        self._finished = True
        self._source.close()
        if self.registered:
            self.registered = False
            self._consumer.unregisterProducer()
        self._done(success)


Handler = Callable[["Pop3Server", Command], None]


class Pop3Server(Protocol, ClockedTimeout):
    """One POP3 session.

    Input is framed by our own :class:`LineFramer` rather than LineReceiver: we need a
    bounded discard of over-long lines without disconnecting, a longer limit for AUTH,
    queueing of pipelined lines while a login or a RETR is in progress, and dropping every
    byte pipelined after STLS.
    """

    def __init__(
        self,
        portal: Portal,
        settings: Pop3Settings,
        clock: IReactorTime,
        login_times: LoginTimes | None = None,
    ) -> None:
        self.portal = portal
        self.settings = settings
        self._clock = clock
        self._profile = settings.profile
        self._parsing = settings.profile.parsing_mode
        self._login_times = login_times if login_times is not None else LoginTimes(clock)
        #: The greeting's APOP timestamp; None when APOP is not offered on this connection.
        self._apop_timestamp: bytes | None = None
        self._cram_md5 = False
        self._retrieved: set[int] = set()
        self.state = State.AUTHORIZATION
        self._framer = LineFramer(MAX_AUTH_LINE, bare_lf=self._parsing is Parsing.LENIENT)
        self._busy = False  # a login, a stream or the UPDATE commit is in progress
        self._processing = False  # _process is on the stack (guards re-entrance)
        self._reading_paused = False
        self._tls = settings.implicit_tls
        self._plaintext_here = False
        self._peer = ""
        self._host = ""  # the peer's IP alone: the throttle's and fail2ban's key
        #: The throttle's wait before a failure reply; cancelled if the client leaves.
        self._penalty: Deferred[None] | None = None
        self._user: bytes | None = None
        self._mechanism: sasl.Mechanism | None = None
        self._failures = 0
        self._maildrop: IMaildrop | None = None
        self._logout: Callable[[], None] | None = None
        self._login_name = ""
        self._messages: Sequence[MessageInfo] = ()
        self._timer_suspended = False  # the idle timer, while a long RETR/TOP streams
        self._deleted: set[int] = set()
        self._stream: MessageStream | None = None
        self._xmit: XmitReceiver | None = None
        self._xmit_policy = settings.xmit_policy() if settings.xtnd_xmit else None
        self._ended_by = "connection lost"  # for the session-end log line
        self._update_started = False  # QUIT entered UPDATE: the commit releases the lock
        self._commands = 0  # command lines seen, for max_commands
        self._junk_count = 0  # invalid command lines seen, for max_junk
        #: The slowloris watchdog (fed here, or by the lab's fault wrapper in front).
        self.line_watch = PartialLineWatch(
            clock, settings.line_time, settings.min_rate, self._partial_line_expired
        )

    # -- transport plumbing ---------------------------------------------------------------

    @property
    def _transport(self) -> ITransport:
        assert self.transport is not None
        return self.transport

    def _send(self, data: bytes) -> None:
        """Every reply leaves in exactly one write."""
        if self.state is not State.CLOSED:
            if self._framer.buffered:
                # More pipelined input to answer: queue, so the replies leave together.
                self._transport.write(data)
            else:
                write_now(self._transport, data)

    def _close(self) -> None:
        self.state = State.CLOSED
        close_now(self._transport)  # may run connectionLost before it returns

    def connectionMade(self) -> None:
        transport = self._transport
        set_no_delay(transport)
        peer = transport.getPeer()
        host = getattr(peer, "host", "")
        self._peer = f"{host}:{getattr(peer, 'port', '')}"
        self._host = str(host)
        self._plaintext_here = bool(self.settings.allow_plaintext(str(host)))
        self._set_timeout(self.settings.timeout)
        s = self.settings
        greeting = f"{s.hostname} POP3 server ready"
        try:
            # Evaluated per connection, so a user-file change takes effect at once.
            if self._profile.apop and s.apop_available():
                self._apop_timestamp = s.challenge(s.hostname, self._clock.seconds())
                greeting += " " + self._apop_timestamp.decode("ascii")
                if len(greeting) > 500:  # the status line limit would cut the timestamp
                    self._apop_timestamp = None
                    greeting = f"{s.hostname} POP3 server ready"
            self._cram_md5 = self._profile.offers_mechanism(sasl.CRAM_MD5) and bool(
                s.cram_md5_available()
            )
        except Exception:
            log.failure("POP3 could not decide on APOP/CRAM-MD5; not offering them")
            self._apop_timestamp = None
            self._cram_md5 = False
        self._send(ok(greeting))

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        if not self.line_watch.fed_in_front:
            self.line_watch.received(data)
        self._framer.feed(data)
        self._process()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.state = State.CLOSED
        self._set_timeout(None)
        self.line_watch.stop()
        penalty, self._penalty = self._penalty, None
        if penalty is not None:
            penalty.cancel()  # no timer may outlive the connection
        if self._stream is not None:
            self._stream.stopProducing()
            self._stream = None
        self._abort_xmit()
        if self._logout is not None and not self._update_started:
            # Dropped, timed out or shut down: no UPDATE, just let go of the lock.
            self._logout()
        self._logout = None
        self._maildrop = None
        login = self._login_name or None
        log_line(
            log,
            f"POP3 session from {self._peer} ended by {self._ended_by} (user {login!r})",
            peer=self._peer,
            login=login,
            how=self._ended_by,
        )

    def timeoutConnection(self) -> None:
        """Autologout: close without a reply and without UPDATE (connectionLost releases)."""
        self._ended_by = "autologout"
        self._abort_xmit()
        self._close()

    def _partial_line_expired(self) -> None:
        """The slowloris watchdog: closed like an autologout, with its own log line."""
        log.info(
            "closing POP3 session from {peer}: a partial line pending for more than {seconds}s",
            peer=self._peer,
            seconds=self.settings.line_time,
        )
        self._ended_by = "a partial line timeout"
        self._abort_xmit()
        self._close()

    # -- line processing ------------------------------------------------------------------

    def _process(self) -> None:
        """Handle buffered lines in order until one of them makes the session busy."""
        if self._processing:
            return  # the loop further up the stack will continue
        self._processing = True
        try:
            while not self._busy and self.state is not State.CLOSED:
                if self.state is State.XMIT:
                    data = self._framer.take()
                    if not data:
                        break
                    self.resetTimeout()  # type: ignore[no-untyped-call]
                    self._xmit_data(data)
                    continue
                item = self._framer.next_line()
                if item is None:
                    break
                self.resetTimeout()  # type: ignore[no-untyped-call]
                self._line(item)
        finally:
            self._processing = False
        self._flow_control()

    def _flow_control(self) -> None:
        """Stop reading from a client that pipelines far ahead of a busy session."""
        if self.state is State.CLOSED:
            return
        if self._busy and self._framer.buffered > MAX_BACKLOG and not self._reading_paused:
            pause = getattr(self.transport, "pauseProducing", None)
            if callable(pause):
                self._reading_paused = True
                self.line_watch.pause()
                pause()
        elif self._reading_paused and not self._busy:
            self._reading_paused = False
            self.line_watch.resume()
            resume = getattr(self.transport, "resumeProducing", None)
            if callable(resume):
                resume()

    def _line(self, item: bytes | object) -> None:
        self._commands += 1
        if self._commands > self.settings.max_commands:
            log.warn("POP3 too many commands from {peer}, closing", peer=self._peer)
            self._end_session(
                self._err("Too many commands", ResponseCode.SYS_PERM), "too many commands"
            )
            return
        if self.state is State.SASL:
            if not isinstance(item, bytes):
                self._end_sasl()
                self._junk(err("Authentication line too long"))
                return
            self._sasl_continue(item)
            return
        if not isinstance(item, bytes) or (
            len(item) + 2 > MAX_COMMAND_LINE and item.split(b" ", 1)[0].upper() != b"AUTH"
        ):
            self._junk(err("Command line too long"))
            return
        try:
            command = parse_command(item, self._parsing)
        except Pop3SyntaxError as e:
            self._junk(err(e.reply))
            return
        handler = _HANDLERS.get((self.state, command.verb))
        if command.verb != "PASS":
            self._user = None  # PASS must come immediately after USER
        disabled = not self._verb_enabled(command.verb)
        if handler is None or disabled:
            if command.verb in _KNOWN_VERBS and not disabled:
                self._junk(err("Command not valid in this state"))
            else:
                self._junk(err(f"Unknown command: {echo(command.verb.encode('ascii'))}"))
            return
        try:
            handler(self, command)
        except Pop3SyntaxError as e:
            if e.junk:
                self._junk(err(e.reply))
            else:
                self._send(err(e.reply))
        except Exception:
            log.failure("POP3 handler for {verb} failed", verb=command.verb)
            self._send(self._err("Internal server error", ResponseCode.SYS_TEMP))

    def _junk(self, reply: bytes) -> None:
        """Answer an invalid command line; one more than ``max_junk`` ends the session."""
        self._junk_count += 1
        if self._junk_count > self.settings.max_junk:
            log.warn("POP3 too many invalid commands from {peer}, closing", peer=self._peer)
            self._end_session(err("Too many invalid commands"), "too many invalid commands")
            return
        self._send(reply)

    def _end_session(self, reply: bytes, why: str) -> None:
        """Say ``reply`` and hang up without UPDATE: deletions are not applied."""
        self._ended_by = why
        self._end_sasl()
        self._send(reply)
        self._close()

    def _err(self, text: str, code: ResponseCode | None = None) -> bytes:
        """A ``-ERR`` line, with its response code only when the profile offers RESP-CODES."""
        return err(text, code if self._profile.resp_codes else None)

    def _verb_enabled(self, verb: str) -> bool:
        """Whether this listener's profile (and this connection) offers the command at all."""
        p = self._profile
        if verb in ("USER", "PASS"):
            return p.user
        if verb == "TOP":
            return p.top
        if verb == "UIDL":
            return p.uidl
        if verb == "STLS":
            return p.stls
        if verb == "XTND":
            return p.xtnd
        if verb == "APOP":
            return self._apop_timestamp is not None
        if verb == "AUTH":
            return any(p.offers_mechanism(name) for name in sasl.MECHANISMS)
        if verb == "*ENV":
            return self.settings.sdps_env
        return True

    # -- AUTHORIZATION --------------------------------------------------------------------

    def _plaintext_ok(self) -> bool:
        return self._tls or self._plaintext_here

    def _mechanism_usable(self, name: str, cls: type[sasl.Mechanism]) -> bool:
        if not self._profile.offers_mechanism(name):
            return False
        if name == sasl.CRAM_MD5 and not self._cram_md5:
            return False
        return self._plaintext_ok() or not cls.plaintext

    def _mechanisms(self) -> list[str]:
        return [name for name, cls in sasl.MECHANISMS.items() if self._mechanism_usable(name, cls)]

    def _stls_available(self) -> bool:
        return (
            self.settings.tls_context is not None
            and not self.settings.implicit_tls
            and not self._tls
            and ITLSTransport.providedBy(self.transport)
        )

    def _do_capa(self, command: Command) -> None:
        if command.args():
            raise Pop3SyntaxError("CAPA takes no argument")
        p = self._profile
        s = self.settings
        tags = capabilities(
            plaintext_ok=self._plaintext_ok(),
            mechanisms=self._mechanisms(),
            stls=self._stls_available() and p.stls,
            top=p.top,
            uidl=p.uidl,
            user=p.user,
            resp_codes=p.resp_codes,
            pipelining=p.pipelining,
            login_delay=s.login_delay,
            expire=s.expire,
            implementation=(
                self.settings.implementation if self.state is State.TRANSACTION else None
            ),
            xtnd_xmit=(
                self.state is State.TRANSACTION
                and p.xtnd
                and self.settings.xtnd_xmit
                and self.settings.xtnd_advertise
            ),
        )
        self._send(multiline(ok("Capability list follows"), tags))

    def _do_user(self, command: Command) -> None:
        if not self._plaintext_ok():
            self._send(self._err(PLAINTEXT_DISALLOWED, ResponseCode.AUTH))
            return
        args = command.args()
        if len(args) != 1:
            raise Pop3SyntaxError("USER takes exactly one argument")
        self._user = args[0]
        self._send(ok("Send your password"))

    def _do_pass(self, command: Command) -> None:
        user, self._user = self._user, None
        if not self._plaintext_ok():
            self._send(self._err(PLAINTEXT_DISALLOWED, ResponseCode.AUTH))
            return
        if user is None:
            raise Pop3SyntaxError("USER first")
        if not command.rest:
            raise Pop3SyntaxError("PASS needs a password")
        self._login(UsernamePassword(user, command.rest))

    def _do_auth(self, command: Command) -> None:
        args = command.args()
        if not args:
            names = [n.encode("ascii") for n in self._mechanisms()]
            self._send(multiline(ok("Supported mechanisms follow"), names))
            return
        if len(args) > 2:
            raise Pop3SyntaxError("AUTH takes a mechanism and an optional initial response")
        name = args[0].decode("ascii", "replace").upper()
        cls = sasl.MECHANISMS.get(name)
        if (
            cls is None
            or not self._profile.offers_mechanism(name)
            or (name == sasl.CRAM_MD5 and not self._cram_md5)
        ):
            raise Pop3SyntaxError("Unrecognized authentication type")
        if cls.plaintext and not self._plaintext_ok():
            self._send(self._err(PLAINTEXT_DISALLOWED, ResponseCode.AUTH))
            return
        if cls.server_first and len(args) == 2:
            raise Pop3SyntaxError(f"{name} does not take an initial response")
        s = self.settings
        # Only CRAM-MD5 (server-first) has a challenge; PLAIN and LOGIN skip the random bytes.
        challenge = s.challenge(s.hostname, self._clock.seconds()) if cls.server_first else None
        mechanism = sasl.mechanism(name, challenge=challenge)
        assert mechanism is not None
        initial: bytes | None = None
        if len(args) == 2:
            try:
                initial = sasl.decode_response(args[1])
            except sasl.Cancelled:
                raise Pop3SyntaxError("Authentication cancelled", junk=False) from None
            except sasl.Base64Error:
                raise Pop3SyntaxError("Invalid base64 data") from None
        self._sasl_step(mechanism, lambda: mechanism.start(initial))

    def _sasl_continue(self, line: bytes) -> None:
        mechanism = self._mechanism
        assert mechanism is not None
        try:
            data = sasl.decode_response(line)
        except sasl.Cancelled:
            self._end_sasl()
            self._send(err("Authentication cancelled"))
            return
        except sasl.Base64Error:
            self._end_sasl()
            self._junk(err("Invalid base64 data"))
            return
        self._sasl_step(mechanism, lambda: mechanism.step(data))

    def _sasl_step(
        self,
        mechanism: sasl.Mechanism,
        step: Callable[[], sasl.Challenge | sasl.Credentials],
    ) -> None:
        try:
            result = step()
        except sasl.SaslError:
            self._end_sasl()
            self._credential_failure("", b"", "malformed")
            return
        if isinstance(result, sasl.Challenge):
            self._mechanism = mechanism
            self.state = State.SASL
            self._send(continuation(sasl.encode_challenge(result.data)))
            return
        self._end_sasl()
        self._login(result)

    def _end_sasl(self) -> None:
        self._mechanism = None
        if self.state is State.SASL:
            self.state = State.AUTHORIZATION

    def _do_stls(self, command: Command) -> None:
        if command.args():
            raise Pop3SyntaxError("STLS takes no argument")
        if self._tls:
            self._send(err("Command not permitted when TLS active"))
            return
        if not self._stls_available():
            self._send(err("TLS not available"))
            return
        self._send(ok("Begin TLS negotiation"))
        # Whatever was pipelined after STLS arrived in plaintext: it must never be obeyed.
        self._framer.clear()
        self.line_watch.forget()
        self._user = None
        self._tls = True
        context = cast(IOpenSSLServerConnectionCreator, self.settings.tls_context)
        cast(ITLSTransport, self.transport).startTLS(context)

    def _do_quit_authorization(self, command: Command) -> None:
        self._send(ok(f"{self.settings.hostname} signing off"))
        self._ended_by = "QUIT"
        self._close()

    # -- login through the portal ---------------------------------------------------------

    def _do_apop(self, command: Command) -> None:
        """RFC 1939 APOP: MD5 over the greeting's timestamp and the secret; no TLS needed."""
        timestamp = self._apop_timestamp
        assert timestamp is not None  # otherwise the verb is disabled
        args = command.args()
        if len(args) != 2:
            raise Pop3SyntaxError("APOP takes a name and a digest")
        try:
            name, digest = sasl.parse_digest_answer(args[0] + b" " + args[1])
        except sasl.SaslError:
            self._credential_failure(args[0].decode("utf-8", "replace"), b"", "malformed")
            return
        self._login(sasl.DigestResponse(name, timestamp, digest, sasl.APOP))

    def _login(self, credentials: sasl.Credentials) -> None:
        name = credentials.username.decode("utf-8", "replace")
        self._busy = True
        d = self.portal.login(credentials, None, IMaildrop)
        d.addCallbacks(
            self._logged_in,
            self._login_failed,
            callbackArgs=(name,),
            errbackArgs=(name, _secret(credentials)),
        )
        d.addErrback(lambda f: log.failure("POP3 login handling failed", f))

    def _logged_in(self, result: tuple[Any, Any, Callable[[], None]], name: str) -> None:
        _, avatar, logout = result
        if self.settings.throttle is not None:
            self.settings.throttle.succeeded(self._host)  # the credentials were right
        if self.state is State.CLOSED:
            logout()  # the client left while we were logging it in
            return
        delay = self.settings.login_delay
        account = str(getattr(avatar, "account", name))
        if delay is not None:
            if self._login_times.too_soon(account, delay):
                logout()
                self._busy = False
                log.info("POP3 login of {login!r} refused: LOGIN-DELAY", login=name)
                self._send(
                    self._err(
                        f"Minimum time between logins is {delay} seconds",
                        ResponseCode.LOGIN_DELAY,
                    )
                )
                self._process()
                return
            self._login_times.record(account, delay)
        self._maildrop = cast(IMaildrop, avatar)
        self._logout = logout
        self._login_name = name
        self._messages = list(self._maildrop.messages)
        self._deleted = set()
        self._retrieved = set()
        self.state = State.TRANSACTION
        self._busy = False
        count, octets = self._totals()
        self._send(ok(f"maildrop has {count} messages ({octets} octets)"))
        log_line(log, f"POP3 login {name!r} from {self._peer}", login=name, peer=self._peer)
        self._process()

    def _login_failed(self, failure: Failure, name: str, secret: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self._busy = False
        if isinstance(failure.value, LoginFailed):
            self._credential_failure(name, secret, "bad-credentials")
        elif isinstance(failure.value, MaildropInUse):
            log.info("POP3 maildrop of {login!r} in use", login=name)
            self._send(self._err("Maildrop already locked by another session", ResponseCode.IN_USE))
        elif isinstance(failure.value, MaildropUnavailable):
            log.failure("POP3 maildrop of {login!r} unavailable", failure, login=name)
            self._send(self._err("Maildrop temporarily unavailable", ResponseCode.SYS_TEMP))
        else:
            log.failure("POP3 login of {login!r} failed unexpectedly", failure, login=name)
            self._send(self._err("Temporary server failure", ResponseCode.SYS_TEMP))
        self._process()

    def _credential_failure(self, login: str, secret: bytes, reason: str) -> None:
        """Log a failed login, tell the throttle, and reply once its delay has passed.

        While the delay runs the session is busy: pipelined lines wait, in order.
        """
        throttle = self.settings.throttle
        if throttle is None:
            log.warn("{line}", line=failure_line("pop3", self._host, login, reason))
            self._failure_reply()
            return
        throttle.failed(self._host, login, throttle.fingerprint(secret))
        throttle.log_failure("pop3", self._host, login, reason)
        penalty = deferred_failure(self._clock, throttle.delay_for(self._host), None)
        if penalty.called:
            self._failure_reply()
            return
        self._busy = True
        self._penalty = penalty
        penalty.addCallbacks(self._penalty_over, self._penalty_cancelled)

    def _penalty_over(self, _: None) -> None:
        self._penalty = None
        if self.state is State.CLOSED:
            return
        self._busy = False
        self._failure_reply()
        self._process()

    def _penalty_cancelled(self, failure: Failure) -> None:
        if not isinstance(failure.value, CancelledError):  # cancelled: the client left
            log.failure("POP3 delayed failure reply failed", failure)

    def _failure_reply(self) -> None:
        """Reply to a failed login; too many of them in one session end it."""
        self._failures += 1
        self._send(self._err("Authentication failed", ResponseCode.AUTH))
        if self._failures >= self.settings.max_failures:
            log.warn("POP3 too many failed logins from {peer}, closing", peer=self._peer)
            self._ended_by = "too many failed logins"
            self._close()

    # -- TRANSACTION ----------------------------------------------------------------------

    def _totals(self) -> tuple[int, int]:
        live = [m for i, m in enumerate(self._messages) if i not in self._deleted]
        return len(live), sum(m.size for m in live)

    def _index(self, arg: bytes) -> int:
        index = parse_message_number(arg, len(self._messages))
        if index in self._deleted:
            raise Pop3SyntaxError(f"Message {index + 1} already deleted", junk=False)
        return index

    def _do_stat(self, command: Command) -> None:
        if command.args():
            raise Pop3SyntaxError("STAT takes no argument")
        count, octets = self._totals()
        self._send(ok(f"{count} {octets}"))

    def _scan(self, command: Command, value: Callable[[MessageInfo], str]) -> None:
        args = command.args()
        if len(args) > 1:
            raise Pop3SyntaxError("Too many arguments")
        if args:
            index = self._index(args[0])
            self._send(ok(f"{index + 1} {value(self._messages[index])}"))
            return
        lines = [
            f"{i + 1} {value(m)}".encode("ascii")
            for i, m in enumerate(self._messages)
            if i not in self._deleted
        ]
        self._send(multiline(ok(f"{len(lines)} messages"), lines))

    def _do_list(self, command: Command) -> None:
        self._scan(command, lambda m: str(m.size))

    def _do_uidl(self, command: Command) -> None:
        self._scan(command, lambda m: m.uid)

    def _do_retr(self, command: Command) -> None:
        args = command.args()
        if len(args) != 1:
            raise Pop3SyntaxError("RETR takes one message number")
        index = self._index(args[0])
        self._retrieved.add(index)  # for EXPIRE 0
        self._start_stream(index, None, ok(f"{self._messages[index].size} octets"))

    def _do_top(self, command: Command) -> None:
        args = command.args()
        if len(args) != 2:
            raise Pop3SyntaxError("TOP takes a message number and a line count")
        index = self._index(args[0])
        lines = parse_line_count(args[1])
        self._start_stream(index, lines, ok("Top of message follows"))

    def _start_stream(self, index: int, top_lines: int | None, status: bytes) -> None:
        assert self._maildrop is not None
        try:
            stuff = self._maildrop.may_have_dot_lines(index)
            source = self._maildrop.open_message(index)
        except Exception:
            log.failure("POP3 could not open message {n}", n=index + 1)
            self._send(self._err("Message temporarily unavailable", ResponseCode.SYS_TEMP))
            return
        self._busy = True
        consumer = cast(IConsumer, self.transport)
        stream = self._stream = MessageStream(
            source,
            status,
            consumer,
            top_lines,
            self._stream_done,
            stuff=stuff,
        )
        if self._messages[index].size < CHUNK_SIZE:
            # Fits one read: reply, message and "." in one write, no producer round trip
            # (and no idle timer to suspend: the reply is complete before we return).
            stream.registered = False
            stream.resumeProducing()
            if stream.finished:
                return
            stream.registered = True
        self._timer_suspended = True
        self._set_timeout(None)  # our own long response must not count as client idleness
        consumer.registerProducer(stream, False)

    def _stream_done(self, success: bool) -> None:
        self._stream = None
        if self.state is State.CLOSED:
            return
        if not success:
            # Part of the message is on the wire already; no honest reply is possible.
            self._ended_by = "message read error"
            self._close()
            return
        self._busy = False
        if self._timer_suspended:
            self._timer_suspended = False
            self._set_timeout(self.settings.timeout)
        self._process()

    def _do_dele(self, command: Command) -> None:
        args = command.args()
        if len(args) != 1:
            raise Pop3SyntaxError("DELE takes one message number")
        index = self._index(args[0])
        self._deleted.add(index)
        self._send(ok(f"Message {index + 1} deleted"))

    def _do_noop(self, command: Command) -> None:
        if command.args():
            raise Pop3SyntaxError("NOOP takes no argument")
        self._send(ok())

    def _do_rset(self, command: Command) -> None:
        if command.args():
            raise Pop3SyntaxError("RSET takes no argument")
        self._deleted.clear()
        count, octets = self._totals()
        self._send(ok(f"maildrop has {count} messages ({octets} octets)"))

    def _do_quit_transaction(self, command: Command) -> None:
        maildrop = self._maildrop
        assert maildrop is not None
        self.state = State.UPDATE
        self._update_started = True  # the commit owns the lock now, however the session ends
        self._busy = True
        # The commit is our time, not the client's: neither the idle timer nor the
        # partial-line watchdog may end the session while it runs.
        self._set_timeout(None)
        self.line_watch.stop()
        expired = self._expired() - self._deleted
        if expired:
            log.info(
                "POP3 UPDATE for {login!r}: {n} messages expired",
                login=self._login_name,
                n=len(expired),
            )
        deleted = sorted(self._deleted | expired)
        d = maybeDeferred(maildrop.commit, deleted)

        def committed(not_removed: int) -> None:
            if not_removed:
                log.warn(
                    "POP3 UPDATE for {login!r}: {n} messages not removed",
                    login=self._login_name,
                    n=not_removed,
                )
                self._reply_and_close(err("some deleted messages not removed"))
            else:
                self._reply_and_close(ok(f"{self.settings.hostname} signing off"))

        def failed(failure: Failure) -> None:
            log.failure("POP3 UPDATE for {login!r} failed", failure, login=self._login_name)
            maildrop.release()
            self._reply_and_close(err("some deleted messages not removed"))

        d.addCallbacks(committed, failed)

    def _expired(self) -> set[int]:
        """Messages RFC 2449 EXPIRE removes at this UPDATE (never with NEVER or unset).

        EXPIRE 0 removes what was retrieved in this session; EXPIRE n removes messages
        delivered at least n days ago. A message of unknown age is kept.
        """
        days = self.settings.expire
        if not isinstance(days, int):
            return set()
        if days == 0:
            return set(self._retrieved)
        limit = self._clock.seconds() - days * DAY
        return {
            i
            for i, m in enumerate(self._messages)
            if m.delivered is not None and m.delivered <= limit
        }

    # -- SDPS -------------------------------------------------------------------------------

    def _do_env(self, command: Command) -> None:
        """SDPS ``*ENV n``: the envelope as fetchmail/getmail read it (checklist 0.3).

        Data lines: account local part, account domain, envelope sender (the stored
        Return-Path, blank for the null sender or when absent), envelope recipient.
        """
        maildrop = self._maildrop
        assert maildrop is not None
        args = command.args()
        if len(args) != 1:
            raise Pop3SyntaxError("*ENV takes one message number")
        index = self._index(args[0])
        try:
            with maildrop.open_message(index) as source:
                found = first_header_lines(source, "Return-Path")
        except Exception:
            log.failure("POP3 *ENV could not read message {n}", n=index + 1)
            self._send(self._err("Message temporarily unavailable", ResponseCode.SYS_TEMP))
            return
        account = cast(Address, maildrop.account)
        lines = [
            account.local.encode("utf-8"),
            account.domain.encode("ascii"),
            envelope_sender(found),
            str(account).encode("utf-8"),
        ]
        self._send(multiline(ok(), lines))

    # -- XTND -------------------------------------------------------------------------------

    def _do_xtnd(self, command: Command) -> None:
        enabled = [
            name
            for name, on in (("xmit", self.settings.xtnd_xmit), ("xlst", self.settings.xtnd_xlst))
            if on
        ]
        xtnd = parse_xtnd(command.args(), enabled)
        if xtnd.sub == "xmit":
            self._xtnd_xmit()
        else:
            self._xtnd_xlst(xtnd.args)

    def _xtnd_xmit(self) -> None:
        maildrop = self._maildrop
        assert maildrop is not None
        if self.settings.xtnd_xmit_require_tls and not self._tls:
            log.info("POP3 XTND XMIT refused without TLS from {peer}", peer=self._peer)
            self._send(self._err("XTND XMIT requires a TLS connection", ResponseCode.SYS_PERM))
            return
        account = cast(Address, maildrop.account)
        self._busy = True
        # The same realm, hence the same sending rules, as an SMTP AUTH login.
        d = maybeDeferred(
            self.portal.realm.requestAvatar,
            str(account).encode("utf-8"),
            None,
            ISubmission,
        )
        d.addCallbacks(self._xmit_ready, self._xmit_unavailable, callbackArgs=(account,))
        d.addErrback(lambda f: log.failure("POP3 XTND XMIT setup failed", f))

    def _xmit_ready(self, result: tuple[Any, Any, Callable[[], None]], account: Address) -> None:
        _, avatar, logout = result
        logout()  # a submission avatar holds nothing; its rules are all we need
        if self.state is not State.TRANSACTION:
            return  # the client left meanwhile
        assert self._xmit_policy is not None
        host = getattr(self._transport.getPeer(), "host", "")
        self._xmit = XmitReceiver(
            cast(ISubmission, avatar),
            account,
            self._xmit_policy,
            peer=self._peer,
            peer_ip=str(host),
            now=self._clock.seconds,
        )
        self.state = State.XMIT
        self._busy = False
        self._send(ok("Start sending message."))
        self._process()

    def _xmit_unavailable(self, failure: Failure) -> None:
        log.failure("POP3 XTND XMIT: no sending rights for this account", failure)
        if self.state is not State.TRANSACTION:
            return
        self._busy = False
        self._send(self._err("Unable to send message", ResponseCode.SYS_TEMP))
        self._process()

    def _xmit_data(self, data: bytes) -> None:
        receiver = self._xmit
        assert receiver is not None
        rest = receiver.feed(data)
        if rest is None:
            return
        # The framer is empty (take() emptied it): what followed the "." is commands again.
        self._framer.feed(rest)
        self._xmit = None
        self.state = State.TRANSACTION
        self._busy = True
        self._set_timeout(None)  # storing the message is our time, not the client's

        def reply(line: bytes) -> None:
            if self.state is State.CLOSED:
                return
            self._busy = False
            self._set_timeout(self.settings.timeout)
            if not self._profile.resp_codes and line.startswith(b"-ERR ["):
                line = b"-ERR " + line.partition(b"] ")[2]
            self._send(line)
            self._process()

        receiver.finish().addCallback(reply).addErrback(
            lambda f: log.failure("POP3 XTND XMIT reply failed", f)
        )

    def _abort_xmit(self) -> None:
        receiver, self._xmit = self._xmit, None
        if receiver is not None:
            receiver.abort()

    def _xtnd_xlst(self, args: Sequence[bytes]) -> None:
        maildrop = self._maildrop
        assert maildrop is not None
        name = parse_field_name(args[0])
        if len(args) > 1:
            arg = args[1]
            try:
                index = parse_message_number(arg, len(self._messages))
            except Pop3SyntaxError:
                raise Pop3SyntaxError(f"Message {echo(arg)} does not exist.", junk=False) from None
            if index in self._deleted:
                raise Pop3SyntaxError(f"Message {index + 1} has been deleted.", junk=False)
            indices = [index]
        else:
            indices = [i for i in range(len(self._messages)) if i not in self._deleted]

        def read_headers() -> list[bytes]:
            """Thread pool: one open and read per message, too slow for the reactor on a
            big maildrop."""
            lines: list[bytes] = []
            for index in indices:
                try:
                    with maildrop.open_message(index) as source:
                        found = first_header_lines(source, name)
                except Exception as e:
                    raise _XlstReadError(index) from e
                if found:
                    lines.append(f"{index + 1} ".encode("ascii") + found[0])
                    lines.extend(found[1:])
            return lines

        def send(lines: list[bytes]) -> None:
            self._send(multiline(ok("xlst command accepted; headers coming."), lines))

        def failed(failure: Failure) -> None:
            index = failure.value.index if isinstance(failure.value, _XlstReadError) else -1
            log.failure("POP3 XTND XLST could not read message {n}", failure, n=index + 1)
            self._send(self._err("Message temporarily unavailable", ResponseCode.SYS_TEMP))

        def resume(_: object) -> None:
            self._busy = False
            if self.state is not State.CLOSED:
                self._process()

        self._busy = True
        d: Deferred[list[bytes]] = self.settings.run_in_thread(read_headers)
        d.addCallbacks(send, failed).addBoth(resume)

    def _reply_and_close(self, reply: bytes) -> None:
        self._logout = None  # commit (or the explicit release) has let go of the lock
        if self.state is State.UPDATE:
            self._send(reply)
            self._ended_by = "QUIT"
            self._close()


def _secret(credentials: sasl.Credentials) -> bytes:
    """What the throttle fingerprints: the password, or the APOP/CRAM-MD5 digest."""
    if isinstance(credentials, sasl.DigestResponse):
        return credentials.response
    password = getattr(credentials, "password", b"")
    return password if isinstance(password, bytes) else str(password).encode("utf-8")


def envelope_sender(field_lines: Sequence[bytes]) -> bytes:
    """The address in a ``Return-Path:`` field's physical lines; b"" for ``<>`` or none.

    Only printable ASCII without spaces survives: the value goes back on the wire.
    """
    value = b" ".join(x.strip() for x in field_lines).partition(b":")[2].strip()
    if value.startswith(b"<"):
        value = value[1:].partition(b">")[0]
    value = value.strip()
    if not value or any(c <= 0x20 or c >= 0x7F for c in value) or len(value) > 254:
        return b""
    return value


_HANDLERS: dict[tuple[State, str], Handler] = {
    (State.AUTHORIZATION, "CAPA"): Pop3Server._do_capa,
    (State.AUTHORIZATION, "APOP"): Pop3Server._do_apop,
    (State.TRANSACTION, "*ENV"): Pop3Server._do_env,
    (State.AUTHORIZATION, "USER"): Pop3Server._do_user,
    (State.AUTHORIZATION, "PASS"): Pop3Server._do_pass,
    (State.AUTHORIZATION, "AUTH"): Pop3Server._do_auth,
    (State.AUTHORIZATION, "STLS"): Pop3Server._do_stls,
    (State.AUTHORIZATION, "QUIT"): Pop3Server._do_quit_authorization,
    (State.TRANSACTION, "CAPA"): Pop3Server._do_capa,
    (State.TRANSACTION, "STAT"): Pop3Server._do_stat,
    (State.TRANSACTION, "LIST"): Pop3Server._do_list,
    (State.TRANSACTION, "RETR"): Pop3Server._do_retr,
    (State.TRANSACTION, "DELE"): Pop3Server._do_dele,
    (State.TRANSACTION, "NOOP"): Pop3Server._do_noop,
    (State.TRANSACTION, "RSET"): Pop3Server._do_rset,
    (State.TRANSACTION, "TOP"): Pop3Server._do_top,
    (State.TRANSACTION, "UIDL"): Pop3Server._do_uidl,
    (State.TRANSACTION, "QUIT"): Pop3Server._do_quit_transaction,
    (State.TRANSACTION, "XTND"): Pop3Server._do_xtnd,
}
#: Verbs we know but refuse in the current state (vs. "Unknown command"). XTND is not
#: among them: before login it is as unknown as in qpopper, which lists it for TRANSACTION;
#: nor is the SDPS *ENV.
_KNOWN_VERBS = frozenset(verb for _, verb in _HANDLERS) - {"XTND", "*ENV"}


class Pop3Factory(ServerFactory):
    """Builds :class:`Pop3Server` sessions sharing one portal, policy and clock."""

    noisy = False  # the service logs what listens where; no "Starting factory <...>" lines

    def __init__(self, portal: Portal, settings: Pop3Settings, clock: IReactorTime) -> None:
        self.portal = portal
        self.settings = settings
        self.clock = clock
        #: LOGIN-DELAY bookkeeping shared by every session of this listener.
        self.login_times = LoginTimes(clock)

    def buildProtocol(self, addr: IAddress | None) -> Pop3Server:
        protocol = Pop3Server(self.portal, self.settings, self.clock, self.login_times)
        protocol.factory = self
        return protocol
