"""Identical Maildir contents for every server: generated once, hard-linked into each tree.

Messages are stored with LF line ends (mailgate's storage convention; Dovecot reads the same
files) and named ``<secs>.M<usec>P<pid>Q<n>.bench,S=<octets>,W=<CRLF octets>`` so neither
server has to read a message to learn its size, plus ``,D=0`` (no line starts with ".") as
mailgate's own delivery names such a message. Dovecot ignores the field. A mailbox with
``dot_mark=False`` holds messages named as another program would deliver them, without it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

DOMAIN = "bench.test"


def message(size: int, seq: int) -> bytes:
    """An LF message of about ``size`` octets; no line starts with '.'."""
    head = (
        f"From: Bench Sender <sender@{DOMAIN}>\n"
        f"To: reader@{DOMAIN}\n"
        f"Subject: benchmark message {seq}\n"
        f"Message-ID: <bench.{seq}@{DOMAIN}>\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\n"
        "\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n"
    body_len = max(0, size - len(head))
    reps, rest = divmod(body_len, len(line))
    tail = line[: max(0, rest - 1)] + b"\n" if rest else b""
    return head + line * reps + tail


def wire_size(data: bytes) -> int:
    return len(data) + data.count(b"\n") + (2 if data and not data.endswith(b"\n") else 0)


@dataclass(frozen=True)
class Mailbox:
    local: str
    count: int
    size: int
    dot_mark: bool = True


def fill_maildir(root: str, box: Mailbox, secs: int = 1_700_000_000) -> None:
    """Write ``box`` under ``root/<domain>/<local>/Maildir/new``; same content for the same box."""
    maildir = os.path.join(root, DOMAIN, box.local, "Maildir")
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    cache: dict[int, bytes] = {}
    for i in range(box.count):
        # A handful of distinct bodies is enough; content does not change the cost.
        data = cache.get(i % 8)
        if data is None:
            data = cache[i % 8] = message(box.size, i % 8)
        name = f"{secs + i}.M{i % 1_000_000}P1Q{i}.bench,S={len(data)},W={wire_size(data)}"
        if box.dot_mark and not (data.startswith(b".") or b"\n." in data):
            name += ",D=0"
        with open(os.path.join(maildir, "new", name), "wb") as f:
            f.write(data)


def seed(root: str, boxes: list[Mailbox]) -> None:
    if os.path.exists(root):
        shutil.rmtree(root)
    for box in boxes:
        fill_maildir(root, box)


def link_copy(src: str, dst: str) -> None:
    """``cp -al``: a private directory tree sharing the (never rewritten) message files."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=os.link)
