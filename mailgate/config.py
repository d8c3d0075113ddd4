"""Configuration: a TOML file (or nothing at all) -> a frozen, validated :class:`Config`.

Every key is checked: an unknown key or a bad value is a :class:`ConfigError` that names the
file and the key, so a typo never silently runs a server with a default.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mailgate.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS = ("pop3", "submission")
TLS_MODES = ("starttls", "implicit", "none")
RELAY_TLS = ("none", "opportunistic", "required")

DEFAULT_LISTENERS: tuple[tuple[str, str, str], ...] = (
    ("pop3", "tcp:1110:interface=127.0.0.1", "starttls"),
    ("pop3", "tcp:1995:interface=127.0.0.1", "implicit"),
    ("submission", "tcp:1587:interface=127.0.0.1", "starttls"),
    ("submission", "tcp:1465:interface=127.0.0.1", "implicit"),
)


FAULT_ACTIONS = ("delay", "error", "drop")
PARSING_MODES = ("normal", "strict", "lenient")
APOP_MODES = ("auto", "some", "never")
SASL_NAMES = ("PLAIN", "LOGIN", "CRAM-MD5")
# Capability profile switches per protocol (all booleans unless named in _PROFILE_SPECIAL).
PROFILE_KEYS: dict[str, tuple[str, ...]] = {
    "pop3": (
        "stls",
        "apop",
        "sasl",
        "user",
        "top",
        "uidl",
        "pipelining",
        "xtnd",
        "resp_codes",
        "parsing",
    ),
    "submission": (
        "pipelining",
        "eightbitmime",
        "size",
        "enhancedstatuscodes",
        "starttls",
        "sasl",
        "parsing",
    ),
}


@dataclass(frozen=True)
class FaultRule:
    """A lab fault on one command verb, fired always, every Nth time, or with a probability.

    ``reply`` is the whole reply line for ``error`` (no CRLF); ``seconds`` the hold for ``delay``.
    """

    command: str
    action: str
    reply: str | None = None
    seconds: float = 0.0
    every: int | None = None
    probability: float | None = None


@dataclass(frozen=True)
class Listener:
    """One listening socket: which protocol, where (a Twisted endpoint string), which TLS.

    ``xtnd_xmit`` None means "as [pop3] xtnd_xmit says".
    """

    protocol: str
    endpoint: str
    tls: str
    xtnd_xmit: bool | None = None
    #: A lab listener may carry fault rules (see mailgate.lab.faults); off by default.
    lab: bool = False
    #: Record every session's wire transcript under STATE_DIR/transcripts (mailgate.lab).
    transcripts: bool = False
    faults: tuple[FaultRule, ...] = ()
    #: Capability profile switches (key, value), e.g. (("stls", False), ("parsing", "strict")).
    profile: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        if self.protocol == "pop3":
            return "pop3s" if self.tls == "implicit" else "pop3"
        return "submissions" if self.tls == "implicit" else "submission"


@dataclass(frozen=True)
class Pop3Config:
    timeout: float = 600.0
    xtnd_xmit: bool = False
    xtnd_xmit_require_tls: bool = False
    xtnd_advertise: bool = False
    xtnd_xlst: bool = False
    #: When to offer APOP and CRAM-MD5, which need a plaintext-equivalent stored secret:
    #: "auto" when every account has one (clients such as curl pick them whenever offered and
    #: never fall back), "some" when at least one account has one, "never".
    apop: str = "auto"
    #: RFC 2449 LOGIN-DELAY seconds, enforced per account (None: not advertised).
    login_delay: int | None = None
    #: RFC 2449 EXPIRE days, or "NEVER" (None: not advertised, nothing expires).
    expire: int | str | None = None
    #: SDPS ``*ENV`` command (lab only).
    sdps_env: bool = False
    #: Commands per session, and invalid commands before the session is closed (no UPDATE).
    max_commands: int = 100000
    max_junk: int = 10


@dataclass(frozen=True)
class LimitsConfig:
    """Per-listener, per-process connection bounds and the slow-client watchdog."""

    max_connections: int = 1000
    max_per_peer: int = 20
    line_time: float = 60.0
    min_rate: float = 100.0


@dataclass(frozen=True)
class SubmissionConfig:
    enforce_from: bool = False


@dataclass(frozen=True)
class RelayConfig:
    """Where non-local mail goes: a smarthost endpoint, or each domain's MX when None."""

    smarthost: str | None = None
    tls: str = "opportunistic"
    ca_file: Path | None = None
    auth_file: Path | None = None
    mx_port: int = 25
    #: DNS servers ("host:port") for MX lookups instead of /etc/resolv.conf (labs, tests).
    dns_servers: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class QueueConfig:
    lifetime: float = 5 * 86400.0
    first_retry: float = 300.0
    max_retry: float = 3600.0
    max_concurrent: int = 10
    delay_warning: float = 0.0


