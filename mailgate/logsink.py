"""One log for the master and its workers, written by every process itself.

Relaying a worker's lines through the master cost each line a pipe write, a wake-up of
the master and Twisted's formatting a second time: ~60 us a line, a tenth of a POP3
session's CPU (two lines a session). Instead every process formats its own lines the
way twistd does (``TIME [namespace#level] text``) and writes each line with one
``write()`` to the same destination (~25 us a line, all told):

- a log file opened ``O_APPEND`` by every process, so whole lines from several
  processes never overwrite each other. The master rotates it (by its real size, checked
  every second, and on SIGUSR1) and sends its workers SIGUSR1, and each reopens it by name
  (a worker also checks once a second, for a rotation made by someone else);
- or the master's standard output, which a worker inherits as its standard error (a
  line longer than ``PIPE_BUF``, 4 KB, such as a traceback, may then interleave with
  another process's line on a pipe).

Syslog or a custom ``--logger`` keep the relay (see :mod:`mailgate.workers`).
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import logfile, threadable
from zope.interface import implementer

from mailgate.fileio import stdout_fd, write_all

#: Environment variable telling a worker where its log lines go: ``stderr`` (its fd 2 is
#: the master's log stream) or ``file:PATH``. Unset: relay through the master.
LOG_ENV = "MAILGATE_LOG"
#: How often a worker checks whether the log file was rotated, and the master whether
#: the file (workers' lines included) has reached its rotation size.
CHECK_INTERVAL = 1.0

_log = Logger()

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
        if text and "\n" not in text and "log_failure" not in event and "log_system" not in event:
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
        except (OSError, ValueError):
            pass  # a full disk or a closed file must not take the server down


def _tagged(event: Mapping[str, Any], tag: str) -> LogEvent:
    """The event with ``tag`` in front of its text (for the slow, formatted path)."""
    copy = dict(event)
    fmt = copy.get("log_format")
    if isinstance(fmt, str):
        copy["log_format"] = tag.replace("{", "{{").replace("}", "}}") + fmt
    return copy


class SharedLogFile(logfile.LogFile):
    """twistd's size-rotated log file, opened ``O_APPEND`` so workers can append too.

    ``size`` is refreshed from the file by :meth:`check`, so the workers' lines count
    towards rotation as well as the master's own; the file may outgrow the rotation size
    by what is written in the second before a check. ``on_rotate`` runs after a rotation
    (the master tells its workers to reopen at once).
    """

    synchronized = ["write", "check", "rotate_now"]
    on_rotate: Callable[[], object] = staticmethod(lambda: None)
    _failing = False

    @classmethod
    def at(cls, path: str, rotate_length: int = 1_000_000) -> SharedLogFile:
        """twistd's defaults: rotate at 1 MB, keep every rotated file."""
        full = os.path.abspath(path)
        return cls(os.path.basename(full), os.path.dirname(full), rotateLength=rotate_length)

    def write(self, data: bytes) -> None:
        """Append a line. Rotation is left to :meth:`check` (once a second), so a rename
        that keeps failing costs no line and no directory listing per line."""
        write_all(self._file.fileno(), data)
        self.size += len(data)

    def close(self) -> None:
        super().close()  # type: ignore[no-untyped-call]

    def rotate_now(self) -> None:
        """Rotate (twistd's way: FILE -> FILE.1 -> FILE.2 ...), then say so."""
        try:
            self.rotate()  # type: ignore[no-untyped-call]
        finally:
            if self._file.closed:  # the rename failed after the close: keep logging
                self._openFile()
        self.on_rotate()

    def _openFile(self) -> None:
        self.closed = False
        # Created with twistd's permissions (the umask's, or defaultMode), never wider.
        mode = 0o666 if self.defaultMode is None else self.defaultMode
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._file = os.fdopen(os.open(self.path, flags, mode), "ab", 0)
        if self.defaultMode is not None:
            os.chmod(self.path, self.defaultMode)
        self.size = os.fstat(self._file.fileno()).st_size

    def check(self) -> None:
        """Rotate when the file (every process's lines) has reached the rotation size.
        A failed rotation is tried again at the next check."""
        if self.closed:
            return
        try:
            self.size = os.fstat(self._file.fileno()).st_size
        except (OSError, ValueError):
            return
        if self.shouldRotate():  # type: ignore[no-untyped-call]
            self.rotate_or_say_why()

    def rotate_or_say_why(self) -> None:
        """Rotate; a failure is logged once until a rotation works again (not every
        second) and never raised: the log keeps going to the same file."""
        try:
            self.rotate_now()
        except (OSError, ValueError) as e:
            if not self._failing:
                self._failing = True
                _log.error("cannot rotate {path}: {error}", path=self.path, error=e)
            return
        self._failing = False


