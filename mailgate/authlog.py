"""The failed-login log line and the delayed failure reply, shared by both protocols.

Neutral ground between the protocols and :mod:`mailgate.auth.throttle`: pure formatting and
one clock-driven Deferred, so POP3 and SMTP log failures in exactly one fail2ban-friendly
format without importing the auth layer.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

T = TypeVar("T")

#: The one line format of a failed login (see the module docstring for the failregex).
FAILURE_FORMAT = (
    "mailgate: auth failure: protocol={protocol} rhost={rhost} user={user} reason={reason}"
)
#: Attacker-chosen login names are cut to this many characters in the log.
MAX_LOGGED_LOGIN = 128


@functools.lru_cache(maxsize=4096)
def peer_key(host: str) -> str:
    """One key per client address: IPv4-mapped IPv6 and scoped addresses normalised
    (memoized: the same few peers come back for every connection and message)."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def log_field(value: str, limit: int = MAX_LOGGED_LOGIN) -> str:
    """Make an untrusted value one harmless token: no spaces, controls or non-ASCII.

    Anything outside 0x21-0x7E (and the backslash) becomes ``\\xNN`` so a login such as
    ``"x rhost=198.51.100.1"`` cannot forge a second ``rhost=`` for fail2ban.
    """
    out: list[str] = []
    for ch in value[:limit]:
        code = ord(ch)
        if 0x21 <= code <= 0x7E and ch != "\\":
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    if len(value) > limit:
        out.append("...")
    return "".join(out) or "-"


def failure_line(protocol: str, peer_ip: str, login: str, reason: str) -> str:
    """The fail2ban line for one failed login (pure, for tests and other log sinks)."""
    return FAILURE_FORMAT.format(
        protocol=log_field(protocol, 16),
        rhost=log_field(peer_key(peer_ip), 64),
        user=log_field(login),
        reason=log_field(reason, 32),
    )


def deferred_failure(clock: IReactorTime, delay: float, value: T) -> Deferred[T]:
    """A Deferred firing with ``value`` after ``delay`` seconds on ``clock``.

    Cancelling it (e.g. when the client hangs up) cancels the timer. A delay of zero or less
    fires at once.
    """
    if delay <= 0:
        return succeed(value)
    call: list[IDelayedCall] = []

    def cancel(d: Deferred[T]) -> None:
        if call and call[0].active():
            call[0].cancel()

    d: Deferred[T] = Deferred(cancel)
    call.append(clock.callLater(delay, d.callback, value))
    return d
