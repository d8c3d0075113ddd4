"""The composition root: the only place that knows every concrete class and wires them."""

from __future__ import annotations

import contextlib
import functools
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate import demo, fastpoll, fileio, lagprobe, tls
from mailgate.auth.checker import PasswordChecker
from mailgate.auth.passwords import (
    DUMMY_HASH,
    hash_password,
    supports_apop,
    supports_cram_md5,
    verify_password,
)
from mailgate.auth.throttle import AuthThrottle
from mailgate.auth.userdb import UserFile
from mailgate.config import Config, Listener, network_predicate, read_auth_file
from mailgate.errors import ConfigError
from mailgate.interfaces import ThreadRunner
from mailgate.lab.faults import FaultFactory, FaultPolicy
from mailgate.lab.transcript import TranscriptFactory, TranscriptStore
from mailgate.limits import (
    POP3_REFUSAL,
    FactoryInFront,
    LimitSettings,
    after_connection_lost,
    guard,
    smtp_refusal,
)
from mailgate.logsink import MasterLog
from mailgate.model import Address, Envelope
from mailgate.pop3.server import Pop3Factory, Pop3Profile, Pop3Settings
from mailgate.queue.runner import QueueRunner, QueueSettings
from mailgate.queue.spool import Spool
from mailgate.realm import MailRealm
from mailgate.relay.client import SmtpRelay
from mailgate.smtp.server import SmtpFactory, SmtpProfile, SmtpSettings
from mailgate.store.flush import FilesystemFlush
from mailgate.store.maildir import MaildirStore
from mailgate.workers import WorkerPool, bind_socket, tcp_address, worker_command

log = Logger()


@implementer(IOpenSSLContextFactory)
class ReloadableContext:
    """The TLS server context every factory holds; SIGHUP swaps what is behind it.

    Factories keep this one object, so reloading needs no new factories: each handshake
    asks ``getContext()`` afresh (Twisted builds one Connection per handshake from it).
    Sessions already in TLS keep the certificate they started with.
    """

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self.options: Any = load()

    def getContext(self) -> Any:
        return self.options.getContext()

    def reload(self) -> None:
        """Load the files again; on error keep the current context and raise ConfigError."""
        self.options = self._load()


