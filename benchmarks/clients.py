"""Minimal asyncio POP3 clients for the scenarios that are not closed loops (the huge
maildrop, idle connections); the closed loops use :mod:`benchmarks.scripted`.

Every reply is checked: a ``-ERR`` raises :class:`ProtocolError`, so a benchmark never
counts a failed operation as a fast one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

TERMINATOR = b"\r\n.\r\n"


class ProtocolError(Exception):
    """The server answered something other than success."""


def client_tls() -> ssl.SSLContext:
    """Loopback benchmark servers use throw-away self-signed certificates: no verification."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Conn:
    """A buffered line/terminator reader over an asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls, limit=1 << 20)
        return cls(reader, writer)

    async def _fill(self) -> None:
        data = await self.reader.read(1 << 18)
        if not data:
            raise ProtocolError("connection closed by server")
        self.buf += data

    async def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return out
            await self._fill()

    async def until_terminator(self) -> int:
        """Consume a POP3 multi-line body up to CRLF.CRLF; returns its length (not kept).

        POP3 is lock-step and a dot-stuffed body never contains CRLF.CRLF, so the body ends
        exactly where the server stops sending: only the end of what has arrived is checked,
        and the body is counted, never copied into our buffer or searched (at 800 MB/s the
        old buffer-and-find loop made this client, not the server, the limit of retr_big).
        """
        # The status line was consumed already, so the body may be empty: ".\r\n" at once
        # (a body's first line is never a lone "." once stuffed).
        while len(self.buf) < 3:
            await self._fill()
        if self.buf[:3] == b".\r\n":
            del self.buf[:3]
            return 0
        if self.buf.endswith(TERMINATOR):
            total = len(self.buf) - 3
            self.buf.clear()
            return total
        total = len(self.buf)
        tail = bytes(self.buf[-4:])
        self.buf.clear()
        while True:
            data = await self.reader.read(1 << 20)
            if not data:
                raise ProtocolError("connection closed by server")
            total += len(data)
            if data.endswith(TERMINATOR) or (tail + data[-5:]).endswith(TERMINATOR):
                return total - 3
            tail = (tail + data[-4:])[-4:]

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


# -- POP3 --------------------------------------------------------------------------------


async def pop3_ok(c: Conn) -> bytes:
    line = await c.line()
    if not line.startswith(b"+OK"):
        raise ProtocolError(line[:80].decode("latin-1"))
    return line


async def pop3_cmd(c: Conn, cmd: bytes) -> bytes:
    c.send(cmd + b"\r\n")
    return await pop3_ok(c)


async def pop3_multi(c: Conn, cmd: bytes) -> int:
    """A multi-line command (UIDL, LIST, RETR): returns the body length in octets."""
    # The body may begin in the same read as the status line, which is why the one buffer
    # is shared: pop3_cmd leaves any following bytes in it.
    await pop3_cmd(c, cmd)
    return await c.until_terminator()


async def pop3_login(port: int, user: str, password: str, tls: ssl.SSLContext | None) -> Conn:
    c = await Conn.open(port, tls)
    await pop3_ok(c)
    await pop3_cmd(c, b"USER " + user.encode())
    await pop3_cmd(c, b"PASS " + password.encode())
    return c


async def pop3_quit(c: Conn) -> None:
    await pop3_cmd(c, b"QUIT")
    await c.close()


async def pop3_stat(c: Conn) -> tuple[int, int]:
    parts = (await pop3_cmd(c, b"STAT")).split()
    return int(parts[1]), int(parts[2])


# -- a bulk reader for one big RETR ------------------------------------------------------


class BulkPop3:
    """A blocking POP3 client for one big transfer: the body is received with
    ``recv_into`` one preallocated buffer, never copied or searched.

    asyncio's stream reader copies every byte twice (into its buffer, out of it) and holds
    the GIL meanwhile: at 800 MB/s that client used more CPU per MB than the server it
    measured, and so did the memory sampler sharing its process. Here the kernel's copy
    into our buffer is the only one, done with the GIL released.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = bytearray(1 << 20)
        self.pending = b""
        self.ok()

    def _line(self) -> bytes:
        while b"\r\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError("connection closed by server")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line

    def ok(self) -> bytes:
        line = self._line()
        if not line.startswith(b"+OK"):
            raise ProtocolError(line[:80].decode("latin-1"))
        return line

    def cmd(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        return self.ok()

    def login(self, user: str, password: str) -> None:
        self.cmd(b"USER " + user.encode())
        self.cmd(b"PASS " + password.encode())

    def multi(self, command: bytes) -> int:
        """A multi-line reply's body length (lock-step: it ends where the server stops)."""
        self.cmd(command)
        data, self.pending = self.pending, b""
        if data[:3] == b".\r\n":
            self.pending = data[3:]
            return 0
        total = len(data)
        tail = data[-5:]
        if tail.endswith(TERMINATOR):
            return total - 3
        view = memoryview(self.buf)
        while True:
            n = self.sock.recv_into(view)
            if not n:
                raise ProtocolError("connection closed by server")
            total += n
            tail = (tail + bytes(view[max(0, n - 5) : n]))[-5:]
            if tail.endswith(TERMINATOR):
                return total - 3

    def quit(self) -> None:
        self.cmd(b"QUIT")
        self.sock.close()
