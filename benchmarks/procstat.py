"""CPU and memory of server process trees, read straight from /proc (no dependencies).

CPU of a tree is the root's own and reaped children's time (utime+stime+cutime+cstime) plus the
live descendants' own and reaped time, so per-session worker processes that already exited
(Dovecot's pop3, Postfix's smtpd) are still counted once their parent has waited for them.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

TICK = float(os.sysconf("SC_CLK_TCK"))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process on the machine."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            out.setdefault(int(fields[1]), []).append(int(name))
    return out


def tree(roots: list[int]) -> list[int]:
    """The roots and all their live descendants."""
    kids = children_map()
    seen: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(kids.get(pid, ()))
    return seen


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime+cutime+cstime summed over ``pids`` (pass a whole tree)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # After the ')': state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
            total += sum(int(x) for x in fields[11:15])
    return total / TICK


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def settle(threshold: float = 0.15, window: float = 0.5, timeout: float = 10.0) -> float:
    """Wait until the whole machine is quiet; returns the seconds waited.

    What one scenario leaves running must not be measured as part of the next: after the
    idle scenario Dovecot reaps 10,000 login processes, which took CPU from the first
    round's POP3 runs (22 sessions/s for Dovecot, a third less for mailgate) and from the
    100k first login. Quiet means below ``threshold`` of all CPUs busy over ``window``.
    """
    start = time.monotonic()
    busy0, total0 = _cpu_times()
    while True:
        time.sleep(window)
        busy1, total1 = _cpu_times()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < threshold:
            break
        if time.monotonic() - start > timeout:
            break
        busy0, total0 = busy1, total1
    return time.monotonic() - start


def settle_tree(roots: list[int], most: int, timeout: float = 90.0) -> float:
    """Wait until the process tree of ``roots`` has at most ``most`` processes again (a
    server reaping the processes of a finished scenario); returns the seconds waited."""
    start = time.monotonic()
    while len(tree(roots)) > most and time.monotonic() - start < timeout:
        time.sleep(0.5)
    return time.monotonic() - start


def tree_cpu(roots: list[int]) -> float:
    return cpu_seconds(tree(roots))


def thread_cpu(pid: int) -> dict[str, float]:
    """Per-thread CPU seconds of one process, keyed by 'main' or 'thread-<tid>'."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        key = "main" if int(tid) == pid else f"thread-{tid}"
        out[key] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def main_threads_cpu(roots: list[int]) -> float:
    """CPU seconds of the main threads of every process in the tree: for mailgate, the
    reactor of the master and of each worker."""
    return sum(thread_cpu(pid).get("main", 0.0) for pid in tree(roots))


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return _status_kb(pid, "VmRSS")


def tree_memory_kb(roots: list[int]) -> int:
    """Proportional set size of the whole tree (shared pages counted once overall)."""
    return sum(_pss_kb(pid) for pid in tree(roots))


def hwm_kb(pid: int) -> int:
    """VmHWM: the process's own peak resident set since it started."""
    return _status_kb(pid, "VmHWM")


@dataclass
class MemorySampler:
    """Samples a tree's memory in a thread while a scenario runs; keeps the peak."""

    roots: list[int]
    interval: float = 0.1
    peak_kb: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemorySampler:
        self.peak_kb = tree_memory_kb(self.roots)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, tree_memory_kb(self.roots))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_kb = max(self.peak_kb, tree_memory_kb(self.roots))


def self_cpu() -> float:
    """CPU seconds of this process and its reaped children (the load generator's own cost)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_port(port: int, timeout: float = 30.0) -> bool:
    """True once something accepts on 127.0.0.1:port."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.1)
    return False
