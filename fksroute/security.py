"""The door: client address, allow list, rate limit and the shared secret."""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from fksroute.signing import SIGNATURE_HEADER as SIGNED_BY
from fksroute.signing import sign

PASSPHRASE = "passphrase"
SIGNATURE_HEADER = SIGNED_BY.lower()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=4096)  # the same few peers send alert after alert
def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    # An IPv4 client seen through a dual-stack socket arrives as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _within(address: Any, networks: Sequence[Network]) -> bool:
    return address is not None and any(address.version == n.version and address in n for n in networks)


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: Sequence[Network]) -> str | None:
    """The client's address: X-Forwarded-For is believed only when the peer is a trusted proxy,
    and then only up to the first hop that is not itself a trusted proxy."""
    if not forwarded_for:
        return _peer_text(peer)
    address = _address(peer)
    if address is None or not _within(address, trusted_proxies):
        return _text(address)
    for hop in reversed([h for h in forwarded_for.split(",") if h.strip()]):
        hop_address = _address(hop)
        if hop_address is None:
            return _text(address)  # a forged or garbled hop: stop at the last one we could trust
        address = hop_address
        if not _within(address, trusted_proxies):
            break
    return _text(address)


@lru_cache(maxsize=4096)
def _peer_text(peer: str | None) -> str | None:
    """The peer's address as text (::ffff:a.b.c.d as a.b.c.d): one look-up for the common request."""
    return _text(_address(peer))


@lru_cache(maxsize=4096)
def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str | None:
    return str(address) if address is not None else None


def address_allowed(address: str | None, allow: Sequence[Network]) -> bool:
    """An empty allow list admits everyone; otherwise the address must be inside one entry."""
    return not allow or _within(_address(address), allow)


class RateLimiter:
    """A token bucket per source address: `burst` at once, refilled at `per_minute`."""

    def __init__(self, per_minute: float, burst: int, max_sources: int = 10000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, source: str, now: float | None = None) -> float:
        """0 when admitted, else the seconds to wait before the next token."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)  # forget the longest-idle source
        return wait


def _same(given: Any, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


class Credentials(NamedTuple):  # made once per request: a named tuple is built the fastest
    """What a request offered as proof: the signature header, the passphrase, the path token."""

    signature: str | None = None
    passphrase: Any = None
    path_token: str | None = None


def authenticate(body: bytes, offered: Credentials, secret: str | None, path_token: str | None) -> bool:
    """True when no secret is configured, or one of the offered proofs is right (constant time)."""
    if secret is None and path_token is None:
        return True
    if path_token is not None and offered.path_token is not None and _same(offered.path_token, path_token):
        return True
    if secret is None:
        return False
    if offered.signature is not None:
        return _same(offered.signature.strip().lower(), sign(body, secret))
    return offered.passphrase is not None and _same(offered.passphrase, secret)


def strip_secret(alert: Mapping[str, Any]) -> dict[str, Any]:
    """The alert without its passphrase: what is logged, journaled and rendered (the alert
    itself when it has none)."""
    if PASSPHRASE not in alert:
        return alert  # type: ignore[return-value]
    return {k: v for k, v in alert.items() if k != PASSPHRASE}


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every occurrence of each secret replaced by `***`."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "***")
    return text