threadable.synchronize(SharedLogFile)  # type: ignore[no-untyped-call]


class ReopeningWriter:
    """A worker's end of the shared log file: appends lines, follows a rotation by name.

    It never creates the file (the master does): while the name is missing, or cannot be
    opened, it keeps writing to the file it has."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def write(self, data: bytes) -> None:
        write_all(self._fd, data)

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


def _regular_file(path: str) -> bool:
    """Whether every process opening ``path`` gets the same file: not ``/dev/stdout``,
    ``/proc/self/fd/N`` and the like, which each process resolves in its own fd table."""
    if path.startswith(("/dev/", "/proc/")):
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True  # created as a regular file
    except OSError:
        return False


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
        self._checker: Any = None
        self._old_usr1: Any = None

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
            return cls(LineObserver(_stdout_writer()), "stderr", None)
        path = os.path.abspath(name or "twistd.log")
        if not _regular_file(path):
            return None
        try:
            shared = SharedLogFile.at(path)
        except OSError:
            return None  # twistd tries the same file itself and reports the error its way
        return cls(LineObserver(shared.write), f"file:{shared.path}", shared)

    def observer(self) -> LineObserver:
        return self._observer

    def start(self, reactor: Any, rotated: Callable[[], object], signals: bool) -> None:
        """Rotation of a log file: by size, checked every second, and (``signals``) on
        SIGUSR1 as twistd does; ``rotated`` runs after each one. Logging to stdout,
        SIGUSR1 is ignored rather than fatal."""
        shared = self.file
        if shared is not None:
            from twisted.internet.task import LoopingCall

            shared.on_rotate = rotated
            self._checker = LoopingCall(shared.check)
            self._checker.clock = reactor
            self._checker.start(CHECK_INTERVAL, now=False)
        if signals and hasattr(signal, "SIGUSR1") and not signal.getsignal(signal.SIGUSR1):

            def on_usr1(signum: int, frame: FrameType | None) -> None:
                if shared is not None:
                    reactor.callFromThread(shared.rotate_or_say_why)

            self._old_usr1 = signal.signal(signal.SIGUSR1, on_usr1)

    def stop(self) -> None:
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        self._checker = None
        if self._old_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._old_usr1)
            self._old_usr1 = None


def _stdout_writer() -> Callable[[bytes], object]:
    """Whole lines straight to the real stdout (the fd a worker gets as its stderr), after
    anything Python still buffers there (the demo account's banner, say)."""
    stream = sys.__stdout__
    fd = stdout_fd()

    def write(data: bytes) -> None:
        if stream is not None:
            stream.flush()
        write_all(fd, data)

    return write


def worker_observer(
    setting: str, pid: int
) -> tuple[LineObserver, Callable[[], None] | None] | None:
    """The observer a worker logs through when ``MAILGATE_LOG`` is set, and how it follows
    a rotation (None: nothing to follow); None keeps the relay through the master (also
    when the file cannot be opened here, e.g. after twistd dropped privileges)."""
    tag = f"[worker {pid}] "
    if setting == "stderr":
        return LineObserver(lambda data: write_all(2, data), tag), None
    if setting.startswith("file:"):
        try:
            writer = ReopeningWriter(setting[len("file:") :])
        except OSError:
            return None
        return LineObserver(writer.write, tag), writer.check
    return None
