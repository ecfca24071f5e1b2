"""The TOML loader: every key validated, every error collected, one precise line each (pure)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.config.load import ConfigError, load_config, parse_config
from mailguard.config.schema import (
    LIMIT_KEYS,
    Config,
    Customer,
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

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "mailguard.toml"
SRC = Path("/etc/mailguard.toml")
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHQ$iWh06vD8Fy27wf9npn6FXWiCX4K6pW6Ue1Bnzz07Z8A"
ARGON2_HELP = (
    'is not an argon2 PHC string such as "$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>" '
    "(value not shown); make one with: python3 -c 'import argon2, getpass; "
    "print(argon2.PasswordHasher().hash(getpass.getpass()))'"
)
SIZE_HELP = (
    "expected a non-negative number with an optional unit B, KB, MB, GB, TB (1000-based) "
    'or KiB, MiB, GiB, TiB (1024-based), bytes when omitted, e.g. "512", "10KB", "50MB", "1GiB"'
)
DURATION_HELP = (
    "expected a non-negative number with an optional unit ms, s, m, h, d or w "
    '(seconds when omitted), e.g. "500ms", "90s", "15m", "24h", "45d", "1w"'
)


def errors_of(data: dict[str, Any]) -> list[str]:
    """The error lines for ``data``, without the common ``config error: <file>: `` prefix."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, SRC)
    prefix = f"config error: {SRC}: "
    assert all(line.startswith(prefix) for line in info.value.errors)
    return [line.removeprefix(prefix) for line in info.value.errors]


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "mailguard.toml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


# ---------------------------------------------------------------------------------------------
# The example file and the defaults.


def test_example_config_loads_as_documented() -> None:
    config = load_config(EXAMPLE, environ={})
    expected = Config(
        server=dataclasses.replace(ServerConfig(), hostname="mailguard.example.net"),
        customers=(
            Customer(
                id="acme",
                networks=(
                    ipaddress.ip_network("192.0.2.0/24"),
                    ipaddress.ip_network("2001:db8::/48"),
                ),
                domains=("acme.example",),
            ),
        ),
        source=EXAMPLE,
    )
    assert config == expected
    assert config.server.listen == (ListenAddress("127.0.0.1", 10025),)
    assert config.server.state_dir == Path("/var/lib/mailguard")


def test_example_user_section_loads_when_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    block = text[text.index("# [[customer.user]]") :]
    uncommented = text.replace(block, re.sub(r"(?m)^# ", "", block))
    config = load_config(write(tmp_path, uncommented), environ={})
    (user,) = config.customers[0].users
    assert user.name == "relay@acme.example"
    assert user.password_hash.startswith("$argon2id$")


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "store": StoreConfig,
    "policy": PolicyConfig,
    "log": LogConfig,
    "customer": Customer,
    "customer.user": User,
    "policy.templates": Templates,
    "milter": MilterConfig,
}


def test_example_documents_every_key() -> None:
    """Every schema field appears (set, or commented out when it has no value) in its section."""
    documented: dict[str, set[str]] = {}
    section = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if header := re.match(r"^(?:# )?\[\[?([a-z.]+)\]\]?", line):
            section = header[1]
        elif key := re.match(r"^(?:# )?([a-z_]+) = ", line):
            documented.setdefault(section, set()).add(key[1])
    for name, cls in _SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        if cls is Customer:
            fields.discard("users")  # documented as the [[customer.user]] section
            fields.discard("overrides")  # written as [policy]'s own keys
            fields |= set(LIMIT_KEYS)
        if cls is PolicyConfig:
            fields -= {"limits", "templates"}  # flat keys, and the [policy.templates] section
            fields |= set(LIMIT_KEYS)
        assert documented.get(name) == fields, name


def test_example_values_equal_schema_defaults() -> None:
    """Apart from the documented examples, the example file restates the defaults."""
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    data["server"].pop("hostname")
    del data["customer"]
    assert parse_config(data) == Config()


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"server": {}, "upstream": {}, "store": {}, "policy": {}, "log": {}},
        {"customer": []},
    ],
)
def test_defaults_equal_schema_defaults(data: dict[str, Any]) -> None:
    assert parse_config(data) == Config()
    assert parse_config(data, SRC) == Config(source=SRC)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(path, environ={}) == Config(source=path)


