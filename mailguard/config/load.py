"""Load and validate the TOML configuration into the frozen schema (``mailguard.config.schema``).

Responsible for: reading one TOML file, checking every key and value against the tables below
(unknown keys, types, ranges, formats and the rules that span keys: TLS certificate and key
together, unique customer ids and user names, no network shared by two customers) and either
returning a complete ``Config`` or raising one ``ConfigError`` that lists *every* problem, each
as one line naming the file and the key path (``customer[2].networks[0]``, 0-based).
Must never: let a traceback or a library's message stand in for a user-facing error, stop at the
first problem, return a partly validated ``Config``, echo a password hash or a store URL (they
may hold secrets), or open anything but the configuration file (certificates, CA files and the
state directory are the caller's).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from mailguard.config.schema import (
    LIMIT_KEYS,
    CampaignLimits,
    Config,
    Customer,
    IPNetwork,
    ListenAddress,
    LogConfig,
    MilterConfig,
    PolicyConfig,
    Reply,
    ServerConfig,
    StoreConfig,
    Templates,
    UpstreamConfig,
    User,
)
from mailguard.config.units import parse_duration, parse_size, quote

__all__ = [
    "STATE_DIR_ENV",
    "ConfigError",
    "load_config",
    "parse_config",
    "reload_config",
    "startup_config",
]

STATE_DIR_ENV: Final = "MAILGUARD_STATE_DIR"


class ConfigError(Exception):
    """The configuration is unusable; ``errors`` holds one user-facing line per problem."""

    def __init__(self, errors: Sequence[str], source: Path | None) -> None:
        self.errors: list[str] = list(errors)
        self.source: Path | None = source
        super().__init__("\n".join(self.errors))


class _Errors:
    """Collects error lines, each ``config error: <file>: <key path>: <message>``."""

    def __init__(self, source: Path | None) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        parts = [str(self.source)] if self.source is not None else []
        parts += [where] if where else []
        self.lines.append(": ".join(["config error", *parts, message]))

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines, self.source)


class _Invalid:
    """Marker for a value that failed validation (its error is already recorded)."""


_INVALID: Final = _Invalid()

# A check validates the raw TOML value found at a key path, records its errors and returns the
# schema value or _INVALID.  A leaf turns a raw value into a schema value or raises ValueError.
Check = Callable[[object, str, _Errors], Any]
Leaf = Callable[[object], Any]


def _join(path: str, key: str) -> str:
    """``path.key``; a key that is not a TOML bare key is quoted, as it is in TOML."""
    shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else quote(key)
    return f"{path}.{shown}" if path else shown


_TOML_TYPES: Final[tuple[tuple[type, str], ...]] = (
    (bool, "a boolean"),  # before int: bool is an int subclass
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def _type_name(value: object) -> str:
    for kind, name in _TOML_TYPES:
        if isinstance(value, kind):
            return name
    return "a date/time"


def _wrong_type(expected: str, value: object) -> ValueError:
    return ValueError(f"must be {expected}, got {_type_name(value)}")


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {quote(close[0])}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Leaves: one raw value -> one schema value, or ValueError with the user-facing message.


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _wrong_type("a string", value)
    if not value:
        raise ValueError("must not be empty")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type("a boolean (true or false)", value)
    return value


def _integer(low: int, high: int = 2**31 - 1, why: str = "") -> Leaf:
    def leaf(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type("an integer", value)
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range {low}-{high}{why}")
        return value

    return leaf


def _duration(minimum: float = 0.0, *, allow_minimum: bool = False) -> Leaf:
    def leaf(value: object) -> float:
        if isinstance(value, str):
            seconds = parse_duration(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{value} is not a duration: must be a finite number >= 0")
            seconds = float(value)
        else:
            raise _wrong_type('a duration such as "90s", "15m" or "24h"', value)
        if seconds < minimum or (seconds == minimum and not allow_minimum):
            relation = "at least" if allow_minimum else "longer than"
            raise ValueError(f"{quote(value)} is too short: must be {relation} {minimum:g}s")
        return seconds

    return leaf


def _size(minimum: int = 1) -> Leaf:
    def leaf(value: object) -> int:
        if isinstance(value, str):
            size = parse_size(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"{value} is not a size: must be >= 0")
            size = value
        else:
            raise _wrong_type('a size such as "50MB", "10KiB" or 512', value)
        if size < minimum:
            raise ValueError(f"{quote(value)} is too small: must be at least {minimum} bytes")
        return size

    return leaf


def _choice(*allowed: str, fold: Callable[[str], str] = str) -> Leaf:
    def leaf(value: object) -> str:
        text = fold(_string(value))
        if text not in allowed:
            options = ", ".join(quote(a) for a in allowed)
            raise ValueError(f"{quote(value)} is not one of {options}{_suggest(text, allowed)}")
        return text

    return leaf


def _workers(value: object) -> int:
    """A process count, or "auto" (stored as 0: one per CPU, resolved when the gate starts)."""
    if value == "auto":
        return 0
    if isinstance(value, str):
        raise ValueError(f'{quote(value)} is not a number of processes: give 1-256 or "auto"')
    count: int = _integer(1, 256)(value)
    return count


def _path(value: object) -> Path:
    return Path(_string(value))


_LABEL: Final = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _hostname(value: object) -> str:
    text = _string(value)
    last = text.rstrip(".").rpartition(".")[2]
    if not _HOSTNAME.fullmatch(text) or len(text) > 253 or last.isdigit():
        raise ValueError(
            f"{quote(text)} is not a valid host name (letters, digits and '-' in dot-separated "
            "labels of at most 63 characters)"
        )
    return text


def _host(value: object) -> str:
    """A host name or an IP address (IPv6 without brackets)."""
    text = _string(value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        return _hostname(text)
    except ValueError:
        raise ValueError(f"{quote(text)} is neither a host name nor an IP address") from None


def _domain(value: object) -> str:
    text = _string(value).rstrip(".").lower()
    try:
        ascii_text = text.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{quote(value)} is not a valid domain name") from None
    try:
        return _hostname(ascii_text)
    except ValueError:
        raise ValueError(f"{quote(value)} is not a valid domain name") from None


def _network(value: object) -> IPNetwork:
    text = _string(value)
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{quote(text)} is not an IP network") from None
        raise ValueError(
            f"{quote(text)} has host bits set (did you mean {quote(str(loose))}?)"
        ) from None
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is not None:  # clients are matched as IPv4, so this network would never match
        plain = ipaddress.ip_network(f"{mapped}/{max(network.prefixlen - 96, 0)}", strict=False)
        raise ValueError(
            f"{quote(text)} is an IPv4-mapped IPv6 network; write it as IPv4 ({quote(str(plain))})"
        )
    return network


_LISTEN_HELP: Final = 'expected "host:port", e.g. "127.0.0.1:10025" or "[::1]:10025"'


def _listen_address(value: object) -> ListenAddress:
    text = _string(value)
    bracketed = re.fullmatch(r"\[([^\[\]]*)\]:([^:]*)", text)
    if bracketed:
        host, port_text = bracketed.groups()
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(
                f"{quote(text)}: only an IPv6 address goes in brackets, got {quote(host)}"
            ) from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"{quote(text)} is not a listen address: {_LISTEN_HELP}")
        if ":" in host:
            raise ValueError(f'{quote(text)}: put an IPv6 address in brackets, e.g. "[::1]:10025"')
        if not host:
            raise ValueError(
                f'{quote(text)} has no host: use "0.0.0.0:{port_text}" or "[::]:{port_text}" '
                "to listen on every address"
            )
        try:
            host = _host(host)
        except ValueError:
            raise ValueError(
                f"{quote(text)}: {quote(host)} is neither a host name nor an IP address"
            ) from None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{quote(text)}: port {quote(port_text)} is not a number 1-65535")
    return ListenAddress(host, int(port_text))


_REPLY_HELP: Final = 'expected "<code> <enhanced code> <text>", e.g. "451 4.3.0 Try again later"'


def _failure_reply(value: object) -> Reply:
    """A temporary-failure reply written as ``"451 4.3.0 Some text"``."""
    text = _string(value)
    parts = text.split(" ", 2)
    if len(parts) < 3 or not parts[2].strip():
        raise ValueError(f"{quote(text)} is not a reply: {_REPLY_HELP}")
    code, enhanced, message = parts
    if not re.fullmatch(r"[2-5][0-5][0-9]", code):
        raise ValueError(f"{quote(text)}: {quote(code)} is not an SMTP reply code (e.g. 451)")
    if not re.fullmatch(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", enhanced):
        raise ValueError(
            f"{quote(text)}: {quote(enhanced)} is not an enhanced status code "
            "(class.subject.detail, e.g. 4.3.0)"
        )
    if code[0] != enhanced[0]:
        raise ValueError(
            f"{quote(text)}: reply code {code} and enhanced code {enhanced} disagree in class "
            f"({code[0]}xx vs {enhanced[0]}.x.x)"
        )
    if code[0] != "4":
        raise ValueError(
            f"{quote(text)}: a failure reply must be temporary (4xx with 4.x.x), "
            f'got {code}; e.g. "451 4.3.0 Try again later"'
        )
    if not (message.isascii() and message.isprintable()):
        raise ValueError(f"{quote(text)}: the reply text must be printable ASCII on one line")
    return Reply(int(code), enhanced, message)


_CUSTOMER_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _customer_id(value: object) -> str:
    text = _string(value)
    if not _CUSTOMER_ID.fullmatch(text):
        raise ValueError(
            f"{quote(text)} is not a valid customer id: 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return text


def _user_name(value: object) -> str:
    text = _string(value)
    if len(text) > 255 or not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError(
            f"{quote(text)} is not a valid user name: at most 255 printable characters, no spaces"
        )
    return text


_ARGON2: Final = re.compile(
    r"\$argon2(?:id|i|d)\$v=[0-9]+\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
)


def _password_hash(value: object) -> str:
    if not isinstance(value, str):
        raise _wrong_type("a string", value)
    if not _ARGON2.fullmatch(value):  # never echo the value: it may be a plain password
        raise ValueError(
            "is not an argon2 PHC string such as "
            '"$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>" (value not shown); make one with: '
            "python3 -c 'import argon2, getpass; "
            "print(argon2.PasswordHasher().hash(getpass.getpass()))'"
        )
    return value


_STORE_SCHEMES: Final = ("redis", "rediss", "unix")


def _store_url(value: object) -> str:
    text = _string(value)
    if text == "embedded":
        return text
    help_ = 'expected "embedded" or a redis://, rediss:// or unix:// URL'
    try:  # never echo the URL: it may hold a password
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise ValueError(f"is not a valid URL: {help_}") from None
    if parts.scheme not in _STORE_SCHEMES:
        raise ValueError(f"has unsupported scheme {quote(parts.scheme)}: {help_}")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError('a unix:// URL needs a socket path, e.g. "unix:///run/redis.sock"')
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f'a {parts.scheme}:// URL needs a host, e.g. "redis://127.0.0.1:6379/0"')
    return text


def _key_prefix(value: object) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", text):
        raise ValueError(
            f"{quote(text)} is not a valid key prefix: 1-64 characters from A-Z a-z 0-9 _ . : -"
        )
    return text


# ---------------------------------------------------------------------------------------------
# Checks: leaves at a key path, arrays and tables.


def _leaf(leaf: Leaf) -> Check:
    def check(value: object, path: str, errors: _Errors) -> Any:
        try:
            return leaf(value)
        except ValueError as error:
            errors.add(path, str(error))
            return _INVALID

    return check


def _array(
    item: Check,
    *,
    unique: bool = True,
    single: bool = False,
    empty: bool = True,
    expected: str = "an array",
) -> Check:
    """An array of ``item``; _INVALID if any item is.  ``single``: a lone value is one item."""

    def check(value: object, path: str, errors: _Errors) -> Any:
        if single and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list):
            errors.add(path, str(_wrong_type(expected, value)))
            return _INVALID
        if not value and not empty:
            errors.add(path, "must not be empty")
            return _INVALID
        items = [item(raw, f"{path}[{i}]", errors) for i, raw in enumerate(value)]
        if any(result is _INVALID for result in items):
            return _INVALID
        if unique:
            first: dict[object, int] = {}
            for i, result in enumerate(items):
                if result in first:
                    errors.add(f"{path}[{i}]", f"{quote(value[i])} repeats {path}[{first[result]}]")
                first.setdefault(result, i)
        return tuple(items)

    return check


# A rule spanning several keys of one table: (raw table, validated values, its path, errors).
CrossCheck = Callable[[Mapping[str, object], dict[str, Any], str, _Errors], None]


@dataclasses.dataclass(frozen=True, slots=True)
class _Table:
    """A TOML table validated key by key and built into the schema dataclass ``build``.

    ``keys`` maps each TOML key to its check; ``rename`` maps a TOML key to the field name where
    they differ.  The built value is best-effort (an invalid key keeps its default) so that rules
    spanning tables can still run; the errors recorded make sure it is never returned.
    """

    build: Callable[..., Any]
    keys: Mapping[str, Check]
    required: tuple[str, ...] = ()
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cross: tuple[CrossCheck, ...] = ()

    def __call__(self, value: object, path: str, errors: _Errors) -> Any:
        if not isinstance(value, dict):
            errors.add(path, str(_wrong_type("a table", value)))
            return _INVALID
        values: dict[str, Any] = {}
        for key, raw in value.items():
            check = self.keys.get(key)
            if check is None:
                kind = "table" if isinstance(raw, dict) else "key"
                errors.add(_join(path, key), f"unknown {kind}{_suggest(key, list(self.keys))}")
                continue
            result = check(raw, _join(path, key), errors)
            if result is not _INVALID:
                values[key] = result
        missing = [key for key in self.required if key not in value]
        for key in missing:
            errors.add(path, f"missing required key {quote(key)}")
        if any(key not in values for key in self.required):
            return _INVALID
        for cross in self.cross:
            cross(value, values, path, errors)
        return self.build(**{self.rename.get(key, key): v for key, v in values.items()})


# ---------------------------------------------------------------------------------------------
# Rules spanning keys.


def _tls_pair(
    raw: Mapping[str, object], values: dict[str, Any], path: str, errors: _Errors
) -> None:
    if ("tls_certificate" in raw) != ("tls_key" in raw):
        given, missing = ("tls_certificate", "tls_key")[:: 1 if "tls_certificate" in raw else -1]
        errors.add(
            _join(path, given), f"needs {_join(path, missing)} as well (give both or neither)"
        )


def _proxy_trust(
    raw: Mapping[str, object], values: dict[str, Any], path: str, errors: _Errors
) -> None:
    if values.get("proxy_protocol") and not raw.get("proxy_trusted_networks"):
        errors.add(
            _join(path, "proxy_trusted_networks"),
            "must list the proxies' networks when proxy_protocol = true",
        )


def _per_client_limit(
    raw: Mapping[str, object], values: dict[str, Any], path: str, errors: _Errors
) -> None:
    total = values.get("max_connections", ServerConfig().max_connections)
    per_client = values.get("max_connections_per_client")
    if per_client is not None and per_client > total:
        errors.add(
            _join(path, "max_connections_per_client"),
            f"{per_client} is more than max_connections ({total})",
        )


def _customer_rules(
    raw: Mapping[str, object], values: dict[str, Any], path: str, errors: _Errors
) -> None:
    """Unique customer ids and user names; no network shared by two customers."""
    customers = raw.get("customer")
    if not isinstance(customers, list):
        return
    built = [(i, c) for i, c in enumerate(values.get("customer", ())) if isinstance(c, Customer)]
    ids: dict[str, int] = {}
    users: dict[str, tuple[int, int]] = {}
    for i, customer in built:
        if customer.id in ids:
            errors.add(
                f"customer[{i}].id",
                f"duplicate customer id {quote(customer.id)} (also customer[{ids[customer.id]}])",
            )
        ids.setdefault(customer.id, i)
        for j, user in enumerate(customer.users):
            if user.name in users:
                ci, uj = users[user.name]
                errors.add(
                    f"customer[{i}].user[{j}].name",
                    f"duplicate user name {quote(user.name)} (also customer[{ci}].user[{uj}])",
                )
            users.setdefault(user.name, (i, j))
    _network_overlaps(built, errors)


def _network_overlaps(customers: Sequence[tuple[int, Customer]], errors: _Errors) -> None:
    """Report every network of one customer that overlaps a network of another.

    A sweep in address order: CIDR blocks either nest or are disjoint, so the blocks still open
    when a block starts form a chain that all enclose it.
    """
    entries = sorted(
        (net.version, int(net.network_address), net.prefixlen, i, j, net)
        for i, customer in customers
        for j, net in enumerate(customer.networks)
    )
    owners = dict(customers)
    enclosing: list[tuple[int, int, int, int, IPNetwork]] = []  # (version, end, i, j, net)
    for version, start, _prefix, i, j, net in entries:
        while enclosing and (enclosing[-1][0] != version or enclosing[-1][1] < start):
            enclosing.pop()
        for _version, _end, oi, oj, other in enclosing:
            if oi != i:
                errors.add(
                    f"customer[{i}].networks[{j}]",
                    f"{quote(str(net))} overlaps customer[{oi}].networks[{oj}] "
                    f"{quote(str(other))} of customer {quote(owners[oi].id)}",
                )
        enclosing.append((version, int(net.broadcast_address), i, j, net))


# ---------------------------------------------------------------------------------------------
# The schema, table by table: TOML key -> check.  Keys and schema fields must match one to one.

_POSITIVE: Final = _leaf(_duration())
_COUNT: Final = _leaf(_integer(1))
_PATH: Final = _leaf(_path)

_SERVER: Final = _Table(
    ServerConfig,
    {
        "listen": _array(_leaf(_listen_address), single=True, empty=False),
        "hostname": _leaf(_hostname),
        "max_message_size": _leaf(_size()),
        "state_dir": _PATH,
        "max_recipients": _COUNT,
        "max_connections": _COUNT,
        "max_connections_per_client": _COUNT,
        "max_command_length": _leaf(_integer(512, 65536, " (RFC 5321 allows no less than 512)")),
        "max_line_length": _leaf(_integer(1000, 2**20, " (RFC 5321 allows no less than 1000)")),
        "command_timeout": _POSITIVE,
        "data_timeout": _POSITIVE,
        "max_transactions_per_connection": _COUNT,
        "max_bad_commands": _COUNT,
        "tls_certificate": _PATH,
        "tls_key": _PATH,
        "auth_require_tls": _leaf(_boolean),
        "max_auth_failures_per_connection": _COUNT,
        "max_auth_failures_per_client": _COUNT,
        "auth_failure_window": _POSITIVE,
        "proxy_protocol": _leaf(_boolean),
        "proxy_trusted_networks": _array(_leaf(_network)),
        "drain_timeout": _leaf(_duration(allow_minimum=True)),
        "workers": _leaf(_workers),
    },
    cross=(_tls_pair, _proxy_trust, _per_client_limit),
)

_UPSTREAM: Final = _Table(
    UpstreamConfig,
    {
        "host": _leaf(_host),
        "port": _leaf(_integer(1, 65535)),
        "helo_name": _leaf(_hostname),
        "starttls": _leaf(_choice("off", "opportunistic", "require")),
        "tls_verify": _leaf(_boolean),
        "tls_ca_file": _PATH,
        "connect_timeout": _POSITIVE,
        "command_timeout": _POSITIVE,
        "data_timeout": _POSITIVE,
        "pool_size": _COUNT,
        "pool_idle_timeout": _POSITIVE,
    },
)

_STORE: Final = _Table(
    StoreConfig,
    {
        "url": _leaf(_store_url),
        "timeout": _POSITIVE,
        "redis_server": _leaf(_string),
        "key_prefix": _leaf(_key_prefix),
    },
)

_ACTION: Final = _leaf(_choice("reject", "defer", "monitor"))

# [policy]'s AUP numbers; the same keys in a [[customer]] override them for that customer.
_LIMITS: Final[dict[str, Check]] = {
    "bulk_recipients": _leaf(_integer(1, 1_000_000)),
    "bulk_window": _POSITIVE,
    "mailbomb_messages": _leaf(_integer(1, 1_000_000)),
    "mailbomb_window": _POSITIVE,
    "bulk_action": _ACTION,
    "mailbomb_action": _ACTION,
    "hygiene_action": _ACTION,
}
assert tuple(_LIMITS) == LIMIT_KEYS


def _template(value: object) -> str:
    """A refusal text template: one line, only known ``{placeholders}``."""
    text = _string(value)
    if "\r" in text or "\n" in text:
        raise ValueError("must be one line")
    try:
        text.format(
            count=21,
            threshold=20,
            window="24h",
            recipient="r@example.org",
            reason="r",
            missing="m",
            hold="10m",
            url="u",
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"bad placeholder {exc} (allowed: {{count}} {{threshold}} {{window}} "
            "{recipient} {reason} {missing} {hold} {url})"
        ) from None
    return text


_TEMPLATES: Final = _Table(
    Templates,
    {
        "bulk": _leaf(_template),
        "mailbomb": _leaf(_template),
        "hygiene": _leaf(_template),
        "mailbomb_hold": _leaf(_template),
    },
)


def _policy(**values: Any) -> PolicyConfig:
    limits = {k: values.pop(k) for k in LIMIT_KEYS if k in values}
    return PolicyConfig(limits=CampaignLimits(**limits), **values)


_POLICY: Final = _Table(
    _policy,
    {
        "mode": _leaf(_choice("enforce", "monitor", "off")),
        "soft_bounce": _leaf(_boolean),
        "store_failure_reply": _leaf(_failure_reply),
        "upstream_failure_reply": _leaf(_failure_reply),
        **_LIMITS,
        "mailbomb_hold": _leaf(_duration(allow_minimum=True)),
        "require_list_unsubscribe": _leaf(_boolean),
        "require_one_click_unsubscribe": _leaf(_boolean),
        "aup_url": _leaf(_string),
        "templates": _TEMPLATES,
    },
)

_LOG: Final = _Table(
    LogConfig,
    {
        "level": _leaf(_choice("DEBUG", "INFO", "WARNING", "ERROR", fold=str.upper)),
        "decision_log": _leaf(_string),
    },
)


def _milter_socket(value: object) -> str:
    text = _string(value)
    if not text.startswith(("inet:", "inet6:", "unix:", "local:")):
        raise ValueError(
            f"{quote(text)} is not a milter socket (inet:PORT@HOST, inet6:PORT@HOST or unix:/path)"
        )
    return text


_MILTER: Final = _Table(MilterConfig, {"listen": _leaf(_milter_socket), "timeout": _POSITIVE})

_USER: Final = _Table(
    User,
    {"name": _leaf(_user_name), "password_hash": _leaf(_password_hash)},
    required=("name", "password_hash"),
)


def _customer(**values: Any) -> Customer:
    overrides = tuple((k, values.pop(k)) for k in LIMIT_KEYS if k in values)
    return Customer(overrides=overrides, **values)


def _sender_address(value: object) -> str:
    text = _string(value)
    if text.count("@") != 1 or any(c.isspace() for c in text) or len(text) > 254:
        raise ValueError(f"{quote(text)} is not an e-mail address")
    local, _, domain = text.partition("@")
    return f"{local}@{_domain(domain)}"


def _bulk_networks_inside(
    raw: Mapping[str, object], values: dict[str, Any], path: str, errors: _Errors
) -> None:
    networks = values.get("networks", ())
    for j, net in enumerate(values.get("bulk_networks", ())):
        if not any(net.version == n.version and net.subnet_of(n) for n in networks):
            errors.add(
                f"{_join(path, 'bulk_networks')}[{j}]",
                f"{quote(str(net))} is not inside this customer's networks",
            )


_CUSTOMER: Final = _Table(
    _customer,
    {
        "id": _leaf(_customer_id),
        "networks": _array(_leaf(_network)),
        "domains": _array(_leaf(_domain)),
        "user": _array(
            _USER, unique=False, expected="an array of tables ([[customer.user]] sections)"
        ),
        "bulk_sender": _leaf(_boolean),
        "bulk_networks": _array(_leaf(_network)),
        "transactional_senders": _array(_leaf(_sender_address)),
        **_LIMITS,
    },
    required=("id",),
    rename={"user": "users"},
    cross=(_bulk_networks_inside,),
)


def _customers(value: object, path: str, errors: _Errors) -> Any:
    """``[[customer]]``: like an array of tables, but keeps the customers that built (with
    their indexes) so the rules across customers still run when one of them is wrong."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        errors.add(path, "must be an array of tables ([[customer]] sections)")
        return _INVALID
    return tuple(_CUSTOMER(item, f"{path}[{i}]", errors) for i, item in enumerate(value))


