"""End to end with Python's own poplib and smtplib over real loopback sockets."""

from __future__ import annotations

import poplib
import smtplib
import ssl
from email.message import EmailMessage

import pytest

from tests.e2e.conftest import Gateway


def tls_context(gw: Gateway) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(gw.cert))
    return ctx


def submit(gw: Gateway, sender: str, password: str, to: list[str], body: str) -> None:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = "e2e"
    msg.set_content(body)
    with smtplib.SMTP("127.0.0.1", gw.submission, timeout=30) as s:
        s.ehlo("client.example")
        assert "auth" not in s.esmtp_features
        s.starttls(context=tls_context(gw))
        s.ehlo("client.example")
        assert "PLAIN" in s.esmtp_features["auth"]
        s.login(sender, password)
        s.send_message(msg)


def test_pop3_refuses_plaintext_login_before_stls(gateway: Gateway) -> None:
    p = poplib.POP3("127.0.0.1", gateway.pop3, timeout=30)
    try:
        assert "USER" not in p.capa()
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            p.user("alice@example.com")
    finally:
        p.quit()


def test_submit_over_starttls_and_fetch_over_stls(gateway: Gateway) -> None:
    submit(gateway, "alice@example.com", "alice-secret-1", ["bob@example.com"], "hi bob\n.dot\n")
    p = poplib.POP3("127.0.0.1", gateway.pop3, timeout=30)
    p.stls(context=tls_context(gateway))
    assert "USER" in p.capa()
    p.user("bob")  # bare name gets the default domain
    p.pass_("bob-secret-2")
    count, _size = p.stat()
    assert count == 1
    _resp, lines, _octets = p.retr(1)
    text = b"\r\n".join(lines)
    assert b"hi bob" in text
    assert b"\r\n.dot" in text
    assert b"Received: " in text
    assert b"Message-ID: " in text or b"Message-Id: " in text
    p.dele(1)
    p.quit()
    p = poplib.POP3_SSL("127.0.0.1", gateway.pop3s, context=tls_context(gateway), timeout=30)
    p.user("bob@example.com")
    p.pass_("bob-secret-2")
    assert p.stat() == (0, 0)
    p.quit()


def test_smtp_rejects_unowned_sender_and_unknown_user(gateway: Gateway) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", gateway.submissions, context=tls_context(gateway), timeout=30
    ) as s:
        s.ehlo("client.example")
        assert "starttls" not in s.esmtp_features
        s.login("alice@example.com", "alice-secret-1")
        code, _ = s.mail("bob@example.com")
        assert code == 553
        s.rset()
        assert s.mail("alice@example.com")[0] == 250
        assert s.rcpt("nobody@example.com")[0] == 550
        assert s.rcpt("bob@example.com")[0] == 250


def test_wrong_password_is_refused_with_auth_code(gateway: Gateway) -> None:
    p = poplib.POP3_SSL("127.0.0.1", gateway.pop3s, context=tls_context(gateway), timeout=30)
    p.user("alice@example.com")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.pass_("Wr0ng-Pa55-zz")
    p.quit()
    assert "Wr0ng-Pa55-zz" not in gateway.log_text()
    assert "alice@example.com" in gateway.log_text()


def test_plaintext_allowed_when_network_is_named(plain_gateway: Gateway) -> None:
    p = poplib.POP3("127.0.0.1", plain_gateway.pop3, timeout=30)
    assert "USER" in p.capa()
    p.user("alice@example.com")
    p.pass_("alice-secret-1")
    assert p.stat() == (0, 0)
    p.quit()


def test_uidl_survives_restart(gateway: Gateway) -> None:
    submit(gateway, "bob@example.com", "bob-secret-2", ["alice@example.com"], "one\n")
    submit(gateway, "bob@example.com", "bob-secret-2", ["alice@example.com"], "two\n")

    def uidls() -> list[bytes]:
        p = poplib.POP3_SSL("127.0.0.1", gateway.pop3s, context=tls_context(gateway), timeout=30)
        p.user("alice@example.com")
        p.pass_("alice-secret-1")
        _, lines, _ = p.uidl()
        sizes = [int(x.split()[1]) for x in p.list()[1]]
        for i, size in enumerate(sizes, 1):
            assert p.retr(i)[2] == size  # LIST size is exactly what RETR sends
        p.quit()
        return list(lines)

    before = uidls()
    assert len(before) == 2
    gateway.stop()
    gateway.start()
    assert uidls() == before