# ---------------------------------------------------------------------------------------------
# Good values in their various spellings.

_GOOD: list[tuple[dict[str, Any], Config]] = [
    (
        {"server": {"listen": "[::1]:10025"}},
        Config(server=ServerConfig(listen=(ListenAddress("::1", 10025),))),
    ),
    (
        {"server": {"listen": ["localhost:25", "[2001:DB8::1]:587", "0.0.0.0:2525"]}},
        Config(
            server=ServerConfig(
                listen=(
                    ListenAddress("localhost", 25),
                    ListenAddress("2001:db8::1", 587),
                    ListenAddress("0.0.0.0", 2525),
                )
            )
        ),
    ),
    (
        {"server": {"max_message_size": "10MiB", "command_timeout": 30, "data_timeout": 1.5}},
        Config(
            server=ServerConfig(max_message_size=10 * 2**20, command_timeout=30.0, data_timeout=1.5)
        ),
    ),
    (
        {"server": {"max_message_size": 1024, "drain_timeout": "0s"}},
        Config(server=ServerConfig(max_message_size=1024, drain_timeout=0.0)),
    ),
    ({"server": {"workers": 4}}, Config(server=ServerConfig(workers=4))),
    ({"server": {"workers": "auto"}}, Config(server=ServerConfig(workers=0))),
    (
        {"server": {"tls_certificate": "/etc/c.pem", "tls_key": "/etc/k.pem"}},
        Config(server=ServerConfig(tls_certificate=Path("/etc/c.pem"), tls_key=Path("/etc/k.pem"))),
    ),
    (
        {"server": {"proxy_protocol": True, "proxy_trusted_networks": ["10.0.0.10/32"]}},
        Config(
            server=ServerConfig(
                proxy_protocol=True,
                proxy_trusted_networks=(ipaddress.ip_network("10.0.0.10/32"),),
            )
        ),
    ),
    (
        {"upstream": {"host": "mx.example.net", "helo_name": "gate.example.net", "port": 587}},
        Config(
            upstream=UpstreamConfig(host="mx.example.net", helo_name="gate.example.net", port=587)
        ),
    ),
    (
        {"upstream": {"host": "::1", "starttls": "require", "tls_ca_file": "/etc/ca.pem"}},
        Config(
            upstream=UpstreamConfig(host="::1", starttls="require", tls_ca_file=Path("/etc/ca.pem"))
        ),
    ),
    (
        {"store": {"url": "redis://:secret@127.0.0.1:6379/2", "key_prefix": "mg:test"}},
        Config(store=StoreConfig(url="redis://:secret@127.0.0.1:6379/2", key_prefix="mg:test")),
    ),
    (
        {"store": {"url": "unix:///run/redis/redis.sock", "timeout": "500ms"}},
        Config(store=StoreConfig(url="unix:///run/redis/redis.sock", timeout=0.5)),
    ),
    (
        {"policy": {"mode": "monitor", "soft_bounce": True, "store_failure_reply": "421 4.3.0 x"}},
        Config(
            policy=PolicyConfig(
                mode="monitor", soft_bounce=True, store_failure_reply=Reply(421, "4.3.0", "x")
            )
        ),
    ),
    (
        {"log": {"level": "debug", "decision_log": "/var/log/mailguard/decisions.log"}},
        Config(log=LogConfig(level="DEBUG", decision_log="/var/log/mailguard/decisions.log")),
    ),
    (
        {
            "customer": [
                {
                    "id": "acme",
                    "networks": ["10.0.0.0/16", "10.0.1.0/24", "192.0.2.7"],
                    "domains": ["Acme.Example.", "bücher.example"],
                    "user": [{"name": "relay@acme.example", "password_hash": HASH}],
                },
                {"id": "b.c_d-1", "networks": ["10.1.0.0/16", "2001:db8::/32"]},
            ]
        },
        Config(
            customers=(
                Customer(
                    id="acme",
                    networks=(
                        ipaddress.ip_network("10.0.0.0/16"),
                        ipaddress.ip_network("10.0.1.0/24"),  # same customer may nest
                        ipaddress.ip_network("192.0.2.7/32"),
                    ),
                    domains=("acme.example", "xn--bcher-kva.example"),
                    users=(User("relay@acme.example", HASH),),
                ),
                Customer(
                    id="b.c_d-1",
                    networks=(
                        ipaddress.ip_network("10.1.0.0/16"),
                        ipaddress.ip_network("2001:db8::/32"),
                    ),
                ),
            )
        ),
    ),
]


