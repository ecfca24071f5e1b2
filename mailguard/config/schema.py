"""The typed, frozen configuration schema: the single source of truth for every setting.

Responsible for: the shape, types and defaults of the configuration.  Durations are
seconds (float), sizes are bytes (int), networks are ``ipaddress`` networks.
Must never: read files, parse TOML or validate raw input (that is ``mailguard.config.load``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PolicyMode = Literal["enforce", "monitor", "off"]
RuleAction = Literal["reject", "defer", "monitor"]
UpstreamTLS = Literal["off", "opportunistic", "require"]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One ``host:port`` the gate listens on (``host`` without IPv6 brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: the client-facing SMTP listener and its protocol limits."""

    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 10025),)
    hostname: str = "mailguard.localdomain"
    max_message_size: int = 50 * 1000 * 1000
    state_dir: Path = Path("/var/lib/mailguard")
    max_recipients: int = 1000
    max_connections: int = 1000
    max_connections_per_client: int = 50
    max_command_length: int = 2048
    max_line_length: int = 1000  # octets per message line, CRLF included (RFC 5321 4.5.3.1.6)
    command_timeout: float = 300.0
    data_timeout: float = 600.0  # overall deadline for one DATA phase
    max_transactions_per_connection: int = 1000
    max_bad_commands: int = 10
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    auth_require_tls: bool = True
    max_auth_failures_per_connection: int = 3
    max_auth_failures_per_client: int = 10
    auth_failure_window: float = 900.0
    proxy_protocol: bool = False
    proxy_trusted_networks: tuple[IPNetwork, ...] = ()
    drain_timeout: float = 30.0
    # Gate processes sharing the listeners and the store; 0 means one per CPU ("auto").
    workers: int = 1


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """``[upstream]``: the MTA that receives every accepted transaction."""

    host: str = "127.0.0.1"
    port: int = 25
    helo_name: str | None = None  # defaults to server.hostname
    starttls: UpstreamTLS = "off"
    tls_verify: bool = True
    tls_ca_file: Path | None = None
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    data_timeout: float = 600.0
    pool_size: int = 32
    pool_idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``[store]``: where counters live.  ``url = "embedded"`` runs a private redis-server."""

    url: str = "embedded"
    timeout: float = 2.0
    redis_server: str = "redis-server"
    key_prefix: str = "mg"


@dataclass(frozen=True, slots=True)
class Reply:
    """A configured SMTP reply: basic code, enhanced status code (RFC 3463) and text."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


DEFAULT_TEMPLATES = {
    "bulk": (
        "Refused: this message is one of {count} substantively similar messages to different "
        "recipients in {window}, and {reason} (AUP: unsolicited bulk e-mail). See {url}"
    ),
    "mailbomb": (
        "Refused: this would be message {count} of substantively similar messages to "
        "<{recipient}> in {window}; at most {threshold} are allowed (AUP: mail bombing). See {url}"
    ),
    "hygiene": (
        "Refused: bulk mail ({count} recipients in {window}) must carry {missing} "
        "(RFC 2369, RFC 8058; AUP: bulk mailing). See {url}"
    ),
    "mailbomb_hold": (
        "Deferred: mail from this sender to <{recipient}> is held for up to {hold} after message "
        "{count} of substantively similar messages to it in {window} was refused; at most "
        "{threshold} are allowed (AUP: mail bombing). See {url}"
    ),
}


@dataclass(frozen=True, slots=True)
class Templates:
    """``[policy.templates]``: the text of each refusal; ``{placeholders}`` are filled in:
    count, threshold, window, recipient, reason, missing, hold, url (``mailbomb_hold`` is the
    RCPT-time deferral after a mail-bomb refusal, see ``PolicyConfig.mailbomb_hold``)."""

    bulk: str = DEFAULT_TEMPLATES["bulk"]
    mailbomb: str = DEFAULT_TEMPLATES["mailbomb"]
    hygiene: str = DEFAULT_TEMPLATES["hygiene"]
    mailbomb_hold: str = DEFAULT_TEMPLATES["mailbomb_hold"]


