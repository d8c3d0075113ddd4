# mypy: allow-untyped-calls
"""Checklist section 8 POP3 cases (P, C, A, T) that no other test asserted, or only weakly.

The audit table mapping every id to its test lives in the audit report; these tests close
the gaps. They reuse the in-memory harness of tests/test_pop3_server.py: a real Portal over
MailRealm and PasswordChecker, the protocol on a StringTransport, a fake Clock.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from twisted.cred.portal import Portal
from twisted.trial import unittest

from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.auth.passwords import supports_apop, supports_cram_md5, verify_password
from mailgate.auth.userdb import UserFile
from mailgate.model import Address, Envelope
from mailgate.pop3.server import State
from mailgate.realm import MailRealm
from mailgate.service import _legacy_offer
from mailgate.store.maildir import MaildirStore
from mailgate.testing import MemoryMailStore, MemoryUserDatabase
from tests.test_pop3_server import (
    ALICE,
    PLAIN_TIM,
    Session,
    capa_tags,
    make_portal,
    multiline_body,
    unstuffed_retr,
    with_messages,
)
from tests.test_smtp_server import Session as SmtpSession
from tests.test_smtp_server import codes
from tests.test_smtp_server import settings as smtp_settings
from tests.test_store_contract import run_sync, temp_dir

CRAM_CH = b"<1896.697170952@postoffice.reston.mci.net>"
CRAM_TIM = b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
TIMESTAMP = re.compile(rb"<[^<>@\s]+@[^<>@\s]+>")


def fixed(value: bytes) -> Any:
    return lambda hostname, now: value


def sdps_portal(store: MemoryMailStore, users: MemoryUserDatabase) -> Portal:
    """The production checker shape: ``+host`` logins are split only for known domains."""
    checker = PasswordChecker(users, "example.com", plaintext_verify, known_domains=["example.com"])
    return Portal(MailRealm(store, users, ["example.com"]), [checker])


def hashed_user_file(tmp: Path) -> UserFile:
    """A credential store holding only one-way (Argon2id) hashes: no clear secrets."""
    path = tmp / "users"
    path.write_text(
        "alice@example.com:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA\n"
        "tim@example.com:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA\n",
        encoding="utf-8",
    )
    return UserFile(path)


def tls_session(store: MemoryMailStore | None = None, **kw: Any) -> Session:
    """Plaintext logins refused until STLS; STLS already done (the transport double)."""
    s = Session(store, plaintext=False, **kw)
    assert s.cmd("STLS") == b"+OK Begin TLS negotiation\r\n"
    return s


class GreetingAndLogin(unittest.TestCase):
    def test_p01_greeting_with_apop_has_one_timestamp_within_512(self) -> None:
        """P01: first line starts +OK, is <=512 octets, and (APOP on) has one <...@...>."""
        s = Session(apop_available=lambda: True)
        first, _, rest = s.greeting.partition(b"\r\n")
        assert rest == b""
        assert first.startswith(b"+OK ")
        assert len(s.greeting) <= 512
        assert len(TIMESTAMP.findall(first)) == 1

    def test_p04_lower_case_user_over_tls(self) -> None:
        """P04: AUTHORIZATION over TLS, `user alice` (lower case) gets +OK."""
        s = tls_session(with_messages(b"Subject: x\n\nx\n"))
        assert s.cmd("user alice") == b"+OK Send your password\r\n"
        assert s.cmd("pass secret").startswith(b"+OK")
        assert s.state() is State.TRANSACTION

    def test_p13_hashed_store_no_timestamp_and_apop_refused(self) -> None:
        """P13: hashed credential store: no timestamp in the greeting, `APOP x y` gets -ERR."""
        users = hashed_user_file(Path(temp_dir(self)))
        portal = Portal(
            MailRealm(MemoryMailStore(), users, ["example.com"]),
            [PasswordChecker(users, "example.com", verify_password)],
        )
        for mode in ("auto", "some"):
            s = Session(
                portal=portal,
                apop_available=_legacy_offer(users, mode, supports_apop),
                cram_md5_available=_legacy_offer(users, mode, supports_cram_md5),
            )
            assert TIMESTAMP.search(s.greeting) is None, mode
            assert s.cmd("APOP x y").startswith(b"-ERR"), mode
            assert s.cmd("APOP tim c4c9334bac560ecc979e58001b3e22fb").startswith(b"-ERR")
            assert s.state() is State.AUTHORIZATION


class Sizes(unittest.TestCase):
    # 120 and 200 octets once sent with CRLF line ends (5 and 8 lines).
    M120 = b"Subject: a\n\n" + b"x" * 20 + b"\n" + b"y" * 38 + b"\n" + b"z" * 42 + b"\n"
    M200 = b"Subject: b\n\n" + (b"w" * 34 + b"\n") * 5 + b"v" * 4 + b"\n"

    def test_p17_exact_stat_for_120_and_200_octets(self) -> None:
        """P17/P18/P19: messages of 120 and 200 octets: `+OK 2 320`, LIST lines, `+OK 2 200`."""
        assert len(self.M120) + self.M120.count(b"\n") == 120
        assert len(self.M200) + self.M200.count(b"\n") == 200
        s = Session(with_messages(self.M120, self.M200))
        s.login()
        assert s.cmd("STAT") == b"+OK 2 320\r\n"
        reply = s.cmd("LIST")
        assert reply.startswith(b"+OK")
        assert reply.split(b"\r\n", 1)[1] == b"1 120\r\n2 200\r\n.\r\n"
        assert s.cmd("LIST 2") == b"+OK 2 200\r\n"


class Retrieval(unittest.TestCase):
    def retr(self, stored: bytes, command: str = "RETR 1") -> bytes:
        s = Session(with_messages(stored))
        s.login()
        reply = s.cmd(command)
        assert s.cmd("NOOP") == b"+OK\r\n"  # the response ended where the client thinks
        return reply

    def test_p29_dot_line_at_octet_16384(self) -> None:
        """P29: a `.` line starting exactly at octet 16384 is stuffed; no truncation."""
        line = b"a" * 63 + b"\n"
        stored_offset = line * 256 + b".\nafter\n"  # stored octet 16384
        assert stored_offset.index(b"\n.\n") + 1 == 16384
        wire_line = b"a" * 62 + b"\n"  # 64 octets once sent as CRLF
        wire_offset = wire_line * 256 + b".\nafter\n"  # wire octet 16384 (after the status)
        for stored in (stored_offset, wire_offset):
            reply = self.retr(stored)
            assert reply.endswith(b"\r\n..\r\nafter\r\n.\r\n")
            assert reply.count(b"\r\n.\r\n") == 1
            assert unstuffed_retr(reply) == stored.replace(b"\n", b"\r\n")

    def test_p30_bare_lf_storage_goes_out_as_crlf(self) -> None:
        """P30: stored with bare LF: every line ends CRLF and no CR CR LF appears."""
        stored = b"Subject: lf\nX: y\n\none\n\ntwo\n" + b"long " * 4000 + b"\nend\n"
        reply = self.retr(stored)
        assert b"\r\r\n" not in reply
        assert b"\n" not in reply.replace(b"\r\n", b"")
        assert b"\r" not in reply.replace(b"\r\n", b"")
        assert unstuffed_retr(reply) == stored.replace(b"\n", b"\r\n")

    def test_p30_stored_bare_cr_also_goes_out_as_crlf(self) -> None:
        """P30 (section 1.4): stored bare CR is converted to CRLF too; sizes agree with LIST."""
        stored = b"Subject: cr\r\rone\rtwo\r\n.x\rend"
        s = Session(with_messages(stored))
        s.login()
        reply = s.cmd("RETR 1")
        assert reply == b"+OK 34 octets\r\nSubject: cr\r\n\r\none\r\ntwo\r\n..x\r\nend\r\n.\r\n"
        assert s.cmd("LIST 1") == b"+OK 1 34\r\n"

    def test_p31_missing_final_line_end(self) -> None:
        """P31: stored without a final line end: a CRLF precedes the terminating `.`."""
        reply = self.retr(b"Subject: x\n\nno newline at the end")
        assert reply.endswith(b"\r\nno newline at the end\r\n.\r\n")
        # LIST counts the CRLF the server adds.
        s = Session(with_messages(b"Subject: x\n\nno newline at the end"))
        s.login()
        size = int(s.cmd("LIST 1").split()[2])
        assert size == len(unstuffed_retr(s.cmd("RETR 1")))

    def test_p35_top_stuffs_a_first_body_line_of_dot(self) -> None:
        """P35: a body whose 1st line is `.`: `TOP 1 1` sends it stuffed."""
        reply = self.retr(b"Subject: t\n\n.\nsecond\n", "TOP 1 1")
        assert reply.endswith(b"\r\nSubject: t\r\n\r\n..\r\n.\r\n")
        assert reply.count(b"\r\n.\r\n") == 1


class Uids(unittest.TestCase):
    def test_p37_uids_survive_a_restart_and_new_uid_is_unused(self) -> None:
        """P37: across a server restart the same messages keep their UIDs; a new one is new."""
        root = temp_dir(self)

        def deliver(store: MaildirStore, data: bytes) -> None:
            sink = store.open_delivery(Envelope(None, (ALICE,)))
            sink.write(data)
            self.successResultOf(sink.finish())

        def uidl(store: MaildirStore) -> list[bytes]:
            s = Session(portal=make_portal_for(store))
            assert s.login().startswith(b"+OK")
            lines = multiline_body(s.cmd("UIDL"))
            assert s.cmd("QUIT").startswith(b"+OK")
            s.drop()
            return lines

        first = MaildirStore(root, run_sync, hostname="test.host")
        deliver(first, b"Subject: one\n\n1\n")
        deliver(first, b"Subject: two\n\n2\n")
        before = uidl(first)
        assert len(before) == 2
        restarted = MaildirStore(root, run_sync, hostname="test.host")  # a new process
        assert uidl(restarted) == before
        deliver(restarted, b"Subject: three\n\n3\n")
        after = uidl(restarted)
        assert after[:2] == before
        new_uid = after[2].split()[1]
        assert new_uid not in {line.split()[1] for line in before}


def make_portal_for(store: Any) -> Portal:
    users = MemoryUserDatabase({"alice@example.com": "secret"})
    return Portal(
        MailRealm(store, users, ["example.com"]),
        [PasswordChecker(users, "example.com", plaintext_verify)],
    )


class Commands(unittest.TestCase):
    def test_p46_unknown_command_with_400_octet_argument(self) -> None:
        """P46: an unknown command with a 400-octet argument: the reply line is <=512 octets."""
        for logged_in in (False, True):
            s = Session(with_messages(b"x\n"))
            if logged_in:
                s.login()
            reply = s.cmd("FOO " + "x" * 400)
            assert reply.startswith(b"-ERR")
            assert reply.endswith(b"\r\n") and reply.count(b"\r\n") == 1
            assert len(reply) <= 512
            assert s.cmd("NOOP" if logged_in else "CAPA").startswith(b"+OK")

    def test_p48_smtp_delivery_not_in_the_current_snapshot(self) -> None:
        """P48: alice logged in, a message for her arrives by SMTP: STAT unchanged; next has it."""
        store = with_messages(b"Subject: old\n\nold\n")
        pop = Session(store)
        pop.login()
        before = pop.cmd("STAT")
        assert before.startswith(b"+OK 1 ")
        smtp = SmtpSession(
            smtp_settings(require_tls=False, allow_plaintext=lambda ip: True),
            portal=make_portal(store),
        )
        smtp.cmd("EHLO c.example")
        plain = base64.b64encode(b"\0tim\0tanstaaf")
        assert codes(smtp.cmd(b"AUTH PLAIN " + plain)) == ["235 2.7.0"]
        assert codes(smtp.cmd("MAIL FROM:<tim@example.com>")) == ["250 2.1.0"]
        assert codes(smtp.cmd("RCPT TO:<alice@example.com>")) == ["250 2.1.5"]
        assert codes(smtp.cmd("DATA")) == ["354"]
        assert codes(smtp.send(b"Subject: new\r\n\r\nnew\r\n.\r\n")) == ["250 2.0.0"]
        assert len(store.mailboxes[ALICE]) == 2
        assert pop.cmd("STAT") == before
        assert len(multiline_body(pop.cmd("LIST"))) == 1
        assert pop.cmd("RETR 2").startswith(b"-ERR")
        assert pop.cmd("QUIT").startswith(b"+OK")
        pop.drop()
        again = Session(store)
        again.login()
        assert again.cmd("STAT").startswith(b"+OK 2 ")
        assert b"Subject: new" in again.cmd("RETR 2")


class Capa(unittest.TestCase):
    def test_c04_logged_in_capa_keeps_tags_and_shows_expire_value(self) -> None:
        """C04: after login every pre-login tag (same TLS state) is kept; EXPIRE shows the value."""
        for plaintext in (True, False):
            s = Session(with_messages(b"x\n"), plaintext=plaintext, expire=30)
            if not plaintext:
                s.cmd("STLS")
            before = capa_tags(s.cmd("CAPA"))
            s.login()
            after = capa_tags(s.cmd("CAPA"))
            assert set(before) <= set(after), (before, after)
            expire = [t for t in after if t.startswith(b"EXPIRE")]
            assert expire == [b"EXPIRE 30"]
            assert not any(t.endswith(b" USER") for t in after)

    def test_c05_no_twisted_legacy_tags_in_either_state(self) -> None:
        """C05: in any state CAPA lists none of PIPELINE, CELERITY, AUSPEX, POTENCE."""
        s = Session(with_messages(b"x\n"))
        legacy = {b"PIPELINE", b"CELERITY", b"AUSPEX", b"POTENCE"}
        assert not legacy & {t.split()[0] for t in capa_tags(s.cmd("CAPA"))}
        s.login()
        tags = capa_tags(s.cmd("CAPA"))
        assert b"PIPELINING" in tags
        assert not legacy & {t.split()[0] for t in tags}

    def test_c07_capa_with_argument_in_transaction(self) -> None:
        """C07: in any state `CAPA x` gets -ERR (TRANSACTION here; AUTHORIZATION elsewhere)."""
        s = Session(with_messages(b"x\n"))
        s.login()
        assert s.cmd("CAPA x").startswith(b"-ERR")
        assert s.state() is State.TRANSACTION
        assert s.cmd("CAPA").startswith(b"+OK")

    def test_c08_hashed_store_no_cram_md5_after_tls(self) -> None:
        """C08: hashed credential store: CAPA after TLS does not list CRAM-MD5."""
        users = hashed_user_file(Path(temp_dir(self)))
        portal = Portal(
            MailRealm(MemoryMailStore(), users, ["example.com"]),
            [PasswordChecker(users, "example.com", verify_password)],
        )
        for mode in ("auto", "some"):
            s = tls_session(
                portal=portal,
                apop_available=_legacy_offer(users, mode, supports_apop),
                cram_md5_available=_legacy_offer(users, mode, supports_cram_md5),
            )
            reply = s.cmd("CAPA")
            assert b"CRAM-MD5" not in reply
            assert b"SASL PLAIN LOGIN" in capa_tags(reply)
            assert b"CRAM-MD5" not in s.cmd("AUTH")
            assert s.cmd("AUTH CRAM-MD5").startswith(b"-ERR")


class AuthOverTls(unittest.TestCase):
    def test_a01_auth_lists_usable_mechanisms_after_stls(self) -> None:
        """A01: over TLS, `AUTH` gives +OK, the usable mechanism names one per line, `.`."""
        s = tls_session()
        assert s.cmd("AUTH") == b"+OK Supported mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n"
        assert s.state() is State.AUTHORIZATION

    def test_a02_plain_initial_response_after_stls(self) -> None:
        """A02: over TLS, `AUTH PLAIN AHRpbQB0YW5zdGFhZg==` for tim/tanstaaf gives +OK."""
        s = tls_session()
        assert PLAIN_TIM == b"AHRpbQB0YW5zdGFhZg=="
        assert s.cmd(b"AUTH PLAIN AHRpbQB0YW5zdGFhZg==").startswith(b"+OK")
        assert s.state() is State.TRANSACTION

    def test_a03_plain_empty_challenge_after_stls(self) -> None:
        """A03: over TLS, `AUTH PLAIN` alone gets exactly `+ `; a base64 PLAIN message logs in."""
        s = tls_session()
        s.transport.writes.clear()
        assert s.cmd("AUTH PLAIN") == b"+ \r\n"
        assert s.transport.writes == [b"+ \r\n"]
        assert s.cmd(PLAIN_TIM).startswith(b"+OK")
        assert s.state() is State.TRANSACTION

    def test_a11_rfc2195_vector_verbatim(self) -> None:
        """A11: challenge <1896.697170952@postoffice.reston.mci.net>, secret tanstaaftanstaaf,
        answer dGltIGI5MTNh... gives +OK."""
        store = MemoryMailStore()
        users = MemoryUserDatabase({"tim@example.com": "{PLAIN}tanstaaftanstaaf"})
        portal = Portal(
            MailRealm(store, users, ["example.com"]),
            [PasswordChecker(users, "example.com", verify_password)],
        )
        s = tls_session(
            store,
            portal=portal,
            challenge=fixed(CRAM_CH),
            cram_md5_available=lambda: True,
        )
        assert s.cmd("AUTH CRAM-MD5") == b"+ " + base64.b64encode(CRAM_CH) + b"\r\n"
        assert s.cmd(CRAM_TIM).startswith(b"+OK")
        assert s.state() is State.TRANSACTION


class SdpsLogins(unittest.TestCase):
    def test_a17_three_login_forms_reach_the_same_mailbox(self) -> None:
        """A17: `alice@example.com`, `alice+example.com` and `alice` all reach the same mailbox."""
        store = with_messages(b"Subject: only alice has this\n\nx\n")
        users = MemoryUserDatabase({"alice@example.com": "secret", "bob@example.com": "other"})
        portal = sdps_portal(store, users)
        for login in ("alice@example.com", "alice+example.com", "alice"):
            for how in ("USER", "AUTH PLAIN"):
                s = Session(store, portal=portal)
                if how == "USER":
                    reply = s.login(login)
                else:
                    ir = base64.b64encode(b"\0" + login.encode() + b"\0secret")
                    reply = s.cmd(b"AUTH PLAIN " + ir)
                assert reply.startswith(b"+OK"), (login, how, reply)
                assert b"only alice has this" in s.cmd("TOP 1 0"), (login, how)
                assert s.cmd("QUIT").startswith(b"+OK")
                s.drop()
                assert ALICE not in store.locked

    def test_a18_plus_with_unknown_domain_stays_in_the_local_part(self) -> None:
        """A18: `tag` is not a configured domain: login `bob+tag` looks up local part `bob+tag`."""
        bob_tag = Address("bob+tag", "example.com")
        store = MemoryMailStore()
        store.deliver(bob_tag, b"Subject: for bob+tag\n\nx\n")
        store.deliver(Address("bob", "example.com"), b"Subject: for bob\n\nx\n")
        users = MemoryUserDatabase({"bob+tag@example.com": "tagpw", "bob@example.com": "bobpw"})
        portal = sdps_portal(store, users)
        s = Session(store, portal=portal)
        assert s.login("bob+tag", "tagpw").startswith(b"+OK")
        assert b"for bob+tag" in s.cmd("TOP 1 0")
        assert bob_tag in store.locked
        # bob's own password does not open bob+tag: the name is not split at "+tag".
        s2 = Session(store, portal=portal)
        assert s2.login("bob+tag", "bobpw").startswith(b"-ERR [AUTH]")
