"""The brute-force brake behind the one credential checker, shared by POP3 and SMTP.

Modelled on Dovecot's anvil auth penalty: per client address, every failed login makes the
next failure reply wait longer (2 s doubling up to 15 s). A client that repeats the very same
wrong credentials (a mail client polling with a stale password) does not escalate. A success
clears the address. Waiting uses the reactor clock through :func:`deferred_failure`, so a
throttled session never blocks any other.

Failed logins are logged in one line format that fail2ban can match (one line, split
here only for width)::

    mailgate: auth failure: protocol=pop3 rhost=203.0.113.7 user=alice@example.com
    reason=bad-credentials

fail2ban filter (``[Definition]``)::

    failregex = ^.*mailgate: auth failure: protocol=\\S+ rhost=<HOST> user=\\S* reason=\\S+$
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.authlog import (  # re-exported: the throttle's public helpers
    FAILURE_FORMAT,
    MAX_LOGGED_LOGIN,
    deferred_failure,
    failure_line,
    log_field,
    peer_key,
)
from mailgate.interfaces import IAuthThrottle

__all__ = [
    "FAILURE_FORMAT",
    "MAX_LOGGED_LOGIN",
    "AuthThrottle",
    "deferred_failure",
    "failure_line",
    "log_field",
    "peer_key",
]

T = TypeVar("T")

#: How many distinct recent (login, secret) pairs per address count as "repeats".
RECENT_ATTEMPTS = 8

_log = Logger(namespace="mailgate.auth")


@dataclass
class _Peer:
    """What we remember of one client address."""

    failures: int = 0
    last: float = 0.0
    recent: OrderedDict[tuple[str, bytes], None] = field(default_factory=OrderedDict)


@implementer(IAuthThrottle)
class AuthThrottle:
    """Per-address failure delays (2 s doubling to 15 s), bounded in memory.

    ``exempt(peer_ip)`` marks trusted networks that are never delayed. An address not seen
    failing for ``forget_after`` seconds starts afresh; at most ``max_peers`` addresses are
    remembered (least recently failing forgotten first), so a spray of source addresses
    cannot grow memory without bound.
    """

    def __init__(
        self,
        clock: IReactorTime,
        exempt: Callable[[str], bool] = lambda _: False,
        first: float = 2.0,
        cap: float = 15.0,
        forget_after: float = 900.0,
        max_peers: int = 10000,
        logger: Logger | None = None,
    ) -> None:
        if first <= 0 or cap < first or forget_after <= 0 or max_peers <= 0:
            raise ValueError("throttle needs 0 < first <= cap, forget_after > 0, max_peers > 0")
        self._clock = clock
        self._exempt = exempt
        self.first = first
        self.cap = cap
        self.forget_after = forget_after
        self.max_peers = max_peers
        self._log = logger or _log
        self._key = os.urandom(32)  # per process: fingerprints mean nothing elsewhere
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    def __len__(self) -> int:
        """How many addresses are remembered (for tests and metrics)."""
        return len(self._peers)

    def fingerprint(self, secret: bytes) -> bytes:
        return hashlib.blake2b(secret, key=self._key, digest_size=16).digest()

    def _lookup(self, ip: str) -> _Peer | None:
        entry = self._peers.get(ip)
        if entry is not None and self._clock.seconds() - entry.last >= self.forget_after:
            del self._peers[ip]
            return None
        return entry

    def delay_for(self, peer_ip: str) -> float:
        ip = peer_key(peer_ip)
        if self._exempt(ip):
            return 0.0
        entry = self._lookup(ip)
        if entry is None or entry.failures == 0:
            return 0.0
        return float(min(self.cap, self.first * 2.0 ** (entry.failures - 1)))

    def failed(self, peer_ip: str, login: str, secret_fingerprint: bytes) -> None:
        ip = peer_key(peer_ip)
        if self._exempt(ip):
            return
        entry = self._lookup(ip)
        if entry is None:
            entry = self._peers[ip] = _Peer()
        attempt = (login, secret_fingerprint)
        if attempt in entry.recent:
            entry.recent.move_to_end(attempt)  # the same wrong password again: no escalation
        else:
            entry.recent[attempt] = None
            if len(entry.recent) > RECENT_ATTEMPTS:
                entry.recent.popitem(last=False)
            entry.failures += 1
        entry.last = self._clock.seconds()
        self._peers.move_to_end(ip)
        self._evict()

    def _evict(self) -> None:
        now = self._clock.seconds()
        while self._peers:
            ip, oldest = next(iter(self._peers.items()))
            if len(self._peers) > self.max_peers or now - oldest.last >= self.forget_after:
                del self._peers[ip]
            else:
                break

    def succeeded(self, peer_ip: str) -> None:
        self._peers.pop(peer_key(peer_ip), None)

    def log_failure(self, protocol: str, peer_ip: str, login: str, reason: str) -> None:
        self._log.warn("{line}", line=failure_line(protocol, peer_ip, login, reason))
