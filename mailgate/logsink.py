"""One log for the master and its workers, written by every process itself.

Relaying a worker's lines through the master cost each line a pipe write, a wake-up of
the master and Twisted's formatting a second time: ~60 us a line, a tenth of a POP3
session's CPU (two lines a session). Instead every process formats its own lines the
way twistd does (``TIME [namespace#level] text``) and writes each line with one
``write()`` to the same destination:

- a log file opened ``O_APPEND`` by every process, so whole lines from several
  processes never overwrite each other. The master rotates it (by its real size, as
  twistd's ``LogFile`` does by the size it wrote itself, and on SIGUSR1); a worker sees
  the new file at its next check (every second) and reopens it by name;
- or the master's standard output, which a worker inherits as its standard error.

Syslog or a custom ``--logger`` keep the relay (see :mod:`mailgate.workers`).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import logfile
from zope.interface import implementer

#: Environment variable telling a worker where its log lines go: ``stderr`` (its fd 2 is
#: the master's log stream) or ``file:PATH``. Unset: relay through the master.
LOG_ENV = "MAILGATE_LOG"
#: How often a worker checks whether the log file was rotated, and the master whether
#: the file (workers' lines included) has reached its rotation size.
CHECK_INTERVAL = 1.0

#: The event key where :func:`mailgate.session.log_line` keeps its ready-made text.
TEXT_KEY = "mailgate_text"


class TimeStamps:
    """twistd's timestamp (RFC 3339, local offset), formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._text = formatTime(second)
            self._second = second
        return self._text


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one twistd-style line through ``write`` (one call a line).

    ``tag`` (``"[worker PID] "``) goes before the text, so an admin can tell the
    processes apart. Lines from :func:`mailgate.session.log_line` skip Twisted's
    formatting; anything else (tracebacks included) goes through it.
    """

    def __init__(self, write: Callable[[bytes], object], tag: str = "") -> None:
        self._write = write
        self._tag = tag
        self._stamp = TimeStamps()

    def __call__(self, event: LogEvent) -> None:
        text = event.get(TEXT_KEY)
        if (
            text is not None
            and "\n" not in text
            and "log_failure" not in event
            and "log_system" not in event
        ):
            level = event.get("log_level")
            line = (
                f"{self._stamp(event.get('log_time'))} "
                f"[{event.get('log_namespace', '-')}#{level.name if level else '-'}] "
                f"{self._tag}{text}\n"
            )
        else:
            formatted = formatEventAsClassicLogText(
                _tagged(event, self._tag) if self._tag else event, formatTime=self._stamp
            )
            if formatted is None:
                return
            line = formatted
        try:
            self._write(line.encode("utf-8", "replace"))
        except OSError:
            pass  # a full disk or a closed stream must not take the server down


def _tagged(event: Mapping[str, Any], tag: str) -> LogEvent:
    """The event with ``tag`` in front of its text (for the slow, formatted path)."""
    copy = dict(event)
    fmt = copy.get("log_format")
    if fmt is not None:
        copy["log_format"] = tag.replace("{", "{{").replace("}", "}}") + fmt
    return copy


class SharedLogFile(logfile.LogFile):
    """twistd's size-rotated log file, opened ``O_APPEND`` so workers can append too.

    ``size`` is refreshed from the file by :meth:`check`, so the workers' lines count
    towards rotation as well as the master's own.
    """

    @classmethod
    def at(cls, path: str, rotate_length: int = 1_000_000) -> SharedLogFile:
        """twistd's defaults: rotate at 1 MB, keep every rotated file."""
        full = os.path.abspath(path)
        return cls(os.path.basename(full), os.path.dirname(full), rotateLength=rotate_length)

    def write(self, data: bytes) -> None:
        super().write(data)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        super().close()  # type: ignore[no-untyped-call]

    def _openFile(self) -> None:
        self.closed = False
        self._file = open(self.path, "ab", 0)  # noqa: SIM115 - closed by LogFile.close
        if self.defaultMode is not None:
            os.chmod(self.path, self.defaultMode)
        self.size = os.fstat(self._file.fileno()).st_size

    def check(self) -> None:
        """Rotate when the file (every process's lines) has reached the rotation size."""
        if self.closed:
            return
        try:
            self.size = os.fstat(self._file.fileno()).st_size
        except OSError:
            return
        if self.shouldRotate():  # type: ignore[no-untyped-call]
            self.rotate()  # type: ignore[no-untyped-call]


class ReopeningWriter:
    """A worker's end of the shared log file: appends lines, follows a rotation by name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, data: bytes) -> None:
        os.write(self._fd, data)

    def check(self) -> None:
        """Reopen when the name now points at another file (the master rotated it)."""
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                return
            fresh = self._open()
        except OSError:
            return
        os.close(self._fd)
        self._fd = fresh

    def close(self) -> None:
        os.close(self._fd)


def write_fd(fd: int) -> Callable[[bytes], object]:
    """A writer of whole lines to ``fd`` (one ``write()`` each, so lines never mix)."""
    return lambda data: os.write(fd, data)


class MasterLog:
    """The master's log when it runs under twistd and logs to a file or its stdout.

    Built from twistd's own options (``--logfile``, ``--nodaemon``, ``--syslog``,
    ``--logger``); :meth:`observer` takes twistd's place (twistd asks the application
    for an observer before making its own), :attr:`worker_env` tells each worker where
    to write.
    """

    def __init__(self, observer: LineObserver, worker_env: str, file: SharedLogFile | None):
        self._observer = observer
        self.worker_env = worker_env
        self.file = file

    @classmethod
    def from_twistd(cls, twistd_options: Mapping[str, Any]) -> MasterLog | None:
        """What twistd would do (see its UnixAppLogger), or None where we keep the relay."""
        if twistd_options.get("syslog") or twistd_options.get("logger"):
            return None
        name = twistd_options.get("logfile") or ""
        nodaemon = bool(twistd_options.get("nodaemon"))
        if name == "-" or (nodaemon and not name):
            if not nodaemon:
                return None  # twistd refuses a daemon logging to stdout: let it say so
            stdout = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
            return cls(LineObserver(write_fd(stdout)), "stderr", None)
        try:
            shared = SharedLogFile.at(name or "twistd.log")
        except OSError:
            return None  # twistd tries the same file itself and reports the error its way
        return cls(LineObserver(shared.write), f"file:{shared.path}", shared)

    def observer(self) -> LineObserver:
        return self._observer

    def start(self, reactor: Any) -> None:
        """Rotation for a log file: by size, checked every second, and on SIGUSR1."""
        shared = self.file
        if shared is None:
            return
        from twisted.internet.task import LoopingCall

        checker = LoopingCall(shared.check)
        checker.clock = reactor
        checker.start(CHECK_INTERVAL, now=False)
        if hasattr(signal, "SIGUSR1") and not signal.getsignal(signal.SIGUSR1):

            def rotate(signum: int, frame: FrameType | None) -> None:
                reactor.callFromThread(shared.rotate)

            signal.signal(signal.SIGUSR1, rotate)


def worker_observer(setting: str, pid: int) -> tuple[LineObserver, Callable[[], None]] | None:
    """The observer a worker logs through when ``MAILGATE_LOG`` is set, and its periodic
    check (a rotation to follow); None keeps the relay through the master."""
    tag = f"[worker {pid}] "
    if setting == "stderr":
        return LineObserver(write_fd(2), tag), lambda: None
    if setting.startswith("file:"):
        writer = ReopeningWriter(setting[len("file:") :])
        return LineObserver(writer.write, tag), writer.check
    return None
