# mypy: allow-untyped-calls
"""XTND XMIT and XTND XLST on the POP3 server (checklist section 2, cases X01-X27, X29).

Sessions run on a StringTransport with a fake clock, logging in through a real Portal,
MailRealm and PasswordChecker over the in-memory store, user database and outbound queue:
remote recipients land in ``MemoryQueue.queued``, local ones in ``store.mailboxes``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pytest
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.dataread import DataReader
from mailgate.interfaces import IMessageSink
from mailgate.model import Address, Envelope
from mailgate.pop3 import Pop3Factory, Pop3Settings
from mailgate.pop3._grammar import (
    LineFramer,
    Pop3SyntaxError,
    XtndCommand,
    capabilities,
    parse_field_name,
    parse_xtnd,
)
from mailgate.pop3.server import State
from mailgate.pop3.xtnd import first_header_lines
from mailgate.realm import MailRealm
from mailgate.testing import HeldRunner, MemoryMailStore, MemoryQueue, MemoryUserDatabase

ALICE = Address("alice", "example.com")
BOB = Address("bob", "example.com")

START = b"+OK Start sending message.\r\n"
SENT = b"+OK Message sent successfully\r\n"


class RecordingTransport(StringTransport):
    """Keeps every write separately, so "one reply, one write" can be checked."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


@implementer(IMessageSink)
class SlowSink:
    """Wraps a MemoryQueue sink; finish() waits for the test to fire ``gate``."""

    def __init__(self, inner: IMessageSink, gate: Deferred[str]) -> None:
        self._inner = inner
        self._gate = gate
        self.queue_id = inner.queue_id

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    def finish(self) -> Deferred[str]:
        return self._gate.addCallback(lambda _: self._inner.finish())

    def abort(self) -> None:
        self._inner.abort()


