"""Callback-driven clients for the closed-loop scenarios: a session is a fixed script.

The load generator shares the 2 cores with the server it measures, so every microsecond it
spends is one the server does not get. The stream clients (:mod:`benchmarks.clients`) cost
an ``await`` per line and a task per operation: profiled with perf, half of the generator's
CPU in a POP3 session run was the Python interpreter, not the kernel. Here one
:class:`asyncio.Protocol` per connection walks a list of steps from ``data_received``: it
checks the reply to each command as the stream clients do (a ``-ERR`` or an unexpected
SMTP code fails the operation) and sends the next one, with one ``await`` per session.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Sequence
from typing import Any

from benchmarks.clients import TERMINATOR, ProtocolError

#: What a step waits for: a POP3 status line, a POP3 status line and multi-line body, or
#: (any positive number) an SMTP reply with that code.
POP3_OK = -1
POP3_MULTI = -2

#: One step: the bytes to send (None: nothing, wait for the greeting) and what to expect.
Step = tuple[bytes | None, int]


def pop3_session(user: str, password: str, nretr: int) -> list[Step]:
    """Greeting, USER/PASS, STAT, UIDL, RETR 1..nretr, QUIT."""
    steps: list[Step] = [
        (None, POP3_OK),
        (b"USER " + user.encode() + b"\r\n", POP3_OK),
        (b"PASS " + password.encode() + b"\r\n", POP3_OK),
        (b"STAT\r\n", POP3_OK),
        (b"UIDL\r\n", POP3_MULTI),
    ]
    steps += [(b"RETR %d\r\n" % i, POP3_MULTI) for i in range(1, nretr + 1)]
    steps.append((b"QUIT\r\n", POP3_OK))
    return steps


def smtp_submission(
    user: str, password: str, rcpt: str, wire_body: bytes, per_conn: int
) -> list[Step]:
    """Greeting, EHLO, AUTH PLAIN, ``per_conn`` transactions, QUIT (one command at a time:
    no PIPELINING, as Thunderbird and Outlook submit). ``wire_body`` is CRLF, dot-stuffed
    and ends with CRLF."""
    token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    steps: list[Step] = [
        (None, 220),
        (b"EHLO bench.client\r\n", 250),
        (b"AUTH PLAIN " + token + b"\r\n", 235),
    ]
    for _ in range(per_conn):
        steps += [
            (b"MAIL FROM:<" + user.encode() + b">\r\n", 250),
            (b"RCPT TO:<" + rcpt.encode() + b">\r\n", 250),
            (b"DATA\r\n", 354),
            (wire_body + b".\r\n", 250),
        ]
    steps.append((b"QUIT\r\n", 221))
    return steps


def greeting_and_quit(proto: str) -> list[Step]:
    """What a handshake operation does once TLS is up."""
    if proto == "pop3":
        return [(None, POP3_OK), (b"QUIT\r\n", POP3_OK)]
    return [(None, 220), (b"QUIT\r\n", 221)]


class ScriptedSession(asyncio.Protocol):
    """Runs ``steps`` over one connection; ``done`` gets True or the failure."""

    def __init__(self, steps: Sequence[Step], done: asyncio.Future[bool]) -> None:
        self._steps = steps
        self._done = done
        self._index = 0
        self._buf = b""
        # uvloop's transports are not asyncio.Transport subclasses, hence Any.
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        first = self._steps[0][0]
        if first is not None:
            self._transport.write(first)

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception as e:  # a bug here must fail the operation, not hang it
            self._finish(e)

    def _received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        expect = self._steps[self._index][1]
        complete = _complete(buf, expect)
        if complete is None:
            self._buf = buf
            return
        self._buf = b""
        if not complete:
            self._finish(ProtocolError(buf[:160].decode("latin-1")))
            return
        self._index += 1
        if self._index == len(self._steps):
            self._finish(None)
            return
        command = self._steps[self._index][0]
        if command is not None:
            self._transport.write(command)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(ProtocolError("connection closed by server"))

    def abort(self) -> None:
        self._finish(TimeoutError("no reply in time"))

    def _finish(self, error: Exception | None) -> None:
        if self._transport is not None:
            self._transport.close()
        if not self._done.done():
            if error is None:
                self._done.set_result(True)
            else:
                self._done.set_exception(error)


def _complete(buf: bytes, expect: int) -> bool | None:
    """None while the reply is incomplete; then whether it is the success expected.

    The protocols are lock-step, so a reply is the whole buffer: only its end needs
    looking at to know it is complete.
    """
    if not buf.endswith(b"\r\n"):
        return None
    if expect == POP3_OK:
        return buf.startswith(b"+OK")
    if expect == POP3_MULTI:
        if not buf.startswith(b"+OK"):
            return False
        # Dot-stuffing keeps CRLF.CRLF out of a body, so it is the end (an empty body's too:
        # "+OK ...\r\n.\r\n").
        return True if buf.endswith(TERMINATOR) else None
    cut = buf.rfind(b"\r\n", 0, len(buf) - 2)
    last = cut + 2 if cut >= 0 else 0
    if buf[last + 3 : last + 4] == b"-":
        return None  # a multi-line SMTP reply goes on
    return buf[last : last + 3] == b"%d" % expect


async def run_session(
    port: int, steps: Sequence[Step], tls: ssl.SSLContext | None, timeout: float
) -> None:
    """Connect to 127.0.0.1:``port`` (TLS first when ``tls``), run ``steps``, close."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()
    session = ScriptedSession(steps, done)
    try:
        # One deadline for connect, handshake and script (no extra task, unlike wait_for).
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: session, "127.0.0.1", port, ssl=tls)
            await done
    finally:
        session.abort()  # closes the connection if a timeout or error left it open
