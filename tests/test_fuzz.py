# mypy: allow-untyped-calls
"""Property tests over the pure grammars and the two protocols fed random bytes.

Every parser may only raise its own documented error; encoders and decoders round-trip;
a protocol fed any bytes never raises, never logs a handler failure and never puts a
Python exception name or traceback on the wire. The default (CI) Hypothesis profile is
modest; the long run is ``HYPOTHESIS_PROFILE=fuzz .venv/bin/pytest tests/test_fuzz.py``
(profiles in tests/conftest.py).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from mailgate import sasl
from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.dataread import DataReader
from mailgate.errors import AddressError
from mailgate.model import Address, parse_account
from mailgate.pop3 import Pop3Factory, Pop3Settings
from mailgate.pop3 import _grammar as pop3g
from mailgate.realm import MailRealm
from mailgate.recipients import RecipientError, extract_recipients, parse_address_list
from mailgate.smtp import SmtpFactory, SmtpSettings
from mailgate.smtp import _grammar as smtpg
from mailgate.testing import MemoryMailStore, MemoryUserDatabase
from mailgate.wire import WireEncoder
from tests.test_pop3_server import TLSTransport
from tests.test_smtp_server import TLSStringTransport

# Bytes that matter to these grammars, mixed with anything at all.
_INTERESTING = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"\x00", b" ", b"\t", b"<", b">", b":", b"@", b"=", b'"']
)
noisy_bytes = st.lists(st.one_of(st.binary(max_size=8), _INTERESTING), max_size=40).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given (wrapped) offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, start = [], 0
    for p in points:
        out.append(data[start:p])
        start = p
    out.append(data[start:])
    return out


cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)

# -- POP3 grammar ----------------------------------------------------------------------------


@given(noisy_bytes, st.sampled_from(list(pop3g.Parsing)))
def test_pop3_parse_command_raises_only_its_error(line: bytes, mode: pop3g.Parsing) -> None:
    try:
        command = pop3g.parse_command(line, mode)
    except pop3g.Pop3SyntaxError as e:
        assert e.reply and e.reply.isprintable()
        return
    assert command.verb == command.verb.upper() and command.verb.isascii()
    assert not any(c in command.rest for c in b"\r\n\x00")
    for arg in command.args():
        assert arg and b" " not in arg


@given(st.binary(max_size=30), st.integers(min_value=0, max_value=10**6))
def test_pop3_message_number(arg: bytes, count: int) -> None:
    try:
        index = pop3g.parse_message_number(arg, count)
    except pop3g.Pop3SyntaxError:
        assert not arg.isdigit() or not 1 <= int(arg) <= count
        return
    assert arg.isdigit() and index == int(arg) - 1 and 0 <= index < count


@given(st.binary(max_size=40))
def test_pop3_line_count_and_field_name(arg: bytes) -> None:
    try:
        assert pop3g.parse_line_count(arg) >= 0
    except pop3g.Pop3SyntaxError:
        assert not arg.isdigit()
    try:
        assert pop3g.parse_field_name(arg).encode("ascii") == arg
    except pop3g.Pop3SyntaxError:
        pass


@given(st.lists(st.binary(max_size=6), max_size=4), st.lists(st.sampled_from(["xmit", "xlst"])))
def test_pop3_xtnd(args: list[bytes], enabled: list[str]) -> None:
    try:
        x = pop3g.parse_xtnd(args, enabled)
    except pop3g.Pop3SyntaxError as e:
        assert e.reply.isprintable()
        return
    assert x.sub in enabled


@given(noisy_bytes, cuts, st.booleans())
def test_pop3_line_framer_is_chunking_invariant(data: bytes, at: list[int], bare_lf: bool) -> None:
    def frame(pieces: list[bytes]) -> list[object]:
        framer = pop3g.LineFramer(40, bare_lf=bare_lf)
        out: list[object] = []
        for piece in pieces:
            framer.feed(piece)
            while (item := framer.next_line()) is not None:
                out.append(item)
        return out

    whole = frame([data])
    assert frame(chunked(data, at)) == whole
    for item in whole:
        assert item is pop3g.TOO_LONG or (isinstance(item, bytes) and len(item) <= 38)


lf_text = st.lists(
    st.one_of(st.binary(max_size=10), st.sampled_from([b"\n", b".", b"..", b"\n.\n", b"\n."])),
    max_size=30,
).map(lambda parts: b"".join(parts).replace(b"\r", b""))


@given(st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))))
def test_pop3_multiline_round_trip(lines: list[bytes]) -> None:
    wire = pop3g.multiline(pop3g.ok(), lines)
    body = wire[len(pop3g.ok()) :]
    assert body.endswith(b".\r\n")
    got = body[:-3].split(b"\r\n")[:-1] if lines else []
    assert [x[1:] if x.startswith(b".") else x for x in got] == lines


@given(lf_text, cuts, st.integers(min_value=0, max_value=5))
def test_top_limiter_output_is_a_prefix(content: bytes, at: list[int], k: int) -> None:
    enc = WireEncoder(stuff=True)
    wire = b"".join(enc.feed(c) for c in chunked(content, at)) + enc.finish()
    limiter = pop3g.TopLimiter(k)
    out = limiter.feed(wire)
    assert wire.startswith(out)


# -- wire / dataread round trip --------------------------------------------------------------


@given(lf_text, cuts, cuts, noisy_bytes)
def test_stuffing_round_trip(
    content: bytes, enc_cuts: list[int], dec_cuts: list[int], after: bytes
) -> None:
    enc = WireEncoder(stuff=True)
    wire = b"".join(enc.feed(c) for c in chunked(content, enc_cuts)) + enc.finish()
    assert b"\r\n.\r\n" not in b"\r\n" + wire
    got: list[bytes] = []
    reader = DataReader(got.append, line_limit=10**6)
    rest = None
    for piece in chunked(wire + b".\r\n" + after, dec_cuts):
        if rest is not None:
            rest += piece
            continue
        rest = reader.feed(piece)
    assert rest == after
    expected = content if not content or content.endswith(b"\n") else content + b"\n"
    assert b"".join(got) == expected
    assert reader.size == len(expected) + expected.count(b"\n")  # RFC 1870: unstuffed, CRLF


@given(noisy_bytes, cuts)
def test_data_reader_on_random_input(data: bytes, at: list[int]) -> None:
    reader = DataReader(lambda b: None, line_limit=100, max_size=200)
    pieces = chunked(data, at)
    for i, piece in enumerate(pieces):
        rest = reader.feed(piece)
        if rest is not None:
            # What follows the terminator: the rest of this piece plus every later piece.
            assert data.endswith(rest + b"".join(pieces[i + 1 :]))
            assert rest == piece[len(piece) - len(rest) :]
            break


# -- SMTP grammar ----------------------------------------------------------------------------


@given(noisy_bytes, st.sampled_from(list(smtpg.Parsing)))
def test_smtp_parse_command_raises_only_its_error(line: bytes, mode: smtpg.Parsing) -> None:
    try:
        cmd = smtpg.parse_command(line, mode)
    except smtpg.SmtpSyntaxError as e:
        assert e.kind in ("line", "verb")
        return
    assert cmd.verb.isalpha() and cmd.verb == cmd.verb.upper()


@given(noisy_bytes, st.sampled_from(["FROM", "TO"]), st.booleans(), st.booleans())
def test_smtp_paths_and_parameters(arg: bytes, keyword: str, strict: bool, utf8: bool) -> None:
    try:
        path = smtpg.parse_path(arg, keyword, strict=strict)
    except smtpg.SmtpSyntaxError:
        return
    for check in (
        lambda: smtpg.parse_mail_params(path.params, smtputf8_enabled=utf8),
        lambda: smtpg.check_rcpt_params(path.params),
        lambda: smtpg.parse_address(path.mailbox, "example.com"),
    ):
        try:
            check()
        except smtpg.SmtpSyntaxError:
            pass


@given(
    st.sampled_from(["FROM", "TO"]),
    st.from_regex(r"\A[a-z0-9.+_-]{1,20}@[a-z0-9-]{1,10}\.[a-z]{2,5}\Z"),
    st.integers(min_value=0, max_value=10**12),
)
def test_smtp_path_round_trip(keyword: str, mailbox: str, size: int) -> None:
    assume(".." not in mailbox and not mailbox.startswith(".") and ".@" not in mailbox)
    path = smtpg.parse_path(f"{keyword}:<{mailbox}> SIZE={size}".encode(), keyword, strict=True)
    assert path.mailbox == mailbox
    assert smtpg.parse_mail_params(path.params, smtputf8_enabled=False).size == size


@given(st.text(max_size=60))
def test_smtp_parameter_text(params: str) -> None:
    try:
        smtpg.parse_mail_params(params, smtputf8_enabled=True)
    except smtpg.SmtpSyntaxError as e:
        assert e.kind in ("unknown-param", "bad-param", "param-syntax")


# -- SASL ------------------------------------------------------------------------------------


@given(
    st.sampled_from(sorted(sasl.MECHANISMS)),
    st.one_of(st.none(), st.binary(max_size=60)),
    st.lists(st.binary(max_size=60), max_size=4),
)
def test_sasl_exchanges_raise_only_sasl_errors(
    name: str, initial: bytes | None, steps: list[bytes]
) -> None:
    mech = sasl.mechanism(name, challenge=b"<1.2@h>")
    assert mech is not None
    try:
        result = mech.start(initial)
        for data in steps:
            if not isinstance(result, sasl.Challenge):
                break
            result = mech.step(data)
    except (sasl.SaslError, sasl.Cancelled):
        return
    assert isinstance(result, sasl.Challenge) or isinstance(result.username, bytes)


@given(noisy_bytes)
def test_sasl_decode_response_raises_only_its_errors(line: bytes) -> None:
    try:
        sasl.decode_response(line)
    except (sasl.SaslError, sasl.Cancelled):
        pass


@given(st.binary(max_size=200))
def test_sasl_base64_round_trip(data: bytes) -> None:
    assert sasl.decode_response(sasl.encode_challenge(data)) == data
    assert sasl.decode_response(base64.b64encode(data)) == data


@given(st.binary(max_size=30), st.binary(max_size=30), st.binary(max_size=30))
def test_sasl_plain_round_trip(authzid: bytes, authcid: bytes, password: bytes) -> None:
    assume(b"\0" not in authzid + authcid + password)
    mech = sasl.mechanism("PLAIN")
    assert mech is not None
    try:
        result = mech.start(authzid + b"\0" + authcid + b"\0" + password)
    except sasl.SaslError:
        return  # empty fields, bad UTF-8 or a proxy authzid: refused, never half-accepted
    assert not isinstance(result, sasl.Challenge)
    assert result.username == authcid


# -- addresses -------------------------------------------------------------------------------

address_text = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"\A[A-Za-z0-9._+-]{1,12}(@[A-Za-z0-9.-]{1,12})?\Z"),
)


@given(address_text, st.one_of(st.none(), st.just("example.com")))
def test_address_parse_round_trip(text: str, default: str | None) -> None:
    try:
        address = Address.parse(text, default)
    except AddressError:
        return
    assert Address.parse(str(address)) == address
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in str(address))


@given(address_text, st.booleans())
def test_parse_account_is_path_safe_and_round_trips(login: str, fold: bool) -> None:
    try:
        account = parse_account(login, "example.com", fold_local_case=fold)
    except AddressError:
        return
    assert "/" not in account.local and "\\" not in account.local
    assert account.local not in (".", "..")
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in account.local + account.domain)
    assert parse_account(str(account), "example.com", fold_local_case=fold) == account


@given(st.text(max_size=80))
def test_recipient_lists_raise_only_recipient_errors(value: str) -> None:
    try:
        for a in parse_address_list(value, "example.com"):
            assert isinstance(a, Address)
    except RecipientError:
        pass
    try:
        extract_recipients([("To", value), ("Cc", value)], "example.com", max_recipients=5)
    except RecipientError:
        pass


# -- the protocols, fed random bytes ---------------------------------------------------------

_PYTHON_LEAK = re.compile(rb"Traceback|[A-Za-z]+(Error|Exception)\b|File \"")

pop3_line = st.one_of(
    st.sampled_from(
        [
            b"USER alice",
            b"PASS secret",
            b"STAT",
            b"LIST",
            b"LIST 1",
            b"RETR 1",
            b"TOP 1 2",
            b"DELE 1",
            b"UIDL",
            b"NOOP",
            b"RSET",
            b"CAPA",
            b"AUTH PLAIN",
            b"AUTH LOGIN",
            b"AUTH CRAM-MD5",
            b"STLS",
            b"XTND XMIT",
            b"XTND XLST Subject",
            b"*ENV 1",
            b"APOP alice 0123456789abcdef0123456789abcdef",
            b"*",
            b"=",
            base64.b64encode(b"\0alice\0secret"),
            b".",
            b"To: a@example.com",
            b"",
        ]
    ),
    noisy_bytes,
).map(lambda line: line + b"\r\n")
smtp_line = st.one_of(
    st.sampled_from(
        [
            b"EHLO c",
            b"HELO c",
            b"STARTTLS",
            b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret"),
            b"AUTH LOGIN",
            b"MAIL FROM:<alice@example.com>",
            b"MAIL FROM:<> SIZE=10 BODY=8BITMIME",
            b"RCPT TO:<bob@example.com>",
            b"RCPT TO:<x@elsewhere.test>",
            b"DATA",
            b"RSET",
            b"NOOP",
            b"VRFY a",
            b"EXPN a",
            b"HELP",
            b"Subject: x",
            b"",
            b".",
            b"..",
            b"*",
        ]
    ),
    noisy_bytes,
).map(lambda line: line + b"\r\n")


def _no_leak(transport: Any, events: Sequence[dict[str, Any]]) -> None:
    out = transport.value()
    assert _PYTHON_LEAK.search(out) is None, out
    failures = [e for e in events if "log_failure" in e]
    assert failures == [], failures


def _users() -> MemoryUserDatabase:
    return MemoryUserDatabase({"alice@example.com": "secret", "bob@example.com": "pw"})


@given(st.lists(pop3_line, max_size=25), cuts, st.booleans())
def test_pop3_server_on_random_input(lines: list[bytes], at: list[int], xmit: bool) -> None:
    store = MemoryMailStore()
    store.deliver(Address("alice", "example.com"), b"Subject: s\n\nbody\n.\n")
    users = _users()
    portal = Portal(
        MailRealm(store, users, ["example.com"]),
        [PasswordChecker(users, "example.com", plaintext_verify)],
    )
    settings = Pop3Settings(
        hostname="h",
        tls_context=object(),
        allow_plaintext=lambda ip: True,
        xtnd_xmit=xmit,
        xtnd_xlst=True,
        sdps_env=True,
        apop_available=lambda: True,
        cram_md5_available=lambda: True,
    )
    proto = Pop3Factory(portal, settings, Clock()).buildProtocol(None)
    transport = TLSTransport()
    with capturedLogs() as events:
        proto.makeConnection(transport)
        for piece in chunked(b"".join(lines), at):
            proto.dataReceived(piece)
            while transport.producer is not None and not transport.disconnecting:
                transport.producer.resumeProducing()
        proto.connectionLost(None)  # type: ignore[arg-type]
    _no_leak(transport, events)


@given(st.lists(smtp_line, max_size=25), cuts, st.booleans())
def test_smtp_server_on_random_input(lines: list[bytes], at: list[int], trusted: bool) -> None:
    store = MemoryMailStore()
    users = _users()
    realm = MailRealm(store, users, ["example.com"])
    portal = Portal(realm, [PasswordChecker(users, "example.com", plaintext_verify)])
    settings = SmtpSettings(
        hostname="h",
        default_domain="example.com",
        tls_context=object(),
        require_tls=False,
        allow_plaintext=lambda ip: True,
        trusted=lambda ip: trusted,
        cram_md5_available=lambda: True,
        max_size=300,
    )
    proto = SmtpFactory(
        portal, settings, Clock(), lambda: realm.submission_for(None)
    ).buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
    transport = TLSStringTransport("192.0.2.1")
    with capturedLogs() as events:
        proto.makeConnection(transport)
        for piece in chunked(b"".join(lines), at):
            proto.dataReceived(piece)
        proto.connectionLost(None)  # type: ignore[arg-type]
    _no_leak(transport, events)
