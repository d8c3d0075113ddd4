"""A read-only conformance probe for any POP3 or SMTP server (a synchronous CLI, on stdlib).

``run_probe(ProbeOptions.from_url("pop3://host:port", ...))`` returns one :class:`Check` per
item: ``PASS``, ``FAIL`` (a protocol violation), ``WARN`` (legal but unwise, e.g. cleartext
logins offered before TLS) or ``SKIP`` (needs a login, or a feature the server lacks).
Nothing is ever changed on the server: no DELE, no message sent, every session ends in QUIT
(POP3 UPDATE with nothing marked) or RSET + QUIT.
"""

from __future__ import annotations

import base64
import poplib
import re
import smtplib
import ssl
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

DEFAULT_PORTS = {"pop3": 110, "pop3s": 995, "smtp": 587, "smtps": 465}
CLEARTEXT_MECHS = frozenset({"PLAIN", "LOGIN"})
TWISTED_BOGUS_TAGS = ("PIPELINE", "CELERITY", "AUSPEX", "POTENCE")
_TIMESTAMP = re.compile(rb"<[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+>")
_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}( |$)")
_UID = re.compile(r"[\x21-\x7e]{1,70}")


@dataclass(frozen=True)
class Check:
    status: str  # PASS | FAIL | WARN | SKIP
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


@dataclass(frozen=True)
class ProbeOptions:
    scheme: str
    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    insecure: bool = False
    cafile: str | None = None
    timeout: float = 30.0

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> ProbeOptions:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"{url!r}: scheme must be one of {', '.join(DEFAULT_PORTS)}")
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise ValueError(f"{url!r}: bad port") from None
        return cls(scheme=scheme, host=parts.hostname, port=port, **kwargs)

    @property
    def implicit_tls(self) -> bool:
        return self.scheme.endswith("s")

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cafile)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


class _Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def add(self, status: str, name: str, detail: str) -> None:
        self.checks.append(Check(status, name, " ".join(detail.split())))

    def expect(self, ok: bool, name: str, good: str, bad: str, failing: str = "FAIL") -> None:
        self.add("PASS" if ok else failing, name, good if ok else bad)


class _Abort(Exception):
    """The session cannot go on; the failing check is already in the report."""


_ERRORS = (OSError, EOFError, poplib.error_proto, smtplib.SMTPException, ssl.SSLError)


def run_probe(options: ProbeOptions) -> list[Check]:
    report = _Report()
    probe = _Pop3Probe if options.scheme.startswith("pop3") else _SmtpProbe
    try:
        probe(options, report).run()
    except _Abort:
        pass
    return report.checks


