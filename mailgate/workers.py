"""Several processes on one mail root: the master binds, children adopt the sockets.

With ``workers = N > 1`` the twistd process (the master) binds every TCP listener itself
(port 0 works: the kernel picks once, every process shares that socket), serves on them
like a single-process server, runs the only queue runner, and spawns N-1 children with
``reactor.spawnProcess``. Each child runs :func:`worker_main`: it inherits the listening
sockets as file descriptors and adopts them (``reactor.adoptStreamPort``), so TLS wrapping
happens in each process's own factory exactly as in one process. The kernel spreads new
connections over every process accepting on the shared socket.

Children die with the master: ``PR_SET_PDEATHSIG`` (SIGKILL) on Linux, and an EOF on the
stdin pipe everywhere. A child writes ``QUEUED <id>`` on its stdout when it has spooled an
outbound message so the master's runner tries it at once. When the master logs to a file
or to its stdout, a child writes its own lines there (``[worker PID] ...``, see
:mod:`mailgate.logsink`); otherwise (syslog, ``--logger``) its log goes to stderr and the
master relays it into its own log. Writing to a file, a child's stderr stays the relay
pipe for anything else it prints (a crash's traceback, say).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgate.fileio import stdout_fd
from mailgate.logsink import CHECK_INTERVAL, LOG_ENV, worker_observer
from mailgate.session import log_line

log = Logger(namespace="mailgate.workers")  # also when run as __main__ (a worker)

#: First file descriptor number the listening sockets get in a child.
FIRST_FD = 3
#: Seconds a child that died on its own waits before it is started again.
RESPAWN_DELAY = 1.0
#: Extra seconds after the grace period before a child that ignored SIGTERM is killed.
KILL_MARGIN = 5.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class TcpAddress:
    """Where a ``tcp:``/``tcp6:`` endpoint string listens."""

    family: int
    host: str
    port: int
    backlog: int


def tcp_address(reactor: Any, endpoint: str) -> TcpAddress | None:
    """Parse a server endpoint string; None when it is not plain TCP (e.g. ``unix:``).

    Twisted's parser does the work; the values live in private attributes of the endpoint
    objects, read defensively.
    """
    ep = serverFromString(reactor, endpoint)  # type: ignore[no-untyped-call]
    if isinstance(ep, TCP6ServerEndpoint):
        family = socket.AF_INET6
    elif isinstance(ep, TCP4ServerEndpoint):
        family = socket.AF_INET
    else:
        return None
    host = getattr(ep, "_interface", "") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return TcpAddress(family, host, int(ep._port), int(getattr(ep, "_backlog", 50)))


def bind_socket(address: TcpAddress) -> socket.socket:
    """A non-blocking, inheritable listening socket (bound before the reactor runs)."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(address.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL us when the master dies (Linux); exit if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class _ChildProtocol(ProcessProtocol):
    """One child: relays its log lines and its ``QUEUED`` notices, reports its end."""

    def __init__(self, pool: WorkerPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.ended: Deferred[None] = Deferred()
        self._out = b""
        self._err = b""
        self.pid: int | None = None

    def connectionMade(self) -> None:
        transport = self.transport
        self.pid = getattr(transport, "pid", None)
        log.info("worker {slot} started (pid {pid})", slot=self.slot, pid=self.pid)

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            verb, _, arg = line.partition(b" ")
            if verb == b"QUEUED" and arg:
                self.pool.on_queued(arg.decode("ascii", "replace"))

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line:
                text = line.decode("utf-8", "replace")
                # Formatted here: a worker's busiest lines (one per session or message)
                # would otherwise pay Twisted's field formatting a second time.
                log_line(log, f"[worker {self.pid}] {text}", pid=self.pid, line=text)

    def processEnded(self, reason: Failure) -> None:
        log.info(
            "worker {slot} (pid {pid}) ended: {reason}",
            slot=self.slot,
            pid=self.pid,
            reason=reason.getErrorMessage(),
        )
        self.pool._ended(self)
        self.ended.callback(None)


class WorkerPool(Service):
    """Spawns and supervises the child workers of the master process.

    ``command`` is the child's argv (``[python, -m, mailgate.workers, ...]``); ``fds`` are
    the master's listening sockets, handed to each child as fds 3, 4, ...
    """

    def __init__(
        self,
        reactor: Any,
        command: Sequence[str],
        fds: Sequence[int],
        count: int,
        grace: float,
        on_queued: Callable[[str], None] = lambda _: None,
        ready: Callable[[], Deferred[None]] | None = None,
        log_env: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.command = list(command)
        self.fds = list(fds)
        self.count = count
        self.grace = grace
        self.on_queued = on_queued
        self.ready = ready
        #: Where children write their own log lines (see mailgate.logsink); None: relay.
        self.log_env = log_env
        self.children: dict[int, tuple[_ChildProtocol, IProcessTransport]] = {}
        self._respawns: dict[int, IDelayedCall] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        if self.ready is None:
            self._spawn_all()
        else:
            self.ready().addBoth(lambda _: self._spawn_all())

    def _spawn_all(self) -> None:
        for slot in range(self.count):
            if slot not in self.children:
                self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self._respawns.pop(slot, None)
        if self._stopping:
            return
        proto = _ChildProtocol(self, slot)
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: "r"}
        for i, fd in enumerate(self.fds):
            child_fds[FIRST_FD + i] = fd
        env = dict(os.environ)
        env["MAILGATE_MASTER_PID"] = str(os.getpid())
        env.pop(LOG_ENV, None)
        if self.log_env is not None:
            env[LOG_ENV] = self.log_env
            if self.log_env == "stderr":
                child_fds[2] = stdout_fd()
        transport = self.reactor.spawnProcess(
            proto,
            self.command[0],
            self.command,
            env=env,
            path=os.getcwd(),
            childFDs=child_fds,
        )
        self.children[slot] = (proto, transport)

    def _ended(self, proto: _ChildProtocol) -> None:
        current = self.children.get(proto.slot)
        if current is not None and current[0] is proto:
            del self.children[proto.slot]
        if not self._stopping and self.running:
            log.warn("worker {slot} died: starting it again", slot=proto.slot)
            self._respawns[proto.slot] = self.reactor.callLater(
                RESPAWN_DELAY, self._spawn, proto.slot
            )

    def signal_all(self, signame: str | int) -> None:
        """Signal every child: a name Twisted knows (TERM, KILL, HUP, INT) or a number."""
        for _, transport in list(self.children.values()):
            with contextlib.suppress(ProcessExitedAlready, OSError):
                transport.signalProcess(signame)

    def reload(self) -> None:
        """Pass SIGHUP on: each child reloads its certificate and user database."""
        self.signal_all("HUP")

    def stopService(self) -> Deferred[Any]:
        """SIGTERM every child (each drains its sessions), SIGKILL those still there later."""
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        ended = [proto.ended for proto, _ in self.children.values()]
        self.signal_all("TERM")
        killer = self.reactor.callLater(self.grace + KILL_MARGIN, self.signal_all, "KILL")
        d: Deferred[Any] = DeferredList(ended)

        def done(result: object) -> object:
            if killer.active():
                killer.cancel()
            return result

        return d.addBoth(done)


# -- the child side ----------------------------------------------------------------------


def worker_command(mailgate_args: Sequence[str], count: int) -> list[str]:
    """The argv a child runs: this module, how many inherited sockets, the server options."""
    return [sys.executable, "-m", "mailgate.workers", str(count), *mailgate_args]


def worker_main(argv: Sequence[str]) -> int:
    """Child entry point: adopt fds 3.. as the TCP listeners and serve until told to stop."""
    from twisted.internet import reactor as _reactor
    from twisted.internet import stdio
    from twisted.internet.protocol import Protocol
    from twisted.internet.task import LoopingCall
    from twisted.logger import FileLogObserver, formatEvent, globalLogBeginner

    from mailgate.errors import ConfigError, MailgateError
    from mailgate.service import build_service, raise_open_file_limit
    from mailgate.tap import Options, config_from_options

    reactor: Any = _reactor
    master = int(os.environ.get("MAILGATE_MASTER_PID", "0"))
    if master:
        die_with_parent(master)
    count = int(argv[0])
    direct = worker_observer(os.environ.get(LOG_ENV, ""), os.getpid())
    follow_rotation: Callable[[], None] | None = None
    if direct is not None:
        observer, follow_rotation = direct
        globalLogBeginner.beginLoggingTo([observer])
        if follow_rotation is not None:
            rotation = LoopingCall(follow_rotation)
            rotation.clock = reactor
            reactor.callWhenRunning(rotation.start, CHECK_INTERVAL, False)
    else:
        # No timestamp: the master's log adds its own when it relays the line.
        globalLogBeginner.beginLoggingTo(
            [
                FileLogObserver(
                    sys.stderr, lambda e: f"[{e.get('log_namespace', '-')}] {formatEvent(e)}\n"
                )
            ]
        )
    raise_open_file_limit()
    options = Options()
    try:
        options.parseOptions(list(argv[1:]))
        config = config_from_options(options)
        fds = list(range(FIRST_FD, FIRST_FD + count))
        service = build_service(config, reactor, inherited_fds=fds)
    except (ConfigError, MailgateError) as e:
        sys.stderr.write(f"mailgate worker: error: {e}\n")
        return 2

    class _Master(Protocol):
        """stdin/stdout to the master: EOF means the master is gone."""

        def connectionLost(self, reason: Failure | None = None) -> None:
            if reactor.running:
                reactor.stop()

    master_link = _Master()
    stdio.StandardIO(master_link, reactor=reactor)  # type: ignore[no-untyped-call]

    def queued(queue_id: str) -> None:
        if master_link.transport is not None:
            master_link.transport.write(f"QUEUED {queue_id}\n".encode("ascii"))

    service.on_queued = queued
    service.install_signals = True

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        """The master rotated the log (a cgroup-wide kill may send it too: never fatal)."""
        if follow_rotation is not None:
            reactor.callFromThread(follow_rotation)

    signal.signal(signal.SIGUSR1, on_usr1)
    reactor.callWhenRunning(_stop_once_on_signals, reactor)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


def _stop_once_on_signals(reactor: Any) -> None:
    """SIGTERM and SIGINT stop the reactor once; repeats are ignored.

    A worker often gets two: Ctrl-C or a service manager signals the whole process group
    (or cgroup), and the master then passes its own SIGTERM on. Twisted's handler would call
    ``reactor.stop()`` again and log ReactorNotRunning as a critical error.
    """
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        name = signal.Signals(signum).name
        reactor.callFromThread(log.info, "received {signal}, shutting down", signal=name)
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
