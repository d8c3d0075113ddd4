"""The SMTP submission protocol (RFC 6409) and its factory.

A thin adapter: command parsing lives in :mod:`mailgate.smtp._grammar`, the DATA stream in
:mod:`mailgate.dataread`, header fixing in :mod:`mailgate.headers`. The protocol learns who
the client is only through ``portal.login(credentials, None, ISubmission)`` (or the
``anonymous`` avatar for trusted networks) and acts only through that avatar.

Input handling is our own loop over LineReceiver's buffer rather than LineReceiver's, because
three things must hold that LineReceiver does not give: an over-long line is discarded up to
its CRLF without losing the commands after it; a reply that waits on a Deferred (AUTH, the
final "." of DATA) holds back every later pipelined line; and STARTTLS drops every octet the
client pipelined after it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IReactorTime, ITLSTransport
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mailgate import sasl
from mailgate.authlog import deferred_failure, failure_line
from mailgate.dataread import BareNewline, DataReader, DataStatus, LongLines
from mailgate.errors import DeliveryError, RelayDenied, SenderNotOwned, UnknownRecipient
from mailgate.headers import (
    MAX_HEADER_BYTES,
    MAX_HEADER_LINES,
    HeaderBlock,
    HeaderSplitter,
    HeaderTooLarge,
    ReceivedInfo,
    fix_headers,
    received_protocol,
)
from mailgate.interfaces import IAuthThrottle, IMessageSink, ISubmission
from mailgate.model import Address, Envelope
from mailgate.session import (
    ClockedTimeout,
    PartialLineWatch,
    close_now,
    log_line,
    set_no_delay,
    write_now,
)
from mailgate.smtp._grammar import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    MailParams,
    Parsing,
    SmtpSyntaxError,
    check_rcpt_params,
    ehlo_reply,
    find_line_end,
    parse_address,
    parse_command,
    parse_mail_params,
    parse_path,
    reply,
    strip_enhanced,
)

__all__ = ["SmtpFactory", "SmtpProfile", "SmtpServer", "SmtpSettings", "State"]

_log = Logger()
T = TypeVar("T")

#: While a reply waits on a Deferred, stop reading from the socket beyond this much input.
_MAX_PENDING_INPUT = 256 * 1024
#: Commands allowed before STARTTLS when TLS is required (RFC 3207 4).
_BEFORE_TLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "RSET", "QUIT"})
#: The replies every submission sends, built once.
_SENDER_OK = reply(250, "2.1.0", "Sender ok")
_RECIPIENT_OK = reply(250, "2.1.5", "Recipient ok")
_GO_AHEAD = reply(354, None, "End data with <CR><LF>.<CR><LF>")
_AUTHENTICATED = reply(235, "2.7.0", "Authentication successful")
_BYE = reply(221, "2.0.0", "Bye")


def _nobody(peer_ip: str) -> bool:
    """The default policy: no address gets the privilege."""
    return False


def _none_available() -> bool:
    return False


@dataclass(frozen=True)
class SmtpProfile:
    """What one submission listener advertises, so a lab can emulate an older server.

    A hidden extension is neither listed in EHLO nor accepted: STARTTLS answers like an
    unknown command, SIZE=/BODY= become unknown MAIL parameters, replies lose their
    enhanced status codes. Defaults are mailgate's normal behaviour. CRAM-MD5 in ``sasl``
    is further subject to some account having a plaintext-equivalent secret.
    """

    pipelining: bool = True
    eightbitmime: bool = True
    size: bool = True
    enhancedstatuscodes: bool = True
    starttls: bool = True
    sasl: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")
    #: "normal", "strict" or "lenient" (see :class:`mailgate.smtp._grammar.Parsing`).
    parsing: str = "normal"

    def __post_init__(self) -> None:
        unknown = [m for m in self.sasl if m.upper() not in sasl.MECHANISMS]
        if unknown:
            raise ValueError(f"unknown SASL mechanism {unknown[0]!r}")
        # Derived once, not per connection (the profile is immutable).
        object.__setattr__(self, "parsing_mode", Parsing(self.parsing))  # ValueError if bad
        object.__setattr__(self, "_offered", frozenset(m.upper() for m in self.sasl))

    #: :class:`Parsing` for ``parsing``.
    parsing_mode: Parsing = field(init=False, repr=False, compare=False)
    _offered: frozenset[str] = field(init=False, repr=False, compare=False)

    def offers_mechanism(self, name: str) -> bool:
        return name.upper() in self._offered


@dataclass(frozen=True)
class SmtpSettings:
    """Policy of one submission listener.

    ``allow_plaintext(peer_ip)``: may AUTH PLAIN/LOGIN without TLS. ``trusted(peer_ip)``:
    may submit without AUTH (needs the factory's ``anonymous``). Peers for which either is
    true are also exempt from ``require_tls``; so is everyone on an implicit-TLS port.
    """

    hostname: str
    default_domain: str
    tls_context: object | None = None
    implicit_tls: bool = False
    timeout: float = 600
    require_tls: bool = True
    allow_plaintext: Callable[[str], bool] = _nobody
    trusted: Callable[[str], bool] = _nobody
    max_size: int = 26214400
    max_recipients: int = 100
    bare_newline: str = "normalize"
    long_lines: str = "reject"
    max_failures: int = 3
    smtputf8: bool = False
    max_header_lines: int = MAX_HEADER_LINES
    max_header_bytes: int = MAX_HEADER_BYTES
    #: What this listener advertises (PIPELINING, 8BITMIME, SIZE, STARTTLS, mechanisms...).
    profile: SmtpProfile = field(default_factory=SmtpProfile)
    #: Asked once per connection: can CRAM-MD5 succeed for some account? E.g.
    #: ``lambda: users.any_hash(passwords.supports_cram_md5)``.
    cram_md5_available: Callable[[], bool] = _none_available
    #: (hostname, now) -> a fresh ``<random.time@host>`` CRAM-MD5 challenge.
    challenge: Callable[[str, float], bytes] = sasl.make_challenge
    #: The brute-force brake shared with POP3 (per client address); None: no delays, but
    #: every failed login is still logged in the fail2ban line format.
    throttle: IAuthThrottle | None = None
    #: Command lines (AUTH responses included, message data not) one session may send; the
    #: next one is answered ``421 4.7.0 <host> Too many commands`` and the session closed.
    max_commands: int = 10_000
    #: Invalid command lines tolerated per session (Postfix's hard error limit is 20):
    #: unknown verbs, verbs out of sequence (503), syntax errors in commands and MAIL/RCPT
    #: parameters (500/501/555/553), over-long lines, bad base64 in AUTH. Not junk: policy
    #: refusals (530, 550-554), failed logins (``max_failures``), a cancelled AUTH, DATA
    #: after every recipient was refused. The next one is answered ``421 4.7.0 <host>
    #: Error: too many errors`` and the session closed.
    max_junk: int = 20
    #: A partial line pending longer than this many seconds ends the session with the
    #: idle timeout's 421, unless it grows at ``min_rate`` bytes/s (session.PartialLineWatch).
    line_time: float = 60.0
    min_rate: float = 100.0

    def __post_init__(self) -> None:
        BareNewline(self.bare_newline)  # ValueError on a bad policy name
        LongLines(self.long_lines)
        if self.max_size <= 0 or self.max_recipients <= 0 or self.max_failures <= 0:
            raise ValueError("SMTP limits must be positive")
        if self.max_commands <= 0 or self.max_junk < 0:
            raise ValueError("max_commands must be positive and max_junk not negative")
        if self.line_time <= 0 or self.min_rate < 0:
            raise ValueError("line_time must be positive and min_rate not negative")
        if (
            self.require_tls
            and not self.implicit_tls
            and self.tls_context is not None
            and not self.profile.starttls
        ):
            raise ValueError("require_tls needs STARTTLS, which the profile hides")
        #: EHLO replies by (TLS, plaintext allowed, CRAM-MD5 possible): nothing else of a
        #: session changes them, and building one was a tenth of the EHLO's cost.
        object.__setattr__(self, "ehlo_replies", {})

    ehlo_replies: dict[tuple[bool, bool, bool], bytes] = field(
        init=False, repr=False, compare=False
    )


class State(enum.Enum):
    """Where the session is; together with the verb it picks the handler."""

    INITIAL = "initial"  # connected, no EHLO/HELO yet
    READY = "ready"  # greeted, no mail transaction
    MAIL = "mail"  # MAIL FROM accepted
    AUTH = "auth"  # inside a SASL exchange: lines are responses
    DATA = "data"  # reading the message
    CLOSED = "closed"


_Handler = Callable[["SmtpServer", bytes], None]


def _delivery_reply(e: DeliveryError) -> bytes:
    """The wire reply for a refusal from the avatar (our own text, never Python's)."""
    text = " ".join(e.text.split()) or "Rejected"
    if isinstance(e, SenderNotOwned):
        return reply(553, "5.7.1", text)
    if isinstance(e, UnknownRecipient):
        return reply(550, "5.1.1", text)
    if isinstance(e, RelayDenied):
        return reply(554, "5.7.1", text)
    if not e.permanent:
        return reply(451, "4.3.0", "Temporary failure, please try again later")
    return reply(550, "5.7.1", text)


class SmtpServer(LineReceiver, ClockedTimeout):
    """One submission session."""

    _table: ClassVar[dict[tuple[State, str], _Handler]] = {}
    _known: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        portal: Portal,
        settings: SmtpSettings,
        clock: IReactorTime,
        anonymous: Callable[[], ISubmission] | None = None,
    ) -> None:
        self._portal = portal
        self._settings = settings
        self._clock = clock
        self._anonymous = anonymous
        self._parsing = settings.profile.parsing_mode
        self.state = State.INITIAL
        self._tls = settings.implicit_tls
        self._peer_ip = "unknown"
        self._helo: str | None = None
        self._extended = False
        self._busy = False
        self._waiting = False
        self._throttled = False
        self._discarding: str | None = None
        self._failures = 0
        #: The throttle's wait before a failure reply; cancelled if the client leaves.
        self._penalty: Deferred[None] | None = None
        # Authentication
        self._avatar: ISubmission | None = None
        self._logout: Callable[[], None] | None = None
        self._user: str | None = None
        self._mech: sasl.Mechanism | None = None
        # The mail transaction
        self._sender: Address | None = None
        self._params = MailParams()
        self._recipients: list[Address] = []
        # DATA
        self._reader: DataReader | None = None
        self._splitter: HeaderSplitter | None = None
        self._sink: IMessageSink | None = None
        self._data_failure: str | None = None
        self._cram_md5 = False
        self._commands = 0  # command lines seen, for max_commands
        self._junk_count = 0  # invalid command lines seen, for max_junk
        #: The slowloris watchdog (fed here, or by the lab's fault wrapper in front).
        self.line_watch = PartialLineWatch(
            clock, settings.line_time, settings.min_rate, self._partial_line_expired
        )

    # -- connection ---------------------------------------------------------------------

    @property
    def _transport(self) -> Any:
        """The transport, whatever extra interfaces (TCP, TLS, producer) it provides."""
        return self.transport

    def connectionMade(self) -> None:
        peer = self._transport.getPeer()
        self._peer_ip = str(getattr(peer, "host", "unknown"))
        set_no_delay(self._transport)
        self._set_timeout(self._settings.timeout)
        try:
            # Evaluated per connection, so a user-file change takes effect at once.
            self._cram_md5 = self._settings.profile.offers_mechanism(sasl.CRAM_MD5) and bool(
                self._settings.cram_md5_available()
            )
        except Exception:
            _log.failure("SMTP could not decide on CRAM-MD5; not offering it")
        self._send(reply(220, None, f"{self._settings.hostname} ESMTP mailgate"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.state = State.CLOSED
        self._set_timeout(None)
        self.line_watch.stop()
        penalty, self._penalty = self._penalty, None
        if penalty is not None:
            penalty.cancel()  # no timer may outlive the connection
        self._abort_data()
        self._drop_avatar()

    def timeoutConnection(self) -> None:
        _log.info("SMTP idle timeout peer={peer}", peer=self._peer_ip)
        self._timed_out()

    def _partial_line_expired(self) -> None:
        """The slowloris watchdog: same reply as the idle timeout, its own log line."""
        _log.info(
            "closing SMTP session from {peer}: a partial line pending for more than {seconds}s",
            peer=self._peer_ip,
            seconds=self._settings.line_time,
        )
        self._timed_out()

    def _timed_out(self) -> None:
        self._send(reply(421, "4.4.2", f"{self._settings.hostname} Error: timeout exceeded"))
        self._close()

    def _send(self, data: bytes) -> None:
        """Every reply leaves in exactly one write."""
        if self.state is not State.CLOSED:
            if not self._settings.profile.enhancedstatuscodes:
                data = strip_enhanced(data)
            if self._buffer:
                # More pipelined input to answer: queue, so the replies to a PIPELINING
                # group leave in one send rather than one each.
                self._transport.write(data)
            else:
                write_now(self._transport, data)

    def _close(self) -> None:
        self._abort_data()
        self.state = State.CLOSED
        self._set_timeout(None)
        close_now(self._transport)  # may run connectionLost before it returns

    # -- input loop ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # The idle timer is reset per complete line (see _next_line, _data_chunk), never
        # per octet: a client dripping a byte now and then must still time out.
        if self.state is State.CLOSED:
            return
        if not self.line_watch.fed_in_front:
            self.line_watch.received(data)
        self._buffer += data
        if self._waiting and len(self._buffer) > _MAX_PENDING_INPUT and not self._throttled:
            self._throttled = True
            self.line_watch.pause()
            self._transport.pauseProducing()
        self._process()

    def _process(self) -> None:
        """Handle buffered input until more is needed or a reply is pending."""
        if self._busy:
            return  # the running loop picks up where this call would start
        self._busy = True
        try:
            while self._buffer and not self._waiting and self.state is not State.CLOSED:
                if self.state is State.DATA:
                    chunk, self._buffer = self._buffer, b""
                    self._data_chunk(chunk)
                elif not self._next_line():
                    break
        finally:
            self._busy = False
        if self._throttled and not self._waiting and self.state is not State.CLOSED:
            self._throttled = False
            self.line_watch.resume()
            self._transport.resumeProducing()

    def _line_kind(self, line: bytes) -> str:
        if self.state is State.AUTH or line[:5].upper() in (b"AUTH", b"AUTH "):
            return "auth"
        return "command"

    def _next_line(self) -> bool:
        """Take one line from the buffer; False when no whole line is there yet."""
        buf = self._buffer
        end, after = find_line_end(buf, bare_lf=self._parsing is Parsing.LENIENT)
        if end >= 0:
            self.resetTimeout()  # type: ignore[no-untyped-call]
        if self._discarding is not None:
            if end < 0:
                self._buffer = b"\r" if buf.endswith(b"\r") else b""
                return False
            self._buffer = buf[after:]
            kind, self._discarding = self._discarding, None
            if self._count_command():
                self._line_too_long(kind)
            return True
        if end < 0:
            if len(buf) > MAX_AUTH_LINE:
                # Too long whatever it is: drop it up to its CRLF, keep nothing meanwhile.
                self._discarding = self._line_kind(buf)
                self._buffer = b"\r" if buf.endswith(b"\r") else b""
            return False
        line, self._buffer = buf[:end], buf[after:]
        if not self._count_command():
            return True
        kind = self._line_kind(line)
        limit = MAX_AUTH_LINE if kind == "auth" else MAX_COMMAND_LINE
        if len(line) + 2 > limit:
            self._line_too_long(kind)
        else:
            self._line(line)
        return True

    def _count_command(self) -> bool:
        """Count one command line; False (and the session is over) past ``max_commands``."""
        self._commands += 1
        if self._commands <= self._settings.max_commands:
            return True
        _log.warn("SMTP too many commands peer={peer}, closing", peer=self._peer_ip)
        self._send(reply(421, "4.7.0", f"{self._settings.hostname} Too many commands"))
        self._close()
        return False

    def _junk(self, data: bytes) -> None:
        """Answer an invalid command line; one more than ``max_junk`` ends the session."""
        self._junk_count += 1
        if self._junk_count <= self._settings.max_junk:
            self._send(data)
            return
        _log.warn("SMTP too many invalid commands peer={peer}, closing", peer=self._peer_ip)
        self._send(reply(421, "4.7.0", f"{self._settings.hostname} Error: too many errors"))
        self._close()

    def _line_too_long(self, kind: str) -> None:
        if kind == "auth":
            if self.state is State.AUTH:
                self._mech = None
                self.state = State.READY
            self._junk(reply(500, "5.5.6", "Authentication Exchange line is too long"))
        else:
            self._junk(reply(500, "5.5.2", "Line too long"))

    def _line(self, line: bytes) -> None:
        if self.state is State.AUTH:
            self._guarded(self._auth_response, line)
            return
        try:
            cmd = parse_command(line, self._parsing)
        except SmtpSyntaxError as e:
            if e.kind == "verb" and line.strip():
                self._junk(reply(500, "5.5.1", "Command unrecognized"))
            else:
                self._junk(reply(500, "5.5.2", "Syntax error"))
            return
        if cmd.verb not in self._known or (
            cmd.verb == "STARTTLS" and not self._settings.profile.starttls
        ):
            self._junk(reply(500, "5.5.1", "Command unrecognized"))
            return
        if self._tls_required() and cmd.verb not in _BEFORE_TLS:
            self._send(reply(530, "5.7.0", "Must issue a STARTTLS command first"))
            return
        handler = self._table.get((self.state, cmd.verb))
        if handler is None:
            self._junk(reply(503, "5.5.1", "Bad sequence of commands"))
            return
        self._guarded(handler, self, cmd.arg)

    def _guarded(self, f: Callable[..., None], *args: Any) -> None:
        """Run a handler; an unexpected error becomes a generic reply and a log entry."""
        try:
            f(*args)
        except Exception:
            _log.failure("SMTP handler failed peer={peer}", peer=self._peer_ip)
            if self.state is State.AUTH:
                self._mech = None
                self.state = State.READY
            self._send(reply(451, "4.3.0", "Local error in processing"))

    def _wait(
        self,
        d: Deferred[T],
        ok: Callable[[T], None],
        err: Callable[[Failure], None],
    ) -> None:
        """Hold every later line until ``d`` fires and its reply was sent."""
        self._waiting = True
        self._set_timeout(None)

        def done(result: T | Failure) -> None:
            self._waiting = False
            if self.state is not State.CLOSED:
                self._set_timeout(self._settings.timeout)
            if isinstance(result, Failure):
                self._guarded(err, result)
            else:
                self._guarded(ok, result)
            if self.state is not State.CLOSED:
                self._process()

        d.addBoth(done)

    # -- policy helpers -----------------------------------------------------------------

    def _plaintext_ok(self) -> bool:
        return self._tls or self._settings.allow_plaintext(self._peer_ip)

    def _mechanism_offered(self, name: str) -> bool:
        """Listed by the profile and, for CRAM-MD5, possible for some account."""
        if not self._settings.profile.offers_mechanism(name):
            return False
        return name != sasl.CRAM_MD5 or self._cram_md5

    def _mechanism_usable(self, name: str, cls: type[sasl.Mechanism]) -> bool:
        return self._mechanism_offered(name) and (self._plaintext_ok() or not cls.plaintext)

    def _tls_required(self) -> bool:
        s = self._settings
        if not s.require_tls or self._tls:
            return False
        return not (s.allow_plaintext(self._peer_ip) or s.trusted(self._peer_ip))

    def _reset_transaction(self) -> None:
        self._sender = None
        self._params = MailParams()
        self._recipients = []
        if self.state is State.MAIL:
            self.state = State.READY

    def _drop_avatar(self) -> None:
        logout, self._logout = self._logout, None
        self._avatar = None
        self._user = None
        if logout is not None:
            logout()

    # -- simple commands ----------------------------------------------------------------

    def _ehlo(self, arg: bytes) -> None:
        if not arg:
            self._junk(reply(501, "5.5.4", "Syntax: EHLO hostname"))
            return
        self._reset_transaction()
        self._helo = arg.decode("utf-8", "replace")
        self._extended = True
        self.state = State.READY
        s = self._settings
        key = (self._tls, self._plaintext_ok(), self._cram_md5)
        cached = s.ehlo_replies.get(key)
        if cached is None:
            cached = s.ehlo_replies[key] = self._ehlo_reply()
        self._send(cached)

    def _ehlo_reply(self) -> bytes:
        s = self._settings
        p = s.profile
        offered = (
            ("PIPELINING", p.pipelining),
            (f"SIZE {s.max_size}", p.size),
            ("8BITMIME", p.eightbitmime),
            ("ENHANCEDSTATUSCODES", p.enhancedstatuscodes),
        )
        keywords = [keyword for keyword, on in offered if on]
        if not self._tls and s.tls_context is not None and p.starttls:
            keywords.append("STARTTLS")
        mechs = [n for n, m in sasl.MECHANISMS.items() if self._mechanism_usable(n, m)]
        if mechs:
            keywords.append("AUTH " + " ".join(mechs))
        if s.smtputf8:
            keywords.append("SMTPUTF8")
        return ehlo_reply(s.hostname, "", keywords)

    def _helo_cmd(self, arg: bytes) -> None:
        if not arg:
            self._junk(reply(501, "5.5.4", "Syntax: HELO hostname"))
            return
        self._reset_transaction()
        self._helo = arg.decode("utf-8", "replace")
        self._extended = False
        self.state = State.READY
        self._send(reply(250, None, self._settings.hostname))

    def _rset(self, arg: bytes) -> None:
        if arg:
            self._junk(reply(501, "5.5.4", "Syntax: RSET"))
            return
        self._reset_transaction()
        self._send(reply(250, "2.0.0", "Ok"))

    def _noop(self, arg: bytes) -> None:
        self._send(reply(250, "2.0.0", "Ok"))

    def _quit(self, arg: bytes) -> None:
        self._send(_BYE)
        self._close()

    def _help(self, arg: bytes) -> None:
        self._send(
            reply(
                214,
                "2.0.0",
                "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT HELP VRFY",
            )
        )

    def _vrfy(self, arg: bytes) -> None:
        if not arg:
            self._junk(reply(501, "5.5.4", "Syntax: VRFY address"))
            return
        self._send(reply(252, "2.5.2", "Cannot VRFY user, but will accept message"))

    def _expn(self, arg: bytes) -> None:
        self._send(reply(502, "5.5.1", "EXPN not available"))

    # -- STARTTLS -----------------------------------------------------------------------

    def _starttls(self, arg: bytes) -> None:
        if arg:
            self._junk(reply(501, "5.5.4", "Syntax: STARTTLS"))
            return
        if self._tls:
            self._junk(reply(503, "5.5.1", "TLS already active"))
            return
        ctx = self._settings.tls_context
        if ctx is None or not ITLSTransport.providedBy(self.transport):
            self._send(reply(454, "4.7.0", "TLS not available"))
            return
        self._send(reply(220, "2.0.0", "Ready to start TLS"))
        # Whatever the client pipelined in plaintext must never be read as a command.
        self._buffer = b""
        self._discarding = None
        self.line_watch.forget()
        self._transport.startTLS(ctx)
        self._tls = True
        # RFC 3207 4.2: forget everything learnt before the handshake.
        self._reset_transaction()
        self._helo = None
        self._extended = False
        self._drop_avatar()
        self.state = State.INITIAL

    # -- AUTH ---------------------------------------------------------------------------

    def _auth(self, arg: bytes) -> None:
        if not self._extended:
            self._junk(reply(503, "5.5.1", "Send EHLO first"))
            return
        if self._user is not None:
            self._junk(reply(503, "5.5.1", "Already authenticated"))
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._junk(reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
            return
        name = parts[0].decode("ascii", "replace").upper()
        cls = sasl.MECHANISMS.get(name)
        if cls is None or not self._mechanism_offered(name):
            self._send(reply(504, "5.5.4", "Unrecognized authentication type"))
            return
        if cls.plaintext and not self._plaintext_ok():
            self._send(
                reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
            )
            return
        if cls.server_first and len(parts) == 2:
            self._junk(reply(501, "5.5.2", f"{name} does not take an initial response"))
            return
        s = self._settings
        # Only a server-first mechanism (CRAM-MD5) has a challenge: PLAIN and LOGIN, the
        # usual submission logins, skip the random bytes.
        challenge = s.challenge(s.hostname, self._clock.seconds()) if cls.server_first else None
        mech = sasl.mechanism(name, challenge=challenge)
        assert mech is not None
        initial: bytes | None = None
        if len(parts) == 2:
            try:
                initial = sasl.decode_response(parts[1])
            except sasl.Cancelled:
                self._send(reply(501, "5.7.0", "Authentication cancelled"))
                return
            except sasl.Base64Error:
                self._junk(reply(501, "5.5.2", "Cannot decode response"))
                return
        self._mech = mech
        self.state = State.AUTH
        self._sasl_step(lambda: mech.start(initial))

    def _auth_response(self, line: bytes) -> None:
        mech = self._mech
        assert mech is not None
        try:
            response = sasl.decode_response(line)
        except sasl.Cancelled:
            self._end_exchange()
            self._send(reply(501, "5.7.0", "Authentication cancelled"))
            return
        except sasl.Base64Error:
            self._end_exchange()
            self._junk(reply(501, "5.5.2", "Cannot decode response"))
            return
        self._sasl_step(lambda: mech.step(response))

    def _end_exchange(self) -> None:
        self._mech = None
        self.state = State.READY

    def _sasl_step(self, step: Callable[[], sasl.Challenge | sasl.Credentials]) -> None:
        try:
            result = step()
        except sasl.SaslError:
            self._end_exchange()
            self._auth_failed("", b"", "malformed")
            return
        if isinstance(result, sasl.Challenge):
            self._send(reply(334, None, sasl.encode_challenge(result.data).decode("ascii")))
            return
        self._end_exchange()
        login = result.username.decode("utf-8", "replace")
        secret = _secret(result)
        d = self._portal.login(result, None, ISubmission)
        self._wait(d, self._logged_in, lambda f: self._login_failed(f, login, secret))

    def _logged_in(self, result: tuple[Any, Any, Callable[[], None]]) -> None:
        _, avatar, logout = result
        if self._settings.throttle is not None:
            self._settings.throttle.succeeded(self._peer_ip)  # the credentials were right
        if self.state is State.CLOSED:
            logout()
            return
        self._drop_avatar()
        self._avatar = avatar
        self._logout = logout
        address = getattr(avatar, "address", None)
        self._user = str(address) if address is not None else "?"
        self._send(_AUTHENTICATED)
        log_line(
            _log,
            f"SMTP login user={self._user} peer={self._peer_ip}",
            user=self._user,
            peer=self._peer_ip,
        )

    def _login_failed(self, failure: Failure, login: str, secret: bytes) -> None:
        if isinstance(failure.value, (UnauthorizedLogin, LoginFailed)):
            self._auth_failed(login, secret, "bad-credentials")
            return
        _log.failure(
            "SMTP authentication error peer={peer} login={login}",
            failure,
            peer=self._peer_ip,
            login=login,
        )
        self._send(reply(454, "4.7.0", "Temporary authentication failure"))

    def _auth_failed(self, login: str, secret: bytes, reason: str) -> None:
        """Log a failed login, tell the throttle, and reply once its delay has passed.

        The delay holds every later pipelined line, like any reply waiting on a Deferred.
        """
        throttle = self._settings.throttle
        if throttle is None:
            _log.warn("{line}", line=failure_line("smtp", self._peer_ip, login, reason))
            self._auth_failure_reply()
            return
        throttle.failed(self._peer_ip, login, throttle.fingerprint(secret))
        throttle.log_failure("smtp", self._peer_ip, login, reason)
        penalty = deferred_failure(self._clock, throttle.delay_for(self._peer_ip), None)
        if penalty.called:
            self._auth_failure_reply()
            return
        self._penalty = penalty
        self._wait(penalty, self._penalty_over, self._penalty_cancelled)

    def _penalty_over(self, _: None) -> None:
        self._penalty = None
        self._auth_failure_reply()

    def _penalty_cancelled(self, failure: Failure) -> None:
        if not isinstance(
            failure.value, CancelledError
        ):  # cancelled: the client left, nothing to say
            _log.failure(
                "SMTP delayed failure reply failed peer={peer}", failure, peer=self._peer_ip
            )

    def _auth_failure_reply(self) -> None:
        """The failure reply; too many failures in one session end it."""
        self._failures += 1
        if self._failures >= self._settings.max_failures:
            self._send(reply(421, "4.7.0", "Too many authentication failures"))
            self._close()
            return
        self._send(reply(535, "5.7.8", "Authentication credentials invalid"))

    # -- the mail transaction -----------------------------------------------------------

    def _mail(self, arg: bytes) -> None:
        s = self._settings
        if self._user is None:
            if self._anonymous is None or not s.trusted(self._peer_ip):
                self._send(reply(530, "5.7.0", "Authentication required"))
                return
            if self._avatar is None:
                self._avatar = self._anonymous()
        assert self._avatar is not None
        try:
            path = parse_path(arg, "FROM", strict=self._parsing is Parsing.STRICT)
            params = parse_mail_params(
                path.params,
                smtputf8_enabled=s.smtputf8,
                size_enabled=s.profile.size,
                body_enabled=s.profile.eightbitmime,
            )
        except SmtpSyntaxError as e:
            self._junk(self._syntax_reply(e, "5.1.7"))
            return
        if params.size is not None and params.size > s.max_size:
            self._send(reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))
            return
        sender: Address | None = None
        if not path.is_null:
            try:
                sender = parse_address(path.mailbox, s.default_domain)
            except SmtpSyntaxError as e:
                self._junk(self._syntax_reply(e, "5.1.7"))
                return
        try:
            self._avatar.check_sender(sender)
        except DeliveryError as e:
            self._send(_delivery_reply(e))
            return
        self._sender = sender
        self._params = params
        self._recipients = []
        self.state = State.MAIL
        self._send(_SENDER_OK)

    def _syntax_reply(self, e: SmtpSyntaxError, address_code: str) -> bytes:
        if e.kind == "unknown-param":
            return reply(555, "5.5.4", e.text)
        if e.kind in ("bad-param", "param-syntax"):
            return reply(501, "5.5.4", e.text)
        if e.kind == "utf8" and self._settings.smtputf8:
            return reply(553, "5.6.7", "Non-ASCII address not permitted")
        if e.kind == "syntax":
            return reply(501, "5.5.2", e.text)
        return reply(501, address_code, "Bad address syntax")

    def _rcpt(self, arg: bytes) -> None:
        s = self._settings
        assert self._avatar is not None
        try:
            path = parse_path(arg, "TO", strict=self._parsing is Parsing.STRICT)
            check_rcpt_params(path.params)
            if path.is_null:
                raise SmtpSyntaxError("address", "Null recipient")
            rcpt = parse_address(path.mailbox, s.default_domain)
        except SmtpSyntaxError as e:
            self._junk(self._syntax_reply(e, "5.1.3"))
            return
        if len(self._recipients) >= s.max_recipients:
            self._send(reply(452, "4.5.3", "Too many recipients"))
            return
        try:
            self._avatar.check_recipient(rcpt)
        except DeliveryError as e:
            self._send(_delivery_reply(e))
            return
        if rcpt not in self._recipients:
            self._recipients.append(rcpt)
        self._send(_RECIPIENT_OK)

    def _data(self, arg: bytes) -> None:
        if arg:
            self._junk(reply(501, "5.5.4", "Syntax: DATA"))
            return
        if not self._recipients:
            self._send(reply(503, "5.5.1", "No valid recipients"))
            return
        assert self._avatar is not None
        s = self._settings
        envelope = Envelope(self._sender, tuple(self._recipients))
        try:
            self._sink = self._avatar.open_message(envelope)
        except DeliveryError as e:
            self._send(_delivery_reply(e))
            return
        self._reader = DataReader(
            self._content,
            bare_newline=s.bare_newline,
            long_lines=s.long_lines,
            max_size=s.max_size,
        )
        self._splitter = HeaderSplitter(s.max_header_lines, s.max_header_bytes)
        self._data_failure = None
        self.state = State.DATA
        self._send(_GO_AHEAD)

    # -- DATA ---------------------------------------------------------------------------

    def _data_chunk(self, chunk: bytes) -> None:
        assert self._reader is not None
        if b"\n" in chunk:
            self.resetTimeout()  # type: ignore[no-untyped-call]  # a whole line arrived
        rest = self._reader.feed(chunk)
        if rest is not None:
            self._buffer = rest + self._buffer
            self._guarded(self._end_of_data)

    def _fixed_headers(self, block: HeaderBlock) -> bytes:
        assert self._sink is not None
        info = ReceivedInfo(
            helo=self._helo or "unknown",
            peer_ip=self._peer_ip,
            hostname=self._settings.hostname,
            protocol=received_protocol(
                extended=self._extended, tls=self._tls, authenticated=self._user is not None
            ),
            queue_id=str(self._sink.queue_id),
            recipients=[str(r) for r in self._recipients],
        )
        return fix_headers(block, info, now=self._clock.seconds)

    def _content(self, data: bytes) -> None:
        """Unstuffed LF content from the reader: headers are fixed first, then streamed."""
        if self._data_failure is not None:
            return
        assert self._sink is not None and self._splitter is not None
        try:
            if self._splitter.block is None:
                done = self._splitter.feed(data)
                if done is None:
                    return
                block, body = done
                data = self._fixed_headers(block) + body
            self._sink.write(data)
        except HeaderTooLarge:
            self._data_failure = "header"
        except Exception:
            _log.failure("SMTP message store failed peer={peer}", peer=self._peer_ip)
            self._data_failure = "sink"

    def _end_of_data(self) -> None:
        reader, sink, splitter = self._reader, self._sink, self._splitter
        assert reader is not None and sink is not None and splitter is not None
        self._reader = self._splitter = None
        self.state = State.MAIL
        sender, recipients, user = self._sender, tuple(self._recipients), self._user
        self._reset_transaction()
        ok = reader.status is DataStatus.OK and self._data_failure is None
        if ok and splitter.block is None:
            try:
                block, body = splitter.finish()
                sink.write(self._fixed_headers(block) + body)
            except HeaderTooLarge:
                self._data_failure = "header"
            except Exception:
                _log.failure("SMTP message store failed peer={peer}", peer=self._peer_ip)
                self._data_failure = "sink"
        failure = self._failure_reply(reader.status)
        if failure is not None:
            self._sink = None
            sink.abort()
            self._send(failure)
            return
        size = reader.size

        def queued(queue_id: str) -> None:
            self._sink = None
            self._send(reply(250, "2.0.0", f"Ok: queued as {queue_id}"))
            mail_from = "" if sender is None else str(sender)
            rcpts = ",".join(str(r) for r in recipients)
            log_line(
                _log,
                f"SMTP queued id={queue_id} from=<{mail_from}> to={rcpts} size={size} "
                f"user={user or '-'} peer={self._peer_ip}",
                qid=queue_id,
                sender=mail_from,
                rcpts=rcpts,
                size=size,
                user=user or "-",
                peer=self._peer_ip,
            )

        def failed(f: Failure) -> None:
            self._sink = None
            _log.failure("SMTP queueing failed peer={peer}", f, peer=self._peer_ip)
            e = f.value
            if isinstance(e, DeliveryError) and e.permanent:
                self._send(reply(554, "5.3.0", "Message not accepted"))
            else:
                self._send(reply(451, "4.3.0", "Temporary failure, message not queued"))

        # From here on the sink belongs to finish(); a lost connection must not abort it.
        self._sink = None
        self._wait(maybeDeferred(sink.finish), queued, failed)

    def _failure_reply(self, status: DataStatus) -> bytes | None:
        if status is DataStatus.TOO_BIG:
            return reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        if status is DataStatus.BARE_NEWLINE:
            return reply(554, "5.6.0", "Message contains bare CR or LF")
        if status is DataStatus.LINE_TOO_LONG:
            return reply(554, "5.6.0", "Line too long")
        if self._data_failure == "header":
            return reply(552, "5.3.4", "Message header size exceeds limit")
        if self._data_failure == "sink":
            return reply(451, "4.3.0", "Temporary failure, message not queued")
        return None

    def _abort_data(self) -> None:
        sink, self._sink = self._sink, None
        self._reader = self._splitter = None
        if sink is not None:
            try:
                sink.abort()
            except Exception:
                _log.failure("SMTP sink abort failed peer={peer}", peer=self._peer_ip)


def _secret(credentials: sasl.Credentials) -> bytes:
    """What the throttle fingerprints: the password, or the CRAM-MD5 digest."""
    if isinstance(credentials, sasl.DigestResponse):
        return credentials.response
    password = getattr(credentials, "password", b"")
    return password if isinstance(password, bytes) else str(password).encode("utf-8")


def _build_table() -> dict[tuple[State, str], _Handler]:
    table: dict[tuple[State, str], _Handler] = {}
    anywhere: dict[str, _Handler] = {
        "EHLO": SmtpServer._ehlo,
        "HELO": SmtpServer._helo_cmd,
        "RSET": SmtpServer._rset,
        "NOOP": SmtpServer._noop,
        "QUIT": SmtpServer._quit,
        "HELP": SmtpServer._help,
        "VRFY": SmtpServer._vrfy,
        "EXPN": SmtpServer._expn,
        "STARTTLS": SmtpServer._starttls,
    }
    for state in (State.INITIAL, State.READY, State.MAIL):
        for verb, handler in anywhere.items():
            table[(state, verb)] = handler
    table[(State.READY, "AUTH")] = SmtpServer._auth
    table[(State.READY, "MAIL")] = SmtpServer._mail
    table[(State.MAIL, "RCPT")] = SmtpServer._rcpt
    table[(State.MAIL, "DATA")] = SmtpServer._data
    return table


SmtpServer._table = _build_table()
SmtpServer._known = frozenset(verb for _, verb in SmtpServer._table)


class SmtpFactory(ServerFactory):
    """Builds :class:`SmtpServer` sessions sharing one portal, policy and clock.

    ``anonymous`` gives the avatar for clients of trusted networks that submit without AUTH.
    """

    noisy = False  # the service logs what listens where

    def __init__(
        self,
        portal: Portal,
        settings: SmtpSettings,
        clock: IReactorTime,
        anonymous: Callable[[], ISubmission] | None = None,
    ) -> None:
        self.portal = portal
        self.settings = settings
        self.clock = clock
        self.anonymous = anonymous

    def buildProtocol(self, addr: IAddress | None) -> SmtpServer:
        proto = SmtpServer(self.portal, self.settings, self.clock, self.anonymous)
        proto.factory = self
        return proto
