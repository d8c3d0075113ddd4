"""Small file-descriptor helpers shared by the Maildir store, the TLS files and the log."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any


def write_all(fd: int, data: bytes) -> None:
    """Write every byte: ``os.write`` may write less (a signal, a full pipe or disk), and
    a short write would truncate a message or glue the next log line onto half of this."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def stdout_fd() -> int:
    """The process's real standard output (twistd replaces ``sys.stdout`` with a logger)."""
    return sys.__stdout__.fileno() if sys.__stdout__ is not None else 1


@functools.cache
def _libc_function(name: str) -> Any:
    """A function of the C library (ctypes; os has neither syncfs nor fstatfs), or None."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


#: syncfs(2) reports data write-back errors from Linux 5.8 on and errors of the
#: filesystem's own commit (journal, log) from 5.17 on; before that it could return 0
#: whatever happened, which is no basis for an acknowledgement.
SYNCFS_MIN_LINUX = (5, 17)


def syncfs_function(
    sysname: str | None = None, release: str | None = None
) -> Callable[[int], None] | None:
    """``syncfs(fd)`` (raises OSError), or None where it is missing or cannot be trusted.

    Python's ``os`` has no syncfs, so it comes from the C library through ctypes.
    """
    if sysname is None or release is None:
        uname = os.uname()
        sysname, release = uname.sysname, uname.release
    version = re.match(r"(\d+)\.(\d+)", release)
    if sysname != "Linux" or not version:
        return None
    if (int(version[1]), int(version[2])) < SYNCFS_MIN_LINUX:
        return None
    c_syncfs = _libc_function("syncfs")
    if c_syncfs is None:
        return None
    c_syncfs.argtypes = [ctypes.c_int]
    c_syncfs.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if c_syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return syncfs


class _StatFs(ctypes.Structure):
    # Only the first field is read; the buffer is larger than any struct statfs.
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


def filesystem_type(fd: int) -> int | None:
    """statfs(2) ``f_type`` of the filesystem holding ``fd`` (None where unknown)."""
    fstatfs = _libc_function("fstatfs")
    if fstatfs is None:
        return None
    buf = _StatFs()
    if fstatfs(fd, ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@functools.cache
def boot_id(path: str = BOOT_ID_PATH) -> str | None:
    """12 hex digits naming this boot of the machine (Linux), or None where unknown.

    A name that carries it tells a later boot that the process which wrote it is gone.
    """
    try:
        with open(path, encoding="ascii") as f:
            digits = f.read().strip().replace("-", "").lower()
    except (OSError, ValueError):
        return None
    return digits[:12] if re.fullmatch(r"[0-9a-f]{32}", digits) else None