@dataclass(frozen=True)
class SmtpConfig:
    timeout: float = 600.0
    max_size: int = 26214400
    max_recipients: int = 100
    bare_newline: str = "normalize"
    long_lines: str = "reject"
    require_tls: bool = True
    smtputf8: bool = False
    max_commands: int = 10000
    max_junk: int = 20


@dataclass(frozen=True)
class AuthConfig:
    max_failures: int = 3
    #: Failure-reply delay per client address: first, doubling up to cap (Dovecot's anvil).
    throttle_first: float = 2.0
    throttle_cap: float = 15.0
    #: Seconds without a failure after which an address is forgotten.
    throttle_forget: float = 900.0
    #: Networks never delayed; None means "the trusted networks".
    throttle_exempt: tuple[Network, ...] | None = None


@dataclass(frozen=True)
class Config:
    """Everything the composition root needs, already validated."""

    state_dir: Path = Path("mailgate-data")
    hostname: str = field(default_factory=socket.getfqdn)
    default_domain: str = "localhost"
    local_domains: tuple[str, ...] = ()
    listeners: tuple[Listener, ...] = tuple(Listener(*x) for x in DEFAULT_LISTENERS)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_plaintext_from: tuple[Network, ...] = ()
    trusted_networks: tuple[Network, ...] = ()
    pop3: Pop3Config = Pop3Config()
    smtp: SmtpConfig = SmtpConfig()
    auth: AuthConfig = AuthConfig()
    submission: SubmissionConfig = SubmissionConfig()
    relay: RelayConfig = RelayConfig()
    queue: QueueConfig = QueueConfig()
    limits: LimitsConfig = LimitsConfig()
    #: True when no config file was given: the demo account may be created.
    embedded_defaults: bool = True
    #: Processes serving the listeners (the master plus workers-1 children); see workers.py.
    workers: int = field(default_factory=lambda: default_workers())
    #: Seconds SIGTERM lets open sessions finish before they are cut (without UPDATE).
    shutdown_grace: float = 30.0
    #: How a group of deliveries is made durable: "file" (fsync each file and new/),
    #: "filesystem" (one syncfs per filesystem) or "auto" (syncfs, backing off to per-file
    #: fsyncs while other writers make it slow); see mailgate/store/flush.py.
    fsync: str = "auto"

    @property
    def all_local_domains(self) -> tuple[str, ...]:
        domains = [self.default_domain, *self.local_domains]
        return tuple(dict.fromkeys(d.lower() for d in domains))

    @property
    def cert_path(self) -> Path:
        return self.tls_cert or self.state_dir / "tls" / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.tls_key or self.state_dir / "tls" / "key.pem"

    @property
    def self_signed(self) -> bool:
        return self.tls_cert is None


FSYNC_MODES = ("auto", "file", "filesystem")


def default_workers() -> int:
    """One process per core: the default for the ``workers`` key."""
    return max(os.cpu_count() or 1, 1)


def network_predicate(networks: Iterable[Network]) -> Callable[[str], bool]:
    """A fast ``peer ip -> bool`` test for membership in any of ``networks``."""
    nets = tuple(networks)

    # Called several times per command with the same few peers: parsing the address
    # each time was ~90 us per submitted message.
    @functools.lru_cache(maxsize=4096)
    def contains(host: str) -> bool:
        if not nets:
            return False
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in nets)

    return contains