@pytest.mark.parametrize(("data", "expected"), _GOOD)
def test_good_values(data: dict[str, Any], expected: Config) -> None:
    assert parse_config(data) == expected


# ---------------------------------------------------------------------------------------------
# Bad configs: each gives exactly these lines (without the "config error: <file>: " prefix).

_BAD: list[tuple[dict[str, Any], list[str]]] = [
    # unknown keys and tables, with suggestions
    ({"sever": {}}, ['sever: unknown table (did you mean "server"?)']),
    ({"frobnicate": 1}, ["frobnicate: unknown key"]),
    ({"server": {"a.b\n": 1}}, ['server."a.b\\n": unknown key']),
    ({"customers": []}, ['customers: unknown key (did you mean "customer"?)']),
    ({"server": {"listn": []}}, ['server.listn: unknown key (did you mean "listen"?)']),
    ({"upstream": {"tls": {}}}, ["upstream.tls: unknown table"]),
    (
        {"customer": [{"id": "a", "user": [{"name": "u", "password_hash": HASH, "pw": "x"}]}]},
        ["customer[0].user[0].pw: unknown key"],
    ),
    # tables of the wrong shape
    ({"server": 1}, ["server: must be a table, got an integer"]),
    ({"log": []}, ["log: must be a table, got an array"]),
    ({"customer": {"id": "a"}}, ["customer: must be an array of tables ([[customer]] sections)"]),
    (
        {"customer": [{"id": "a", "user": {"name": "u"}}]},
        ["customer[0].user: must be an array of tables ([[customer.user]] sections), got a table"],
    ),
    # wrong types
    ({"upstream": {"port": "25"}}, ["upstream.port: must be an integer, got a string"]),
    ({"upstream": {"port": 25.0}}, ["upstream.port: must be an integer, got a float"]),
    (
        {"server": {"max_recipients": True}},
        ["server.max_recipients: must be an integer, got a boolean"],
    ),
    (
        {"server": {"proxy_protocol": "yes"}},
        ["server.proxy_protocol: must be a boolean (true or false), got a string"],
    ),
    ({"server": {"hostname": 1}}, ["server.hostname: must be a string, got an integer"]),
    ({"server": {"state_dir": ""}}, ["server.state_dir: must not be empty"]),
    (
        {"server": {"command_timeout": True}},
        ['server.command_timeout: must be a duration such as "90s", "15m" or "24h", got a boolean'],
    ),
    (
        {"server": {"max_message_size": 5.5}},
        ['server.max_message_size: must be a size such as "50MB", "10KiB" or 512, got a float'],
    ),
    ({"server": {"listen": [1]}}, ["server.listen[0]: must be a string, got an integer"]),
    ({"server": {"listen": []}}, ["server.listen: must not be empty"]),
    (
        {"customer": [{"id": "a", "networks": "10.0.0.0/8"}]},
        ["customer[0].networks: must be an array, got a string"],
    ),
    # ranges
    ({"upstream": {"port": 0}}, ["upstream.port: 0 is out of range 1-65535"]),
    ({"upstream": {"port": 65536}}, ["upstream.port: 65536 is out of range 1-65535"]),
    ({"upstream": {"pool_size": 0}}, ["upstream.pool_size: 0 is out of range 1-2147483647"]),
    (
        {"server": {"max_command_length": 100}},
        [
            "server.max_command_length: 100 is out of range 512-65536 "
            "(RFC 5321 allows no less than 512)"
        ],
    ),
    (
        {"server": {"max_line_length": 998}},
        [
            "server.max_line_length: 998 is out of range 1000-1048576 "
            "(RFC 5321 allows no less than 1000)"
        ],
    ),
    (
        {"server": {"max_message_size": "0"}},
        ['server.max_message_size: "0" is too small: must be at least 1 bytes'],
    ),
    (
        {"server": {"max_message_size": -1}},
        ["server.max_message_size: -1 is not a size: must be >= 0"],
    ),
    (
        {"server": {"max_message_size": "5XB"}},
        [f'server.max_message_size: "5XB" is not a size: {SIZE_HELP}'],
    ),
    (
        {"server": {"command_timeout": "0s"}},
        ['server.command_timeout: "0s" is too short: must be longer than 0s'],
    ),
    (
        {"server": {"data_timeout": 0}},
        ["server.data_timeout: 0 is too short: must be longer than 0s"],
    ),
    (
        {"store": {"timeout": -1}},
        ["store.timeout: -1 is not a duration: must be a finite number >= 0"],
    ),
    (
        {"store": {"timeout": float("inf")}},
        ["store.timeout: inf is not a duration: must be a finite number >= 0"],
    ),
    (
        {"store": {"timeout": "2 secs"}},
        [f'store.timeout: "2 secs" is not a duration: {DURATION_HELP}'],
    ),
    # listen addresses
    (
        {"server": {"listen": ["127.0.0.1"]}},
        [
            'server.listen[0]: "127.0.0.1" is not a listen address: expected "host:port", '
            'e.g. "127.0.0.1:10025" or "[::1]:10025"'
        ],
    ),
    (
        {"server": {"listen": ["::1:10025"]}},
        ['server.listen[0]: "::1:10025": put an IPv6 address in brackets, e.g. "[::1]:10025"'],
    ),
    (
        {"server": {"listen": ["[127.0.0.1]:25"]}},
        [
            'server.listen[0]: "[127.0.0.1]:25": only an IPv6 address goes in brackets, got '
            '"127.0.0.1"'
        ],
    ),
    (
        {"server": {"listen": [":25"]}},
        [
            'server.listen[0]: ":25" has no host: use "0.0.0.0:25" or "[::]:25" to listen on '
            "every address"
        ],
    ),
    (
        {"server": {"listen": ["127.0.0.1:0"]}},
        ['server.listen[0]: "127.0.0.1:0": port "0" is not a number 1-65535'],
    ),
    (
        {"server": {"listen": ["[::1]:65536"]}},
        ['server.listen[0]: "[::1]:65536": port "65536" is not a number 1-65535'],
    ),
    (
        {"server": {"listen": ["127.0.0.1:smtp"]}},
        ['server.listen[0]: "127.0.0.1:smtp": port "smtp" is not a number 1-65535'],
    ),
    (
        {"server": {"listen": ["10.0.0.300:25"]}},
        [
            'server.listen[0]: "10.0.0.300:25": "10.0.0.300" is neither a host name nor an '
            "IP address"
        ],
    ),
    (
        {"server": {"listen": ["127.0.0.1:25", "127.0.0.1:25"]}},
        ['server.listen[1]: "127.0.0.1:25" repeats server.listen[0]'],
    ),
    # host names
    (
        {"server": {"hostname": "mail guard"}},
        [
            "server.hostname: \"mail guard\" is not a valid host name (letters, digits and '-' "
            "in dot-separated labels of at most 63 characters)"
        ],
    ),
    (
        {"upstream": {"host": "-bad-.example"}},
        ['upstream.host: "-bad-.example" is neither a host name nor an IP address'],
    ),
    # choices
    (
        {"policy": {"mode": "enforcing"}},
        [
            'policy.mode: "enforcing" is not one of "enforce", "monitor", "off" (did you '
            'mean "enforce"?)'
        ],
    ),
    (
        {"upstream": {"starttls": "yes"}},
        ['upstream.starttls: "yes" is not one of "off", "opportunistic", "require"'],
    ),
    (
        {"log": {"level": "warn"}},
        [
            'log.level: "warn" is not one of "DEBUG", "INFO", "WARNING", "ERROR" (did you '
            'mean "WARNING"?)'
        ],
    ),
    # networks
    (
        {"customer": [{"id": "a", "networks": ["10.0.0.300/24"]}]},
        ['customer[0].networks[0]: "10.0.0.300/24" is not an IP network'],
    ),
    (
        {"customer": [{"id": "a", "networks": ["10.0.0.1/24"]}]},
        ['customer[0].networks[0]: "10.0.0.1/24" has host bits set (did you mean "10.0.0.0/24"?)'],
    ),
    (
        {"customer": [{"id": "a", "networks": ["::ffff:192.0.2.0/120"]}]},
        [
            'customer[0].networks[0]: "::ffff:192.0.2.0/120" is an IPv4-mapped IPv6 network; '
            'write it as IPv4 ("192.0.2.0/24")'
        ],
    ),
    (
        {"server": {"proxy_trusted_networks": ["fe80::/10", "bogus"]}},
        ['server.proxy_trusted_networks[1]: "bogus" is not an IP network'],
    ),
    (
        {"customer": [{"id": "a", "networks": ["10.0.0.0/8", "10.0.0.0/8"]}]},
        ['customer[0].networks[1]: "10.0.0.0/8" repeats customer[0].networks[0]'],
    ),
    # replies
    (
        {"policy": {"store_failure_reply": "451 5.3.0 Some text"}},
        [
            'policy.store_failure_reply: "451 5.3.0 Some text": reply code 451 and enhanced code '
            "5.3.0 disagree in class (4xx vs 5.x.x)"
        ],
    ),
    (
        {"policy": {"upstream_failure_reply": "550 5.7.1 No"}},
        [
            'policy.upstream_failure_reply: "550 5.7.1 No": a failure reply must be temporary '
            '(4xx with 4.x.x), got 550; e.g. "451 4.3.0 Try again later"'
        ],
    ),
    (
        {"policy": {"store_failure_reply": "451 4.3.0"}},
        [
            'policy.store_failure_reply: "451 4.3.0" is not a reply: expected '
            '"<code> <enhanced code> <text>", e.g. "451 4.3.0 Try again later"'
        ],
    ),
    (
        {"policy": {"store_failure_reply": "45 4.3.0 text"}},
        ['policy.store_failure_reply: "45 4.3.0 text": "45" is not an SMTP reply code (e.g. 451)'],
    ),
    (
        {"policy": {"store_failure_reply": "451 4.3 text"}},
        [
            'policy.store_failure_reply: "451 4.3 text": "4.3" is not an enhanced status code '
            "(class.subject.detail, e.g. 4.3.0)"
        ],
    ),
    (
        {"policy": {"store_failure_reply": "451 4.3.0 bad\r\ntext"}},
        [
            'policy.store_failure_reply: "451 4.3.0 bad\\r\\ntext": the reply text must be '
            "printable ASCII on one line"
        ],
    ),
    # customers and users
    (
        {"customer": [{"id": "ac me"}]},
        [
            'customer[0].id: "ac me" is not a valid customer id: 1-64 characters from '
            "A-Z a-z 0-9 _ . -, starting with a letter or digit"
        ],
    ),
    (
        {"customer": [{"id": "a{b}"}]},
        [
            'customer[0].id: "a{b}" is not a valid customer id: 1-64 characters from '
            "A-Z a-z 0-9 _ . -, starting with a letter or digit"
        ],
    ),
    (
        {"customer": [{"id": "x" * 65}]},
        [
            f'customer[0].id: "{"x" * 65}" is not a valid customer id: 1-64 characters from '
            "A-Z a-z 0-9 _ . -, starting with a letter or digit"
        ],
    ),
    ({"customer": [{"networks": []}]}, ['customer[0]: missing required key "id"']),
    (
        {"customer": [{"id": "a"}, {"id": "b"}, {"id": "a"}]},
        ['customer[2].id: duplicate customer id "a" (also customer[0])'],
    ),
    (
        {"customer": [{"id": "a", "domains": ["bad_domain.example"]}]},
        ['customer[0].domains[0]: "bad_domain.example" is not a valid domain name'],
    ),
    (
        {"customer": [{"id": "a", "user": [{"name": "u", "password_hash": "hunter2"}]}]},
        [f"customer[0].user[0].password_hash: {ARGON2_HELP}"],
    ),
    (
        {"customer": [{"id": "a", "user": [{"name": "u", "password_hash": "$2b$12$abc"}]}]},
        [f"customer[0].user[0].password_hash: {ARGON2_HELP}"],
    ),
    (
        {"customer": [{"id": "a", "user": [{"password_hash": HASH}]}]},
        ['customer[0].user[0]: missing required key "name"'],
    ),
    (
        {"customer": [{"id": "a", "user": [{"name": "a b", "password_hash": HASH}]}]},
        [
            'customer[0].user[0].name: "a b" is not a valid user name: at most 255 printable '
            "characters, no spaces"
        ],
    ),
    (
        {
            "customer": [
                {"id": "a", "user": [{"name": "u", "password_hash": HASH}]},
                {"id": "b", "user": [{"name": "u", "password_hash": HASH}]},
            ]
        },
        ['customer[1].user[0].name: duplicate user name "u" (also customer[0].user[0])'],
    ),
    # overlapping networks of two customers
    (
        {
            "customer": [
                {"id": "acme", "networks": ["10.0.0.0/24"]},
                {"id": "other", "networks": ["192.0.2.0/24", "10.0.0.128/25"]},
            ]
        },
        [
            'customer[1].networks[1]: "10.0.0.128/25" overlaps customer[0].networks[0] '
            '"10.0.0.0/24" of customer "acme"'
        ],
    ),
    (
        {
            "customer": [
                {"id": "a", "networks": ["2001:db8:1::/48"]},
                {"id": "b", "networks": ["2001:db8::/32"]},
            ]
        },
        [
            'customer[0].networks[0]: "2001:db8:1::/48" overlaps customer[1].networks[0] '
            '"2001:db8::/32" of customer "b"'
        ],
    ),
    (
        {
            "customer": [
                {"id": "a", "networks": ["192.0.2.0/24"]},
                {"id": "b", "networks": ["192.0.2.0/24"]},
            ]
        },
        [
            'customer[1].networks[0]: "192.0.2.0/24" overlaps customer[0].networks[0] '
            '"192.0.2.0/24" of customer "a"'
        ],
    ),
    # rules spanning keys
    (
        {"server": {"tls_certificate": "/etc/c.pem"}},
        ["server.tls_certificate: needs server.tls_key as well (give both or neither)"],
    ),
    (
        {"server": {"tls_key": "/etc/k.pem"}},
        ["server.tls_key: needs server.tls_certificate as well (give both or neither)"],
    ),
    (
        {"server": {"proxy_protocol": True}},
        [
            "server.proxy_trusted_networks: must list the proxies' networks when "
            "proxy_protocol = true"
        ],
    ),
    (
        {"server": {"max_connections": 10, "max_connections_per_client": 20}},
        ["server.max_connections_per_client: 20 is more than max_connections (10)"],
    ),
    # store
    (
        {"store": {"url": "http://user:secret@example.net"}},
        [
            'store.url: has unsupported scheme "http": expected "embedded" or a redis://, '
            "rediss:// or unix:// URL"
        ],
    ),
    (
        {"store": {"url": "redis://:secret@host:99999"}},
        [
            'store.url: is not a valid URL: expected "embedded" or a redis://, rediss:// '
            "or unix:// URL"
        ],
    ),
    (
        {"store": {"url": "redis:///0"}},
        ['store.url: a redis:// URL needs a host, e.g. "redis://127.0.0.1:6379/0"'],
    ),
    ({"server": {"workers": 0}}, ["server.workers: 0 is out of range 1-256"]),
    (
        {"server": {"workers": "many"}},
        ['server.workers: "many" is not a number of processes: give 1-256 or "auto"'],
    ),
    ({"server": {"workers": 1.5}}, ["server.workers: must be an integer, got a float"]),
    (
        {"store": {"key_prefix": "mg{x}"}},
        [
            'store.key_prefix: "mg{x}" is not a valid key prefix: 1-64 characters from A-Z '
            "a-z 0-9 _ . : -"
        ],
    ),
]


