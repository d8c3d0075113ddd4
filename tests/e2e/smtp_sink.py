"""A small threaded SMTP server for end-to-end tests: the smarthost mailgate relays to.

It records every accepted message and can be told to answer RCPT with a given reply for
chosen recipients, a number of times (to script 4xx-then-success and 5xx bounces).
"""

from __future__ import annotations

import socketserver
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class SinkState:
    messages: list[Received] = field(default_factory=list)
    # recipient -> list of replies to use (consumed in order) before accepting
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        with self.lock:
            return list(self.messages)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        state = self.server.state
        self.reply("220 sink.example ESMTP test sink")
        sender = ""
        rcpts: list[str] = []
        while True:
            raw = self.rfile.readline(4096)
            if not raw:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            verb = line[:4].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250-sink.example\r\n250 8BITMIME" if verb == "EHLO" else "250 ok")
            elif verb == "MAIL":
                sender = line.split(":", 1)[1].split()[0].strip("<>")
                rcpts = []
                self.reply("250 2.1.0 ok")
            elif verb == "RCPT":
                rcpt = line.split(":", 1)[1].split()[0].strip("<>")
                with state.lock:
                    scripted = state.rcpt_replies.get(rcpt)
                    answer = scripted.pop(0) if scripted else "250 2.1.5 ok"
                if answer.startswith("250"):
                    rcpts.append(rcpt)
                self.reply(answer)
            elif verb == "DATA":
                if not rcpts:
                    self.reply("503 5.5.1 no recipients")
                    continue
                self.reply("354 go ahead")
                chunks = []
                while True:
                    data_line = self.rfile.readline()
                    if not data_line or data_line == b".\r\n":
                        break
                    if data_line.startswith(b"."):
                        data_line = data_line[1:]
                    chunks.append(data_line)
                with state.lock:
                    state.messages.append(Received(sender, list(rcpts), b"".join(chunks)))
                self.reply("250 2.0.0 accepted")
            elif verb == "RSET":
                sender, rcpts = "", []
                self.reply("250 2.0.0 ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 bye")
                return
            else:
                self.reply("502 5.5.1 not implemented")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: SinkState


class SmtpSink:
    """Start with ``start()``; ``port`` is where it listens on 127.0.0.1."""

    def __init__(self, port: int = 0) -> None:
        self.state = SinkState()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.state = self.state
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> SmtpSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