def format_report(checks: list[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "WARN", "SKIP")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return "".join(c.line() + "\n" for c in checks) + f"summary: {summary}\n"


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.strip("b'\"") if isinstance(error, poplib.error_proto) else text


# -- POP3 ---------------------------------------------------------------------------------


def _text(reply: bytes) -> str:
    return reply.decode("utf-8", "replace")


class _Pop3Probe:
    def __init__(self, options: ProbeOptions, report: _Report) -> None:
        self.o = options
        self.r = report

    def connect(self) -> poplib.POP3:
        try:
            if self.o.implicit_tls:
                return poplib.POP3_SSL(
                    self.o.host, self.o.port, timeout=self.o.timeout, context=self.o.ssl_context()
                )
            return poplib.POP3(self.o.host, self.o.port, timeout=self.o.timeout)
        except _ERRORS as e:
            self.r.add("FAIL", "connect", f"{self.o.host}:{self.o.port}: {_describe(e)}")
            raise _Abort from e

    @staticmethod
    def command(pop: poplib.POP3, line: str) -> bytes:
        """Any command; a ``-ERR`` reply is returned, not raised."""
        try:
            return cast(bytes, cast(Any, pop)._shortcmd(line))
        except poplib.error_proto as e:
            reply = e.args[0] if e.args else b"-ERR"
            return reply if isinstance(reply, bytes) else str(reply).encode()

    @staticmethod
    def capa(pop: poplib.POP3) -> dict[str, list[str]] | None:
        try:
            return pop.capa()
        except poplib.error_proto:
            return None

    def run(self) -> None:
        pop = self.connect()
        try:
            self.first_session(pop)
        except _ERRORS as e:
            self.r.add("FAIL", "session", _describe(e))
            raise _Abort from e
        finally:
            pop.close()
        self.login_checks()

    def first_session(self, pop: poplib.POP3) -> None:
        r = self.r
        greeting = pop.getwelcome()
        r.expect(
            greeting.startswith(b"+OK") and len(greeting) + 2 <= 512,
            "greeting",
            _text(greeting),
            f"not a +OK line of at most 512 octets: {_text(greeting[:80])}",
        )
        stamps = _TIMESTAMP.findall(greeting)
        if not stamps:
            r.add("SKIP", "apop-timestamp", "no APOP timestamp in the greeting (APOP not offered)")
        else:
            again = self.connect()
            try:
                other = _TIMESTAMP.findall(again.getwelcome())
                again.quit()
            finally:
                again.close()
            r.expect(
                len(stamps) == 1 and other != stamps,
                "apop-timestamp",
                f"one msg-id timestamp, fresh per connection ({_text(stamps[0])})",
                f"timestamps {stamps!r} / {other!r}: need exactly one, unique per greeting",
            )
        capa = self.capa(pop)
        if capa is None:
            r.add("WARN", "capa", "CAPA refused: RFC 2449 extensions unknown")
            capa = {}
        else:
            r.add("PASS", "capa", " ".join(sorted(capa)))
            bogus = [t for t in TWISTED_BOGUS_TAGS if t in capa]
            r.expect(
                not bogus,
                "capa-tags",
                "no stock-Twisted placeholder tags",
                f"meaningless tags {' '.join(bogus)}",
                "WARN",
            )
            r.expect(
                "RESP-CODES" in capa,
                "resp-codes",
                "RESP-CODES advertised",
                "RESP-CODES not advertised",
                "WARN",
            )
        unknown = self.command(pop, "XYZZY")
        r.expect(
            unknown.startswith(b"-ERR"), "unknown-command", _text(unknown), _text(unknown[:80])
        )
        wrong = self.command(pop, "STAT")
        r.expect(
            wrong.startswith(b"-ERR"),
            "wrong-state",
            f"STAT before login: {_text(wrong)}",
            f"STAT before login answered {_text(wrong[:80])}",
        )
        if self.o.implicit_tls:
            self.implicit_checks(pop, capa)
        else:
            self.stls_checks(pop, capa)
        bye = pop.quit()
        r.expect(bye.startswith(b"+OK"), "quit", _text(bye), _text(bye[:80]))

    def mechanisms(self, capa: dict[str, list[str]]) -> set[str]:
        mechs = {m.upper() for m in capa.get("SASL", [])}
        if "USER" in capa:
            mechs.add("USER")
        return mechs

    def stls_checks(self, pop: poplib.POP3, capa: dict[str, list[str]]) -> None:
        r = self.r
        before = self.mechanisms(capa)
        cleartext = sorted(before & (CLEARTEXT_MECHS | {"USER"}))
        r.expect(
            not cleartext,
            "auth-before-tls",
            f"no cleartext login offered without TLS ({' '.join(sorted(before)) or 'none'})",
            f"cleartext logins offered without TLS: {' '.join(cleartext)}",
            "WARN",
        )
        if "STLS" not in capa:
            r.add("WARN", "stls", "STLS not offered: passwords would cross in the clear")
            return
        try:
            reply = pop.stls(self.o.ssl_context())
        except poplib.error_proto as e:
            r.add("FAIL", "stls", f"STLS advertised but refused: {_describe(e)}")
            raise _Abort from e
        except (OSError, ssl.SSLError) as e:
            r.add("FAIL", "stls", f"TLS handshake failed: {_describe(e)}")
            raise _Abort from e
        r.add("PASS", "stls", f"{_text(reply)}; handshake done")
        after = self.capa(pop) or {}
        r.expect(
            "STLS" not in after,
            "capa-after-tls",
            "STLS no longer listed",
            "STLS still listed after TLS started",
        )
        self.auth_after_tls(after)
        again = self.command(pop, "STLS")
        r.expect(
            again.startswith(b"-ERR"),
            "stls-twice",
            f"second STLS refused: {_text(again)}",
            f"second STLS answered {_text(again[:80])}",
        )
        if not again.startswith(b"-ERR"):
            raise _Abort

    def implicit_checks(self, pop: poplib.POP3, capa: dict[str, list[str]]) -> None:
        r = self.r
        r.expect(
            "STLS" not in capa,
            "stls-absent",
            "STLS not listed on an implicit-TLS port",
            "STLS listed on an implicit-TLS port",
        )
        reply = self.command(pop, "STLS")
        r.expect(
            reply.startswith(b"-ERR"),
            "stls-refused",
            f"STLS refused under TLS: {_text(reply)}",
            f"STLS answered {_text(reply[:80])} under TLS",
        )
        if not reply.startswith(b"-ERR"):
            raise _Abort
        self.auth_after_tls(capa)

    def auth_after_tls(self, capa: dict[str, list[str]]) -> None:
        mechs = self.mechanisms(capa)
        self.r.expect(
            bool(mechs),
            "auth-after-tls",
            f"logins offered under TLS: {' '.join(sorted(mechs))}",
            "no login method listed under TLS",
            "WARN",
        )

    # -- with a login ---------------------------------------------------------------------

    def logged_in(self) -> poplib.POP3:
        """A new session, under TLS when the server offers it, logged in."""
        user, password = cast(str, self.o.user), cast(str, self.o.password)
        pop = self.connect()
        capa = self.capa(pop) or {}
        if not self.o.implicit_tls and "STLS" in capa:
            pop.stls(self.o.ssl_context())
            capa = self.capa(pop) or {}
        if "USER" in capa or "PLAIN" not in [m.upper() for m in capa.get("SASL", [])]:
            pop.user(user)
            pop.pass_(password)
        else:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            reply = self.command(pop, f"AUTH PLAIN {token}")
            if not reply.startswith(b"+OK"):
                raise poplib.error_proto(reply)
        return pop

    def listing(self, pop: poplib.POP3) -> tuple[tuple[int, int], dict[int, str], dict[int, int]]:
        stat = pop.stat()
        _, uid_lines, _ = pop.uidl()
        _, list_lines, _ = pop.list()
        uids = {}
        for raw in uid_lines:
            number, _, uid = raw.decode("latin-1").partition(" ")
            uids[int(number)] = uid
        sizes = {}
        for raw in list_lines:
            number, _, size = raw.decode("latin-1").partition(" ")
            sizes[int(number)] = int(size.split()[0])
        return stat, uids, sizes

    def login_checks(self) -> None:
        r = self.r
        names = ("login", "uidl-format", "list-vs-stat", "uidl-stable")
        if not (self.o.user and self.o.password):
            for name in names:
                r.add("SKIP", name, "needs --user and --password")
            return
        sessions = []
        for attempt in (1, 2):
            try:
                pop = self.logged_in()
            except (poplib.error_proto, OSError, EOFError, ssl.SSLError) as e:
                r.add("FAIL", "login", _describe(e))
                return
            try:
                sessions.append(self.listing(pop))
                pop.quit()  # nothing marked: UPDATE removes nothing
            except (poplib.error_proto, OSError, EOFError, ValueError) as e:
                r.add("FAIL", "uidl-format", f"STAT/UIDL/LIST failed: {_describe(e)}")
                return
            finally:
                pop.close()
            if attempt == 1:
                r.add("PASS", "login", f"as {self.o.user}: {sessions[0][0][0]} messages")
        (count, octets), uids, sizes = sessions[0]
        bad = [u for u in uids.values() if not _UID.fullmatch(u)]
        r.expect(
            not bad and len(set(uids.values())) == len(uids) and len(uids) == count,
            "uidl-format",
            f"{len(uids)} unique UIDs of 1-70 printable characters",
            f"bad or repeated UIDs (count {len(uids)} for {count} messages): {bad[:3]}",
        )
        r.expect(
            sum(sizes.values()) == octets and len(sizes) == count,
            "list-vs-stat",
            f"LIST sizes add up to STAT ({octets} octets)",
            f"LIST sums to {sum(sizes.values())} over {len(sizes)}, STAT says {count} {octets}",
        )
        second = sessions[1][1]
        common = set(uids.values()) & set(second.values())
        if not uids:
            r.add("SKIP", "uidl-stable", "the maildrop is empty: nothing to compare")
        else:
            r.expect(
                second == uids,
                "uidl-stable",
                f"same {len(uids)} UIDs in a second session",
                f"UIDs changed between sessions ({len(common)} of {len(uids)} kept)",
            )


# -- SMTP ---------------------------------------------------------------------------------


class _SmtpProbe:
    def __init__(self, options: ProbeOptions, report: _Report) -> None:
        self.o = options
        self.r = report

    def connect(self) -> smtplib.SMTP:
        try:
            if self.o.implicit_tls:
                return smtplib.SMTP_SSL(
                    self.o.host, self.o.port, timeout=self.o.timeout, context=self.o.ssl_context()
                )
            return smtplib.SMTP(self.o.host, self.o.port, timeout=self.o.timeout)
        except _ERRORS as e:
            self.r.add("FAIL", "connect", f"{self.o.host}:{self.o.port}: {_describe(e)}")
            raise _Abort from e

    def ehlo(self, smtp: smtplib.SMTP, name: str) -> None:
        code, text = smtp.ehlo("probe.invalid")
        self.r.expect(
            code == 250,
            name,
            f"{len(smtp.esmtp_features)} keywords: {' '.join(sorted(smtp.esmtp_features))}",
            f"EHLO answered {code} {text.decode('utf-8', 'replace')}",
        )
        if code != 250:
            raise _Abort

    def mechanisms(self, smtp: smtplib.SMTP) -> set[str]:
        return {m.upper() for m in smtp.esmtp_features.get("auth", "").split()}

    def run(self) -> None:
        smtp = self.connect()
        try:
            self.session(smtp)
        except _ERRORS as e:
            self.r.add("FAIL", "session", _describe(e))
            raise _Abort from e
        finally:
            smtp.close()

    def session(self, smtp: smtplib.SMTP) -> None:
        r = self.r
        # smtplib read the greeting in connect(); a non-220 greeting raised there.
        r.add("PASS", "greeting", "220")
        self.ehlo(smtp, "ehlo")
        size = smtp.esmtp_features.get("size")
        if size is not None:
            r.expect(
                size.strip().isdigit(), "size", f"SIZE {size}", f"SIZE {size!r} is not a number"
            )
        if self.o.implicit_tls:
            r.expect(
                not smtp.has_extn("starttls"),
                "starttls-absent",
                "STARTTLS not offered on an implicit-TLS port",
                "STARTTLS offered on an implicit-TLS port",
            )
        else:
            before = self.mechanisms(smtp)
            clear = sorted(before & CLEARTEXT_MECHS)
            r.expect(
                not clear,
                "auth-before-tls",
                f"no cleartext AUTH without TLS ({' '.join(sorted(before)) or 'no AUTH'})",
                f"cleartext AUTH offered without TLS: {' '.join(clear)}",
                "WARN",
            )
            if not smtp.has_extn("starttls"):
                r.add("WARN", "starttls", "STARTTLS not offered")
            else:
                code, text = smtp.starttls(context=self.o.ssl_context())
                r.add("PASS", "starttls", f"{code} {text.decode('utf-8', 'replace')}")
                self.ehlo(smtp, "ehlo-after-tls")
                r.expect(
                    not smtp.has_extn("starttls"),
                    "starttls-gone",
                    "STARTTLS no longer offered",
                    "STARTTLS still offered after TLS started",
                )
        if smtp.sock is not None and isinstance(smtp.sock, ssl.SSLSocket):
            mechs = self.mechanisms(smtp)
            r.expect(
                bool(mechs),
                "auth-after-tls",
                f"AUTH {' '.join(sorted(mechs))}",
                "no AUTH under TLS",
                "WARN",
            )
        code, text = smtp.noop()
        r.expect(code == 250, "noop", f"{code}", f"NOOP answered {code}")
        code, raw = smtp.docmd("XYZZY")
        message = raw.decode("utf-8", "replace")
        r.expect(
            code in (500, 502),
            "unknown-command",
            f"{code} {message}",
            f"unknown command answered {code} {message}",
        )
        if smtp.has_extn("enhancedstatuscodes"):
            r.expect(
                bool(_ENHANCED.match(message)),
                "enhanced-codes",
                "error replies carry an enhanced status code",
                f"ENHANCEDSTATUSCODES advertised but {code} {message!r}",
            )
        code, raw = smtp.docmd("RCPT", "TO:<postmaster@example.invalid>")
        status = "PASS" if code == 503 else ("WARN" if 500 <= code < 600 else "FAIL")
        r.add(status, "bad-sequence", f"RCPT before MAIL: {code} {raw.decode('utf-8', 'replace')}")
        self.login(smtp)
        smtp.rset()
        code, raw = smtp.docmd("QUIT")
        r.expect(code == 221, "quit", f"{code}", f"QUIT answered {code}")

    def login(self, smtp: smtplib.SMTP) -> None:
        if not (self.o.user and self.o.password):
            self.r.add("SKIP", "login", "needs --user and --password")
            return
        token = base64.b64encode(f"\0{self.o.user}\0{self.o.password}".encode()).decode("ascii")
        code, raw = smtp.docmd("AUTH", f"PLAIN {token}")
        self.r.expect(
            code == 235,
            "login",
            f"AUTH PLAIN as {self.o.user}: {code}",
            f"AUTH PLAIN as {self.o.user}: {code} {raw.decode('utf-8', 'replace')}",
        )
