"""Redis key names: the one module that builds them.

Responsible for: every key name mailguard writes, so the layout can be read (and changed) in one
place.  Must never: talk to Redis or decide policy.

Layout::

    {prefix}:{{{customer}}}:cust:{kind}[:{part}...]   state of one hosting customer
    {prefix}:{{{client}}}:client:{kind}[:{part}...]    state of one client IP address

for example ``mg:{acme}:cust:rcpt:2024-05-01`` and ``mg:{192.0.2.1}:client:auth_failures``.

* The ``{...}`` segment is a Redis Cluster *hash tag*: all keys of one customer (or of one client
  address) hash to the same slot, so a Lua script may touch several of them on Redis Cluster.
  Per-client-address state (such as SMTP AUTH failures, counted before we know the customer) is
  tagged with the client address, not a customer.
* The literal scope segment after the tag (``cust`` / ``client``) keeps the two namespaces
  disjoint even if a customer id looks like an IP address.
* Client addresses are canonicalised with :mod:`ipaddress` (``2001:DB8:0::1`` and ``2001:db8::1``
  are one client; an IPv4-mapped IPv6 address is the IPv4 address).
* Variable segments are escaped so no value can forge another key: ``%``, the hash-tag braces,
  control characters and whitespace are percent-encoded everywhere, and the separator ``:`` too
  outside the tag (``customer_key("a", "x:y")`` differs from ``customer_key("a", "x", "y")``).
"""

from __future__ import annotations

import ipaddress
import re

DEFAULT_PREFIX = "mg"

CUSTOMER_SCOPE = "cust"
CLIENT_SCOPE = "client"

AUTH_FAILURES = "auth_failures"

# Escape '%' first (it is the escape character), braces (hash tags), controls and whitespace.
_TAG_UNSAFE = re.compile(r"[%{}\x00-\x20\x7f]")
# In the segments after the tag the separator ':' is escaped as well.
_PART_UNSAFE = re.compile(r"[%{}:\x00-\x20\x7f]")
_PREFIX_OK = re.compile(r"^[A-Za-z0-9_.\-:]+$")


def _escape(pattern: re.Pattern[str], value: str) -> str:
    return pattern.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)


def canonical_client(client: str) -> str:
    """The canonical text of an IP address string; ``ValueError`` if it is not one."""
    try:
        address = ipaddress.ip_address(client.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ValueError(f"not an IP address: {client!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class Keys:
    """Builds the key names under one prefix (``[store] key_prefix``, ``mg`` by default)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not _PREFIX_OK.match(prefix):
            raise ValueError(
                f"invalid key prefix {prefix!r}: use letters, digits and '_.-:' only"
                " (braces would break the Redis Cluster hash tag)"
            )
        self.prefix = prefix

    def customer_key(self, customer: str, kind: str, *parts: str) -> str:
        """A key of ``customer`` (in its hash tag): ``{prefix}:{customer}:cust:{kind}:{parts}``."""
        if not customer:
            raise ValueError("customer id must not be empty")
        return self._build(_escape(_TAG_UNSAFE, customer), CUSTOMER_SCOPE, kind, parts)

    def client_key(self, client: str, kind: str, *parts: str) -> str:
        """A key of one client IP address: ``{prefix}:{address}:client:{kind}:{parts}``."""
        return self._build(canonical_client(client), CLIENT_SCOPE, kind, parts)

    def auth_failures(self, client: str) -> str:
        """Sliding-window log (sorted set) of failed SMTP AUTH attempts from ``client``."""
        return self.client_key(client, AUTH_FAILURES)

    def _build(self, tag: str, scope: str, kind: str, parts: tuple[str, ...]) -> str:
        if not kind:
            raise ValueError("key kind must not be empty")
        segments = [_escape(_PART_UNSAFE, s) for s in (kind, *parts)]
        return ":".join([self.prefix, "{" + tag + "}", scope, *segments])
