"""Who a client is: the customer owning a client address or an SMTP AUTH identity.

Responsible for: mapping a TCP peer address (longest matching network wins) or an AUTH user
name to a configured customer.  Networks of different customers never overlap (the config
loader refuses that), so the answer is unique.
Must never: verify passwords (the door does, off the event loop) or touch sockets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from mailguard.config.schema import Customer, IPAddress, IPNetwork, User


def client_address(address: str | IPAddress) -> IPAddress | None:
    """The address to match against networks (IPv4-mapped IPv6 as IPv4); None if unparseable."""
    if isinstance(address, str):
        return _parsed_address(address)
    return _unmapped(address)


@lru_cache(maxsize=4096)
def _parsed_address(address: str) -> IPAddress | None:
    # Cached: the doors ask for the same few client addresses for every transaction, and
    # ipaddress.ip_address costs several microseconds per call.
    try:
        return _unmapped(ipaddress.ip_address(address))
    except ValueError:
        return None


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str | IPAddress, networks: Sequence[IPNetwork]) -> bool:
    """True when ``address`` (see ``client_address``) lies in one of ``networks``."""
    if not networks:  # most customers have no bulk networks: no address to parse
        return False
    ip = client_address(address)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


class CustomerDirectory:
    """Read-only lookups over the configured customers."""

    def __init__(self, customers: Sequence[Customer]) -> None:
        nets: list[tuple[IPNetwork, Customer]] = [(net, c) for c in customers for net in c.networks]
        nets.sort(key=lambda item: item[0].prefixlen, reverse=True)
        self._networks = nets
        self._users: dict[str, tuple[Customer, User]] = {
            u.name: (c, u) for c in customers for u in c.users
        }

    @property
    def has_users(self) -> bool:
        """True when at least one customer can log in with SMTP AUTH."""
        return bool(self._users)

    def by_address(self, address: str | IPAddress) -> Customer | None:
        """The customer whose networks contain ``address``, or None (unparseable: None)."""
        ip = client_address(address)
        if ip is None:
            return None
        for net, customer in self._networks:
            if ip.version == net.version and ip in net:
                return customer
        return None

    def user(self, name: str) -> tuple[Customer, User] | None:
        """The customer and user entry for an AUTH user name, or None."""
        return self._users.get(name)
