"""One log for master and workers: line format, shared appends, rotation, twistd wiring."""

from __future__ import annotations

import os
import poplib
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from twisted.application.service import Application
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)

from mailgate.logsink import (
    LOG_ENV,
    LineObserver,
    MasterLog,
    ReopeningWriter,
    SharedLogFile,
    TimeStamps,
    worker_observer,
)
from mailgate.session import log_line
from tests.e2e.conftest import admin, free_port, twistd_command, wait_for_ports
from tests.test_workers import children_of


def captured(tag: str = "") -> tuple[Logger, list[bytes]]:
    lines: list[bytes] = []
    publisher = LogPublisher(LineObserver(lines.append, tag))
    return Logger(namespace="mailgate.test", observer=publisher), lines


def twistd_line(**event: object) -> bytes:
    """What twistd's own text observer writes for the event."""
    text = formatEventAsClassicLogText(event, formatTime=formatTime)
    assert text is not None
    return text.encode()


# -- the line format ---------------------------------------------------------------------


def test_a_log_line_is_written_as_twistd_would_write_it_braces_and_all() -> None:
    logger, lines = captured()
    before = int(time.time())
    log_line(logger, "POP3 login 'a{b}' from 127.0.0.1:5", login="a{b}")
    after = int(time.time())
    assert len(lines) == 1
    stamp, rest = lines[0].decode().split(" ", 1)
    assert rest == "[mailgate.test#info] POP3 login 'a{b}' from 127.0.0.1:5\n"
    assert stamp in {formatTime(second) for second in range(before, after + 1)}


def test_other_events_and_failures_go_through_twisteds_formatting_with_the_tag() -> None:
    logger, lines = captured("[worker 7] ")
    logger.warn("queue {qid} deferred", qid="Q1")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logger.failure("delivery crashed")
    assert lines[0].endswith(b" [mailgate.test#warn] [worker 7] queue Q1 deferred\n")
    assert b"[mailgate.test#critical] [worker 7] delivery crashed\n" in lines[1]
    assert b"ZeroDivisionError" in lines[1]


def test_the_same_bytes_as_twisted_for_a_plain_event() -> None:
    lines: list[bytes] = []
    observer = LineObserver(lines.append)
    event = {
        "log_format": "hello {who}",
        "who": "world",
        "log_time": 1_700_000_000.5,
        "log_namespace": "ns",
        "log_level": LogLevel.info,
    }
    observer(dict(event))
    observer(dict(event, mailgate_text="hello world"))
    system = dict(event, log_system="pop3,3,127.0.0.1")
    observer(dict(system, mailgate_text="hello world"))
    assert lines == [twistd_line(**event)] * 2 + [twistd_line(**system)]


