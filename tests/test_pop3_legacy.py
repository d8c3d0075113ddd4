# mypy: allow-untyped-calls
"""POP3 legacy logins and capability profiles: APOP, CRAM-MD5, SDPS forms, LOGIN-DELAY,
EXPIRE, *ENV and the per-listener Pop3Profile switches."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailgate.auth.checker import PasswordChecker
from mailgate.auth.passwords import hash_password, verify_password
from mailgate.model import Address
from mailgate.pop3 import Pop3Factory, Pop3Profile, Pop3Settings
from mailgate.pop3.server import State, envelope_sender
from mailgate.realm import MailRealm
from mailgate.testing import MemoryMailStore, MemoryUserDatabase
from tests.test_pop3_server import TLS_CONTEXT, RecordingTransport, TLSTransport

TIM = Address("tim", "example.com")
APOP_TS = b"<1896.697170952@dbc.mtview.ca.us>"
CRAM_CH = b"<1896.697170952@postoffice.reston.mci.net>"
CRAM_TIM = b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
DAY = 86400
NOW = 1_700_000_000.0
CRAM_HASH = hash_password("tanstaaftanstaaf", "CRAM-MD5")
ARGON_HASH = hash_password("tanstaaftanstaaf", "ARGON2ID")  # hashed once: it is slow


def fixed(value: bytes) -> Any:
    return lambda hostname, now: value


class Legacy:
    """A session over a real checker with {PLAIN}, {CRAM-MD5} and ARGON2ID accounts."""

    def __init__(
        self,
        *,
        apop: bool = True,
        cram: bool = True,
        challenge: Any = None,
        plaintext: bool = True,
        clock: Clock | None = None,
        store: MemoryMailStore | None = None,
        factory: Pop3Factory | None = None,
        tls: bool = True,
        **settings: Any,
    ) -> None:
        self.store = store if store is not None else MemoryMailStore()
        self.clock = clock or Clock()
        if factory is None:
            users = MemoryUserDatabase(
                {
                    "tim@example.com": "{PLAIN}tanstaaf",
                    "cram@example.com": CRAM_HASH,
                    "strong@example.com": ARGON_HASH,
                }
            )
            checker = PasswordChecker(
                users, "example.com", verify_password, known_domains=["example.com"]
            )
            portal = Portal(MailRealm(self.store, users, ["example.com"]), [checker])
            extra: dict[str, Any] = {}
            if challenge is not None:
                extra["challenge"] = challenge
            factory = Pop3Factory(
                portal,
                Pop3Settings(
                    hostname="mail.example.com",
                    tls_context=TLS_CONTEXT,
                    allow_plaintext=lambda host: plaintext,
                    apop_available=lambda: apop,
                    cram_md5_available=lambda: cram,
                    **extra,
                    **settings,
                ),
                self.clock,
            )
        self.factory = factory
        self.proto = factory.buildProtocol(None)
        self.transport: RecordingTransport = TLSTransport() if tls else RecordingTransport()
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, line: str | bytes) -> bytes:
        self.proto.dataReceived((line.encode() if isinstance(line, str) else line) + b"\r\n")
        while self.transport.producer is not None:  # let RETR/TOP stream to the end
            self.transport.producer.resumeProducing()
        return self.take()

    def capa(self) -> list[bytes]:
        return self.cmd("CAPA").split(b"\r\n")[1:-2]


def apop_line(user: str, secret: str, timestamp: bytes) -> str:
    import hashlib

    return f"APOP {user} {hashlib.md5(timestamp + secret.encode()).hexdigest()}"


class ApopTests(unittest.TestCase):
    def test_rfc1939_vector_logs_in(self) -> None:
        s = Legacy(challenge=fixed(APOP_TS))
        assert s.greeting == b"+OK mail.example.com POP3 server ready " + APOP_TS + b"\r\n"
        reply = s.cmd("APOP tim c4c9334bac560ecc979e58001b3e22fb")
        assert reply.startswith(b"+OK maildrop has 0 messages")
        assert s.proto.state is State.TRANSACTION

    def test_upper_case_hex_is_accepted(self) -> None:
        s = Legacy(challenge=fixed(APOP_TS))
        assert s.cmd("APOP tim C4C9334BAC560ECC979E58001B3E22FB").startswith(b"+OK")

    def test_apop_works_before_tls_even_without_plaintext_logins(self) -> None:
        s = Legacy(challenge=fixed(APOP_TS), plaintext=False)
        assert s.cmd("USER tim").startswith(b"-ERR [AUTH]")
        assert s.cmd("APOP tim c4c9334bac560ecc979e58001b3e22fb").startswith(b"+OK")

    def test_greeting_timestamps_are_unique_per_connection(self) -> None:
        stamps = set()
        for _ in range(50):
            greeting = Legacy().greeting
            found = re.findall(rb"<[0-9a-f]{16}\.\d+@mail\.example\.com>", greeting)
            assert len(found) == 1
            stamps.add(found[0])
        assert len(stamps) == 50

    def test_default_timestamp_works_end_to_end(self) -> None:
        s = Legacy()
        timestamp = re.search(rb"<[^>]+>", s.greeting)
        assert timestamp is not None
        assert s.cmd(apop_line("tim", "tanstaaf", timestamp.group(0))).startswith(b"+OK")

    def test_no_timestamp_and_no_apop_when_no_account_can_use_it(self) -> None:
        s = Legacy(apop=False)
        assert s.greeting == b"+OK mail.example.com POP3 server ready\r\n"
        assert s.cmd("APOP tim c4c9334bac560ecc979e58001b3e22fb") == (
            b"-ERR Unknown command: APOP\r\n"
        )

    def test_availability_is_asked_per_connection(self) -> None:
        available = [False]
        users = MemoryUserDatabase({"tim@example.com": "{PLAIN}tanstaaf"})
        portal = Portal(
            MailRealm(MemoryMailStore(), users, ["example.com"]),
            [PasswordChecker(users, "example.com", verify_password)],
        )
        factory = Pop3Factory(
            portal,
            Pop3Settings(hostname="h.example", apop_available=lambda: available[0]),
            Clock(),
        )
        assert b"<" not in Legacy(factory=factory).greeting
        available[0] = True
        assert b"<" in Legacy(factory=factory).greeting

    def test_wrong_digest_and_scheme_without_secret_fail_with_auth_code(self) -> None:
        s = Legacy(challenge=fixed(APOP_TS))
        assert s.cmd("APOP tim " + "0" * 32) == b"-ERR [AUTH] Authentication failed\r\n"
        # {CRAM-MD5} and Argon2id entries keep no clear secret: the normal auth error.
        assert s.cmd(apop_line("cram", "tanstaaftanstaaf", APOP_TS)).startswith(b"-ERR [AUTH]")
        s2 = Legacy(challenge=fixed(APOP_TS))
        assert s2.cmd(apop_line("strong", "tanstaaftanstaaf", APOP_TS)).startswith(b"-ERR [AUTH]")

    def test_malformed_apop(self) -> None:
        s = Legacy(challenge=fixed(APOP_TS))
        assert s.cmd("APOP tim").startswith(b"-ERR")
        assert s.proto.state is State.AUTHORIZATION
        assert s.cmd("APOP tim nothex").startswith(b"-ERR [AUTH]")

    def test_apop_not_valid_in_transaction(self) -> None:
        s = Legacy(challenge=fixed(APOP_TS))
        s.cmd("APOP tim c4c9334bac560ecc979e58001b3e22fb")
        assert s.cmd("APOP tim c4c9334bac560ecc979e58001b3e22fb") == (
            b"-ERR Command not valid in this state\r\n"
        )

    def test_sdps_forms_with_apop(self) -> None:
        for login in ("tim@example.com", "tim+example.com", "TIM"):
            s = Legacy(challenge=fixed(APOP_TS))
            assert s.cmd(f"APOP {login} c4c9334bac560ecc979e58001b3e22fb").startswith(b"+OK")


class CramMd5Tests(unittest.TestCase):
    def test_rfc2195_vector_with_a_plain_secret(self) -> None:
        s = Legacy(challenge=fixed(CRAM_CH), plaintext=False)
        # Not a plaintext mechanism: offered and usable before TLS.
        assert b"SASL CRAM-MD5" in s.capa()
        assert s.cmd("AUTH CRAM-MD5") == b"+ " + base64.b64encode(CRAM_CH) + b"\r\n"
        # "tim" has {PLAIN}tanstaaf; the RFC vector's secret is tanstaaftanstaaf.
        assert s.cmd(CRAM_TIM).startswith(b"-ERR [AUTH]")

    def test_rfc2195_vector_with_a_cram_md5_context(self) -> None:
        s = Legacy(challenge=fixed(CRAM_CH))
        s.cmd("AUTH CRAM-MD5")
        answer = base64.b64encode(base64.b64decode(CRAM_TIM).replace(b"tim", b"cram", 1))
        assert s.cmd(answer).startswith(b"+OK maildrop")
        assert s.proto.state is State.TRANSACTION

    def test_refused_for_argon2id_with_the_normal_auth_error(self) -> None:
        s = Legacy(challenge=fixed(CRAM_CH))
        s.cmd("AUTH CRAM-MD5")
        answer = base64.b64encode(base64.b64decode(CRAM_TIM).replace(b"tim", b"strong", 1))
        assert s.cmd(answer) == b"-ERR [AUTH] Authentication failed\r\n"

    def test_initial_response_is_an_error(self) -> None:
        s = Legacy(challenge=fixed(CRAM_CH))
        reply = s.cmd(b"AUTH CRAM-MD5 " + CRAM_TIM)
        assert reply.startswith(b"-ERR ") and b"[AUTH]" not in reply
        assert s.proto.state is State.AUTHORIZATION

    def test_not_offered_when_no_account_supports_it(self) -> None:
        s = Legacy(cram=False)
        assert all(b"CRAM-MD5" not in tag for tag in s.capa())
        assert b"CRAM-MD5" not in s.cmd("AUTH")
        assert s.cmd("AUTH CRAM-MD5") == b"-ERR Unrecognized authentication type\r\n"

    def test_challenge_is_fresh_per_exchange(self) -> None:
        s = Legacy()
        first = s.cmd("AUTH CRAM-MD5")
        s.cmd("*")
        assert s.cmd("AUTH CRAM-MD5") != first


class LoginDelayTests(unittest.TestCase):
    def test_advertised_and_enforced_per_account(self) -> None:
        clock = Clock()
        first = Legacy(challenge=fixed(APOP_TS), clock=clock, login_delay=300)
        assert b"LOGIN-DELAY 300" in first.capa()
        assert first.cmd("APOP tim c4c9334bac560ecc979e58001b3e22fb").startswith(b"+OK")
        first.cmd("QUIT")
        factory = first.factory
        clock.advance(299)
        again = Legacy(factory=factory, clock=clock)
        reply = again.cmd("USER tim") and again.cmd("PASS tanstaaf")
        assert reply.startswith(b"-ERR [LOGIN-DELAY] ")
        assert again.proto.state is State.AUTHORIZATION
        # The lock was let go, and the session can still log in another account.
        assert TIM not in first.store.locked
        assert again.cmd("USER strong") == b"+OK Send your password\r\n"
        assert again.cmd("PASS tanstaaftanstaaf").startswith(b"+OK maildrop")
        clock.advance(1)
        late = Legacy(factory=factory, clock=clock)
        late.cmd("USER tim")
        assert late.cmd("PASS tanstaaf").startswith(b"+OK maildrop")

    def test_not_advertised_by_default(self) -> None:
        s = Legacy()
        assert not any(t.startswith(b"LOGIN-DELAY") or t.startswith(b"EXPIRE") for t in s.capa())


class ExpireTests(unittest.TestCase):
    def store(self) -> MemoryMailStore:
        store = MemoryMailStore()
        store.deliver(TIM, b"Subject: old\n\nold\n", delivered=NOW - 31 * DAY)
        store.deliver(TIM, b"Subject: new\n\nnew\n", delivered=NOW - 29 * DAY)
        store.deliver(TIM, b"Subject: unknown age\n\n?\n")
        return store

    def session(self, expire: int | str | None) -> Legacy:
        clock = Clock()
        clock.advance(NOW)
        s = Legacy(store=self.store(), clock=clock, expire=expire)
        s.cmd("USER tim")
        assert s.cmd("PASS tanstaaf").startswith(b"+OK maildrop has 3")
        return s

    def subjects(self, s: Legacy) -> list[bytes]:
        return [m.data.split(b"\n")[0] for m in s.store.mailboxes[TIM]]

    def test_quit_deletes_only_messages_older_than_the_limit(self) -> None:
        s = self.session(30)
        assert b"EXPIRE 30" in s.capa()
        assert s.cmd("STAT") == b"+OK 3 69\r\n"  # still visible during the session
        assert s.cmd("QUIT").startswith(b"+OK")
        assert self.subjects(s) == [b"Subject: new", b"Subject: unknown age"]

    def test_dropped_connection_expires_nothing(self) -> None:
        s = self.session(30)
        s.proto.connectionLost()
        assert len(s.store.mailboxes[TIM]) == 3

    def test_never_and_unset_delete_nothing(self) -> None:
        for expire in ("NEVER", None):
            s = self.session(expire)
            tags = s.capa()
            assert (b"EXPIRE NEVER" in tags) == (expire == "NEVER")
            s.cmd("QUIT")
            assert len(s.store.mailboxes[TIM]) == 3

    def test_expire_zero_deletes_what_was_retrieved(self) -> None:
        s = self.session(0)
        s.cmd("RETR 2")
        s.cmd("TOP 3 0")
        s.cmd("QUIT")
        assert self.subjects(s) == [b"Subject: old", b"Subject: unknown age"]

    def test_settings_validate_expire(self) -> None:
        with pytest.raises(ValueError):
            Pop3Settings(hostname="h", expire="SOMETIMES")
        with pytest.raises(ValueError):
            Pop3Settings(hostname="h", expire=-1)
        with pytest.raises(ValueError):
            Pop3Settings(hostname="h", login_delay=-5)


class SdpsEnvTests(unittest.TestCase):
    def session(self, **kw: Any) -> Legacy:
        store = MemoryMailStore()
        store.deliver(TIM, b"Return-Path: <sender@remote.example>\nSubject: a\n\nx\n")
        store.deliver(TIM, b"Return-Path: <>\nSubject: b\n\nx\n")
        store.deliver(TIM, b"Subject: c\n\n.x\n")
        s = Legacy(store=store, **kw)
        s.cmd("USER tim+example.com")
        assert s.cmd("PASS tanstaaf").startswith(b"+OK")
        return s

    def test_env_lines(self) -> None:
        s = self.session(sdps_env=True)
        assert s.cmd("*ENV 1") == (
            b"+OK\r\ntim\r\nexample.com\r\nsender@remote.example\r\ntim@example.com\r\n.\r\n"
        )
        assert s.cmd("*env 2") == b"+OK\r\ntim\r\nexample.com\r\n\r\ntim@example.com\r\n.\r\n"
        assert s.cmd("*ENV 3").split(b"\r\n")[3] == b""
        assert s.cmd("*ENV 9").startswith(b"-ERR")
        assert s.cmd("*ENV").startswith(b"-ERR")

    def test_env_is_unknown_when_off_or_before_login(self) -> None:
        s = self.session()
        assert s.cmd("*ENV 1") == b"-ERR Unknown command: *ENV\r\n"
        before = Legacy(sdps_env=True)
        assert before.cmd("*ENV 1") == b"-ERR Unknown command: *ENV\r\n"

    def test_envelope_sender_is_wire_safe(self) -> None:
        assert envelope_sender([b"Return-Path:", b"  <a@b.example>"]) == b"a@b.example"
        assert envelope_sender([b"Return-Path: a b@c"]) == b""
        assert envelope_sender([]) == b""


class ProfileTests(unittest.TestCase):
    def session(self, profile: Pop3Profile, **kw: Any) -> Legacy:
        return Legacy(profile=profile, challenge=fixed(APOP_TS), **kw)

    def login(self, s: Legacy) -> None:
        s.cmd("USER tim")
        assert s.cmd("PASS tanstaaf").startswith(b"+OK")

    def test_default_profile_lists_everything_as_before(self) -> None:
        s = Legacy(plaintext=False)
        assert s.capa() == [
            b"TOP",
            b"UIDL",
            b"SASL CRAM-MD5",
            b"RESP-CODES",
            b"AUTH-RESP-CODE",
            b"PIPELINING",
            b"STLS",
        ]

    def test_user_off(self) -> None:
        s = self.session(Pop3Profile(user=False))
        assert b"USER" not in s.capa()
        assert s.cmd("USER tim") == b"-ERR Unknown command: USER\r\n"
        assert s.cmd("PASS tanstaaf") == b"-ERR Unknown command: PASS\r\n"

    def test_top_and_uidl_off(self) -> None:
        s = self.session(Pop3Profile(top=False, uidl=False))
        self.login(s)
        tags = s.capa()
        assert b"TOP" not in tags and b"UIDL" not in tags
        assert s.cmd("TOP 1 0") == b"-ERR Unknown command: TOP\r\n"
        assert s.cmd("UIDL") == b"-ERR Unknown command: UIDL\r\n"

    def test_stls_off(self) -> None:
        s = self.session(Pop3Profile(stls=False))
        assert b"STLS" not in s.capa()
        assert s.cmd("STLS") == b"-ERR Unknown command: STLS\r\n"
        assert isinstance(s.transport, TLSTransport) and s.transport.tls_started == []

    def test_apop_off_hides_the_timestamp(self) -> None:
        s = self.session(Pop3Profile(apop=False))
        assert b"<" not in s.greeting
        assert s.cmd("APOP tim c4c9334bac560ecc979e58001b3e22fb").startswith(b"-ERR Unknown")

    def test_each_mechanism_can_be_switched_off(self) -> None:
        s = self.session(Pop3Profile(sasl=("PLAIN",)))
        assert b"SASL PLAIN" in s.capa()
        assert s.cmd("AUTH") == b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"
        assert s.cmd("AUTH LOGIN") == b"-ERR Unrecognized authentication type\r\n"
        assert s.cmd("AUTH CRAM-MD5") == b"-ERR Unrecognized authentication type\r\n"
        none = self.session(Pop3Profile(sasl=()))
        assert not any(t.startswith(b"SASL") for t in none.capa())
        assert none.cmd("AUTH") == b"-ERR Unknown command: AUTH\r\n"
        with pytest.raises(ValueError):
            Pop3Profile(sasl=("GSSAPI",))

    def test_pipelining_off(self) -> None:
        assert b"PIPELINING" not in self.session(Pop3Profile(pipelining=False)).capa()

    def test_xtnd_off(self) -> None:
        s = self.session(Pop3Profile(xtnd=False), xtnd_xlst=True)
        self.login(s)
        assert s.cmd("XTND XLST Subject") == b"-ERR Unknown command: XTND\r\n"
        on = self.session(Pop3Profile(), xtnd_xlst=True)
        self.login(on)
        assert on.cmd("XTND XLST Subject").startswith(b"+OK")

    def test_resp_codes_off(self) -> None:
        s = self.session(Pop3Profile(resp_codes=False), plaintext=False)
        tags = s.capa()
        assert b"RESP-CODES" not in tags and b"AUTH-RESP-CODE" not in tags
        assert s.cmd("USER tim") == (
            b"-ERR Plaintext authentication disallowed on non-secure connection\r\n"
        )
        assert s.cmd("APOP tim " + "0" * 32) == b"-ERR Authentication failed\r\n"

    def test_strict_parsing(self) -> None:
        s = self.session(Pop3Profile(parsing="strict"))
        assert s.cmd("USER  tim") == b"-ERR Invalid command syntax\r\n"
        assert s.cmd("USER tim ") == b"-ERR Invalid command syntax\r\n"
        assert s.cmd("CAPA ") == b"-ERR Invalid command syntax\r\n"
        assert s.send(b"NOOP\n") == b""  # a bare LF does not end a line
        assert s.send(b"\r\n").startswith(b"-ERR")
        assert s.cmd("USER tim") == b"+OK Send your password\r\n"
        assert s.cmd("PASS tanstaaf").startswith(b"+OK")  # PASS keeps its text verbatim
        assert s.cmd("LIST  1") == b"-ERR Invalid command syntax\r\n"

    def test_normal_parsing_is_unchanged(self) -> None:
        s = self.session(Pop3Profile())
        assert s.cmd("USER  tim ") == b"+OK Send your password\r\n"
        assert s.cmd("  NOOP").startswith(b"-ERR")
        assert s.send(b"CAPA\n") == b""

    def test_lenient_parsing(self) -> None:
        s = self.session(Pop3Profile(parsing="lenient"))
        assert s.send(b"  USER   tim  \n") == b"+OK Send your password\r\n"
        assert s.send(b"PASS tanstaaf\n").startswith(b"+OK maildrop")
        assert s.send(b"STAT\r\nNOOP \n") == b"+OK 0 0\r\n+OK\r\n"
        with pytest.raises(ValueError):
            Pop3Profile(parsing="sloppy")


class MaildirAgeTests(unittest.TestCase):
    """EXPIRE's message age as the Maildir store reports it."""

    def test_delivery_time_from_name_or_mtime(self) -> None:
        import os

        from mailgate.store.maildir import MaildirStore
        from tests.test_store_contract import run_sync, temp_dir

        root = temp_dir(self)
        store = MaildirStore(str(root), run_sync, hostname="test.host")
        md = os.path.join(str(root), "example.com", "tim", "Maildir")
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(md, sub), exist_ok=True)
        names = {
            "1600000000.M1P1Q1.host": 1600000000.0,  # time in the name
            "junkname": 1650000000.0,  # no time in the name: mtime
            "1999999999.future.host": 1650000001.0,  # claims the future: mtime wins
            "123.short.host": 1650000002.0,  # too short to be a time: mtime
        }
        for name, mtime in names.items():
            path = os.path.join(md, "new", name)
            with open(path, "wb") as f:
                f.write(b"Subject: x\n\nx\n")
            os.utime(path, (mtime, mtime))
        drop = self.successResultOf(store.open_maildrop(TIM))
        ages = sorted(m.delivered for m in drop.messages if m.delivered is not None)
        drop.release()
        assert ages == sorted(names.values())
