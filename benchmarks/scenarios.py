"""The benchmark scenarios: each runs against one server and returns named figures."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from benchmarks import clients, loadgen, seed
from benchmarks.procstat import MemorySampler, main_threads_cpu, tree_cpu, tree_memory_kb
from benchmarks.servers import PASSWORD, Server

Figures = dict[str, float]


@dataclass(frozen=True)
class Sizes:
    """Everything that makes a run quick or full."""

    rounds: int
    duration: float
    concurrency: int
    retr_count: int
    retr_size: int
    big_size: int
    huge_count: int
    idle: int
    later_logins: int

    def boxes(self) -> list[seed.Mailbox]:
        boxes = [seed.Mailbox(f"s{i:02d}", self.retr_count, self.retr_size) for i in range(16)]
        boxes += [seed.Mailbox(f"a{i:02d}", self.retr_count, self.retr_size) for i in range(16)]
        boxes += [
            seed.Mailbox("big", 1, self.big_size),
            seed.Mailbox("bigx", 1, self.big_size, dot_mark=False),
            seed.Mailbox("huge", self.huge_count, 600),
            seed.Mailbox("inbox", 0, 0),
            seed.Mailbox("sender", 0, 0),
        ]
        return boxes


QUICK = Sizes(
    rounds=1, duration=4.0, concurrency=16, retr_count=10, retr_size=10 * 1024,
    big_size=10 * 2**20, huge_count=10_000, idle=500, later_logins=2,
)  # fmt: skip
FULL = Sizes(
    rounds=3, duration=10.0, concurrency=16, retr_count=10, retr_size=10 * 1024,
    big_size=50 * 2**20, huge_count=100_000, idle=10_000, later_logins=3,
)  # fmt: skip

SESSION_USERS = [(f"s{i:02d}@{seed.DOMAIN}", PASSWORD) for i in range(16)]
#: The same sessions with Argon2id accounts (mailgate's default scheme), see run.py.
ARGON2_USERS = [(f"a{i:02d}@{seed.DOMAIN}", PASSWORD) for i in range(16)]


def argon2_account(local: str) -> bool:
    """Whether a seeded account gets an Argon2id hash; every other one is ``{PLAIN}``."""
    return local.startswith("a")


def _user(local: str) -> str:
    return f"{local}@{seed.DOMAIN}"


def closed_loop(server: Server, job: loadgen.Job, roots: list[int], unit: str) -> Figures:
    """Run a load job; figures: rate, server CPU per op, client CPU, peak memory."""
    single = server.name == "mailgate"
    # Every process's main thread is a reactor; the rest of the CPU is off the reactor:
    # the thread pools, and the short-lived threads Argon2id (p=4) starts, whose time
    # /proc only shows in the process total once they have exited.
    reactors0 = main_threads_cpu(roots) if single else 0.0
    cpu0 = tree_cpu(roots)
    with MemorySampler(roots) as mem:
        result = loadgen.run_job(job)
    cpu = tree_cpu(roots) - cpu0
    ops = max(result.ops, 1)
    figures: Figures = {
        f"{unit}_per_s": result.rate,
        "server_cpu_ms_per_op": 1000 * cpu / ops,
        "server_cpu_util": cpu / result.elapsed,
        "client_cpu_util": result.client_cpu / result.elapsed,
        "peak_mem_mb": mem.peak_kb / 1024,
        "errors": float(result.errors),
    }
    if single:
        main = main_threads_cpu(roots) - reactors0
        figures["reactor_cpu_ms_per_op"] = 1000 * main / ops
        figures["pool_cpu_ms_per_op"] = 1000 * (cpu - main) / ops
    if result.first_error:
        print(f"    {server.name}: {result.errors} errors, first: {result.first_error}")
    return figures


def pop3_sessions(
    server: Server, sizes: Sizes, tls: bool = False, users: list[tuple[str, str]] = SESSION_USERS
) -> Figures:
    port = server.ports.pop3s if tls else server.ports.pop3
    job = loadgen.Job(
        "pop3_session", port, sizes.concurrency, sizes.duration, tls=tls,
        users=users, nretr=sizes.retr_count,
    )  # fmt: skip
    return closed_loop(server, job, server.roots, "sessions")


def submissions(server: Server, roots: list[int], sizes: Sizes, per_conn: int) -> Figures:
    body = seed.message(10 * 1024, 1).replace(b"\n", b"\r\n")
    job = loadgen.Job(
        "smtp_submit", server.ports.submission, sizes.concurrency, sizes.duration,
        users=[(_user("sender"), PASSWORD)], rcpt=_user("inbox"), body=body, per_conn=per_conn,
    )  # fmt: skip
    return closed_loop(server, job, roots, "messages")


def handshakes(server: Server, roots: list[int], sizes: Sizes, proto: str) -> Figures:
    port = server.ports.pop3s if proto == "pop3" else server.ports.submissions
    job = loadgen.Job(
        "tls_handshake", port, sizes.concurrency, sizes.duration, tls=True, proto=proto
    )
    return closed_loop(server, job, roots, "handshakes")


#: RETRs of the big message per sample: one 50 MB transfer lasts under 0.1 s, too short
#: to time reliably on a shared 2-core machine (single transfers varied by 1.8x).
RETR_REPEATS = 5


def retr_big(server: Server, user: str = "big") -> Figures:
    """RETR of the one big message (RETR_REPEATS times in one session): MB/s on the wire,
    the server's CPU per MB and its memory during it.

    The memory baseline is taken after the login, so the growth is the RETR's alone: a
    login may cost an Argon2id verification (64 MiB, freed at once) that has nothing to do
    with streaming and would otherwise show up as 64 MB of "growth" for every server. The
    client is :class:`clients.BulkPop3` (blocking, one copy per byte), so that it is not
    the limit: its own CPU per MB is reported too.
    """
    before = tree_memory_kb(server.roots)
    mem = MemorySampler(server.roots, interval=0.02)
    c = clients.BulkPop3(server.ports.pop3)
    c.login(_user(user), PASSWORD)
    time.sleep(0.2)  # let a freed verification buffer leave the PSS figure
    base = tree_memory_kb(server.roots)
    with mem:
        cpu0 = tree_cpu(server.roots)
        client0 = time.thread_time()
        start = time.perf_counter()
        octets = 0
        for _ in range(RETR_REPEATS):
            octets += c.multi(b"RETR 1")
        elapsed = time.perf_counter() - start
        client_cpu = time.thread_time() - client0
        cpu = tree_cpu(server.roots) - cpu0
    c.quit()
    mb = octets / 2**20
    return {
        "retr_mb_per_s": mb / elapsed,
        "retr_s": elapsed,
        "server_cpu_ms_per_mb": 1000 * cpu / mb,
        "client_cpu_ms_per_mb": 1000 * client_cpu / mb,
        "peak_mem_mb": mem.peak_kb / 1024,
        "mem_growth_mb": (mem.peak_kb - base) / 1024,
        "login_mem_growth_mb": (base - before) / 1024,
    }


def huge_maildrop(server: Server, logins: int) -> list[Figures]:
    """Login+STAT and UIDL on the huge maildrop, ``logins`` times in a row."""

    async def once() -> Figures:
        start = time.perf_counter()
        c = await clients.pop3_login(server.ports.pop3, _user("huge"), PASSWORD, None)
        count, _ = await clients.pop3_stat(c)
        stat_done = time.perf_counter()
        await clients.pop3_multi(c, b"UIDL")
        uidl_done = time.perf_counter()
        await clients.pop3_quit(c)
        return {
            "login_stat_s": stat_done - start,
            "uidl_s": uidl_done - stat_done,
            "messages": float(count),
        }

    async def warm_up() -> None:
        # A fresh process answers its first connections after one-off work (e.g. deciding
        # whether to offer APOP/CRAM-MD5 looks at every account): not this scenario's
        # subject. A full run has had the idle scenario before; --only runs get this.
        for _ in range(4):
            c = await clients.Conn.open(server.ports.pop3)
            await clients.pop3_ok(c)
            await clients.pop3_multi(c, b"CAPA")
            await clients.pop3_quit(c)

    loadgen.run_loop(warm_up())
    out = []
    for _ in range(logins):
        cpu0 = tree_cpu(server.roots)
        figures = loadgen.run_loop(asyncio.wait_for(once(), 600))
        figures["server_cpu_s"] = tree_cpu(server.roots) - cpu0
        out.append(figures)
    return out


def idle_connections(server: Server, count: int, first_user: int = 0) -> Figures:
    """Hold ``count`` authenticated POP3 sessions (one maildrop each); memory per session."""
    loadgen.raise_fd_limit()
    base = tree_memory_kb(server.roots)
    conns: list[clients.Conn] = []
    errors = 0

    async def run() -> None:
        nonlocal errors
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            nonlocal errors
            async with sem:
                try:
                    user = _user(f"idle{first_user + i:05d}")
                    conns.append(await clients.pop3_login(server.ports.pop3, user, "idle", None))
                except (OSError, clients.ProtocolError, TimeoutError) as e:
                    errors += 1
                    if errors == 1:
                        print(f"    {server.name}: idle login failed: {e}")

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 900)
        opened = time.perf_counter() - start
        await asyncio.sleep(1.0)
        held["mem"] = tree_memory_kb(server.roots)
        held["open_s"] = opened
        for c in conns:
            c.writer.close()
        await asyncio.sleep(0.5)

    held: dict[str, float] = {}
    loadgen.run_loop(run())
    n = max(len(conns), 1)
    return {
        "held": float(len(conns)),
        "kb_per_conn": (held["mem"] - base) / n,
        "total_mem_mb": held["mem"] / 1024,
        "logins_per_s": len(conns) / held["open_s"],
        "errors": float(errors),
    }
