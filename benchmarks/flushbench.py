"""What a group commit's durability costs on this disk: per-file fsyncs against syncfs.

    .venv/bin/python -m benchmarks.flushbench [--group 4] [--groups 300] [--dir DIR]

Each group creates N 10 KB files in tmp/, makes them durable, renames them into new/ and
makes the renames durable, the way mailgate's Maildir group commit does: ``file`` fsyncs
every file and new/, ``syncfs`` flushes the filesystem before and after the renames. Prints
milliseconds per group and the committing thread's CPU per message, alternating the modes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from mailgate.fileio import syncfs_function


def _group(base: str, n: int, tag: str, mode: str, data: bytes) -> None:
    syncfs = syncfs_function()
    fds, names = [], []
    for i in range(n):
        name = f"{tag}.{i}"
        fd = os.open(f"{base}/tmp/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        fds.append(fd)
        names.append(name)
    if mode == "syncfs" and syncfs is not None:
        keep = os.dup(fds[0])
        for fd in fds:
            os.close(fd)
        syncfs(keep)
        for name in names:
            os.rename(f"{base}/tmp/{name}", f"{base}/new/{name}")
        syncfs(keep)
        os.close(keep)
        return
    for fd in fds:
        os.fsync(fd)
        os.close(fd)
    for name in names:
        os.rename(f"{base}/tmp/{name}", f"{base}/new/{name}")
    directory = os.open(f"{base}/new", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(directory)
    os.close(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flushbench")
    parser.add_argument("--group", type=int, default=4, help="messages per group")
    parser.add_argument("--groups", type=int, default=300, help="groups per measurement")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    if syncfs_function() is None:
        print("no trustworthy syncfs here (Linux 5.17+ needed): measuring fsyncs only")
    base = tempfile.mkdtemp(prefix="flushbench-", dir=args.dir)
    try:
        os.makedirs(f"{base}/tmp")
        os.makedirs(f"{base}/new")
        data = os.urandom(10 * 1024)
        for rnd in range(2):
            for mode in ("file", "syncfs"):
                start, cpu = time.perf_counter(), time.thread_time()
                for k in range(args.groups):
                    _group(base, args.group, f"{mode}{rnd}.{k}", mode, data)
                elapsed, used = time.perf_counter() - start, time.thread_time() - cpu
                messages = args.groups * args.group
                print(
                    f"{mode:6} group of {args.group}: {elapsed / args.groups * 1000:.2f} ms/group, "
                    f"{messages / elapsed:,.0f} msgs/s, CPU {used / messages * 1e6:.0f} us/msg"
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