def test_an_event_without_text_writes_nothing_and_a_failing_write_is_swallowed() -> None:
    lines: list[bytes] = []
    LineObserver(lines.append)({"log_time": 1.0})
    assert lines == []

    def broken(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    LineObserver(broken)({"log_format": "x", "log_time": 1.0})  # must not raise


def test_time_stamps_match_twisted_and_change_with_the_second() -> None:
    stamps = TimeStamps()
    assert stamps(1_700_000_000.2) == formatTime(1_700_000_000)
    assert stamps(1_700_000_000.9) == formatTime(1_700_000_000)
    assert stamps(1_700_000_001.0) == formatTime(1_700_000_001)
    assert stamps(None) == "-"


# -- one file, several writers, rotation -------------------------------------------------


def test_master_and_worker_appends_never_overwrite_each_other(tmp_path: Path) -> None:
    path = tmp_path / "twistd.log"
    path.write_bytes(b"old line\n")
    master = SharedLogFile.at(str(path))
    worker = ReopeningWriter(str(path))
    for i in range(50):
        master.write(b"master %d\n" % i)
        worker.write(b"worker %d\n" % i)
    lines = path.read_bytes().splitlines()
    assert lines[0] == b"old line"
    assert sorted(lines[1:]) == sorted(
        [b"master %d" % i for i in range(50)] + [b"worker %d" % i for i in range(50)]
    )
    master.close()
    worker.close()


def test_rotation_counts_the_workers_lines_and_the_worker_follows_it(tmp_path: Path) -> None:
    path = tmp_path / "twistd.log"
    master = SharedLogFile.at(str(path), rotate_length=1000)
    worker = ReopeningWriter(str(path))
    master.check()
    assert not (tmp_path / "twistd.log.1").exists()
    worker.write(b"w" * 999 + b"\n")  # only the worker wrote: the master's count is 0
    master.check()
    assert (tmp_path / "twistd.log.1").read_bytes() == b"w" * 999 + b"\n"
    worker.write(b"late\n")  # before its check: still into the rotated file
    worker.check()
    worker.write(b"after\n")
    master.write(b"master\n")
    assert (tmp_path / "twistd.log.1").read_bytes().endswith(b"late\n")
    assert path.read_bytes() == b"after\nmaster\n"
    worker.check()  # nothing rotated: keeps its file
    worker.write(b"again\n")
    assert path.read_bytes().endswith(b"again\n")
    master.close()
    worker.close()


# -- what twistd asked for -----------------------------------------------------------------


def test_master_log_follows_twistds_options(tmp_path: Path) -> None:
    assert MasterLog.from_twistd({"syslog": True, "nodaemon": True}) is None
    assert MasterLog.from_twistd({"logger": "x.y", "nodaemon": True}) is None
    assert MasterLog.from_twistd({"logfile": "-", "nodaemon": False}) is None
    stdout = MasterLog.from_twistd({"logfile": None, "nodaemon": True})
    assert stdout is not None and stdout.worker_env == "stderr" and stdout.file is None
    dash = MasterLog.from_twistd({"logfile": "-", "nodaemon": True})
    assert dash is not None and dash.worker_env == "stderr"
    named = MasterLog.from_twistd({"logfile": str(tmp_path / "m.log"), "nodaemon": False})
    assert named is not None and named.worker_env == f"file:{tmp_path / 'm.log'}"
    assert named.file is not None
    named.file.close()
    unwritable = tmp_path / "no-such-dir" / "m.log"
    assert MasterLog.from_twistd({"logfile": str(unwritable)}) is None
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        daemon = MasterLog.from_twistd({"logfile": None, "nodaemon": False})
    finally:
        os.chdir(cwd)
    assert daemon is not None and daemon.worker_env == f"file:{tmp_path / 'twistd.log'}"
    assert daemon.file is not None
    daemon.file.close()


def test_worker_observer_from_the_environment(tmp_path: Path) -> None:
    assert worker_observer("", 5) is None
    assert worker_observer("syslog", 5) is None
    stderr = worker_observer("stderr", 5)
    assert stderr is not None and stderr[1] is None  # nothing to follow on a stream
    # A file the worker cannot open (the master makes it; privileges dropped): relay.
    assert worker_observer(f"file:{tmp_path / 'missing.log'}", 5) is None
    assert not (tmp_path / "missing.log").exists()
    (tmp_path / "w.log").write_bytes(b"")
    made = worker_observer(f"file:{tmp_path / 'w.log'}", 5)
    assert made is not None
    observer, follow = made
    observer(
        {"log_format": "hi", "log_time": 1.0, "log_namespace": "n", "log_level": LogLevel.info}
    )
    assert follow is not None
    follow()
    assert (tmp_path / "w.log").read_bytes().endswith(b" [n#info] [worker 5] hi\n")


def test_a_worker_keeps_its_file_while_the_name_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    path.write_bytes(b"")
    writer = ReopeningWriter(str(path))
    path.rename(tmp_path / "w.log.1")
    writer.check()  # no new file yet: keeps writing to the old one, never creates it
    writer.write(b"kept\n")
    assert not path.exists()
    assert (tmp_path / "w.log.1").read_bytes() == b"kept\n"
    writer.close()


def test_log_files_that_are_per_process_or_not_files_are_left_to_twistd(tmp_path: Path) -> None:
    for name in ("/dev/stdout", "/dev/stderr", "/proc/self/fd/1", str(tmp_path)):
        assert MasterLog.from_twistd({"logfile": name, "nodaemon": True}) is None, name


def test_a_failed_rotation_is_tried_again_and_rotations_are_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.log"
    shared = SharedLogFile.at(str(path), rotate_length=10)
    told: list[str] = []
    shared.on_rotate = lambda: told.append("rotated")
    shared.write(b"0123456789\n")
    logged: list[bytes] = []
    collect = LineObserver(logged.append)
    globalLogPublisher.addObserver(collect)
    try:
        with monkeypatch.context() as patched:

            def refuse(*args: object) -> None:
                raise PermissionError(13, "Permission denied")

            patched.setattr(os, "rename", refuse)
            shared.check()  # must not raise: the LoopingCall would stop for good
            shared.check()  # still failing: not said again
    finally:
        globalLogPublisher.removeObserver(collect)
    said = [line for line in logged if b"[mailgate.logsink#error] cannot rotate" in line]
    assert len(said) == 1 and f"cannot rotate {path}: ".encode() in said[0]
    shared.write(b"kept\n")  # the failed rename closed the file: it was opened again
    assert path.read_bytes() == b"0123456789\nkept\n"
    assert told == []
    shared.check()
    assert told == ["rotated"]
    assert (tmp_path / "t.log.1").read_bytes() == b"0123456789\nkept\n"
    shared.write(b"x\n")
    assert path.read_bytes() == b"x\n"
    shared.close()


def test_the_service_hands_its_observer_to_twistd_and_rotates_by_size(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    from mailgate.config import Config
    from mailgate.service import MailgateService

    master_log = MasterLog.from_twistd({"logfile": str(tmp_path / "t.log")})
    assert master_log is not None and master_log.file is not None
    master_log.file.rotateLength = 100
    service = MailgateService(Config(), realm=None, users=None)  # type: ignore[arg-type]
    service.master_log = master_log
    application = Application("mailgate")  # type: ignore[no-untyped-call]
    service.setServiceParent(application)
    # twistd asks the application for an observer before it makes one of its own.
    assert ILogObserver(application) is master_log.observer()
    signalled: list[object] = []

    class Pool:
        def signal_all(self, signame: object) -> None:
            signalled.append(signame)

    service.pool = Pool()  # type: ignore[assignment]
    clock = Clock()
    service._reactor = clock
    service.install_signals = True
    before = signal.getsignal(signal.SIGUSR1)
    service.startService()
    try:
        assert callable(signal.getsignal(signal.SIGUSR1))  # twistd's rotation signal
        worker = ReopeningWriter(str(tmp_path / "t.log"))
        worker.write(b"x" * 120 + b"\n")
        assert not (tmp_path / "t.log.1").exists()
        clock.advance(1)
        assert (tmp_path / "t.log.1").read_bytes() == b"x" * 120 + b"\n"
        # The workers are told by number: Twisted's signalProcess knows no "USR1".
        assert signalled == [signal.SIGUSR1]
        worker.close()
    finally:
        service.stopService()
        assert signal.getsignal(signal.SIGUSR1) == before  # stopping puts it back
        signal.signal(signal.SIGUSR1, before)
        master_log.file.close()


# -- end to end: twistd, two workers, one log ------------------------------------------------


def any_open(master: int, path: Path) -> bool:
    """Whether a child of ``master`` has ``path`` open."""
    for pid in children_of(master):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    return True
            except OSError:
                continue
    return False


def alice_state(tmp_path: Path) -> Path:
    """A state directory with one {PLAIN} account, alice@example.com / pw."""
    state = tmp_path / "state"
    r = admin(state, "user", "add", "--scheme", "PLAIN", "alice@example.com", stdin="pw\n")
    assert r.returncode == 0, r.stderr
    return state


def two_workers(state: Path, pop3: int) -> list[str]:
    """mailgate's options for a two-process server with a plaintext POP3 port."""
    return [
        *("--state-dir", str(state), "--workers", "2", "--shutdown-grace", "2"),
        *("--allow-plaintext-from", "127.0.0.0/8", "--default-domain", "example.com"),
        *("--pop3", f"tcp:{pop3}:interface=127.0.0.1"),
    ]


def start_to(
    out: Path, argv: list[str], cwd: Path, env: dict[str, str], new_group: bool = False
) -> subprocess.Popen[bytes]:
    """Start a server with stdout and stderr appended to ``out``; ``new_group``: in a
    process group of its own, so a test can signal all of it."""
    with out.open("ab") as stdout:
        return subprocess.Popen(
            argv,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=new_group,
        )


def ended(log: Path) -> str:
    """The session-end lines of a log."""
    return "\n".join(line for line in log.read_text().splitlines() if "ended by QUIT" in line)


def test_workers_write_the_twistd_log_file_and_follow_sigusr1_rotation(tmp_path: Path) -> None:
    state = alice_state(tmp_path)
    log = tmp_path / "mail.log"
    pop3 = free_port()
    out = tmp_path / "stdout.log"
    with out.open("ab") as stdout:
        proc = subprocess.Popen(
            [
                *twistd_command()[:3],
                "-n", "--pidfile=", f"--logfile={log}", "mailgate",
                *two_workers(state, pop3),
            ],
            stdout=stdout,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k != LOG_ENV},
        )  # fmt: skip
    try:
        wait_for_ports(proc, [pop3], log)
        deadline = time.monotonic() + 30
        while "[worker " not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        worker_line = next(line for line in log.read_text().splitlines() if "[worker " in line)
        assert worker_line[:4].isdigit() and "] [worker " in worker_line  # its own timestamp
        proc.send_signal(signal.SIGUSR1)
        while not (tmp_path / "mail.log.1").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "mail.log.1").exists()
        # The master tells its workers at once; wait until none writes to mail.log.1.
        while any_open(proc.pid, tmp_path / "mail.log.1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any_open(proc.pid, tmp_path / "mail.log.1")
        pop3_session_until_a_worker_logs(pop3, log, deadline)
        assert "ended by QUIT" not in (tmp_path / "mail.log.1").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=40)
    assert "Traceback" not in log.read_text() + out.read_text()


