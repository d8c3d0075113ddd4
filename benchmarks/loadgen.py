"""Load generator: several processes, each running many asyncio clients against one port.

The parent forks ``procs`` workers, releases them together, and reports the operations done,
the wall time, and the workers' own CPU, so a reader can see whether the generator (not the
server) was the bottleneck. Every loop is bounded by a deadline and an operation cap.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing as mp
import multiprocessing.connection
import resource
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from benchmarks import clients, scripted
from benchmarks.procstat import self_cpu

OP_TIMEOUT = 120.0

# The bench extra (`make bench` installs it); imported by name so that type checking does
# not depend on whether it is installed.
uvloop: Any
try:
    uvloop = importlib.import_module("uvloop")
except ImportError:  # plain asyncio works, at about twice the CPU per operation
    uvloop = None

T = TypeVar("T")


def loop_name() -> str:
    """Which event loop the load generator runs on (printed with the results)."""
    return f"uvloop {uvloop.__version__}" if uvloop is not None else "asyncio"


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when installed: the generator's CPU is the server's loss."""
    if uvloop is not None:
        result: T = uvloop.run(main)
        return result
    return asyncio.run(main)


@dataclass
class Job:
    """What every client of a closed-loop run does, again and again until the deadline."""

    kind: str  # "pop3_session" | "smtp_submit" | "tls_handshake"
    port: int
    concurrency: int
    duration: float
    tls: bool = False
    users: list[tuple[str, str]] = field(default_factory=list)
    nretr: int = 10
    rcpt: str = ""
    body: bytes = b""
    per_conn: int = 1
    proto: str = "pop3"  # for tls_handshake
    max_ops: int = 1_000_000


@dataclass
class LoadResult:
    ops: int
    errors: int
    elapsed: float
    client_cpu: float
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed if self.elapsed > 0 else 0.0


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 200_000 if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _script(job: Job, index: int) -> list[scripted.Step]:
    """The steps of one operation of client ``index``."""
    user, password = job.users[index % len(job.users)] if job.users else ("", "")
    if job.kind == "pop3_session":
        return scripted.pop3_session(user, password, job.nretr)
    if job.kind == "smtp_submit":
        return scripted.smtp_submission(user, password, job.rcpt, job.body, job.per_conn)
    if job.kind == "tls_handshake":
        return scripted.greeting_and_quit(job.proto)
    raise ValueError(job.kind)


#: Units one operation counts: messages for a submission, else one (session, handshake).
def _units(job: Job) -> int:
    return job.per_conn if job.kind == "smtp_submit" else 1


async def _worker(
    job: Job, first_index: int, count: int, deadline: float, cap: int
) -> dict[str, Any]:
    tls = clients.client_tls() if job.tls else None
    state: dict[str, Any] = {"ops": 0, "errors": 0, "first_error": ""}

    units = _units(job)

    async def client(index: int) -> None:
        steps = _script(job, index)
        while time.monotonic() < deadline and state["ops"] < cap:
            try:
                await scripted.run_session(job.port, steps, tls, OP_TIMEOUT)
                state["ops"] += units
            except (OSError, clients.ProtocolError, TimeoutError) as e:
                state["errors"] += 1
                if not state["first_error"]:
                    state["first_error"] = f"{type(e).__name__}: {e}"
                if state["errors"] > 50:  # a broken server: stop, do not spin
                    return
                await asyncio.sleep(0.05)

    await asyncio.gather(*(client(first_index + i) for i in range(count)))
    return state


def _child(
    job: Job,
    first_index: int,
    count: int,
    go: Any,
    conn: multiprocessing.connection.Connection,
) -> None:
    raise_fd_limit()
    go.wait()
    deadline = time.monotonic() + job.duration
    cpu0 = self_cpu()
    state = run_loop(_worker(job, first_index, count, deadline, job.max_ops // 1))
    state["cpu"] = self_cpu() - cpu0
    conn.send(state)
    conn.close()


def run_job(job: Job, procs: int = 2) -> LoadResult:
    """Run ``job`` with its clients spread over ``procs`` forked processes."""
    ctx = mp.get_context("fork")
    go = ctx.Event()
    procs = max(1, min(procs, job.concurrency))
    workers = []
    first = 0
    for p in range(procs):
        count = job.concurrency // procs + (1 if p < job.concurrency % procs else 0)
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(job, first, count, go, child_end), daemon=True)
        proc.start()
        child_end.close()
        workers.append((proc, parent_end))
        first += count
    time.sleep(0.2)  # let every worker reach the start line
    start = time.monotonic()
    go.set()
    states = []
    for proc, end in workers:
        if end.poll(job.duration + OP_TIMEOUT + 30):
            states.append(end.recv())
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    elapsed = time.monotonic() - start
    errors = [s["first_error"] for s in states if s["first_error"]]
    return LoadResult(
        ops=sum(s["ops"] for s in states),
        errors=sum(s["errors"] for s in states) + (procs - len(states)),
        elapsed=elapsed,
        client_cpu=sum(s["cpu"] for s in states),
        first_error=errors[0] if errors else "",
    )
