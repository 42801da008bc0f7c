"""Defences against abusive clients, decided before any work is done for them.

- :class:`RateLimiter`: a token bucket per connection; frames over the rate are refused
  (``rate_limited``), and a client that keeps sending while refused is closed (1008).
- :class:`ConnectionCounter`: open sockets per client address (IPv6 per /64).
- :func:`client_address`: the client's address, taking ``X-Forwarded-For`` only from
  configured trusted proxies.
- :class:`OriginPolicy`: the handshake ``Origin`` check against cross-site WebSocket
  hijacking (browsers always send ``Origin``; other clients usually do not).

Everything here is pure (no I/O, time passed in), so it is unit-tested without servers.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shared.config import ConfigError, Settings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 clients are counted per /64: one subscriber usually gets a whole /64, so counting
# single addresses would let one host open a limit's worth of sockets per address.
IPV6_GROUP_PREFIX = 64
_DEFAULT_PORTS = {"http": "80", "https": "443"}


class Verdict(enum.Enum):
    """What to do with one incoming frame."""

    ALLOW = "allow"
    REFUSE = "refuse"  # answer rate_limited, keep the socket
    CLOSE = "close"  # sustained abuse: close with 1008


class RateLimiter:
    """Token bucket of one connection: ``rate`` frames per second, bursts up to ``burst``.

    Refused frames are counted; the count starts again after a quiet spell (no refused
    frame for ``max(1 s, 2 / rate)``), so a client that backs off when told is never
    closed, while one that keeps sending past the limit reaches ``close_after`` refusals
    and gets ``CLOSE``. ``rate`` 0 turns the limiter off.
    """

    __slots__ = ("_last_refused", "_quiet", "_refused", "_stamp", "_tokens", "burst", "close_after", "rate")  # fmt: skip

    def __init__(self, rate: float, burst: int, close_after: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.close_after = close_after
        self._tokens = float(burst)
        self._stamp = now
        self._refused = 0
        self._last_refused = float("-inf")
        self._quiet = max(1.0, 2.0 / rate) if rate > 0 else 0.0

    def check(self, now: float) -> Verdict:
        """Take one token for a frame received at ``now`` (monotonic seconds)."""
        if self.rate <= 0:
            return Verdict.ALLOW
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return Verdict.ALLOW
        if now - self._last_refused > self._quiet:
            self._refused = 0
        self._last_refused = now
        self._refused += 1
        return Verdict.CLOSE if self._refused >= self.close_after else Verdict.REFUSE

    @property
    def refused(self) -> int:
        """Refusals counted since the last quiet spell."""
        return self._refused


class ConnectionCounter:
    """Open connections per key (a client address group); ``limit`` 0 means no limit.

    Keys are dropped when their count returns to zero, so the table never holds more
    entries than there are open sockets.
    """

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        """Count one more connection for ``key``; False (nothing counted) when at the limit."""
        count = self._counts.get(key, 0)
        if self.limit and count >= self.limit:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: str) -> None:
        """Forget one connection of ``key`` (acquired before)."""
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def count(self, key: str) -> int:
        """Connections counted for ``key``."""
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``TRUSTED_PROXIES`` entries (addresses or CIDRs) as networks; ValueError on a bad one."""
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def parse_address(value: str) -> IPAddress | None:
    """An address from a peer or an ``X-Forwarded-For`` hop (``1.2.3.4:5``, ``[::1]:5``
    and IPv4-mapped IPv6 included), or None when it is not one."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        value = value[1:end] if end > 0 else ""
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]  # IPv4 with a port
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> str:
    """The client's address as this gateway should count and log it.

    ``X-Forwarded-For`` is believed only when the direct peer is a trusted proxy. Its
    hops are then read from the right (the hop the trusted proxy itself added) leftwards,
    skipping further trusted proxies; the first untrusted hop is the client. A client can
    prepend anything it likes to the header, which is why the walk never trusts what lies
    left of the first untrusted hop. A hop that is not an address ends the walk at the
    last trusted one.
    """
    address = parse_address(peer) if peer else None
    if address is None:
        return peer or "-"
    if not trusted or not _trusted(address, trusted):
        return str(address)
    hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        parsed = parse_address(hop)
        if parsed is None:
            break
        address = parsed
        if not _trusted(address, trusted):
            break
    return str(address)


def address_group(address: str) -> str:
    """The key an address is counted under: itself for IPv4, its /64 for IPv6."""
    parsed = parse_address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{parsed}/{IPV6_GROUP_PREFIX}", strict=False))
    return str(parsed) if parsed is not None else address


def _split_host_port(value: str) -> tuple[str, str | None]:
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, None
        rest = value[end + 1 :]
        return value[: end + 1], rest[1:] if rest.startswith(":") else None
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit():
        return host, port
    return value, None


def normalise_origin(value: str) -> str | None:
    """``scheme://host[:port]`` lower-cased, without a default port; None if not an origin.

    A browser's ``Origin`` header never has a path, user info, query or fragment, so any
    of those makes the value unusable (and it is then only matched literally, for
    ``null``).
    """
    scheme, sep, rest = value.strip().lower().partition("://")
    if not sep or not scheme.isascii() or not scheme.isalpha() or not rest:
        return None
    if any(mark in rest for mark in "/?#@\\ ") or not rest.isprintable():
        return None
    host, port = _split_host_port(rest)
    if not host or (port is not None and not 0 < int(port) < 65536):
        return None
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class OriginPolicy:
    """Which browser pages may open a socket.

    - No ``Origin`` header: not a browser (seed clients, mobile apps, servers): allowed.
      Cross-site WebSocket hijacking needs a victim's browser, and browsers always send
      ``Origin`` on a WebSocket handshake.
    - The page's own host (``Origin`` host and port equal the ``Host`` header): allowed,
      so the web client served by this gateway (or through a proxy that keeps ``Host``)
      works with no configuration.
    - Listed in ``ALLOWED_ORIGINS`` (exact ``scheme://host[:port]``, or ``null``): allowed.
      ``*`` allows every origin (do not, unless tokens are the only credential and you
      accept any site driving your users' sockets).
    - Anything else: refused with 403 before the upgrade.
    """

    __slots__ = ("allow_any", "allowed")

    def __init__(self, entries: Iterable[str]) -> None:
        allowed: set[str] = set()
        allow_any = False
        for entry in entries:
            entry = entry.strip()
            if entry == "*":
                allow_any = True
            elif entry.lower() == "null":
                allowed.add("null")
            else:
                # A trailing slash is a common way to write an origin in a config file.
                normalised = normalise_origin(entry.rstrip("/"))
                if normalised is None:
                    raise ValueError(f"{entry!r} is not an origin like https://chat.example.com")
                allowed.add(normalised)
        self.allowed = frozenset(allowed)
        self.allow_any = allow_any

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a handshake with this ``Origin`` (None: absent) and ``Host`` may proceed."""
        if origin is None or self.allow_any:
            return True
        normalised = normalise_origin(origin)
        if normalised is None:
            return origin.strip().lower() == "null" and "null" in self.allowed
        if normalised in self.allowed:
            return True
        return host is not None and _same_host(normalised, host)


def _same_host(origin: str, host_header: str) -> bool:
    scheme, _, origin_host = origin.partition("://")
    host, port = _split_host_port(host_header.strip().lower())
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return origin_host == host
    return origin_host == f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Guard:
    """The gateway's abuse settings, parsed once at start-up."""

    trusted_proxies: tuple[IPNetwork, ...]
    origins: OriginPolicy
    per_ip: ConnectionCounter
    rate: float
    burst: int
    close_after: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        """Parse the settings; a bad entry raises ConfigError naming its variable."""
        try:
            trusted = parse_networks(settings.trusted_proxies)
        except ValueError as exc:
            raise ConfigError(f"TRUSTED_PROXIES: {exc}") from None
        try:
            origins = OriginPolicy(settings.allowed_origins)
        except ValueError as exc:
            raise ConfigError(f"ALLOWED_ORIGINS: {exc}") from None
        return cls(
            trusted_proxies=trusted,
            origins=origins,
            per_ip=ConnectionCounter(settings.max_connections_per_ip),
            rate=settings.rate_limit_per_second,
            burst=settings.rate_limit_burst,
            close_after=settings.rate_limit_close_after,
        )

    def client_address(self, peer: str | None, forwarded_for: Sequence[str]) -> str:
        """See :func:`client_address`."""
        return client_address(peer, forwarded_for, self.trusted_proxies)

    def limiter(self, now: float) -> RateLimiter:
        """A fresh rate limiter for a new connection."""
        return RateLimiter(self.rate, self.burst, self.close_after, now)