def pop3_session_until_a_worker_logs(pop3: int, log: Path, deadline: float) -> None:
    """POP3 sessions until a worker (not the master) has logged the end of one."""
    sessions = 0
    while "[worker " not in ended(log) and sessions < 100 and time.monotonic() < deadline:
        client = poplib.POP3("127.0.0.1", pop3, timeout=10)
        client.user("alice@example.com")
        client.pass_("pw")
        client.quit()
        sessions += 1
        while ended(log).count("ended by QUIT") < sessions and time.monotonic() < deadline:
            time.sleep(0.02)
    assert "[worker " in ended(log), log.read_text()[-2000:]


def test_workers_write_to_the_masters_stdout_with_nodaemon(tmp_path: Path) -> None:
    state = alice_state(tmp_path)
    pop3 = free_port()
    out = tmp_path / "stdout.log"
    env = {k: v for k, v in os.environ.items() if k not in (LOG_ENV, "PYTHONUNBUFFERED")}
    proc = start_to(out, twistd_command(*two_workers(state, pop3)), tmp_path, env)
    try:
        wait_for_ports(proc, [pop3], out)
        pop3_session_until_a_worker_logs(pop3, out, time.monotonic() + 30)
        line = next(x for x in out.read_text().splitlines() if "[worker " in x and "QUIT" in x)
        assert line[:4].isdigit() and "[mailgate.pop3.server#info] [worker " in line
    finally:
        proc.terminate()
        proc.wait(timeout=40)
    assert "Traceback" not in out.read_text()


