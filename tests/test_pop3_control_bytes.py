# mypy: allow-untyped-calls
"""NUL and other control bytes in login names never reach a lookup or the file system.

NUL, CR and LF are refused by the command parsers before any handler runs; other control
bytes (which POP3 USER, APOP and SASL can carry) are refused by ``parse_account`` inside
the real :class:`PasswordChecker`, before the user database or the Maildir store is asked.
Checked through the real checker, realm and :class:`MaildirStore` on a temporary directory
holding a canary mailbox, for POP3 and SMTP alike.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mailgate.auth.checker import PasswordChecker, plaintext_verify
from mailgate.interfaces import IMaildrop
from mailgate.model import Address
from mailgate.pop3 import Pop3Factory, Pop3Settings
from mailgate.pop3.server import Pop3Server
from mailgate.realm import MailRealm
from mailgate.smtp import SmtpFactory, SmtpServer
from mailgate.store.maildir import MaildirStore
from mailgate.testing import MemoryUserDatabase
from tests.test_pop3_server import TLSTransport
from tests.test_smtp_server import TLSStringTransport, settings
from tests.test_store_contract import run_sync

CANARY_TEXT = b"Subject: canary\n\nmust never be read or moved\n"
CONTROL = [b"\x01", b"\x07", b"\x08", b"\t", b"\x0b", b"\x0c", b"\x1b", b"\x1f", b"\x7f"]


class RecordingUsers(MemoryUserDatabase):
    def __init__(self, users: dict[str, str]) -> None:
        super().__init__(users)
        self.asked: list[Address] = []

    def get_password_hash(self, address: Address) -> str | None:
        self.asked.append(address)
        return super().get_password_hash(address)


class RecordingStore(MaildirStore):
    opened: list[Address]

    def open_maildrop(self, address: Address) -> Deferred[IMaildrop]:
        self.opened.append(address)
        return super().open_maildrop(address)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for directories) and mtime."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.join(dirpath, name)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[path] = f.read() + str(os.stat(path).st_mtime_ns).encode()
    return out


class World:
    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "mail"
        self.store = RecordingStore(str(self.root), run_sync, hostname="test.host")
        self.store.opened = []
        self.users = RecordingUsers({"canary@example.com": "pw", "a@example.com": "pw"})
        realm = MailRealm(self.store, self.users, ["example.com"])
        self.portal = Portal(realm, [PasswordChecker(self.users, "example.com", plaintext_verify)])
        self.clock = Clock()

    def seed_canary(self) -> None:
        new = self.root / "example.com" / "canary" / "Maildir" / "new"
        for sub in ("new", "cur", "tmp"):
            (new.parent / sub).mkdir(parents=True, exist_ok=True)
        (new / "1.canary.test.host").write_bytes(CANARY_TEXT)
        (self.root.parent / "canary").write_bytes(b"outside the mail root\n")

    def pop3(self) -> tuple[Pop3Server, TLSTransport]:
        s = Pop3Settings(hostname="h", allow_plaintext=lambda ip: True, max_failures=1000)
        proto = Pop3Factory(self.portal, s, self.clock).buildProtocol(None)
        transport = TLSTransport()
        proto.makeConnection(transport)
        transport.clear()
        return proto, transport

    def smtp(self) -> tuple[SmtpServer, TLSStringTransport]:
        s = settings(allow_plaintext=lambda ip: True, max_failures=1000, require_tls=False)
        proto = SmtpFactory(self.portal, s, self.clock).buildProtocol(
            IPv4Address("TCP", "192.0.2.1", 1)
        )
        transport = TLSStringTransport("192.0.2.1")
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO c.example\r\n")
        transport.clear()
        return proto, transport


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.seed_canary()
    return w


def names() -> list[bytes]:
    """Login names that would reach the canary if the control byte were dropped."""
    out = []
    for c in CONTROL:
        out += [b"canary" + c, c + b"canary", b"can" + c + b"ary@example.com"]
        out += [b"canary@example.com" + c, b"canary@" + c + b"example.com"]
        out += [b".." + c + b"/canary", b"canary+" + c]
    return out


def assert_untouched(world: World, before: dict[str, bytes | None]) -> None:
    assert world.users.asked == []
    assert world.store.opened == []
    assert snapshot(world.root.parent) == before


def test_pop3_user_pass_apop_and_sasl_with_control_bytes(world: World) -> None:
    before = snapshot(world.root.parent)
    for name in names():
        proto, t = world.pop3()
        proto.dataReceived(b"USER " + name + b"\r\nPASS pw\r\n")
        replies = t.value().split(b"\r\n")
        assert replies[1].startswith(b"-ERR [AUTH]"), (name, replies)
        t.clear()
        plain = base64.b64encode(b"\0" + name + b"\0pw")
        proto.dataReceived(b"AUTH PLAIN " + plain + b"\r\n")
        assert t.value().startswith(b"-ERR [AUTH]"), name
        t.clear()
        login = base64.b64encode(name)
        proto.dataReceived(b"AUTH LOGIN\r\n" + login + b"\r\n" + base64.b64encode(b"pw") + b"\r\n")
        assert t.value().split(b"\r\n")[-2].startswith(b"-ERR [AUTH]"), name
        proto.connectionLost(None)  # type: ignore[arg-type]
    assert_untouched(world, before)


def test_pop3_nul_cr_lf_are_refused_by_the_parser_before_the_portal(world: World) -> None:
    calls: list[Any] = []
    real_login = world.portal.login

    def spy(*args: Any) -> Any:
        calls.append(args)
        return real_login(*args)

    world.portal.login = spy  # type: ignore[method-assign,assignment]
    before = snapshot(world.root.parent)
    proto, t = world.pop3()
    for bad in (b"USER a\x00b", b"USER canary\x00", b"USER canary\rPASS pw", b"APOP canary\x00 x"):
        proto.dataReceived(bad + b"\r\n")
        assert t.value() == b"-ERR Invalid character in command line\r\n", bad
        t.clear()
    proto.dataReceived(b"USER canary\r\nPASS p\x00w\r\n")
    assert t.value().endswith(b"-ERR Invalid character in command line\r\n")
    assert calls == []
    assert_untouched(world, before)


def test_pop3_apop_with_control_bytes(world: World) -> None:
    s = Pop3Settings(hostname="h", apop_available=lambda: True, max_failures=1000)
    before = snapshot(world.root.parent)
    for name in names():
        proto = Pop3Factory(world.portal, s, world.clock).buildProtocol(None)
        t = TLSTransport()
        proto.makeConnection(t)
        stamp = t.value().split(b" ")[-1].strip()
        digest = hashlib.md5(stamp + b"pw").hexdigest().encode()
        t.clear()
        proto.dataReceived(b"APOP " + name + b" " + digest + b"\r\n")
        assert t.value().startswith(b"-ERR [AUTH]"), name
    assert_untouched(world, before)


def test_smtp_auth_with_control_bytes(world: World) -> None:
    before = snapshot(world.root.parent)
    for name in names():
        proto, t = world.smtp()
        plain = base64.b64encode(b"\0" + name + b"\0pw")
        proto.dataReceived(b"AUTH PLAIN " + plain + b"\r\n")
        assert t.value().startswith(b"535 5.7.8"), (name, t.value())
        t.clear()
        login = base64.b64encode(name)
        proto.dataReceived(b"AUTH LOGIN\r\n" + login + b"\r\n" + base64.b64encode(b"pw") + b"\r\n")
        assert t.value().split(b"\r\n")[-2].startswith(b"535 5.7.8"), name
        proto.connectionLost(None)  # type: ignore[arg-type]
    assert_untouched(world, before)


def test_the_canary_is_reachable_without_the_control_byte(world: World) -> None:
    """The control: the same logins without the bad byte do reach the store."""
    proto, t = world.pop3()
    proto.dataReceived(b"USER canary\r\nPASS pw\r\nSTAT\r\n")
    assert t.value().endswith(b"+OK 1 %d\r\n" % (len(CANARY_TEXT) + CANARY_TEXT.count(b"\n")))
    assert world.users.asked == [Address("canary", "example.com")]
    assert world.store.opened == [Address("canary", "example.com")]
    proto.connectionLost(None)  # type: ignore[arg-type]
