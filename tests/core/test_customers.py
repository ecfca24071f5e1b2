"""Customer lookup by address and AUTH name (pure)."""

from __future__ import annotations

import ipaddress

from mailguard.config.schema import Customer, User
from mailguard.core.customers import CustomerDirectory

ACME = Customer(
    "acme",
    (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/48")),
    users=(User("acme-relay", "$argon2id$x"),),
)
LISTS = Customer("lists", (ipaddress.ip_network("198.51.100.7/32"),))


def test_by_address() -> None:
    d = CustomerDirectory([ACME, LISTS])
    assert d.by_address("192.0.2.10") is ACME
    assert d.by_address("::ffff:192.0.2.10") is ACME
    assert d.by_address("2001:db8:0:1::5") is ACME
    assert d.by_address("198.51.100.7") is LISTS
    assert d.by_address("198.51.100.8") is None
    assert d.by_address("not an ip") is None


def test_users() -> None:
    d = CustomerDirectory([ACME, LISTS])
    assert d.has_users
    assert d.user("acme-relay") == (ACME, ACME.users[0])
    assert d.user("nobody") is None
    assert not CustomerDirectory([LISTS]).has_users


def test_in_networks_treats_mapped_addresses_as_ipv4() -> None:
    from mailguard.core.customers import in_networks

    nets = (ipaddress.ip_network("198.51.100.7/32"),)
    assert in_networks("198.51.100.7", nets)
    assert in_networks("::ffff:198.51.100.7", nets)
    assert not in_networks("198.51.100.8", nets)
    assert not in_networks("garbage", nets)
    assert not in_networks("198.51.100.7", ())