def test_a_daemon_and_its_workers_log_to_twistd_log(tmp_path: Path) -> None:
    state = alice_state(tmp_path)
    pop3 = free_port()
    pidfile = tmp_path / "twistd.pid"
    command = [
        *twistd_command()[:3],
        f"--pidfile={pidfile}", "mailgate",
        *two_workers(state, pop3),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != LOG_ENV}
    started = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert started.returncode == 0, started.stderr
    log = tmp_path / "twistd.log"  # twistd's default for a daemon, in its directory
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon = int(pidfile.read_text())
    try:
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", pop3), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        pop3_session_until_a_worker_logs(pop3, log, deadline)
    finally:
        os.kill(daemon, signal.SIGTERM)
        while pidfile.exists() and time.monotonic() < deadline + 30:
            time.sleep(0.05)
    assert "Traceback" not in log.read_text()


def test_a_signal_to_the_whole_process_group_stops_every_process_once(tmp_path: Path) -> None:
    """Ctrl-C or a service manager signals master and workers together, and the master
    passes its SIGTERM on: a worker gets two and must stop once, without a traceback."""
    state = alice_state(tmp_path)
    pop3 = free_port()
    out = tmp_path / "stdout.log"
    env = {k: v for k, v in os.environ.items() if k != LOG_ENV}
    proc = start_to(out, twistd_command(*two_workers(state, pop3)), tmp_path, env, new_group=True)
    try:
        wait_for_ports(proc, [pop3], out)
        deadline = time.monotonic() + 30
        while "[worker " not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=40) in (0, -signal.SIGTERM)  # twistd re-raises its signal
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.read_text()
    assert "Traceback" not in text and "ReactorNotRunning" not in text
    assert "ended without apparent errors" in text  # the worker's exit, seen by the master
    assert "[worker " in text and "received SIGTERM, shutting down" in text
