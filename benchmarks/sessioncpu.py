"""CPU of one submission session (one message per connection), in one thread.

    .venv/bin/python -m benchmarks.sessioncpu [--sessions 1500] [--repeats 7]
    MAILGATE_SRC=<worktree> .venv/bin/python -m benchmarks.sessioncpu   # another commit

On a 2-core machine shared with the load generator, the closed-loop scenarios move by
+-10% between runs of the same code, too much to see a change of a few percent. This drives
the path a real connection takes (the listener's guard and session tracker, Twisted's
``tcp.Server`` on an accepted loopback socket, EHLO, AUTH PLAIN, MAIL, RCPT, a 10 KB DATA,
QUIT) by hand in one thread: the client writes a command, the server's ``doRead`` runs, the
client reads the reply. Maildir delivery is real but into /dev/shm with fsync a no-op and
the thread pool replaced by an inline call, so the figure is the Python and socket work,
not the disk. Prints the process CPU per session (client side included, the same for every
commit): the minimum and the median of the repeats.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1500, help="sessions per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    source = os.environ.get("MAILGATE_SRC")
    if source:
        sys.path.insert(0, source)
    # Imported here, after MAILGATE_SRC is on the path.
    from twisted.cred.portal import Portal
    from twisted.internet import reactor, tcp
    from twisted.internet.address import IPv4Address
    from twisted.internet.defer import maybeDeferred
    from twisted.logger import globalLogBeginner

    import mailgate
    from mailgate import limits
    from mailgate.auth.checker import PasswordChecker, plaintext_verify
    from mailgate.logsink import LineObserver
    from mailgate.realm import MailRealm
    from mailgate.service import SessionTracker
    from mailgate.smtp import SmtpFactory, SmtpSettings
    from mailgate.store.maildir import MaildirStore
    from mailgate.testing import MemoryUserDatabase

    print(f"mailgate from {os.path.dirname(mailgate.__file__)}")
    devnull = os.open(os.devnull, os.O_WRONLY)
    observer = LineObserver(lambda line: os.write(devnull, line))
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)
    root = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    store = MaildirStore(
        root, lambda f, *a: maybeDeferred(f, *a), hostname="h", fsync=lambda fd: None
    )
    users = MemoryUserDatabase({"alice@example.com": "secret", "bob@example.com": "x"})
    realm = MailRealm(store, users, ["example.com"])
    portal = Portal(realm, [PasswordChecker(users, "example.com", plaintext_verify)])
    settings = SmtpSettings(
        hostname="mx.example.com",
        default_domain="example.com",
        allow_plaintext=lambda ip: True,
        require_tls=False,
    )
    bounds = limits.LimitSettings(max_total=1_000_000, max_per_peer=1_000_000)
    factory: Any = SessionTracker(
        limits.guard(
            SmtpFactory(portal, settings, reactor, None),
            bounds,
            reactor,
            refuse_reply=limits.smtp_refusal("mx.example.com"),
        )
    )
    body = b"Subject: hello\r\nFrom: alice@example.com\r\nTo: bob@example.com\r\n\r\n"
    body += (b"x" * 70 + b"\r\n") * 140 + b".\r\n"
    plain = base64.b64encode(b"\0alice@example.com\0secret")
    script = [
        b"EHLO client.example.com\r\n",
        b"AUTH PLAIN " + plain + b"\r\n",
        b"MAIL FROM:<alice@example.com>\r\n",
        b"RCPT TO:<bob@example.com>\r\n",
        b"DATA\r\n",
        body,
        b"QUIT\r\n",
    ]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    count = 0

    def session() -> None:
        nonlocal count
        client = socket.create_connection(listener.getsockname())
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ours, peer = listener.accept()
        ours.setblocking(False)
        protocol = factory.buildProtocol(IPv4Address("TCP", *peer))
        count += 1
        server = tcp.Server(ours, protocol, peer, None, count, reactor)  # type: ignore[arg-type]
        protocol.makeConnection(server)
        replies = client.recv(65536)
        for line in script:
            client.sendall(line)
            server.doRead()  # type: ignore[no-untyped-call]
            replies += client.recv(65536)
        client.close()
        if replies.count(b"250 2.0.0 Ok: queued") != 1:
            raise SystemExit(f"session failed: {replies[-300:]!r}")

    try:
        for _ in range(100):
            session()  # warm up: imports, caches, the first Maildir
        per_session = []
        for _ in range(args.repeats):
            start = time.process_time()
            for _ in range(args.sessions):
                session()
            per_session.append((time.process_time() - start) / args.sessions * 1e6)
    finally:
        listener.close()
        shutil.rmtree(root, ignore_errors=True)
    per_session.sort()
    print(
        f"CPU per session: min {per_session[0]:.1f} us, "
        f"median {per_session[len(per_session) // 2]:.1f} us ({args.repeats} x {args.sessions})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
