"""``twistd mailgate``: command-line options and makeService. Options only parse."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from mailgate.config import Config, Listener, load_config, with_overrides
from mailgate.errors import ConfigError, MailgateError
from mailgate.logsink import MasterLog

LISTENER_OPTIONS = {
    "pop3": ("pop3", "starttls"),
    "pop3s": ("pop3", "implicit"),
    "submission": ("submission", "starttls"),
    "submissions": ("submission", "implicit"),
}


class Options(usage.Options):
    """twistd mailgate [options]; every option overrides the config file."""

    synopsis = "[options]"
    longdesc = (
        "Runs the mailgate POP3 and SMTP submission gateway. Without --config it runs on "
        "embedded defaults: state in ./mailgate-data, POP3 127.0.0.1:1110 (STLS), POP3S 1995, "
        "submission 1587 (STARTTLS), submissions 1465."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["state-dir", "d", None, "State directory (users, mail, spool, certificates)."],
        ["tls-cert", None, None, "PEM certificate (chain) file."],
        ["tls-key", None, None, "PEM private key file."],
        ["hostname", None, None, "Host name used in greetings and trace headers."],
        ["default-domain", None, None, "Domain given to logins and addresses without one."],
        ["smarthost", None, None, "Relay all non-local mail to this client endpoint."],
        ["smarthost-tls", None, None, "Smarthost TLS: none, opportunistic or required."],
        ["smarthost-ca", None, None, "PEM CA file to verify the smarthost's certificate."],
        ["smarthost-auth-file", None, None, "File with one line user:password for the smarthost."],
        ["workers", "w", None, "Processes sharing the listeners (default: number of cores).", int],
        ["shutdown-grace", None, None, "Seconds SIGTERM lets sessions finish (default 30).", float],
    ]
    optFlags = [
        ["xtnd-xmit", None, "Turn on XTND XMIT (send mail over POP3) on every POP3 listener."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listeners"] = []
        self["allow-plaintext-from"] = []
        self.argv: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse, remembering the arguments: worker processes are started with the same."""
        args = list(sys.argv[1:] if options is None else options)
        self.argv = args
        super().parseOptions(args)  # type: ignore[no-untyped-call]

    def _listener(self, kind: str, endpoint: str) -> None:
        protocol, mode = LISTENER_OPTIONS[kind]
        self["listeners"].append(Listener(protocol, endpoint, mode))

    def opt_pop3(self, endpoint: str) -> None:
        """POP3 listener with STLS, a Twisted endpoint (repeatable), e.g. tcp:110."""
        self._listener("pop3", endpoint)

    def opt_pop3s(self, endpoint: str) -> None:
        """POP3 listener with implicit TLS (repeatable), e.g. tcp:995."""
        self._listener("pop3s", endpoint)

    def opt_submission(self, endpoint: str) -> None:
        """SMTP submission listener with STARTTLS (repeatable), e.g. tcp:587."""
        self._listener("submission", endpoint)

    def opt_submissions(self, endpoint: str) -> None:
        """SMTP submission listener with implicit TLS (repeatable), e.g. tcp:465."""
        self._listener("submissions", endpoint)

    def opt_allow_plaintext_from(self, cidr: str) -> None:
        """Network (CIDR) allowed to send passwords without TLS (repeatable)."""
        self["allow-plaintext-from"].append(cidr)


def config_from_options(options: Options) -> Config:
    """The configuration file (or embedded defaults) with the command line applied."""
    return with_overrides(
        load_config(options["config"]),
        state_dir=options["state-dir"],
        listeners=options["listeners"],
        tls_cert=options["tls-cert"],
        tls_key=options["tls-key"],
        allow_plaintext_from=options["allow-plaintext-from"],
        hostname=options["hostname"],
        default_domain=options["default-domain"],
        xtnd_xmit=bool(options["xtnd-xmit"]),
        smarthost=options["smarthost"],
        smarthost_tls=options["smarthost-tls"],
        smarthost_ca=options["smarthost-ca"],
        smarthost_auth_file=options["smarthost-auth-file"],
        workers=options["workers"],
        shutdown_grace=options["shutdown-grace"],
    )


def _twistd_log(options: Options) -> MasterLog | None:
    """Our own writer of twistd's log destination (file or stdout), shared with the
    workers; None when not run by twistd or when it logs elsewhere (syslog, --logger)."""
    twistd = getattr(options, "parent", None)
    if twistd is None or not hasattr(twistd, "get"):
        return None
    return MasterLog.from_twistd(twistd)


def makeService(options: Options) -> IService:
    """Build the gateway service from parsed options (imports the reactor lazily)."""
    from twisted.internet import reactor

    from mailgate.service import build_service, raise_open_file_limit

    raise_open_file_limit()
    try:
        config = config_from_options(options)
        service: Any = build_service(
            config, reactor, worker_args=options.argv, master_log=_twistd_log(options)
        )
    except (ConfigError, MailgateError) as e:
        sys.stderr.write(f"mailgate: error: {e}\n")
        raise SystemExit(2) from None
    service.install_signals = True
    return service  # type: ignore[no-any-return]