_CONFIG: Final = _Table(
    Config,
    {
        "server": _SERVER,
        "upstream": _UPSTREAM,
        "store": _STORE,
        "policy": _POLICY,
        "log": _LOG,
        "milter": _MILTER,
        "customer": _customers,
    },
    rename={"customer": "customers"},
    cross=(_customer_rules,),
)


# ---------------------------------------------------------------------------------------------
# Entry points.


def parse_config(data: Mapping[str, object], source: Path | None = None) -> Config:
    """Validate already-parsed TOML ``data``; ``source`` names the file in messages."""
    errors = _Errors(source)
    config = _CONFIG(dict(data), "", errors)
    errors.raise_if_any()
    assert isinstance(config, Config)
    return dataclasses.replace(config, source=source)


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the TOML file at ``path``.

    ``$MAILGUARD_STATE_DIR`` (looked up in ``environ``, by default ``os.environ``) overrides
    ``[server] state_dir``; set but empty, it is an error.
    """
    environ = os.environ if environ is None else environ
    errors = _Errors(path)
    data = _read_toml(path, errors)
    config = _CONFIG(data, "", errors) if data is not None else _INVALID
    state_dir = environ.get(STATE_DIR_ENV)
    if state_dir is not None and not state_dir:
        errors.add(f"${STATE_DIR_ENV}", "must not be empty when set")
    errors.raise_if_any()
    assert isinstance(config, Config)
    server = config.server
    if state_dir:
        server = dataclasses.replace(server, state_dir=Path(state_dir))
    return dataclasses.replace(config, server=server, source=path)


def startup_config(path: Path) -> Config | None:
    """``load_config`` for a daemon's start: None, with each error printed to standard error
    (the caller then exits with status 2)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def reload_config(path: Path, log: logging.Logger) -> Config | None:
    """``load_config`` for a running daemon's reload: None, with each error logged, when the
    file is not valid (the daemon keeps the config it runs with)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("reload refused, keeping the running config: %s", line)
        return None


_TOML_POSITION: Final = re.compile(
    r"^(?P<message>.*) \((?:at line (?P<line>[0-9]+), column "
    r"(?P<column>[0-9]+)|at end of document)\)$",
    re.DOTALL,
)


def _read_toml(path: Path, errors: _Errors) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except OSError as error:
        errors.add("", f"cannot read the configuration file: {error.strerror or error}")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        errors.add(f"line {line}", f"not valid UTF-8 (byte 0x{raw[error.start]:02x})")
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        match = _TOML_POSITION.match(message)
        if match is None:
            errors.add("", f"invalid TOML: {message}")
        elif match["line"] is None:  # at end of document: point at its last character
            line = text.count("\n") + 1
            column = len(text) - (text.rfind("\n") + 1) + 1
            errors.add(f"line {line}, column {column}", f"invalid TOML: {match['message']}")
        else:
            where = f"line {match['line']}, column {match['column']}"
            errors.add(where, f"invalid TOML: {match['message']}")
        return None
