"""The first-start experience on embedded defaults: a demo account with a welcome message."""

from __future__ import annotations

import email.utils
import secrets
from pathlib import Path

WELCOME = """\
From: mailgate <postmaster@{domain}>
To: {address}
Subject: Welcome to mailgate
Date: {date}
Message-ID: <{token}.welcome@{domain}>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Hello,

this message was put here by mailgate on its first start, so that you can see
a real POP3 fetch working. Your mail lives under {maildir}.

Next steps:
  * add real users:    mailgate --state-dir DIR user add you@{domain}
  * write a config:    see README.md ("Configuration")
  * send mail:         SMTP submission on port 1587 (STARTTLS) or 1465 (TLS)

-- mailgate
"""


def welcome_message(address: str, domain: str, maildir: Path) -> bytes:
    """The welcome text, LF line ends as stored in Maildir."""
    return WELCOME.format(
        address=address,
        domain=domain,
        date=email.utils.formatdate(localtime=True),
        token=secrets.token_hex(8),
        maildir=maildir,
    ).encode("utf-8")


def new_password() -> str:
    """A random password that survives copy and paste (no look-alike or shell characters)."""
    alphabet = "abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "".join(secrets.choice(alphabet) for _ in range(16))