@dataclass(frozen=True, slots=True)
class CampaignLimits:
    """The AUP's numbers and what to do when they are passed (global or per customer).

    Windows are seconds, sliding.  Bulk: a campaign sent to more than ``bulk_recipients``
    distinct recipients within ``bulk_window``.  Mail bomb: more than ``mailbomb_messages``
    messages of one campaign to one recipient within ``mailbomb_window``.
    """

    bulk_recipients: int = 20
    bulk_window: float = 86400.0
    mailbomb_messages: int = 10
    mailbomb_window: float = 86400.0
    bulk_action: RuleAction = "reject"
    mailbomb_action: RuleAction = "reject"
    hygiene_action: RuleAction = "reject"


LIMIT_KEYS = tuple(f.name for f in fields(CampaignLimits))


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """``[policy]``: how decisions are applied and what failures become."""

    mode: PolicyMode = "enforce"
    limits: CampaignLimits = field(default_factory=CampaignLimits)  # flat keys in [policy]
    require_list_unsubscribe: bool = True  # bulk mail must carry List-Unsubscribe (RFC 2369)
    require_one_click_unsubscribe: bool = True  # ... and List-Unsubscribe-Post (RFC 8058)
    aup_url: str = "https://www.example.net/aup"
    templates: Templates = field(default_factory=Templates)
    soft_bounce: bool = False  # turn every 5xx policy refusal into 4xx (rollout safety net)
    # After a mail-bomb refusal at end of DATA, RCPT TO from the same envelope sender to that
    # recipient is deferred (450 4.7.1) for up to this long; 0 turns it off (core.rules.campaign).
    mailbomb_hold: float = 600.0
    store_failure_reply: Reply = Reply(
        451, "4.3.0", "Temporary policy service failure, please try again later"
    )
    upstream_failure_reply: Reply = Reply(
        451, "4.4.1", "Upstream mail server unavailable, please try again later"
    )


@dataclass(frozen=True, slots=True)
class MilterConfig:
    """``[milter]``: ``mailguard milter``'s socket (libmilter syntax) and policy deadline."""

    listen: str = "inet:8890@127.0.0.1"
    # Postfix waits milter_command_timeout (30s) per step: answering before it keeps the answer
    # ours (a tempfail with store_failure_reply) rather than the MTA's milter_default_action.
    timeout: float = 20.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: operational log level and where decision lines go."""

    level: str = "INFO"
    decision_log: str = "-"  # "-" is standard output, otherwise a file path (appended)


@dataclass(frozen=True, slots=True)
class User:
    """``[[customer.user]]``: an SMTP AUTH identity; the hash is an argon2 PHC string."""

    name: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class Customer:
    """``[[customer]]``: a hosting customer allowed to relay through the gate."""

    id: str
    networks: tuple[IPNetwork, ...] = ()
    domains: tuple[str, ...] = ()
    users: tuple[User, ...] = ()
    bulk_sender: bool = False  # a designated list server (HopOne 12.1.4)
    bulk_networks: tuple[IPNetwork, ...] = ()  # only these of its networks are list servers
    transactional_senders: tuple[str, ...] = ()  # envelope senders exempt from the bulk rule
    # Overrides of [policy]'s numbers and actions, as (field of CampaignLimits, value) pairs.
    overrides: tuple[tuple[str, Any], ...] = ()

    def limits(self, policy: PolicyConfig) -> CampaignLimits:
        """This customer's effective numbers and actions."""
        return replace(policy.limits, **dict(self.overrides)) if self.overrides else policy.limits


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, as loaded from one TOML file."""

    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    customers: tuple[Customer, ...] = ()
    source: Path | None = None  # the file this was loaded from, for messages

    @property
    def campaign_window(self) -> float:
        """How long a campaign is remembered after its last message (seconds): the longest
        bulk or mail-bomb window of the policy and of any customer's overrides."""
        limits = [self.policy.limits, *(c.limits(self.policy) for c in self.customers)]
        return max(max(x.bulk_window, x.mailbomb_window) for x in limits)