@pytest.mark.parametrize(("data", "expected"), _BAD)
def test_bad_configs(data: dict[str, Any], expected: list[str]) -> None:
    assert errors_of(data) == expected


def test_secrets_are_not_echoed() -> None:
    lines = errors_of(
        {
            "store": {"url": "http://user:s3cret@example.net"},
            "customer": [{"id": "a", "user": [{"name": "u", "password_hash": "s3cret"}]}],
        }
    )
    assert len(lines) == 2
    assert not any("s3cret" in line for line in lines)


def test_all_errors_are_collected() -> None:
    data = {
        "server": {"listen": ["127.0.0.1"], "max_recipients": 0, "bogus": 1},
        "upstream": {"port": 70000},
        "policy": {"mode": "on"},
        "customer": [
            {"id": "a", "networks": ["10.0.0.0/8", "nope"]},
            {"id": "a", "networks": ["10.1.0.0/16"]},
            {"id": "c", "networks": ["10.2.0.0/16"], "user": [{"name": "u"}]},
        ],
    }
    assert errors_of(data) == [
        'server.listen[0]: "127.0.0.1" is not a listen address: expected "host:port", '
        'e.g. "127.0.0.1:10025" or "[::1]:10025"',
        "server.max_recipients: 0 is out of range 1-2147483647",
        "server.bogus: unknown key",
        "upstream.port: 70000 is out of range 1-65535",
        'policy.mode: "on" is not one of "enforce", "monitor", "off"',
        'customer[0].networks[1]: "nope" is not an IP network',
        'customer[2].user[0]: missing required key "password_hash"',
        # customer[0]'s networks were invalid, but its id still counts
        'customer[1].id: duplicate customer id "a" (also customer[0])',
    ]


