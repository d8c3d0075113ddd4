"""Small file-descriptor helpers shared by the Maildir store, the TLS files and the log."""

from __future__ import annotations

import os
import sys


def write_all(fd: int, data: bytes) -> None:
    """Write every byte: ``os.write`` may write less (a signal, a full pipe or disk), and
    a short write would truncate a message or glue the next log line onto half of this."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def stdout_fd() -> int:
    """The process's real standard output (twistd replaces ``sys.stdout`` with a logger)."""
    return sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
