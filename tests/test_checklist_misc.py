# mypy: allow-untyped-calls
"""Checklist section 8 bounce cases end to end in memory (XMIT/queue runner -> store -> POP3)."""

from __future__ import annotations

from pathlib import Path

from twisted.cred.portal import Portal

from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.realm import MailRealm
from mailgate.testing import MemoryUserDatabase
from tests.test_pop3_server import Session, multiline_body
from tests.test_queue_runner import ALICE, BOB, Harness


def test_d06_dsn_for_a_local_sender_is_visible_in_her_next_pop3_session(tmp_path: Path) -> None:
    """D06: a DSN for local sender alice is stored in her mailbox, visible in her next session."""
    h = Harness(tmp_path / "spool")
    h.store.deliver(ALICE, b"Subject: before\n\nx\n")
    pop = Session(h.store)
    assert pop.login().startswith(b"+OK maildrop has 1")
    h.relay.script = lambda r: ("perm", 550, "5.1.1 <bob@remote.example>: user unknown")
    h.runner.startService()
    h.submit(rcpts=(BOB,))
    assert len(h.dsns_for(ALICE)) == 2
    # Not in the session that was open while the DSN arrived (snapshot, section 1.11)...
    assert len(multiline_body(pop.cmd("LIST"))) == 1
    assert pop.cmd("QUIT").startswith(b"+OK")
    pop.drop()
    # ...but in the next one, as a delivery-status report from MAILER-DAEMON.
    again = Session(h.store)
    assert again.login().startswith(b"+OK maildrop has 2")
    dsn = again.cmd("RETR 2")
    assert dsn.startswith(b"+OK")
    assert b"report-type=delivery-status" in dsn
    assert b"\r\nFinal-Recipient: rfc822; bob@remote.example\r\n" in dsn
    assert b"\r\nStatus: 5.1.1\r\n" in dsn
    assert b"MAILER-DAEMON@mx.example.com" in dsn
    assert h.store.delivered[-1][0].sender is None


def test_x28_xmit_permanent_failure_returns_a_dsn_to_alice(tmp_path: Path) -> None:
    """X28: a queued XMIT message whose remote delivery fails permanently: a DSN arrives
    in alice's mailbox."""
    h = Harness(tmp_path / "spool")
    users = MemoryUserDatabase({"alice@example.com": "secret"})
    realm = MailRealm(h.store, users, ["example.com"], h.spool)
    portal = Portal(realm, [PasswordChecker(users, "example.com", plaintext_verify)])
    h.relay.script = lambda r: ("perm", 550, "5.1.1 <bob@remote.example>: user unknown")
    h.runner.startService()
    pop = Session(h.store, portal=portal, xtnd_xmit=True, default_domain="example.com")
    assert pop.login().startswith(b"+OK maildrop has 0")
    assert pop.cmd("XTND XMIT") == b"+OK Start sending message.\r\n"
    sent = pop.send(b"From: alice@example.com\r\nTo: bob@remote.example\r\n\r\nhi\r\n.\r\n")
    assert sent == b"+OK Message sent successfully\r\n"
    h.clock.advance(1)
    assert [c[0] for c in h.relay.calls] == [ALICE]  # the XMIT copy, sent as alice
    [dsn] = h.dsns_for(ALICE)
    assert b"Final-Recipient: rfc822; bob@remote.example\n" in dsn
    assert b"Action: failed\n" in dsn
    assert pop.cmd("STAT") == b"+OK 0 0\r\n"  # not in the current snapshot