class _Section:
    """Reads one TOML table, remembering which keys were used so leftovers are errors."""

    def __init__(self, source: str, prefix: str, data: Mapping[str, Any]) -> None:
        self.source = source
        self.prefix = prefix
        self.data = dict(data)

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key(name)}: {message}")

    def take(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.error(name, "expected a number, got a boolean")
        if not isinstance(value, kind):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise self.error(name, f"expected {names}, got {type(value).__name__}")
        return value

    def positive(self, name: str, default: float, minimum: float = 1) -> Any:
        value = self.take(name, (int, float), default)
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.take(name, str, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}")
        return value

    def sub(self, name: str) -> _Section:
        table = self.take(name, dict, {})
        return _Section(self.source, f"{self.key(name)}.", table)

    def done(self) -> None:
        if self.data:
            name = sorted(self.data)[0]
            raise self.error(name, "unknown key")


def parse_networks(values: Iterable[str], where: str) -> tuple[Network, ...]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError as e:
            raise ConfigError(f"{where}: {v!r} is not a network (CIDR) ") from e
    return tuple(out)


def _domain(value: str, where: str) -> str:
    from mailgate.model import _DOMAIN  # the one domain grammar

    if not _DOMAIN.match(value):
        raise ConfigError(f"{where}: {value!r} is not a domain name")
    return value.lower()


def parse_config(data: Mapping[str, Any], source: str, base_dir: Path) -> Config:
    """Validate the TOML document ``data`` (read from ``source``) into a Config."""
    top = _Section(source, "", data)
    defaults = Config()
    state_dir = Path(top.take("state_dir", str, str(defaults.state_dir)))
    hostname = top.take("hostname", str, defaults.hostname)
    default_domain = _domain(
        top.take("default_domain", str, defaults.default_domain), f"{source}: default_domain"
    )
    local_domains = tuple(
        _domain(d, f"{source}: local_domains") for d in _strings(top, "local_domains", [])
    )
    allow_plain = parse_networks(
        _strings(top, "allow_plaintext_from", []), f"{source}: allow_plaintext_from"
    )
    trusted = parse_networks(_strings(top, "trusted_networks", []), f"{source}: trusted_networks")
    workers: int = top.take("workers", int, default_workers())
    if workers < 1:
        raise top.error("workers", "must be at least 1")
    shutdown_grace = float(top.positive("shutdown_grace", 30.0, minimum=0))
    fsync = top.choice("fsync", FSYNC_MODES, defaults.fsync)

    tls = top.sub("tls")
    cert = tls.take("cert", str, None)
    key = tls.take("key", str, None)
    tls.done()
    if (cert is None) != (key is None):
        raise ConfigError(f"{source}: tls: give both cert and key, or neither")

    listeners: list[Listener] = []
    raw_listeners = top.take("listeners", list, None)
    if raw_listeners is not None:
        for i, item in enumerate(raw_listeners):
            if not isinstance(item, dict):
                raise ConfigError(f"{source}: listeners[{i}]: expected a table")
            sec = _Section(source, f"listeners[{i}].", item)
            proto = sec.choice("protocol", PROTOCOLS, "")
            endpoint = sec.take("endpoint", str, "")
            if not endpoint:
                raise sec.error("endpoint", "required (a Twisted endpoint string)")
            mode = sec.choice("tls", TLS_MODES, "starttls")
            xmit = sec.take("xtnd_xmit", bool, None)
            if xmit is not None and proto != "pop3":
                raise sec.error("xtnd_xmit", "only POP3 listeners have XTND XMIT")
            lab = sec.take("lab", bool, False)
            transcripts = sec.take("transcripts", bool, False)
            raw_faults = sec.take("faults", list, [])
            if raw_faults and not lab:
                raise sec.error("faults", "fault injection needs a lab listener (lab = true)")
            faults = tuple(
                _fault_rule(source, f"{sec.key('faults')}[{j}].", rule, proto)
                for j, rule in enumerate(raw_faults)
            )
            profile = _profile(sec.sub("profile"), proto)
            sec.done()
            listeners.append(
                Listener(proto, endpoint, mode, xmit, lab, transcripts, faults, profile)
            )

    pop3 = top.sub("pop3")
    pop3_cfg = Pop3Config(
        timeout=pop3.positive("timeout", 600, minimum=600),
        xtnd_xmit=pop3.take("xtnd_xmit", bool, False),
        xtnd_xmit_require_tls=pop3.take("xtnd_xmit_require_tls", bool, False),
        xtnd_advertise=pop3.take("xtnd_advertise", bool, False),
        xtnd_xlst=pop3.take("xtnd_xlst", bool, False),
        apop=pop3.choice("apop", APOP_MODES, "auto"),
        login_delay=_optional_int(pop3, "login_delay", minimum=0),
        expire=_expire(pop3),
        sdps_env=pop3.take("sdps_env", bool, False),
        max_commands=int(pop3.positive("max_commands", 100000)),
        max_junk=int(pop3.positive("max_junk", 10, minimum=0)),
    )
    pop3.done()

    limits = top.sub("limits")
    limits_cfg = LimitsConfig(
        max_connections=int(limits.positive("max_connections", 1000)),
        max_per_peer=int(limits.positive("max_per_peer", 20)),
        line_time=float(limits.positive("line_time", 60.0)),
        min_rate=float(limits.positive("min_rate", 100.0, minimum=0)),
    )
    limits.done()

    submission = top.sub("submission")
    submission_cfg = SubmissionConfig(enforce_from=submission.take("enforce_from", bool, False))
    submission.done()

    relay = top.sub("relay")
    ca_file = relay.take("ca_file", str, None)
    auth_file = relay.take("auth_file", str, None)
    relay_cfg = RelayConfig(
        smarthost=relay.take("smarthost", str, None) or None,
        tls=relay.choice("tls", RELAY_TLS, "opportunistic"),
        ca_file=None if ca_file is None else base_dir / ca_file,
        auth_file=None if auth_file is None else base_dir / auth_file,
        mx_port=int(relay.positive("mx_port", 25)),
        dns_servers=tuple(
            _host_port(v, f"{source}: relay.dns_servers")
            for v in _strings(relay, "dns_servers", [])
        ),
    )
    relay.done()

    queue = top.sub("queue")
    queue_cfg = QueueConfig(
        lifetime=queue.positive("lifetime", 5 * 86400, minimum=60),
        first_retry=queue.positive("first_retry", 300),
        max_retry=queue.positive("max_retry", 3600),
        max_concurrent=int(queue.positive("max_concurrent", 10)),
        delay_warning=queue.positive("delay_warning", 0, minimum=0),
    )
    queue.done()

    smtp = top.sub("smtp")
    smtp_cfg = SmtpConfig(
        timeout=smtp.positive("timeout", 600, minimum=300),
        max_size=int(smtp.positive("max_size", 26214400, minimum=1024)),
        max_recipients=int(smtp.positive("max_recipients", 100, minimum=100)),
        bare_newline=smtp.choice("bare_newline", ("normalize", "reject"), "normalize"),
        long_lines=smtp.choice("long_lines", ("reject", "accept"), "reject"),
        require_tls=smtp.take("require_tls", bool, True),
        smtputf8=smtp.take("smtputf8", bool, False),
        max_commands=int(smtp.positive("max_commands", 10000)),
        max_junk=int(smtp.positive("max_junk", 20, minimum=0)),
    )
    smtp.done()

    auth = top.sub("auth")
    exempt = auth.take("throttle_exempt", list, None)
    auth_cfg = AuthConfig(
        max_failures=int(auth.positive("max_failures", 3)),
        throttle_first=float(auth.positive("throttle_first", 2.0, minimum=0)),
        throttle_cap=float(auth.positive("throttle_cap", 15.0, minimum=0)),
        throttle_forget=float(auth.positive("throttle_forget", 900.0)),
        throttle_exempt=(
            None
            if exempt is None
            else parse_networks([str(x) for x in exempt], f"{source}: auth.throttle_exempt")
        ),
    )
    if auth_cfg.throttle_cap < auth_cfg.throttle_first:
        raise auth.error("throttle_cap", "must be at least throttle_first")
    auth.done()
    top.done()

    def resolve(p: str | None) -> Path | None:
        return None if p is None else (base_dir / p)

    return Config(
        state_dir=base_dir / state_dir,
        hostname=hostname,
        default_domain=default_domain,
        local_domains=local_domains,
        listeners=tuple(listeners) if raw_listeners is not None else defaults.listeners,
        tls_cert=resolve(cert),
        tls_key=resolve(key),
        allow_plaintext_from=allow_plain,
        trusted_networks=trusted,
        pop3=pop3_cfg,
        smtp=smtp_cfg,
        auth=auth_cfg,
        submission=submission_cfg,
        relay=relay_cfg,
        queue=queue_cfg,
        limits=limits_cfg,
        embedded_defaults=False,
        workers=workers,
        shutdown_grace=shutdown_grace,
        fsync=fsync,
    )


_FAULT_VERB = re.compile(r"[A-Za-z*][A-Za-z0-9*]{0,15}")
_SMTP_ERROR = re.compile(r"[45][0-9][0-9]( [\x20-\x7e]*)?")
_POP3_ERROR = re.compile(r"-ERR( [\x20-\x7e]*)?")


def _fault_rule(source: str, prefix: str, item: object, protocol: str) -> FaultRule:
    """One ``faults`` entry of a lab listener, checked strictly (keys, action, reply form)."""
    if not isinstance(item, dict):
        raise ConfigError(f"{source}: {prefix[:-1]}: expected a table")
    sec = _Section(source, prefix, item)
    command = sec.take("command", str, "")
    if not _FAULT_VERB.fullmatch(command):
        raise sec.error("command", "required: one command verb such as RETR or MAIL")
    action = sec.choice("action", FAULT_ACTIONS, "")
    reply = sec.take("reply", str, None)
    seconds = sec.take("seconds", (int, float), None)
    every = sec.take("every", int, None)
    probability = sec.take("probability", (int, float), None)
    if action == "error":
        if reply is None:
            raise sec.error("reply", "required for action = error")
        pattern = _POP3_ERROR if protocol == "pop3" else _SMTP_ERROR
        if len(reply) > 510 or not pattern.fullmatch(reply):
            form = "-ERR ..." if protocol == "pop3" else "4xx/5xx ..."
            raise sec.error("reply", f"must be one printable line of the form {form!r}")
    elif reply is not None:
        raise sec.error("reply", "only action = error takes a reply")
    if action == "delay":
        if seconds is None or not 0 < seconds <= 3600:
            raise sec.error("seconds", "required for action = delay: 0 < seconds <= 3600")
    elif seconds is not None:
        raise sec.error("seconds", "only action = delay takes seconds")
    if every is not None and probability is not None:
        raise sec.error("every", "give every or probability, not both")
    if every is not None and every < 1:
        raise sec.error("every", "must be at least 1")
    if probability is not None and not 0 < probability <= 1:
        raise sec.error("probability", "must be in (0, 1]")
    sec.done()
    return FaultRule(
        command=command.upper(),
        action=action,
        reply=reply,
        seconds=float(seconds or 0.0),
        every=every,
        probability=None if probability is None else float(probability),
    )


def _host_port(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, "53"
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError as e:
        raise ConfigError(f"{where}: {value!r} is not an IP address with an optional :port") from e
    if not 0 < number < 65536:
        raise ConfigError(f"{where}: {value!r}: port out of range")
    return host, number


def _optional_int(sec: _Section, name: str, minimum: int) -> int | None:
    value = sec.take(name, int, None)
    if value is not None and value < minimum:
        raise sec.error(name, f"must be at least {minimum}")
    return value  # type: ignore[no-any-return]


def _expire(sec: _Section) -> int | str | None:
    value = sec.take("expire", (int, str), None)
    if isinstance(value, str) and value != "NEVER":
        raise sec.error("expire", 'a number of days or "NEVER"')
    if isinstance(value, int) and value < 0:
        raise sec.error("expire", "must be at least 0")
    return value  # type: ignore[no-any-return]


def _profile(sec: _Section, protocol: str) -> tuple[tuple[str, Any], ...]:
    """A listener's capability profile table, checked key by key."""
    allowed = PROFILE_KEYS[protocol]
    out: list[tuple[str, Any]] = []
    for name in list(sec.data):
        if name not in allowed:
            raise sec.error(name, f"unknown key (a {protocol} profile has: {', '.join(allowed)})")
        if name == "parsing":
            out.append((name, sec.choice(name, PARSING_MODES, "normal")))
        elif name == "sasl":
            mechs = [m.upper() for m in _strings(sec, name, [])]
            bad = [m for m in mechs if m not in SASL_NAMES]
            if bad:
                raise sec.error(
                    name, f"unknown mechanism {bad[0]} (known: {', '.join(SASL_NAMES)})"
                )
            out.append((name, tuple(mechs)))
        else:
            out.append((name, sec.take(name, bool, True)))
    sec.done()
    return tuple(out)


def _strings(sec: _Section, name: str, default: list[str]) -> list[str]:
    values = sec.take(name, list, default)
    if not all(isinstance(v, str) for v in values):
        raise sec.error(name, "expected a list of strings")
    return list(values)


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML file; None gives the embedded defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    return parse_config(data, str(p), p.resolve().parent)


def with_overrides(
    config: Config,
    *,
    state_dir: str | None = None,
    listeners: Iterable[Listener] = (),
    tls_cert: str | None = None,
    tls_key: str | None = None,
    allow_plaintext_from: Iterable[str] = (),
    hostname: str | None = None,
    default_domain: str | None = None,
    xtnd_xmit: bool = False,
    smarthost: str | None = None,
    smarthost_tls: str | None = None,
    smarthost_ca: str | None = None,
    smarthost_auth_file: str | None = None,
    workers: int | None = None,
    shutdown_grace: float | None = None,
) -> Config:
    """Apply command-line options on top of a file's (or the embedded) configuration.

    Listeners given on the command line replace the configured ones as a whole.
    """
    changes: dict[str, Any] = {}
    if state_dir is not None:
        changes["state_dir"] = Path(state_dir)
    cli_listeners = tuple(listeners)
    if cli_listeners:
        changes["listeners"] = cli_listeners
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("command line: give both --tls-cert and --tls-key, or neither")
    if tls_cert is not None and tls_key is not None:
        changes["tls_cert"] = Path(tls_cert)
        changes["tls_key"] = Path(tls_key)
    nets = parse_networks(allow_plaintext_from, "command line: --allow-plaintext-from")
    if nets:
        changes["allow_plaintext_from"] = config.allow_plaintext_from + nets
    if hostname is not None:
        changes["hostname"] = hostname
    if default_domain is not None:
        changes["default_domain"] = _domain(default_domain, "command line: --default-domain")
    if xtnd_xmit:
        # Every POP3 listener, whatever the file said for each.
        changes["pop3"] = replace(config.pop3, xtnd_xmit=True)
        changes["listeners"] = tuple(
            replace(x, xtnd_xmit=True) if x.protocol == "pop3" else x
            for x in changes.get("listeners", config.listeners)
        )
    relay: dict[str, Any] = {}
    if smarthost is not None:
        relay["smarthost"] = smarthost
    if smarthost_tls is not None:
        if smarthost_tls not in RELAY_TLS:
            raise ConfigError(
                f"command line: --smarthost-tls: must be one of {', '.join(RELAY_TLS)}"
            )
        relay["tls"] = smarthost_tls
    if smarthost_ca is not None:
        relay["ca_file"] = Path(smarthost_ca)
    if smarthost_auth_file is not None:
        relay["auth_file"] = Path(smarthost_auth_file)
    if relay:
        changes["relay"] = replace(config.relay, **relay)
    if workers is not None:
        if workers < 1:
            raise ConfigError("command line: --workers: must be at least 1")
        changes["workers"] = workers
    if shutdown_grace is not None:
        if shutdown_grace < 0:
            raise ConfigError("command line: --shutdown-grace: must be at least 0")
        changes["shutdown_grace"] = shutdown_grace
    return replace(config, **changes)


def read_auth_file(path: Path) -> tuple[str, str]:
    """The smarthost credential: one line ``user:password``."""
    try:
        line = path.read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read a 'user:password' line") from e
    user, sep, password = line.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{path}: expected one line 'user:password'")
    return user, password