class SlowQueue(MemoryQueue):
    """A spool whose finish() fires only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Deferred[str], Envelope]] = []

    def open_message(self, envelope: Envelope) -> IMessageSink:
        gate: Deferred[str] = Deferred()
        self.pending.append((gate, envelope))
        return SlowSink(super().open_message(envelope), gate)


def make_settings(**overrides: Any) -> Pop3Settings:
    values: dict[str, Any] = {
        "hostname": "mail.example.com",
        "allow_plaintext": lambda host: True,
        "xtnd_xmit": True,
        "default_domain": "example.com",
    }
    values.update(overrides)
    return Pop3Settings(**values)


class World:
    """Store, users, queue and portal shared by the sessions of one test."""

    def __init__(self, queue: MemoryQueue | None = None, relay: bool = True) -> None:
        self.store = MemoryMailStore()
        self.users = MemoryUserDatabase(
            {"alice@example.com": "secret", "bob@example.com": "builder"}
        )
        self.queue = queue if queue is not None else MemoryQueue()
        self.realm = MailRealm(
            self.store, self.users, ["example.com"], self.queue if relay else None
        )
        self.portal = Portal(
            self.realm, [PasswordChecker(self.users, "example.com", plaintext_verify)]
        )
        self.clock = Clock()

    def session(self, **overrides: Any) -> Session:
        return Session(self, make_settings(**overrides))


class Session:
    def __init__(self, world: World, settings: Pop3Settings) -> None:
        self.world = world
        self.settings = settings
        self.proto = Pop3Factory(world.portal, settings, world.clock).buildProtocol(None)
        self.transport = RecordingTransport()
        self.proto.makeConnection(self.transport)
        self.take()

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.transport.writes.clear()
        self.proto.dataReceived(data)
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        return self.take()

    def cmd(self, line: str | bytes) -> bytes:
        raw = line.encode() if isinstance(line, str) else line
        return self.send(raw + b"\r\n")

    def login(self, user: str = "alice", password: str = "secret") -> None:
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        assert self.cmd(f"PASS {password}").startswith(b"+OK")

    def xmit(self, message: bytes) -> bytes:
        """XTND XMIT a message given with LF line ends (sent as CRLF, dot-stuffed)."""
        assert self.cmd("XTND XMIT") == START
        return self.send(wire(message) + b".\r\n")

    def drop(self) -> None:
        self.proto.connectionLost(Failure(ConnectionError("gone")))

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def wire(message: bytes) -> bytes:
    """LF message -> CRLF lines, dot-stuffed, as a client sends it (no terminator)."""
    lines = message.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)


def headers_of(stored: bytes) -> bytes:
    return stored.split(b"\n\n", 1)[0] + b"\n"


def body_of(stored: bytes) -> bytes:
    return stored.split(b"\n\n", 1)[1]


MSG = (
    b"From: Alice <alice@example.com>\n"
    b"To: b@remote.test\n"
    b"Cc: c@remote.test\n"
    b"Bcc: d@remote.test\n"
    b"Subject: hi\n"
    b"\n"
    b"Hello\n"
)


class DisabledAndStateTests(unittest.TestCase):
    def test_x01_disabled_gives_err_without_ok(self) -> None:
        world = World()
        s = world.session(xtnd_xmit=False)
        s.login()
        reply = s.cmd("XTND XMIT")
        self.assertEqual(reply, b'-ERR Unknown command: "xtnd xmit".\r\n')
        self.assertNotIn(b"+OK", reply)
        # The next line is a command again, not message data.
        self.assertTrue(s.cmd("NOOP").startswith(b"+OK"))
        self.assertEqual(s.cmd("XTND XLST Subject"), b'-ERR Unknown command: "xtnd xlst".\r\n')

    def test_x02_authorization_state(self) -> None:
        s = World().session()
        reply = s.cmd("XTND XMIT")
        self.assertTrue(reply.startswith(b"-ERR"))
        self.assertEqual(s.proto.state, State.AUTHORIZATION)
        self.assertTrue(s.cmd("USER alice").startswith(b"+OK"))

    def test_x19_argument_errors_exact_texts(self) -> None:
        s = World().session()
        s.login()
        self.assertEqual(s.cmd("XTND"), b"-ERR Too few arguments for the xtnd command.\r\n")
        self.assertEqual(
            s.cmd("XTND XMIT now"), b"-ERR Too many arguments for the xtnd xmit command.\r\n"
        )
        self.assertEqual(s.cmd("XTND FOO"), b'-ERR Unknown command: "xtnd foo".\r\n')
        self.assertEqual(s.cmd("xtnd xmit"), START)
        self.assertEqual(s.proto.state, State.XMIT)

    def test_x27_require_tls(self) -> None:
        world = World()
        s = world.session(xtnd_xmit_require_tls=True)
        s.login()
        reply = s.cmd("XTND XMIT")
        self.assertTrue(reply.startswith(b"-ERR [SYS/PERM] "), reply)
        self.assertEqual(s.proto.state, State.TRANSACTION)

    def test_require_tls_satisfied_under_tls(self) -> None:
        world = World()
        s = world.session(xtnd_xmit_require_tls=True, implicit_tls=True)
        s.login()
        self.assertEqual(s.xmit(MSG), SENT)
        self.assertEqual(len(world.queue.queued), 1)

    def test_capa_advertises_only_when_asked_and_only_after_login(self) -> None:
        world = World()
        plain = world.session()
        plain.login()
        self.assertNotIn(b"XTND XMIT", plain.cmd("CAPA"))
        s = world.session(xtnd_advertise=True)
        self.assertNotIn(b"XTND XMIT", s.cmd("CAPA"))
        s.login("bob", "builder")
        self.assertIn(b"\r\nXTND XMIT\r\n", s.cmd("CAPA"))
        off = world.session(xtnd_xmit=False, xtnd_advertise=True)
        off.cmd("USER alice")  # alice's maildrop is locked by the first session: use CAPA only
        self.assertNotIn(b"XTND", off.cmd("CAPA"))


class XmitTests(unittest.TestCase):
    def setUp(self) -> None:
        self.world = World()
        self.s = self.world.session()
        self.s.login()

    def queued(self) -> list[tuple[Envelope, bytes]]:
        return self.world.queue.queued

    def recipients(self, index: int = 0) -> set[str]:
        return {str(r) for r in self.queued()[index][0].recipients}

    def test_x03_recipients_from_to_cc_bcc_and_bcc_removed(self) -> None:
        self.s.cmd("XTND XMIT")
        reply = self.s.send(wire(MSG) + b".\r\n")
        self.assertEqual(reply, SENT)
        self.assertEqual(self.s.transport.writes, [SENT])
        self.assertEqual(self.recipients(), {"b@remote.test", "c@remote.test", "d@remote.test"})
        stored = self.queued()[0][1]
        self.assertNotIn(b"Bcc", headers_of(stored))
        self.assertNotIn(b"d@remote.test", stored)
        self.assertIn(b"To: b@remote.test\n", stored)
        self.assertEqual(body_of(stored), b"Hello\n")
        self.assertNotIn(b"\r", stored)

    def test_received_header_names_xtnd_xmit_and_the_peer(self) -> None:
        self.s.xmit(MSG)
        stored = self.queued()[0][1]
        self.assertTrue(stored.startswith(b"Received: from [192.168.1.1]\n"), stored)
        first = headers_of(stored).split(b"\n\t")
        self.assertIn(b"with XTND-XMIT id R", b" ".join(first))

    def test_x04_envelope_sender_is_the_account_not_from(self) -> None:
        msg = MSG.replace(b"From: Alice <alice@example.com>", b"From: ceo@example.com")
        self.assertEqual(self.s.xmit(msg), SENT)
        self.assertEqual(self.queued()[0][0].sender, ALICE)

    def test_x04_sender_header_and_return_path_have_no_say(self) -> None:
        msg = b"Return-Path: <evil@remote.test>\nSender: boss@remote.test\n" + MSG
        self.assertEqual(self.s.xmit(msg), SENT)
        envelope, stored = self.queued()[0]
        self.assertEqual(envelope.sender, ALICE)
        self.assertNotIn(b"Return-Path", stored)
        self.assertNotIn(b"evil@", stored)

    def test_x05_resent_fields_win_and_resent_bcc_removed(self) -> None:
        msg = (
            b"Resent-From: alice@example.com\nResent-To: e@x.test\nResent-Bcc: f@x.test\n"
            b"To: b@y.test\nSubject: fwd\n\nbody\n"
        )
        self.assertEqual(self.s.xmit(msg), SENT)
        self.assertEqual(self.recipients(), {"e@x.test", "f@x.test"})
        stored = self.queued()[0][1]
        self.assertNotIn(b"Resent-Bcc", stored)
        self.assertNotIn(b"f@x.test", stored)
        self.assertIn(b"To: b@y.test", stored)

    def test_x06_undisclosed_recipients_only(self) -> None:
        msg = b"To: undisclosed-recipients:;\nSubject: x\n\nbody\n"
        reply = self.s.xmit(msg)
        self.assertTrue(reply.startswith(b"-ERR"), reply)
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.world.store.delivered, [])
        self.assertTrue(self.s.cmd("NOOP").startswith(b"+OK"))

    def test_no_recipient_fields_at_all(self) -> None:
        reply = self.s.xmit(b"Subject: x\n\nbody\n")
        self.assertTrue(reply.startswith(b"-ERR [SYS/PERM] No recipients"), reply)
        self.assertEqual(self.queued(), [])

    def test_x07_group_syntax(self) -> None:
        self.assertEqual(self.s.xmit(b"To: team: a@x.test, b@y.test;\n\nhi\n"), SENT)
        self.assertEqual(self.recipients(), {"a@x.test", "b@y.test"})

    def test_x08_display_names_quoted_commas_comments(self) -> None:
        self.assertEqual(self.s.xmit(b'To: "Doe, J" <j@x.test>, k@y.test (note)\n\nhi\n'), SENT)
        self.assertEqual(self.recipients(), {"j@x.test", "k@y.test"})

    def test_folded_recipient_field(self) -> None:
        msg = b'To: a@x.test,\n b@y.test,\n\t"C, D" <c@z.test>\n\nhi\n'
        self.assertEqual(self.s.xmit(msg), SENT)
        self.assertEqual(self.recipients(), {"a@x.test", "b@y.test", "c@z.test"})

    def test_x09_duplicates_are_one_recipient(self) -> None:
        msg = b"To: b@remote.test\nCc: B <b@REMOTE.test>\nBcc: b@remote.test\n\nhi\n"
        self.assertEqual(self.s.xmit(msg), SENT)
        self.assertEqual(self.queued()[0][0].recipients, (Address("b", "remote.test"),))

    def test_bare_name_gets_the_default_domain(self) -> None:
        self.assertEqual(self.s.xmit(b"To: bob\n\nhi\n"), SENT)
        (delivered,) = self.world.store.mailboxes[BOB]
        self.assertEqual(body_of(delivered.data), b"hi\n")

    def test_malformed_recipient_refused(self) -> None:
        reply = self.s.xmit(b"To: a@b.test c@d.test\n\nhi\n")
        self.assertTrue(reply.startswith(b"-ERR [SYS/PERM] "), reply)
        self.assertEqual(self.queued(), [])

    def test_too_many_recipients(self) -> None:
        world = World()
        s = world.session(max_recipients=3)
        s.login()
        reply = s.xmit(b"To: a@x.test, b@x.test, c@x.test, d@x.test\n\nhi\n")
        self.assertEqual(reply, b"-ERR [SYS/PERM] Too many recipients\r\n")
        self.assertEqual(world.queue.queued, [])
        self.assertEqual(s.xmit(b"To: a@x.test, b@x.test, c@x.test\n\nhi\n"), SENT)

    def test_x10_stuffed_lines_are_unstuffed(self) -> None:
        self.s.cmd("XTND XMIT")
        reply = self.s.send(b"To: b@r.test\r\n\r\n..foo\r\n..\r\nend\r\n.\r\n")
        self.assertEqual(reply, SENT)
        self.assertEqual(body_of(self.queued()[0][1]), b".foo\n.\nend\n")

    def test_x11_unstuffed_leading_dot_kept(self) -> None:
        self.s.cmd("XTND XMIT")
        self.assertEqual(self.s.send(b"To: b@r.test\r\n\r\n.foo\r\n..bar\r\n.\r\n"), SENT)
        self.assertEqual(body_of(self.queued()[0][1]), b".foo\n.bar\n")

    def test_x12_dot_space_is_content(self) -> None:
        self.s.cmd("XTND XMIT")
        self.assertEqual(self.s.send(b"To: b@r.test\r\n\r\n. \r\nmore\r\n"), b"")
        self.assertEqual(self.s.proto.state, State.XMIT)
        self.assertEqual(self.s.send(b".\r\n"), SENT)
        self.assertEqual(body_of(self.queued()[0][1]), b". \nmore\n")

    def test_x13_commands_inside_the_message_are_content(self) -> None:
        self.s.cmd("XTND XMIT")
        self.assertEqual(self.s.send(b"To: b@r.test\r\n\r\nQUIT\r\nDELE 1\r\n"), b"")
        self.assertFalse(self.s.closed)
        self.assertEqual(self.s.send(b".\r\n"), SENT)
        self.assertFalse(self.s.closed)
        self.assertEqual(body_of(self.queued()[0][1]), b"QUIT\nDELE 1\n")
        self.assertTrue(self.s.cmd("NOOP").startswith(b"+OK"))

    def test_x14_two_xmits_in_one_session(self) -> None:
        self.assertEqual(self.s.xmit(MSG), SENT)
        self.assertEqual(self.s.xmit(MSG.replace(b"Subject: hi", b"Subject: two")), SENT)
        self.assertEqual(len(self.queued()), 2)
        self.assertIn(b"Subject: two", self.queued()[1][1])

    def test_x17_bare_lf_dot_never_ends_the_message(self) -> None:
        self.s.cmd("XTND XMIT")
        reply = self.s.send(b"To: b@r.test\r\n\r\na\n.\nb\r\n.\r\n")
        self.assertEqual(reply, SENT)
        self.assertEqual(len(self.queued()), 1)
        self.assertEqual(body_of(self.queued()[0][1]), b"a\n.\nb\n")

    def test_smuggling_variants_are_content(self) -> None:
        self.s.cmd("XTND XMIT")
        data = b"To: b@r.test\r\n\r\nx\r\n.\nMAIL\r\n.\r.\r\n\n.\r\ny\r\n"
        self.assertEqual(self.s.send(data), b"")
        self.assertEqual(self.s.send(b".\r\n"), SENT)
        self.assertEqual(len(self.queued()), 1)

    def test_bare_newline_reject_policy(self) -> None:
        world = World()
        s = world.session(bare_newline="reject")
        s.login()
        s.cmd("XTND XMIT")
        reply = s.send(b"To: b@r.test\r\n\r\na\nb\r\n.\r\n")
        self.assertEqual(reply, b"-ERR [SYS/PERM] Message contains bare CR or LF\r\n")
        self.assertEqual(world.queue.queued, [])

    def test_long_line_refused_after_the_end(self) -> None:
        self.s.cmd("XTND XMIT")
        self.assertEqual(self.s.send(b"To: b@r.test\r\n\r\n" + b"x" * 2000 + b"\r\n"), b"")
        self.assertEqual(self.s.send(b".\r\n"), b"-ERR [SYS/PERM] Line too long\r\n")
        self.assertEqual(self.queued(), [])

    def test_x18_date_and_message_id_added(self) -> None:
        world = World()
        world.clock.advance(1700000000)  # before the session, or autologout would fire
        s = world.session()
        s.login()
        self.assertEqual(s.xmit(b"To: b@r.test\nSubject: s\n\nhi\n"), SENT)
        headers = headers_of(world.queue.queued[0][1])
        self.assertIn(b"Date: Tue, 14 Nov 2023 22:13:20 +0000\n", headers)
        self.assertRegex(headers, rb"\nMessage-ID: <1700000000\.[0-9a-f]+@mail\.example\.com>\n")

    def test_x18_existing_date_and_message_id_kept(self) -> None:
        msg = (
            b"To: b@r.test\nDate: Mon, 1 Jan 2001 00:00:00 +0000\n"
            b"Message-ID: <orig@client.test>\n\nhi\n"
        )
        self.assertEqual(self.s.xmit(msg), SENT)
        headers = headers_of(self.queued()[0][1])
        self.assertEqual(headers.count(b"Date:"), 1)
        self.assertEqual(headers.count(b"Message-ID:"), 1)
        self.assertIn(b"Date: Mon, 1 Jan 2001 00:00:00 +0000\n", headers)
        self.assertIn(b"Message-ID: <orig@client.test>\n", headers)

    def test_message_without_body(self) -> None:
        self.s.cmd("XTND XMIT")
        self.assertEqual(self.s.send(b"To: b@r.test\r\nSubject: s\r\n.\r\n"), SENT)
        stored = self.queued()[0][1]
        self.assertIn(b"Subject: s\n", stored)
        self.assertTrue(stored.endswith(b"\n\n"), stored)

    def test_header_block_too_large(self) -> None:
        world = World()
        s = world.session(max_header_lines=5)
        s.login()
        fields = b"".join(b"X-H%d: v\r\n" % i for i in range(10))
        s.cmd("XTND XMIT")
        reply = s.send(b"To: b@r.test\r\n" + fields + b"\r\nbody\r\n.\r\n")
        self.assertEqual(reply, b"-ERR [SYS/PERM] Message header too large\r\n")
        self.assertEqual(world.queue.queued, [])

    def test_x21_xmit_to_self_not_in_snapshot(self) -> None:
        self.s.drop()  # setUp's session holds alice's maildrop
        self.world.store.deliver(ALICE, b"Subject: old\n\nold\n")
        world = self.world
        s = world.session()
        s.login("bob", "builder")
        alice = world.session()
        alice.login()
        self.assertEqual(alice.cmd("STAT"), b"+OK 1 21\r\n")
        self.assertEqual(alice.xmit(b"To: alice@example.com\nSubject: me\n\nhi\n"), SENT)
        self.assertEqual(len(world.store.mailboxes[ALICE]), 2)
        self.assertEqual(alice.cmd("STAT"), b"+OK 1 21\r\n")
        self.assertEqual(alice.cmd("QUIT"), b"+OK mail.example.com signing off\r\n")
        alice.drop()
        again = world.session()
        again.login()
        self.assertTrue(again.cmd("STAT").startswith(b"+OK 2 "))

    def test_x22_one_bad_local_recipient_refuses_all(self) -> None:
        msg = b"To: nobody@example.com, b@remote.test\nCc: bob@example.com\n\nhi\n"
        reply = self.s.xmit(msg)
        self.assertEqual(
            reply,
            b"-ERR [SYS/PERM] Recipient address rejected: user unknown: <nobody@example.com>\r\n",
        )
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.world.store.delivered, [])

    def test_local_and_remote_recipients_both_delivered(self) -> None:
        self.assertEqual(self.s.xmit(b"To: bob@example.com, x@remote.test\n\nhi\n"), SENT)
        self.assertEqual(len(self.world.store.mailboxes[BOB]), 1)
        self.assertEqual(self.recipients(), {"x@remote.test"})
        self.assertEqual(self.world.store.delivered[0][0].sender, ALICE)

    def test_relay_denied_without_outbound_queue(self) -> None:
        world = World(relay=False)
        s = world.session()
        s.login()
        reply = s.xmit(b"To: x@remote.test\n\nhi\n")
        self.assertTrue(reply.startswith(b"-ERR [SYS/PERM] Relay access denied"), reply)

    def test_queue_failure_is_temporary_error(self) -> None:
        self.world.queue.fail = True
        reply = self.s.xmit(MSG)
        self.assertEqual(reply, b"-ERR [SYS/TEMP] Unable to send message\r\n")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(self.s.cmd("NOOP").startswith(b"+OK"))

    def test_pipelined_commands_after_the_dot_run_in_order(self) -> None:
        self.world.store.deliver(ALICE, b"x\n")
        s = self.world.session()
        self.s.drop()
        s.login()
        reply = s.send(b"XTND XMIT\r\n" + wire(MSG) + b".\r\nSTAT\r\nDELE 1\r\nSTAT\r\n")
        self.assertEqual(
            reply,
            START + SENT + b"+OK 1 3\r\n+OK Message 1 deleted\r\n+OK 0 0\r\n",
        )
        self.assertEqual(len(s.transport.writes), 5)

    def test_replies_wait_for_a_slow_queue(self) -> None:
        queue = SlowQueue()
        world = World(queue)
        s = world.session()
        s.login()
        reply = s.send(b"XTND XMIT\r\n" + wire(MSG) + b".\r\nNOOP\r\n")
        self.assertEqual(reply, START)  # neither the final reply nor NOOP's before durable
        d, envelope = queue.pending.pop()
        self.assertEqual(envelope.sender, ALICE)
        d.callback("ok")
        self.assertEqual(s.take(), SENT + b"+OK\r\n")
        self.assertEqual(len(queue.queued), 1)

    def test_drop_while_queueing_keeps_the_message(self) -> None:
        queue = SlowQueue()
        world = World(queue)
        s = world.session()
        s.login()
        s.send(b"XTND XMIT\r\n" + wire(MSG) + b".\r\n")
        s.drop()
        queue.pending.pop()[0].callback("ok")
        self.assertEqual(len(queue.queued), 1)
        self.assertEqual(s.take(), b"")

    def test_chunking_does_not_matter(self) -> None:
        data = b"XTND XMIT\r\n" + wire(MSG + b".x\n\n..\n") + b".\r\nNOOP\r\n"
        out = b"".join(self.s.send(data[i : i + 1]) for i in range(len(data)))
        self.assertEqual(out, START + SENT + b"+OK\r\n")
        self.assertEqual(body_of(self.queued()[0][1]), b"Hello\n.x\n\n..\n")


class SizeTimeoutAndDropTests(unittest.TestCase):
    def test_x15_too_large_reported_only_after_the_end(self) -> None:
        world = World()
        s = world.session(max_size=1024 * 1024)
        s.login()
        self.assertEqual(s.cmd("XTND XMIT"), START)
        self.assertEqual(s.send(b"To: b@r.test\r\n\r\n"), b"")
        line = b"y" * 998 + b"\r\n"
        for _ in range(2 * 1024):
            self.assertEqual(s.send(line), b"")
        self.assertFalse(s.closed)
        self.assertEqual(s.send(b".\r\n"), b"-ERR [SYS/PERM] Message too large\r\n")
        self.assertEqual(world.queue.queued, [])
        self.assertEqual(s.cmd("STAT"), b"+OK 0 0\r\n")

    def test_x16_drop_mid_message(self) -> None:
        world = World()
        world.store.deliver(ALICE, b"Subject: keep\n\nme\n")
        s = world.session()
        s.login()
        self.assertTrue(s.cmd("DELE 1").startswith(b"+OK"))
        s.cmd("XTND XMIT")
        s.send(b"To: bob@example.com, x@r.test\r\n\r\npartial body\r\n")
        s.drop()
        self.assertEqual(world.queue.queued, [])
        self.assertEqual(world.store.delivered, [])
        self.assertEqual(len(world.store.mailboxes[ALICE]), 1)
        self.assertNotIn(ALICE, world.store.locked)

    def test_x23_autologout_mid_message(self) -> None:
        world = World()
        s = world.session(timeout=600)
        s.login()
        s.cmd("XTND XMIT")
        s.send(b"To: x@r.test\r\n\r\nbody\r\n")
        world.clock.advance(599)
        s.send(b"still typing\r\n")
        world.clock.advance(599)
        self.assertFalse(s.closed)  # every chunk resets the timer
        world.clock.advance(2)
        self.assertTrue(s.closed)
        self.assertEqual(s.take(), b"")
        s.drop()  # the transport reports the close
        s.send(b".\r\n")
        self.assertEqual(world.queue.queued, [])
        self.assertNotIn(ALICE, world.store.locked)


class EnforceFromTests(unittest.TestCase):
    def test_x20_foreign_from_refused(self) -> None:
        world = World()
        s = world.session(enforce_from=True)
        s.login()
        reply = s.xmit(b"From: bob@example.com\nTo: x@r.test\n\nhi\n")
        self.assertTrue(reply.startswith(b"-ERR [SYS/PERM] "), reply)
        self.assertIn(b"not owned by user", reply)
        self.assertEqual(world.queue.queued, [])

    def test_own_from_accepted(self) -> None:
        world = World()
        s = world.session(enforce_from=True)
        s.login()
        self.assertEqual(s.xmit(b"From: Alice <ALICE@Example.com>\nTo: x@r.test\n\nhi\n"), SENT)

    def test_off_by_default(self) -> None:
        world = World()
        s = world.session()
        s.login()
        self.assertEqual(s.xmit(b"From: bob@example.com\nTo: x@r.test\n\nhi\n"), SENT)


class LoggingTests(unittest.TestCase):
    def test_xmit_and_refusal_logged(self) -> None:
        world = World()
        s = world.session()
        s.login()
        events: Sequence[LogEvent]
        with capturedLogs() as events:
            s.xmit(MSG)
            s.xmit(b"To: nobody@example.com\n\nhi\n")
        text = "\n".join(formatEvent(e) for e in events)
        self.assertRegex(text, r"queued id=R\d+ account=alice@example.com to=\S*d@remote.test")
        self.assertIn("peer=192.168.1.1", text)
        self.assertIn("refused for alice@example.com", text)
        self.assertIn("user unknown", text)
        self.assertNotIn("secret", text)


class XlstTests(unittest.TestCase):
    def setUp(self) -> None:
        self.world = World()
        store = self.world.store
        store.deliver(ALICE, b"Message-Id: <one@x>\nSubject: first\n\nbody\n")
        store.deliver(ALICE, b"Subject: second\r\n  continued\r\nMessage-Idx: z\r\n\r\nb\r\n")
        store.deliver(ALICE, b"subject : third\nMessage-ID:\n <three@x>\n\n.Subject: no\n")
        self.s = self.world.session(xtnd_xmit=False, xtnd_xlst=True)
        self.s.login()

    def lines(self, reply: bytes) -> list[bytes]:
        self.assertTrue(reply.startswith(b"+OK xlst command accepted; headers coming.\r\n"))
        self.assertTrue(reply.endswith(b"\r\n.\r\n"), reply)
        return reply.split(b"\r\n")[1:-2]

    def test_headers_are_read_off_the_reactor_and_later_commands_wait(self) -> None:
        runner = HeldRunner()
        assert self.s.cmd("QUIT").startswith(b"+OK")  # setUp's session holds the lock
        s = self.world.session(xtnd_xmit=False, xtnd_xlst=True, run_in_thread=runner)
        s.login()
        assert s.send(b"XTND XLST Subject 1\r\nNOOP\r\n") == b""  # reading: NOOP waits
        runner.run_one()
        reply = s.take()
        assert reply.startswith(b"+OK xlst command accepted; headers coming.\r\n")
        assert reply.endswith(b"1 Subject: first\r\n.\r\n+OK\r\n")

    def test_x24_x29_message_id_exact_name(self) -> None:
        reply = self.s.cmd("XTND XLST Message-Id")
        self.assertEqual(
            self.lines(reply), [b"1 Message-Id: <one@x>", b"3 Message-ID:", b" <three@x>"]
        )

    def test_x25_one_message_and_missing_one(self) -> None:
        self.assertEqual(
            self.lines(self.s.cmd("XTND XLST Subject 2")),
            [b"2 Subject: second", b"  continued"],
        )
        self.assertEqual(self.s.cmd("XTND XLST Subject 9"), b"-ERR Message 9 does not exist.\r\n")
        self.assertTrue(self.s.cmd("XTND XLST Subject 0").startswith(b"-ERR"))

    def test_x26_deleted_message(self) -> None:
        self.s.cmd("DELE 1")
        self.assertTrue(self.s.cmd("XTND XLST Subject 1").startswith(b"-ERR"))
        lines = self.lines(self.s.cmd("xtnd xlst SUBJECT"))
        self.assertEqual(lines, [b"2 Subject: second", b"  continued", b"3 subject : third"])

    def test_only_the_header_block_is_searched(self) -> None:
        lines = self.lines(self.s.cmd("XTND XLST X-None"))
        self.assertEqual(lines, [])
        # Message 3's body has a ".Subject" line: never listed, and nothing unstuffed leaks.
        self.assertNotIn(b"no", b"".join(self.lines(self.s.cmd("XTND XLST Subject"))))

    def test_argument_errors(self) -> None:
        self.assertEqual(
            self.s.cmd("XTND XLST"), b"-ERR Too few arguments for the xtnd xlst command.\r\n"
        )
        self.assertEqual(
            self.s.cmd("XTND XLST a 1 2"), b"-ERR Too many arguments for the xtnd xlst command.\r\n"
        )
        self.assertTrue(self.s.cmd("XTND XLST Sub:ject").startswith(b"-ERR"))
        self.assertEqual(self.s.cmd("XTND XMIT"), b'-ERR Unknown command: "xtnd xmit".\r\n')


def _read(chunks: list[bytes]) -> tuple[bytes, bytes | None, int]:
    out: list[bytes] = []
    reader = DataReader(out.append, keep_unescaped_dots=True)
    rest: bytes | None = None
    for chunk in chunks:
        if rest is not None:
            rest += chunk  # after the end: handed back untouched
        else:
            rest = reader.feed(chunk)
    return b"".join(out), rest, reader.unescaped_dots


def test_reader_keeps_unescaped_dots_whatever_the_chunking() -> None:
    data = b".a\r\n..b\r\n.\tc\r\n..\r\n. \r\nx\r\n.\r\nNOOP\r\n"
    expected = b".a\n.b\n.\tc\n.\n. \nx\n"
    assert _read([data]) == (expected, b"NOOP\r\n", 3)
    for cut in range(1, len(data)):
        content, rest, dots = _read([data[:cut], data[cut:]])
        assert (content, rest, dots) == (expected, b"NOOP\r\n", 3), cut


def test_reader_default_still_drops_every_first_dot() -> None:
    out: list[bytes] = []
    reader = DataReader(out.append)
    assert reader.feed(b".a\r\n..b\r\n.\r\n") == b""
    assert b"".join(out) == b"a\n.b\n"
    assert reader.unescaped_dots == 0


@pytest.mark.parametrize(
    ("args", "reply"),
    [
        ([], "Too few arguments for the xtnd command."),
        ([b"XMIT", b"x"], "Too many arguments for the xtnd xmit command."),
        ([b"xlst"], "Too few arguments for the xtnd xlst command."),
        ([b"XLST", b"a", b"1", b"2"], "Too many arguments for the xtnd xlst command."),
        ([b"Foo"], 'Unknown command: "xtnd foo".'),
        ([b"HEAD"], 'Unknown command: "xtnd head".'),
        ([b"\xff\x01"], 'Unknown command: "xtnd ??".'),
    ],
)
def test_parse_xtnd_errors(args: list[bytes], reply: str) -> None:
    with pytest.raises(Pop3SyntaxError) as caught:
        parse_xtnd(args, ["xmit", "xlst"])
    assert caught.value.reply == reply


def test_parse_xtnd_disabled_subcommand_is_unknown() -> None:
    with pytest.raises(Pop3SyntaxError) as caught:
        parse_xtnd([b"XMIT"], ["xlst"])
    assert caught.value.reply == 'Unknown command: "xtnd xmit".'
    assert parse_xtnd([b"xMiT"], ["xmit"]) == XtndCommand("xmit", ())
    assert parse_xtnd([b"XLST", b"Subject", b"2"], ["xlst"]) == XtndCommand(
        "xlst", (b"Subject", b"2")
    )


def test_parse_field_name() -> None:
    assert parse_field_name(b"Message-Id") == "Message-Id"
    for bad in (b"", b"Sub:ject", b"\x7f", b"a" * 77):
        with pytest.raises(Pop3SyntaxError):
            parse_field_name(bad)


def test_capabilities_tag_only_when_asked() -> None:
    common: dict[str, Any] = {
        "plaintext_ok": True,
        "mechanisms": [],
        "stls": False,
        "implementation": None,
    }
    assert b"XTND XMIT" not in capabilities(**common)
    assert capabilities(**common, xtnd_xmit=True)[-1] == b"XTND XMIT"


def test_framer_take_hands_over_the_raw_buffer() -> None:
    framer = LineFramer()
    framer.feed(b"XTND XMIT\r\nTo: a\nb\r\n.\r\n")
    assert framer.next_line() == b"XTND XMIT"
    assert framer.take() == b"To: a\nb\r\n.\r\n"
    assert framer.buffered == 0
    framer.feed(b"NOOP\r\n")
    assert framer.next_line() == b"NOOP"


class TrickleFile(io.BytesIO):
    """Returns at most 3 octets per read, so CRLFs straddle reads."""

    def read(self, size: int | None = -1) -> bytes:
        return super().read(3)


def test_first_header_lines_across_reads_and_line_ends() -> None:
    msg = b"A: 1\r\nSubject: x\r\n y\r\nB: 2\r\n\r\nSubject: body\r\n"
    assert first_header_lines(TrickleFile(msg), "subject") == [b"Subject: x", b" y"]
    assert first_header_lines(TrickleFile(msg), "C") == ()
    assert first_header_lines(io.BytesIO(b"Subject : spaced\n\n"), "Subject") == [
        b"Subject : spaced"
    ]
    # A header block larger than the read limit is not searched past the limit.
    huge = b"X: " + b"y" * 100 + b"\nSubject: late\n\n"
    assert first_header_lines(io.BytesIO(huge), "Subject", limit=50) == ()


def test_settings_refuse_a_bad_xmit_policy_at_wiring_time() -> None:
    with pytest.raises(ValueError):
        make_settings(bare_newline="ignore")
    with pytest.raises(ValueError):
        make_settings(max_size=0)
    assert make_settings().xmit_policy().max_recipients == 100
