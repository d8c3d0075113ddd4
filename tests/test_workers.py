"""Worker processes: the pool's supervision (fake reactor), config, and real multi-process runs."""

from __future__ import annotations

import os
import poplib
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailgate.config import Config, load_config, with_overrides
from mailgate.errors import ConfigError
from mailgate.tap import Options, config_from_options
from mailgate.workers import FIRST_FD, KILL_MARGIN, RESPAWN_DELAY, WorkerPool, tcp_address
from tests.e2e.conftest import admin, free_port, twistd_command, wait_for_ports

# -- unit: the pool ----------------------------------------------------------------------


class FakeProcess:
    def __init__(self, proto: Any, pid: int) -> None:
        self.proto = proto
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class SpawningClock(Clock):
    """A Clock that records spawnProcess calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[FakeProcess, list[str], dict[int, object], dict[str, str]]] = []

    def spawnProcess(
        self,
        proto: Any,
        executable: str,
        args: list[str],
        env: dict[str, str],
        path: str,
        childFDs: dict[int, object],
    ) -> FakeProcess:
        process = FakeProcess(proto, 1000 + len(self.spawned))
        self.spawned.append((process, args, childFDs, env))
        proto.makeConnection(process)
        return process


def end(process: FakeProcess) -> None:
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    process.proto.processEnded(Failure(ProcessTerminated(signal=15)))  # type: ignore[no-untyped-call]


def make_pool(count: int = 2, **kwargs: Any) -> tuple[WorkerPool, SpawningClock]:
    clock = SpawningClock()
    pool = WorkerPool(clock, ["python", "-m", "mailgate.workers", "2"], [7, 9], count, 30, **kwargs)
    return pool, clock


def test_pool_spawns_children_with_the_sockets_as_fd_3_and_up() -> None:
    pool, clock = make_pool()
    pool.startService()
    assert len(clock.spawned) == 2
    _, args, fds, env = clock.spawned[0]
    assert args == ["python", "-m", "mailgate.workers", "2"]
    assert fds[FIRST_FD] == 7 and fds[FIRST_FD + 1] == 9
    assert fds[0] == "w" and fds[1] == "r" and fds[2] == "r"
    assert env["MAILGATE_MASTER_PID"] == str(os.getpid())


def test_pool_tells_children_where_to_write_their_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGATE_LOG", "file:/elsewhere.log")  # never inherited as is
    pool, clock = make_pool()
    pool.startService()
    _, _, fds, env = clock.spawned[0]
    assert "MAILGATE_LOG" not in env and fds[2] == "r"  # relay through the master
    pool, clock = make_pool(log_env="file:/var/log/mailgate.log")
    pool.startService()
    _, _, fds, env = clock.spawned[0]
    assert env["MAILGATE_LOG"] == "file:/var/log/mailgate.log" and fds[2] == "r"
    pool, clock = make_pool(log_env="stderr")
    pool.startService()
    _, _, fds, env = clock.spawned[0]
    assert env["MAILGATE_LOG"] == "stderr" and fds[2] == 1  # the master's stdout


def test_pool_waits_for_spool_recovery_before_spawning() -> None:
    from twisted.internet.defer import Deferred

    ready: Deferred[None] = Deferred()
    pool, clock = make_pool(ready=lambda: ready)
    pool.startService()
    assert clock.spawned == []
    ready.callback(None)
    assert len(clock.spawned) == 2


def test_a_dead_child_is_started_again() -> None:
    pool, clock = make_pool()
    pool.startService()
    end(clock.spawned[0][0])
    assert len(clock.spawned) == 2
    clock.advance(RESPAWN_DELAY)
    assert len(clock.spawned) == 3
    assert set(pool.children) == {0, 1}


def test_stop_terms_children_and_kills_stragglers_after_grace() -> None:
    pool, clock = make_pool()
    pool.startService()
    results: list[object] = []
    pool.stopService().addBoth(results.append)
    a, b = clock.spawned[0][0], clock.spawned[1][0]
    assert a.signals == ["TERM"] and b.signals == ["TERM"]
    end(a)
    assert not results
    clock.advance(30 + KILL_MARGIN)
    assert b.signals == ["TERM", "KILL"]
    end(b)
    assert len(results) == 1
    clock.advance(RESPAWN_DELAY)
    assert len(clock.spawned) == 2  # nothing respawned while stopping


def test_reload_passes_sighup_on() -> None:
    pool, clock = make_pool()
    pool.startService()
    pool.reload()
    assert [p.signals for p, *_ in clock.spawned] == [["HUP"], ["HUP"]]


def test_queued_notices_and_log_lines_from_children() -> None:
    seen: list[str] = []
    pool, clock = make_pool(on_queued=seen.append)
    pool.startService()
    proto = clock.spawned[0][0].proto
    proto.outReceived(b"QUEUED 1A2B")
    assert seen == []
    proto.outReceived(b"3C\nQUEUED X\nnoise\n")
    assert seen == ["1A2B3C", "X"]
    proto.errReceived(b"a log line\n")  # relayed to the master's log, must not raise


# -- unit: endpoints, config, options ---------------------------------------------------------


def test_tcp_address_reads_endpoint_strings() -> None:
    a = tcp_address(Clock(), "tcp:1110:interface=127.0.0.1:backlog=7")
    assert a is not None
    assert (a.family, a.host, a.port, a.backlog) == (socket.AF_INET, "127.0.0.1", 1110, 7)
    b = tcp_address(Clock(), r"tcp6:0:interface=\:\:1")
    assert b is not None and (b.family, b.host) == (socket.AF_INET6, "::1")
    assert tcp_address(Clock(), "unix:/tmp/x.sock") is None


def test_workers_and_shutdown_grace_config(tmp_path: Path) -> None:
    assert Config().workers == (os.cpu_count() or 1)
    assert Config().shutdown_grace == 30
    f = tmp_path / "m.toml"
    f.write_text("workers = 3\nshutdown_grace = 2.5\n")
    c = load_config(f)
    assert (c.workers, c.shutdown_grace) == (3, 2.5)
    for bad in ("workers = 0", "workers = 1.5", "workers = true", "shutdown_grace = -1"):
        f.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=str(f)):
            load_config(f)
    assert with_overrides(c, workers=1).workers == 1
    with pytest.raises(ConfigError, match="--workers"):
        with_overrides(c, workers=0)


def test_options_workers_and_argv_for_children() -> None:
    options = Options()
    options.parseOptions(["--workers", "4", "--shutdown-grace", "5", "--hostname", "h"])
    assert options.argv == ["--workers", "4", "--shutdown-grace", "5", "--hostname", "h"]
    config = config_from_options(options)
    assert (config.workers, config.shutdown_grace, config.hostname) == (4, 5.0, "h")


# -- real processes ----------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry))
    return out


def server_pid(client: socket.socket, pids: list[int]) -> int | None:
    """Which process holds the server end of ``client``'s connection (via /proc)."""
    local_port = client.getsockname()[1]
    server_port = client.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == server_port and (
            int(fields[2].split(":")[1], 16) == local_port
        ):
            inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
        except OSError:
            continue
    return None