def test_error_lines_without_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"upstream": {"port": "25"}})
    assert info.value.errors == ["config error: upstream.port: must be an integer, got a string"]
    assert info.value.source is None


def test_config_error_carries_lines_and_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"a": 1, "b": 2}, SRC)
    error = info.value
    assert isinstance(error, Exception)
    assert error.source == SRC
    assert error.errors == [
        f"config error: {SRC}: a: unknown key",
        f"config error: {SRC}: b: unknown key",
    ]
    assert str(error) == "\n".join(error.errors)


# ---------------------------------------------------------------------------------------------
# Files, TOML syntax and the environment.


def test_load_config_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = ["[::1]:2525"]\nmax_message_size = "1GiB"\n')
    config = load_config(path, environ={})
    assert config.server.listen == (ListenAddress("::1", 2525),)
    assert config.server.max_message_size == 2**30
    assert config.source == path


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[[customer]]\nid = "a"\nnetworks = ["10.0.0.300/24"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.errors == [
        f'config error: {path}: customer[0].networks[0]: "10.0.0.300/24" is not an IP network'
    ]
    assert info.value.source == path


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("[server]\nport = = 1\n", "line 2, column 8", "Invalid value"),
        ("x = 1 2\n", "line 1, column 7", "Expected newline or end of document after a statement"),
        ("[server]\n[server]\n", "line 2, column 8", "Cannot declare ('server',) twice"),
        (
            '[server]\nhostname = "a"\nhostname = "b"\n',
            "line 3, column 15",
            "Cannot overwrite a value",
        ),
        ("[server]\nlisten = [1,\n", "line 3, column 1", "Invalid value"),
    ],
)
def test_toml_syntax_error_is_one_precise_line(
    tmp_path: Path, text: str, where: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.errors == [f"config error: {path}: {where}: invalid TOML: {message}"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.errors == [
        f"config error: {path}: cannot read the configuration file: No such file or directory"
    ]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    assert info.value.errors == [
        f"config error: {tmp_path}: cannot read the configuration file: Is a directory"
    ]


def test_file_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, b'[server]\nhostname = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.errors == [f"config error: {path}: line 2: not valid UTF-8 (byte 0xe9)"]


def test_state_dir_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nstate_dir = "/srv/mailguard"\n')
    assert load_config(path, environ={}).server.state_dir == Path("/srv/mailguard")
    config = load_config(path, environ={"MAILGUARD_STATE_DIR": str(tmp_path / "state")})
    assert config.server.state_dir == tmp_path / "state"


def test_state_dir_environment_defaults_to_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "")
    monkeypatch.setenv("MAILGUARD_STATE_DIR", "/run/mg-test")
    assert load_config(path).server.state_dir == Path("/run/mg-test")
    monkeypatch.delenv("MAILGUARD_STATE_DIR")
    assert load_config(path).server.state_dir == ServerConfig().state_dir


def test_empty_state_dir_environment_is_an_error_reported_with_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\nlevel = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"MAILGUARD_STATE_DIR": ""})
    assert info.value.errors == [
        f"config error: {path}: log.level: must be a string, got an integer",
        f"config error: {path}: $MAILGUARD_STATE_DIR: must not be empty when set",
    ]


