"""Next-hop selection for a recipient domain: MX by preference, else the domain itself.

Hosts of equal preference are tried in random order (RFC 5321 5.1: "the SMTP client SHOULD
pick one at random to spread the load"); the random source is injectable for tests.

The resolver is injected (anything with twisted.names' ``lookupMailExchange``), so tests
pass a fake. RFC 5321 5.1: no MX records means the domain's own A/AAAA records are used;
RFC 7505: a single MX of "." (a null MX) means the domain accepts no mail at all.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.names import dns
from twisted.names.error import DNSNameError

from mailgate.errors import DeliveryError

__all__ = ["MXResolver", "mail_hosts", "order_mx"]


class MXResolver(Protocol):
    """The part of :class:`twisted.names.client.Resolver` we use."""

    def lookupMailExchange(
        self, name: str, timeout: Sequence[int] | None = None
    ) -> Deferred[tuple[list[Any], list[Any], list[Any]]]: ...


def _host_name(name: object) -> str:
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
    return text.rstrip(".").lower()


def order_mx(
    records: Sequence[tuple[int, str]], domain: str, rng: random.Random | None = None
) -> list[str]:
    """Hosts to try: best preference first, equal preferences shuffled, duplicates removed
    (a host listed twice keeps its best place).

    No records: the domain itself (implicit MX). Only a null MX: a permanent failure.
    """
    if not records:
        return [domain]
    if all(_host_name(name) == "" for _, name in records):
        raise DeliveryError(
            f"5.1.10 domain {domain} does not accept mail (null MX)", permanent=True
        )
    by_preference: dict[int, list[str]] = {}
    for preference, name in records:
        host = _host_name(name)
        if host:
            by_preference.setdefault(preference, []).append(host)
    hosts: list[str] = []
    for preference in sorted(by_preference):
        group = list(dict.fromkeys(h for h in by_preference[preference] if h not in hosts))
        (rng or _random).shuffle(group)
        hosts.extend(group)
    return hosts


_random = random.Random()


@inlineCallbacks
def mail_hosts(resolver: MXResolver, domain: str, rng: random.Random | None = None) -> Any:
    """Deferred list of host names (or address literals) to try for ``domain``.

    Fails with DeliveryError: permanent when the domain does not exist or has a null MX,
    temporary when DNS could not answer.
    """
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        return [literal[5:] if literal.lower().startswith("ipv6:") else literal]
    try:
        answers, _authority, _additional = yield resolver.lookupMailExchange(domain)
    except DNSNameError:
        raise DeliveryError(f"5.1.2 domain {domain} not found in DNS", permanent=True) from None
    except Exception:
        raise DeliveryError(f"4.4.3 DNS lookup for {domain} failed", permanent=False) from None
    records = [
        (rr.payload.preference, rr.payload.name)
        for rr in answers
        if getattr(rr, "type", None) == dns.MX
    ]
    return order_mx(records, domain, rng)