class Server:
    def __init__(self, tmp_path: Path, state: Path, *extra: str) -> None:
        self.pop3 = free_port()
        self.submission = free_port()
        self.log = tmp_path / f"twistd-{self.pop3}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                twistd_command(
                    *("--state-dir", str(state), "--default-domain", "example.com"),
                    *("--allow-plaintext-from", "127.0.0.0/8", "--hostname", "mail.example.com"),
                    *("--pop3", f"tcp:{self.pop3}:interface=127.0.0.1"),
                    *("--submission", f"tcp:{self.submission}:interface=127.0.0.1"),
                    *extra,
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        wait_for_ports(self.proc, [self.pop3, self.submission], self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    r = admin(state, "user", "add", "--scheme", "SHA512-CRYPT", "alice@example.com", stdin="pw\n")
    assert r.returncode == 0, r.stderr
    return state


@pytest.fixture
def two_workers(tmp_path: Path, state: Path) -> Iterator[Server]:
    server = Server(tmp_path, state, "--workers", "2", "--shutdown-grace", "3")
    try:
        deadline = time.monotonic() + 30
        while len(children_of(server.proc.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The child is up once its log says it listens on both ports.
        while server.log.read_text().count("[worker") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield server
    finally:
        server.stop()


def login(port: int) -> tuple[poplib.POP3, bytes]:
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    p.user("alice@example.com")
    try:
        return p, p.pass_("pw")
    except poplib.error_proto as e:
        return p, e.args[0]


def connection_on_each_process(port: int, pids: list[int]) -> dict[int, poplib.POP3]:
    """Open POP3 connections until one is served by each of ``pids``.

    A connection that lands on a process already found is closed at once: holding it would
    count against the per-client limit (20 per process), and the kernel may hand many
    connections in a row to the same process.
    """
    found: dict[int, poplib.POP3] = {}
    for _ in range(500):
        try:
            p = poplib.POP3("127.0.0.1", port, timeout=10)
        except poplib.error_proto as e:
            # A close the server has not yet seen still counts against the client limit.
            assert b"Too many connections" in e.args[0]
            time.sleep(0.05)
            continue
        pid = server_pid(p.sock, pids)
        if pid is not None and pid not in found:
            found[pid] = p
            if len(found) == len(pids):
                break
        else:
            p.quit()
    return found


def test_two_workers_one_maildrop_lock_across_processes(two_workers: Server) -> None:
    master = two_workers.proc.pid
    pids = [master, *children_of(master)]
    assert len(pids) == 2, "expected the master and one child"
    conns = connection_on_each_process(two_workers.pop3, pids)
    assert set(conns) == set(pids), "could not reach both processes"
    first, second = conns[pids[0]], conns[pids[1]]
    first.user("alice@example.com")
    assert first.pass_("pw").startswith(b"+OK")
    second.user("alice@example.com")
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        second.pass_("pw")
    lock = (
        two_workers.log.parent / "state/mail/example.com/alice/Maildir/mailgate.lock"
    ).read_text()
    assert lock.strip() == str(pids[0])  # the holder's pid, for humans
    first.quit()
    again, reply = login(two_workers.pop3)
    assert reply.startswith(b"+OK")
    again.quit()


def test_two_workers_serve_both_protocols_on_each_process(two_workers: Server) -> None:
    master = two_workers.proc.pid
    pids = [master, *children_of(master)]
    for port in (two_workers.pop3, two_workers.submission):
        served = set()
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                greeting = s.recv(200)
                if b"Too many connections" in greeting:  # closes not yet seen still count
                    time.sleep(0.05)
                    continue
                assert greeting.startswith(b"+OK" if port == two_workers.pop3 else b"220")
                served.add(server_pid(s, pids))
            if served >= set(pids):
                break
        assert served >= set(pids), f"port {port} served only by {served}"
    with smtplib.SMTP("127.0.0.1", two_workers.submission, timeout=10) as smtp:
        smtp.login("alice@example.com", "pw")
        smtp.sendmail("alice@example.com", ["alice@example.com"], b"Subject: hi\r\n\r\nyo\r\n")
    p, reply = login(two_workers.pop3)
    assert reply.startswith(b"+OK")
    assert p.stat()[0] == 1
    p.quit()


def test_lock_across_two_separate_servers_on_one_state_dir(tmp_path: Path, state: Path) -> None:
    a = Server(tmp_path, state, "--workers", "1")
    b = Server(tmp_path, state, "--workers", "1")
    try:
        first, reply = login(a.pop3)
        assert reply.startswith(b"+OK")
        second, reply = login(b.pop3)
        assert b"[IN-USE]" in reply
        second.quit()
        first.quit()
    finally:
        a.stop()
        b.stop()


def test_sigterm_lets_a_session_finish_then_children_exit(two_workers: Server) -> None:
    p, reply = login(two_workers.pop3)
    assert reply.startswith(b"+OK")
    children = children_of(two_workers.proc.pid)
    two_workers.proc.terminate()
    time.sleep(0.5)
    # Still inside the grace period: the open session keeps working and can QUIT.
    assert p.stat()[0] == 0
    p.quit()
    # twistd re-raises the SIGTERM it handled once it has shut down cleanly.
    assert two_workers.proc.wait(timeout=30) in (0, -15)
    for child in children:
        assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", two_workers.pop3), timeout=2).close()


def test_sigkill_of_the_master_takes_the_children_along(two_workers: Server) -> None:
    children = children_of(two_workers.proc.pid)
    assert children
    two_workers.proc.kill()
    two_workers.proc.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{c}").exists() for c in children)