class SessionTracker(FactoryInFront):
    """Wraps a factory to know its open sessions, so shutdown can wait for them to end."""

    def __init__(self, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self.sessions: set[IProtocol] = set()
        self._idle: list[Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> Any:
        protocol = self.wrappedFactory.buildProtocol(addr)  # type: ignore[arg-type]
        if protocol is None:
            return None
        self.sessions.add(protocol)
        after_connection_lost(protocol, functools.partial(self._gone, protocol))
        return protocol

    def _gone(self, protocol: IProtocol) -> None:
        self.sessions.discard(protocol)
        if not self.sessions:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires when no session is open (at once if none is)."""
        if not self.sessions:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def abort_all(self) -> None:
        """Cut every open session: no POP3 UPDATE, no SMTP message is acknowledged."""
        for protocol in list(self.sessions):
            transport = getattr(protocol, "transport", None)
            if transport is None:
                self._gone(protocol)
                continue
            abort = getattr(transport, "abortConnection", None) or transport.loseConnection
            with contextlib.suppress(Exception):
                abort()


class ListeningService(Service):
    """Listens on one endpoint (or an inherited socket) while running.

    Remembers the port so tests can find it. Stopping stops accepting at once, then lets
    open sessions finish for up to ``grace`` seconds before cutting them.
    """

    def __init__(
        self,
        reactor: Any,
        listener: Listener,
        factory: IProtocolFactory,
        *,
        fd: int | None = None,
        family: int = socket.AF_INET,
        grace: float = 0.0,
    ) -> None:
        self.reactor = reactor
        self.listener = listener
        self.factory = factory
        self.tracker = SessionTracker(factory)
        self.fd = fd
        self.family = family
        self.grace = grace
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.fd is not None:
            try:
                port = self.reactor.adoptStreamPort(self.fd, self.family, self.tracker)
            except Exception:
                self._failed(Failure())  # type: ignore[no-untyped-call]
            else:
                self._listening(port)
            return
        endpoint = serverFromString(self.reactor, self.listener.endpoint)  # type: ignore[no-untyped-call]
        d = endpoint.listen(self.tracker)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        addr = port.getHost()
        log.info(
            "{name} listening on {host}:{port} (TLS: {tls})",
            name=self.listener.name,
            host=getattr(addr, "host", "?"),
            port=getattr(addr, "port", "?"),
            tls=self.listener.tls,
        )
        self.listening.callback(port)
        return port

    def _failed(self, failure: Failure) -> None:
        log.critical(
            "{name}: cannot listen on {endpoint}: {reason}",
            name=self.listener.name,
            endpoint=self.listener.endpoint,
            reason=failure.getErrorMessage(),
        )
        self.listening.errback(failure)
        if IReactorCore.providedBy(self.reactor) and self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        stopped: Deferred[Any] = succeed(None)
        if self.port is not None:
            port, self.port = self.port, None
            stopped = Deferred.fromCoroutine(_await(port.stopListening()))
        return stopped.addBoth(lambda _: self.drain())

    def drain(self) -> Deferred[None]:
        """Wait for the open sessions to end, cutting them after the grace period."""
        tracker = self.tracker
        if not tracker.sessions:
            return succeed(None)
        log.info(
            "{name}: waiting up to {grace}s for {count} open session(s)",
            name=self.listener.name,
            grace=self.grace,
            count=len(tracker.sessions),
        )
        idle = tracker.when_idle()
        calls: list[IDelayedCall] = []

        def cut() -> None:
            if tracker.sessions:
                log.info(
                    "{name}: grace period over, closing {count} session(s)",
                    name=self.listener.name,
                    count=len(tracker.sessions),
                )
                tracker.abort_all()
                # A transport that never reports its end must not hold shutdown forever.
                calls.append(self.reactor.callLater(5.0, forget))

        def forget() -> None:
            for protocol in list(tracker.sessions):
                tracker._gone(protocol)

        calls.append(self.reactor.callLater(self.grace, cut))

        def done(result: None) -> None:
            for call in calls:
                if call.active():
                    call.cancel()
            return result

        return idle.addBoth(done)


async def _await(value: Any) -> Any:
    """Await a maybe-Deferred (stopListening may return None)."""
    if isinstance(value, Deferred):
        return await value
    return value


class MailgateService(MultiService):
    """The running gateway; ``listeners`` lets callers (tests) find the bound ports.

    ``reload()`` (SIGHUP) reloads the TLS certificate and the user database without
    touching open sessions. ``install_signals`` (set by tap and the worker entry point)
    makes it handle SIGHUP while running.
    """

    def __init__(self, config: Config, realm: MailRealm, users: UserFile) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.realm = realm
        self.users = users
        self.listeners: list[ListeningService] = []
        self.runner: QueueRunner | None = None
        self.tls: ReloadableContext | None = None
        self.pool: WorkerPool | None = None
        #: Listening sockets bound by the master for its workers.
        self.sockets: list[socket.socket] = []
        self.install_signals = False
        #: Called with a queue id when this process spooled an outbound message.
        self.on_queued: Callable[[str], None] = lambda _: None
        self._reactor: Any = None
        self._old_hup: Any = None
        #: The log this process writes (twistd's destination, our observer); None: twistd's.
        self.master_log: MasterLog | None = None

    def setServiceParent(self, parent: Any) -> None:
        """twistd attaches us to its application before it starts logging; an observer
        registered on the application then takes the place of twistd's own."""
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]
        set_component = getattr(parent, "setComponent", None)
        if self.master_log is not None and set_component is not None:
            set_component(ILogObserver, self.master_log.observer())

    def ports(self) -> Deferred[list[IListeningPort]]:
        from twisted.internet.defer import gatherResults

        return gatherResults([s.listening for s in self.listeners])

    def reload(self) -> None:
        """Reload certificates and users for new sessions; open sessions carry on."""
        log.info("reloading the TLS certificate and the user database")
        try:
            self.users.reload()
        except Exception:
            log.failure("user database reload failed")
        if self.tls is not None:
            try:
                self.tls.reload()
            except ConfigError as e:
                log.error("TLS reload failed, keeping the old certificate: {error}", error=e)
        if self.pool is not None:
            self.pool.reload()

    def _sighup(self, signum: int, frame: FrameType | None) -> None:
        if self._reactor is not None:
            self._reactor.callFromThread(self.reload)

    def _log_rotated(self) -> None:
        """Workers reopen the log file at once (they would within a second anyway)."""
        if self.pool is not None:
            self.pool.signal_all(signal.SIGUSR1)  # Twisted has no name for it

    def startService(self) -> None:
        if self.master_log is not None:
            self.master_log.start(self._reactor, self._log_rotated, self.install_signals)
        if self.install_signals and hasattr(signal, "SIGHUP"):
            self._old_hup = signal.signal(signal.SIGHUP, self._sighup)
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[Any]:
        log.info(
            "stopping: no new connections, open sessions get {grace}s",
            grace=self.config.shutdown_grace,
        )
        if self._old_hup is not None:
            signal.signal(signal.SIGHUP, self._old_hup)
            self._old_hup = None
        for sock in self.sockets:
            sock.close()  # the kernel stops queueing connections once every process let go
        self.sockets = []
        d = super().stopService()  # type: ignore[no-untyped-call]
        stopped = d if isinstance(d, Deferred) else succeed(None)
        if self.master_log is not None:
            stopped.addBoth(_also(self.master_log.stop))
        return stopped


def _also(action: Callable[[], object]) -> Callable[[object], object]:
    """A callback that runs ``action`` and passes the result (or failure) on."""

    def run(result: object) -> object:
        action()
        return result

    return run


def bootstrap_demo(config: Config, users: UserFile, out: Callable[[str], object]) -> None:
    """On embedded defaults with no users at all, create the demo account and say so once."""
    if not config.embedded_defaults or users.list():
        return
    address = Address("demo", config.default_domain)
    password = demo.new_password()
    users.add(address, hash_password(password))
    maildir = config.state_dir / "mail" / address.domain / address.local / "Maildir"
    store = MaildirStore(str(config.state_dir / "mail"), _inline)
    sink = store.open_delivery(Envelope(None, (address,)))
    sink.write(demo.welcome_message(str(address), address.domain, maildir))
    failures: list[Failure] = []
    sink.finish().addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    out(
        "\n"
        "  mailgate created a demo account (shown only this once):\n"
        f"    login:    {address.local}   (or {address})\n"
        f"    password: {password}\n"
        f"  Fetch its welcome message:\n"
        f"    curl --cacert {config.cert_path} pop3s://127.0.0.1:1995/1 -u demo:{password}\n"
        "\n"
    )


def _inline(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    from twisted.internet.defer import maybeDeferred

    return maybeDeferred(f, *args, **kwargs)


def _resolver(reactor: Any, servers: tuple[tuple[str, int], ...]) -> Any:
    """A DNS resolver asking ``servers``; None lets the relay use /etc/resolv.conf."""
    if not servers:
        return None
    from twisted.names import client

    return client.Resolver(servers=list(servers), reactor=reactor)  # type: ignore[no-untyped-call]


def _legacy_offer(
    users: UserFile, mode: str, supports: Callable[[str], bool]
) -> Callable[[], bool]:
    """Whether to offer APOP / CRAM-MD5 on a new connection ([pop3] apop)."""
    if mode == "never":
        return lambda: False
    if mode == "some":
        return lambda: users.any_hash(supports)
    return lambda: users.all_hash(supports)


class _Wiring:
    """Builds each listener's protocol factory and the wrappers around it.

    Order, inside out: protocol (which owns its slow-client watchdog), lab fault injection,
    lab transcripts, implicit TLS, connection limiter (see mailgate.limits.guard). Faults
    sit inside transcripts so injected replies are recorded; all of them see plaintext.
    """

    def __init__(
        self,
        config: Config,
        portal: Portal,
        realm: MailRealm,
        users: UserFile,
        context: ReloadableContext,
        allow_plaintext: Callable[[str], bool],
        trusted: Callable[[str], bool],
        clock: IReactorTime,
        run_in_thread: ThreadRunner,
    ) -> None:
        self.config = config
        self.portal = portal
        self.realm = realm
        self.context = context
        self.allow_plaintext = allow_plaintext
        self.trusted = trusted
        self.clock = clock
        auth = config.auth
        exempt = auth.throttle_exempt
        self.throttle = AuthThrottle(
            clock,
            exempt=trusted if exempt is None else network_predicate(exempt),
            first=auth.throttle_first,
            cap=auth.throttle_cap,
            forget_after=auth.throttle_forget,
        )
        self.apop_available = _legacy_offer(users, config.pop3.apop, supports_apop)
        self.cram_md5_available = _legacy_offer(users, config.pop3.apop, supports_cram_md5)
        self.limits = LimitSettings(
            max_total=config.limits.max_connections,
            max_per_peer=config.limits.max_per_peer,
        )
        self._transcripts: TranscriptStore | None = None
        self._run_in_thread = run_in_thread

    def transcripts(self) -> TranscriptStore:
        if self._transcripts is None:
            self._transcripts = TranscriptStore(
                self.config.state_dir / "transcripts", self.clock, self._run_in_thread
            )
        return self._transcripts

    def factory_for(self, listener: Listener) -> IProtocolFactory:
        factory: IProtocolFactory
        try:
            if listener.protocol == "pop3":
                factory = Pop3Factory(self.portal, self.pop3_settings(listener), self.clock)
            else:
                factory = SmtpFactory(
                    self.portal,
                    self.smtp_settings(listener),
                    self.clock,
                    anonymous=lambda: self.realm.submission_for(None),
                )
        except ValueError as e:
            raise ConfigError(f"{listener.name} listener {listener.endpoint}: {e}") from None
        if listener.faults:  # the config guarantees listener.lab
            factory = FaultFactory(factory, FaultPolicy(listener.faults, self.clock), listener.name)
        if listener.transcripts:
            factory = TranscriptFactory(factory, self.transcripts(), listener.name)
        host = self.config.hostname
        pop3 = listener.protocol == "pop3"
        return guard(
            factory,
            self.limits,
            self.clock,
            refuse_reply=POP3_REFUSAL if pop3 else smtp_refusal(host),
            tls_context=self.context if listener.tls == "implicit" else None,
        )

    def pop3_settings(self, listener: Listener) -> Pop3Settings:
        config = self.config
        return Pop3Settings(
            hostname=config.hostname,
            timeout=config.pop3.timeout,
            tls_context=self.context if listener.tls != "none" else None,
            implicit_tls=listener.tls == "implicit",
            allow_plaintext=self.allow_plaintext,
            max_failures=config.auth.max_failures,
            xtnd_xmit=config.pop3.xtnd_xmit if listener.xtnd_xmit is None else listener.xtnd_xmit,
            xtnd_xmit_require_tls=config.pop3.xtnd_xmit_require_tls,
            xtnd_advertise=config.pop3.xtnd_advertise,
            xtnd_xlst=config.pop3.xtnd_xlst,
            run_in_thread=self._run_in_thread,
            # XTND XMIT follows exactly the submission rules.
            default_domain=config.default_domain,
            max_size=config.smtp.max_size,
            max_recipients=config.smtp.max_recipients,
            bare_newline=config.smtp.bare_newline,
            long_lines=config.smtp.long_lines,
            enforce_from=config.submission.enforce_from,
            profile=Pop3Profile(**dict(listener.profile)),
            apop_available=self.apop_available,
            cram_md5_available=self.cram_md5_available,
            login_delay=config.pop3.login_delay,
            expire=config.pop3.expire,
            sdps_env=config.pop3.sdps_env,
            throttle=self.throttle,
            max_commands=config.pop3.max_commands,
            max_junk=config.pop3.max_junk,
            line_time=config.limits.line_time,
            min_rate=config.limits.min_rate,
        )

    def smtp_settings(self, listener: Listener) -> SmtpSettings:
        config = self.config
        return SmtpSettings(
            hostname=config.hostname,
            timeout=config.smtp.timeout,
            tls_context=self.context if listener.tls != "none" else None,
            implicit_tls=listener.tls == "implicit",
            require_tls=config.smtp.require_tls and listener.tls != "none",
            allow_plaintext=self.allow_plaintext,
            trusted=self.trusted,
            default_domain=config.default_domain,
            max_size=config.smtp.max_size,
            max_recipients=config.smtp.max_recipients,
            bare_newline=config.smtp.bare_newline,
            long_lines=config.smtp.long_lines,
            max_failures=config.auth.max_failures,
            smtputf8=config.smtp.smtputf8,
            profile=SmtpProfile(**dict(listener.profile)),
            cram_md5_available=self.cram_md5_available,
            throttle=self.throttle,
            max_commands=config.smtp.max_commands,
            max_junk=config.smtp.max_junk,
            line_time=config.limits.line_time,
            min_rate=config.limits.min_rate,
        )


def group_flush(
    mode: str,
    mail_root: str,
    quiet: bool,
    find_syncfs: Callable[[], Callable[[int], None] | None] = fileio.syncfs_function,
) -> FilesystemFlush | None:
    """The store's group-commit flush for the ``fsync`` setting (None: per-file fsyncs).

    "filesystem" and "auto" need a syncfs that reports write errors (Linux 5.8+); without
    one both fall back to per-file fsyncs, which are never less durable. ``quiet``: a
    worker, whose master has said so already.
    """
    if mode == "file":
        return None
    syncfs = find_syncfs()
    if syncfs is None:
        if not quiet:
            log.warn(
                'fsync = "{mode}": this system has no syncfs(2) that reports write errors '
                "(Linux 5.8 or later); using per-file fsyncs",
                mode=mode,
            )
        return None
    return FilesystemFlush(syncfs, adaptive=mode == "auto", probe_path=mail_root)


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the limit now in force.

    Every POP3 session holds a socket and its maildrop lock file, so the usual soft limit of
    1024 would cap a server at a few hundred sessions.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def build_service(
    config: Config,
    reactor: Any,
    out: Callable[[str], object] = sys.stdout.write,
    *,
    worker_args: Sequence[str] | None = None,
    inherited_fds: Sequence[int] | None = None,
    master_log: MasterLog | None = None,
) -> MailgateService:
    """Wire the whole gateway for ``config``; nothing listens until the service starts.

    ``worker_args`` (the ``twistd mailgate`` arguments) lets this process be the master of
    ``config.workers`` processes: it binds the TCP listeners now and spawns the others with
    the same arguments. ``inherited_fds`` makes it such a child: it adopts those sockets (in
    the order of the TCP listeners), runs no queue runner and creates no demo account.
    ``master_log`` (twistd's log destination, see :mod:`mailgate.logsink`) becomes the
    process's log observer and tells the workers where to write their own lines.
    """
    is_child = inherited_fds is not None
    fastpoll.install(reactor)
    lagprobe.install_from_environment(reactor)  # benchmarks only (MAILGATE_LAG_PROBE)
    state = config.state_dir
    state.mkdir(parents=True, exist_ok=True)
    (state / "mail").mkdir(exist_ok=True)
    if config.self_signed and tls.ensure_certificate(
        config.cert_path, config.key_path, config.hostname
    ):
        log.info("created a self-signed certificate in {path}", path=str(config.cert_path))
    context = ReloadableContext(
        functools.partial(tls.server_context, config.cert_path, config.key_path)
    )

    run_in_thread = functools.partial(deferToThreadPool, reactor, reactor.getThreadPool())
    users = UserFile(state / "users")
    users.background = run_in_thread  # re-read changed user files off the reactor
    if not is_child:
        bootstrap_demo(config, users, out)
    store = MaildirStore(
        str(state / "mail"),
        run_in_thread,
        hostname=config.hostname,
        group_flush=group_flush(config.fsync, str(state / "mail"), is_child),
        clock=reactor,
    )
    if not is_child:
        store.sweep_stale()  # before any worker starts delivering
    reactor.addSystemEventTrigger("before", "shutdown", store.retire_pending)
    spool = Spool(state / "spool", run_in_thread, reactor)
    realm = MailRealm(store, users, config.all_local_domains, spool)
    checker = PasswordChecker(
        users,
        config.default_domain,
        verify_password,
        run_in_thread,
        dummy_hash=DUMMY_HASH,
        known_domains=config.all_local_domains,
    )
    portal = Portal(realm, [checker])
    allow_plaintext = network_predicate(config.allow_plaintext_from)
    trusted = network_predicate(config.trusted_networks)
    clock: IReactorTime = reactor

    service = MailgateService(config=config, realm=realm, users=users)
    relay_cfg = config.relay
    relay = SmtpRelay(
        reactor,
        config.hostname,
        smarthost=relay_cfg.smarthost,
        tls=relay_cfg.tls,
        ca_file=relay_cfg.ca_file,
        auth=read_auth_file(relay_cfg.auth_file) if relay_cfg.auth_file else None,
        mx_port=relay_cfg.mx_port,
        resolver=_resolver(reactor, relay_cfg.dns_servers),
        run_in_thread=run_in_thread,
    )
    runner = QueueRunner(
        spool,
        relay,
        store,
        lambda address: address.domain in realm.local_domains,
        clock,
        config.hostname,
        QueueSettings(
            first_retry=config.queue.first_retry,
            max_retry=config.queue.max_retry,
            lifetime=config.queue.lifetime,
            max_concurrent=config.queue.max_concurrent,
            delay_warning=config.queue.delay_warning,
        ),
    )
    service.tls = context
    if is_child:
        # The master's runner is the spool's only state changer; tell it about new entries.
        spool.add_listener(lambda queue_id: service.on_queued(queue_id))
    else:
        runner.setServiceParent(service)  # type: ignore[no-untyped-call]
        service.runner = runner
    is_master = not is_child and worker_args is not None and config.workers > 1
    inherited = list(inherited_fds or ())
    wiring = _Wiring(
        config, portal, realm, users, context, allow_plaintext, trusted, clock, run_in_thread
    )
    for listener in config.listeners:
        factory = wiring.factory_for(listener)
        fd: int | None = None
        family: int = socket.AF_INET
        address = tcp_address(reactor, listener.endpoint) if (is_master or is_child) else None
        if address is not None:
            family = address.family
            if is_child:
                fd = inherited.pop(0)
            else:
                try:
                    sock = bind_socket(address)
                except OSError as e:
                    for bound in service.sockets:
                        bound.close()
                    raise ConfigError(
                        f"{listener.name}: cannot listen on {listener.endpoint}: {e.strerror}"
                    ) from None
                service.sockets.append(sock)
                fd = sock.fileno()
        elif is_child:
            continue  # not TCP (e.g. unix:): only the master serves it
        child = ListeningService(
            reactor, listener, factory, fd=fd, family=family, grace=config.shutdown_grace
        )
        child.setServiceParent(service)  # type: ignore[no-untyped-call]
        service.listeners.append(child)
    if is_master and worker_args is not None:
        fds = [sock.fileno() for sock in service.sockets]
        pool = WorkerPool(
            reactor,
            worker_command(worker_args, len(fds)),
            fds,
            config.workers - 1,
            config.shutdown_grace,
            on_queued=spool.notify,
            ready=runner.when_recovered,
            log_env=master_log.worker_env if master_log is not None else None,
        )
        pool.setServiceParent(service)  # type: ignore[no-untyped-call]
        service.pool = pool
    service._reactor = reactor
    service.master_log = master_log
    return service
