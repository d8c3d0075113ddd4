"""The composition root: the only place that knows every concrete class and wires them."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mailgate import demo, tls
from mailgate.auth.checker import PasswordChecker
from mailgate.auth.passwords import DUMMY_HASH, hash_password, verify_password
from mailgate.auth.userdb import UserFile
from mailgate.config import Config, Listener, network_predicate, read_auth_file
from mailgate.model import Address, Envelope
from mailgate.pop3.server import Pop3Factory, Pop3Settings
from mailgate.queue.runner import QueueRunner, QueueSettings
from mailgate.queue.spool import Spool
from mailgate.realm import MailRealm
from mailgate.relay.client import SmtpRelay
from mailgate.smtp.server import SmtpFactory, SmtpSettings
from mailgate.store.maildir import MaildirStore

log = Logger()


class ListeningService(Service):
    """Listens on one endpoint while running; remembers the port so tests can find it."""

    def __init__(self, reactor: Any, listener: Listener, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.listener = listener
        self.factory = factory
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        endpoint = serverFromString(self.reactor, self.listener.endpoint)  # type: ignore[no-untyped-call]
        d = endpoint.listen(self.factory)
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

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class MailgateService(MultiService):
    """The running gateway; ``listeners`` lets callers (tests) find the bound ports."""

    def __init__(self, config: Config, realm: MailRealm, users: UserFile) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.realm = realm
        self.users = users
        self.listeners: list[ListeningService] = []
        self.runner: QueueRunner | None = None

    def ports(self) -> Deferred[list[IListeningPort]]:
        from twisted.internet.defer import gatherResults

        return gatherResults([s.listening for s in self.listeners])


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


def build_service(
    config: Config, reactor: Any, out: Callable[[str], object] = sys.stdout.write
) -> MailgateService:
    """Wire the whole gateway for ``config``; nothing listens until the service starts."""
    state = config.state_dir
    state.mkdir(parents=True, exist_ok=True)
    (state / "mail").mkdir(exist_ok=True)
    if config.self_signed and tls.ensure_certificate(
        config.cert_path, config.key_path, config.hostname
    ):
        log.info("created a self-signed certificate in {path}", path=str(config.cert_path))
    context = tls.server_context(config.cert_path, config.key_path)

    run_in_thread = functools.partial(deferToThreadPool, reactor, reactor.getThreadPool())
    users = UserFile(state / "users")
    bootstrap_demo(config, users, out)
    store = MaildirStore(str(state / "mail"), run_in_thread, hostname=config.hostname)
    spool = Spool(state / "spool", run_in_thread, reactor)
    realm = MailRealm(store, users, config.all_local_domains, spool)
    checker = PasswordChecker(
        users, config.default_domain, verify_password, run_in_thread, dummy_hash=DUMMY_HASH
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
        ),
    )
    runner.setServiceParent(service)  # type: ignore[no-untyped-call]
    service.runner = runner
    for listener in config.listeners:
        implicit = listener.tls == "implicit"
        factory: IProtocolFactory
        if listener.protocol == "pop3":
            factory = Pop3Factory(
                portal,
                Pop3Settings(
                    hostname=config.hostname,
                    timeout=config.pop3.timeout,
                    tls_context=context if listener.tls != "none" else None,
                    implicit_tls=implicit,
                    allow_plaintext=allow_plaintext,
                    max_failures=config.auth.max_failures,
                    xtnd_xmit=(
                        config.pop3.xtnd_xmit if listener.xtnd_xmit is None else listener.xtnd_xmit
                    ),
                    xtnd_xmit_require_tls=config.pop3.xtnd_xmit_require_tls,
                    xtnd_advertise=config.pop3.xtnd_advertise,
                    xtnd_xlst=config.pop3.xtnd_xlst,
                    # XTND XMIT follows exactly the submission rules.
                    default_domain=config.default_domain,
                    max_size=config.smtp.max_size,
                    max_recipients=config.smtp.max_recipients,
                    bare_newline=config.smtp.bare_newline,
                    long_lines=config.smtp.long_lines,
                    enforce_from=config.submission.enforce_from,
                ),
                clock,
            )
        else:
            factory = SmtpFactory(
                portal,
                SmtpSettings(
                    hostname=config.hostname,
                    timeout=config.smtp.timeout,
                    tls_context=context if listener.tls != "none" else None,
                    implicit_tls=implicit,
                    require_tls=config.smtp.require_tls and listener.tls != "none",
                    allow_plaintext=allow_plaintext,
                    trusted=trusted,
                    default_domain=config.default_domain,
                    max_size=config.smtp.max_size,
                    max_recipients=config.smtp.max_recipients,
                    bare_newline=config.smtp.bare_newline,
                    long_lines=config.smtp.long_lines,
                    max_failures=config.auth.max_failures,
                    smtputf8=config.smtp.smtputf8,
                ),
                clock,
                anonymous=lambda: realm.submission_for(None),
            )
        if implicit:
            factory = TLSMemoryBIOFactory(context, False, factory)
        child = ListeningService(reactor, listener, factory)
        child.setServiceParent(service)  # type: ignore[no-untyped-call]
        service.listeners.append(child)
    return service