# ---------------------------------------------------------------------------------------------
# Whatever the data, the loader answers with a Config or a ConfigError, never a traceback.

_KEYS = sorted(
    {f.name for cls in _SECTIONS.values() for f in dataclasses.fields(cls)}
    | {"user", "customer", "listn"}
)
_SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["10.0.0.0/8", "[::1]:25", "90s", "50MB", "451 4.3.0 x", "a", HASH])
    | st.dates()
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), inner)
    ),
    max_leaves=12,
)
_SECTION_NAMES = [*_SECTIONS, "bogus"]


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(_SECTION_NAMES), _VALUES | st.lists(_VALUES, max_size=3)))
def test_any_data_gives_config_or_config_error(data: dict[str, Any]) -> None:
    try:
        config = parse_config(data, SRC)
    except ConfigError as error:
        assert error.errors
        assert all(line.startswith(f"config error: {SRC}: ") for line in error.errors)
        assert all("\n" not in line for line in error.errors)
    else:
        assert isinstance(config, Config)


def test_aup_limits_and_customer_overrides() -> None:
    config = parse_config(
        tomllib.loads(
            """
[policy]
bulk_recipients = 30
mailbomb_window = "12h"
bulk_action = "defer"
[[customer]]
id = "lists"
networks = ["198.51.100.0/24"]
bulk_sender = true
bulk_networks = ["198.51.100.7/32"]
transactional_senders = ["Receipts@Shop.Example"]
bulk_recipients = 500
mailbomb_action = "monitor"
[[customer]]
id = "plain"
"""
        )
    )
    policy = config.policy
    assert policy.limits.bulk_recipients == 30
    assert policy.limits.mailbomb_window == 12 * 3600
    assert policy.limits.bulk_action == "defer"
    lists, plain = config.customers
    assert lists.limits(policy).bulk_recipients == 500
    assert lists.limits(policy).mailbomb_action == "monitor"
    assert lists.limits(policy).mailbomb_window == 12 * 3600  # inherited
    assert lists.transactional_senders == ("Receipts@shop.example",)
    assert plain.limits(policy) is policy.limits


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[policy]\nbulk_action = "drop"\n', 'policy.bulk_action: "drop"'),
        ('[policy.templates]\nbulk = "{nope}"\n', "policy.templates.bulk: bad placeholder"),
        ("[policy]\nmailbomb_messages = 0\n", "policy.mailbomb_messages"),
        ('[policy]\nmailbomb_hold = "-1s"\n', "policy.mailbomb_hold"),
        ('[policy.templates]\nmailbomb_hold = "{when}"\n', "policy.templates.mailbomb_hold"),
        (
            '[[customer]]\nid = "a"\nnetworks = ["10.0.0.0/24"]\nbulk_networks = ["10.1.0.0/24"]\n',
            'customer[0].bulk_networks[0]: "10.1.0.0/24" is not inside',
        ),
        (
            '[[customer]]\nid = "a"\ntransactional_senders = ["nobody"]\n',
            "is not an e-mail address",
        ),
    ],
)
def test_aup_settings_errors(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(toml))
    assert any(message in line for line in info.value.errors), info.value.errors


def test_mailbomb_hold_settings() -> None:
    assert parse_config({}).policy.mailbomb_hold == 600.0
    off = parse_config(tomllib.loads('[policy]\nmailbomb_hold = "0s"\n'))
    assert off.policy.mailbomb_hold == 0.0
    text = "Wait {hold} ({count}/{threshold} in {window}) for <{recipient}>: {url}"
    config = parse_config(
        tomllib.loads(
            f'[policy]\nmailbomb_hold = "5m"\n[policy.templates]\nmailbomb_hold = "{text}"\n'
        )
    )
    assert config.policy.mailbomb_hold == 300.0
    assert config.policy.templates.mailbomb_hold == text
    assert config.policy.templates.mailbomb == PolicyConfig().templates.mailbomb
