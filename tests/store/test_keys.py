"""Key names: hash tags, scopes, canonical client addresses and escaping."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from mailguard.store.keys import Keys, canonical_client


def test_auth_failures_key_is_tagged_by_client_address() -> None:
    assert Keys().auth_failures("192.0.2.1") == "mg:{192.0.2.1}:client:auth_failures"
    assert Keys("x").auth_failures("2001:db8::1") == "x:{2001:db8::1}:client:auth_failures"


def test_customer_keys_share_the_customer_hash_slot() -> None:
    keys = Keys()
    assert keys.customer_key("acme", "rcpt", "2024-05-01") == "mg:{acme}:cust:rcpt:2024-05-01"
    a = keys.customer_key("acme", "rcpt", "x@example.com")
    b = keys.customer_key("acme", "campaign", "abc", "def")
    assert key_slot(a.encode()) == key_slot(b.encode()) == key_slot(b"acme")


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
    ],
)
def test_client_addresses_are_canonical(given: str, canonical: str) -> None:
    assert canonical_client(given) == canonical
    assert Keys().auth_failures(given) == Keys().auth_failures(canonical)


@pytest.mark.parametrize("bad", ["", "example.com", "192.0.2.1}x", "1.2.3.4/24"])
def test_client_must_be_an_ip_address(bad: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        Keys().auth_failures(bad)


def test_customer_and_client_namespaces_are_disjoint() -> None:
    keys = Keys()
    assert keys.customer_key("192.0.2.1", "auth_failures") != keys.auth_failures("192.0.2.1")


def test_values_cannot_forge_tags_or_segments() -> None:
    keys = Keys()
    # Braces in a customer id cannot move the hash tag; the tag is the whole (escaped) id.
    evil = keys.customer_key("a}b{c", "k")
    assert evil == "mg:{a%7Db%7Bc}:cust:k"
    assert key_slot(evil.encode()) == key_slot(b"a%7Db%7Bc")
    # ':' is escaped outside the tag, so segment boundaries are unambiguous.
    assert keys.customer_key("a", "x:y") != keys.customer_key("a", "x", "y")
    assert keys.customer_key("a", "k", "50%") == "mg:{a}:cust:k:50%25"
    assert keys.customer_key("a", "k", "sp ace\n") == "mg:{a}:cust:k:sp%20ace%0A"
    assert keys.customer_key("a", "k", "\u00e9") == "mg:{a}:cust:k:\u00e9"


@pytest.mark.parametrize("prefix", ["", "m{g", "mg}", "a b"])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid key prefix"):
        Keys(prefix)


def test_empty_customer_or_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        Keys().customer_key("", "k")
    with pytest.raises(ValueError):
        Keys().customer_key("a", "")
