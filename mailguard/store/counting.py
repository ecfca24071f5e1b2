"""Campaign counting for the AUP's bulk and mail-bomb rules (issue 4): reserve, then settle.

Responsible for: the atomic counters behind the two rules, one Lua script per decision
(``lua/campaign_reserve.lua``, ``lua/campaign_settle.lua``), their key layout and typed results.
Must never: decide policy (which action, which reply text, who is excused: the caller says so),
read a clock (``now`` comes in), or let a Redis exception escape (``RedisStore.run`` turns every
failure into ``StoreError``).

Semantics (the scripts' headers say the same in Lua terms):

* **Reserve, then settle.**  At end of DATA the door calls :meth:`CampaignCounter.reserve` for the
  whole message (SMTP has one reply to DATA).  The script decides every recipient and reserves
  the message *only if every recipient is allowed* (all or nothing: with one refused recipient
  nothing is reserved or counted; the script only drops data that no longer counts; refusals of
  monitored rules, below, do not count as refusals here).  When the
  upstream accepts, :meth:`~CampaignCounter.commit` turns the reservation into counted sends;
  otherwise :meth:`~CampaignCounter.release` removes it as if it never happened, so a deferred
  message retried later does not use up quota.  Settling is idempotent.  A reservation not
  settled within ``reservation_ttl`` no longer counts (and a late commit counts nothing: keep the
  ttl well above the upstream's timeout); expired reservations are purged lazily by the next
  reserve of the campaign.
* **Monitored rules.**  When the caller says a rule's refusals are only monitored (``monitored``:
  the policy is in monitor mode, or the rule's action is ``monitor``), a message refused only
  by such rules is reserved all the same (its recipients' verdicts still say BULK / MAILBOMB),
  so that, sent anyway, it is counted when committed: in monitor mode the counters hold exactly
  what was sent.  A bulk-refused recipient so reserved is past the threshold like an EXCUSED
  one (it does not join the set; committing marks the campaign bulk).
* **Bulk.**  The campaign's *bulk set* is the recipients with a committed send within the sliding
  ``bulk_window`` plus those held by live reservations, each counted once.  A recipient already in
  the set is ``SEEN`` and adds nothing.  While the set has fewer than ``bulk_recipients`` members
  a new recipient is ``NEW`` (distinct number ``n <= bulk_recipients``) and joins it; a new
  recipient that would be number ``bulk_recipients + 1`` or later is past the threshold: refused
  (``BULK``) unless the caller marked it excused (designated list server *and* confirmed opt-in),
  then ``EXCUSED``.  Recipients past the threshold never join the set, so a campaign's memory is
  bounded by ``bulk_recipients``; instead committing a message with one of them marks the campaign
  bulk until ``now + bulk_window``, and every commit while it is marked refreshes the mark.
  *Approximation:* while marked, every recipient outside the set counts as past the threshold,
  even if fewer than ``bulk_recipients`` distinct recipients got mail in the last window: a bulk
  campaign stays bulk until it has been silent for a whole ``bulk_window``.  The distinct count
  reported for a marked campaign is therefore a lower bound (``bulk_recipients`` + the recipients
  past it in this message), which is exactly "one of 21" for the first refused recipient.
* **Mail bomb.**  Per campaign and recipient a true sliding log of committed sends (a sorted set
  of commit times, one member per message) plus the recipient's live reservations (a count in the
  campaign's ``pend`` hash), this message included.  Message number ``mailbomb_messages + 1`` to
  one recipient within any ``mailbomb_window`` is refused (``MAILBOMB``), excused or not.  A
  recipient refused by both rules reports ``MAILBOMB``.  Every live reservation counts, however
  old (a reservation lives ``reservation_ttl``, normally far shorter than the window).
* **Recipients** are normalized (``<>`` and whitespace stripped, lower-cased) and stored as a
  128-bit BLAKE2b hash, so keys and members stay small and no address is stored.  The same
  recipient twice in one message counts once.
* **Windows** are ``(now - window, ...]``: an entry exactly ``window`` old has left.  Entries later
  than ``now`` (a gate whose clock runs ahead) count: the safe side for a quota.
* **Keys** (all of one customer share the hash tag ``{customer}``, so both scripts run unchanged
  on Redis Cluster; every key a script touches is in its KEYS)::

      {prefix}:{{customer}}:cust:camp:{campaign}:sent        ZSET rcpt hash -> last send time
      {prefix}:{{customer}}:cust:camp:{campaign}:held        HASH rcpt hash -> live holds (set)
      {prefix}:{{customer}}:cust:camp:{campaign}:pend        HASH rcpt hash -> live holds (all)
      {prefix}:{{customer}}:cust:camp:{campaign}:resv        HASH reservation id -> record (*)
      {prefix}:{{customer}}:cust:camp:{campaign}:resx        ZSET reservation id -> expiry
      {prefix}:{{customer}}:cust:camp:{campaign}:bulk_until  STRING time the bulk mark ends
      {prefix}:{{customer}}:cust:camp:{campaign}:mb:{hash}   ZSET c:<id> -> commit time

  (*) A struct-packed record (``lua/campaign_reserve.lua``'s header); records written as JSON
  by earlier versions (and for recipient hashes of unequal length) are read too, so an upgrade
  in place settles the reservations in flight.  An earlier version's scripts fail on packed
  records (a decode error), so downgrade only after draining the gates, with no packed record
  left (settled, or expired and purged; or delete the campaigns' ``camp:*`` keys).
  Every key written gets ``PEXPIRE max(bulk_window, mailbomb_window) + reservation_ttl``.
* **Cost.**  A reserve reads with a fixed number of commands plus one ``ZCOUNT`` per recipient
  and writes only the campaign's hashes (no per-recipient key); entries that left a window are
  ignored when reading and trimmed by the commit that writes the key.  No command scans a log;
  the bulk set's committed part is read whole when it has fewer than 128 members (normally at
  most ``bulk_recipients``), else counted and looked up by score.
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import cast, overload

from mailguard.core.fingerprint.sketch import Fingerprint
from mailguard.store.clustering import ClusterStore, decode_id
from mailguard.store.redis_store import RedisStore, float_arg, lua_script

CAMPAIGN = "camp"
MAX_RESERVATION_ID = 128


@lru_cache(maxsize=8192)  # a gate sends to the same recipients again and again
def recipient_key(recipient: str) -> str:
    """The stored form of a recipient address: a hash of its normalized (lower-case) text."""
    normalized = recipient.strip().removeprefix("<").removesuffix(">").strip().lower()
    data = normalized.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class CountingParams:
    """The thresholds and windows of one decision (the customer's effective policy)."""

    bulk_recipients: int = 20
    bulk_window: float = 86400.0
    mailbomb_messages: int = 10
    mailbomb_window: float = 86400.0
    reservation_ttl: float = 900.0

    def __post_init__(self) -> None:
        for name in ("bulk_recipients", "mailbomb_messages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
        for name in ("bulk_window", "mailbomb_window", "reservation_ttl"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")

    @property
    def key_ttl(self) -> float:
        """Seconds every written key lives after its last write."""
        return max(self.bulk_window, self.mailbomb_window) + self.reservation_ttl


class Verdict(enum.IntEnum):
    """What the reserve script decided for one recipient (the values are the script's codes)."""

    NEW = 1  # not yet counted: joins the bulk set as distinct recipient ``number``
    SEEN = 2  # already in the bulk set (sent to, or reserved, within the window)
    EXCUSED = 3  # past the bulk threshold, allowed because the caller excused it
    BULK = 4  # refused: past the bulk threshold and not excused
    MAILBOMB = 5  # refused: message ``mailbomb_count`` > mailbomb_messages to this recipient

    @property
    def allowed(self) -> bool:
        return self in (Verdict.NEW, Verdict.SEEN, Verdict.EXCUSED)


class SettleOutcome(enum.IntEnum):
    """What settling a reservation did (the values are the settle script's codes)."""

    UNKNOWN = 0  # no such live reservation: already settled, or expired and purged
    COMMITTED = 1
    EXPIRED = 2  # it expired before being settled: removed, nothing counted
    RELEASED = 3


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The decision for one recipient of the message."""

    recipient: str  # as given by the caller
    key: str  # recipient_key(recipient)
    verdict: Verdict
    number: int  # its distinct number in the campaign (0 if SEEN); > threshold = past it
    mailbomb_count: int  # messages of the campaign to it in the window, this one included
    past: bool = False  # past the bulk threshold (EXCUSED, BULK, or a MAILBOMB that also is)

    @property
    def allowed(self) -> bool:
        return self.verdict.allowed


@dataclass(frozen=True, slots=True)
class Reservation:
    """A reserved message, to be committed or released (plain data: it can be kept anywhere)."""

    customer: str
    campaign: str
    id: str
    recipient_keys: tuple[str, ...]  # distinct, in the order they were reserved
    expires_at: float


class RecipientResults(Sequence[RecipientResult]):
    """The per-recipient results of one reserve (a sequence of :class:`RecipientResult`, one per
    recipient given, in the order given), parsed from the script's reply on first use: in the
    common case (every recipient ``plain``) a caller needs only :attr:`plain` and
    :attr:`mailbomb_max`, read from the reply without building a result per recipient."""

    __slots__ = ("_call", "_items", "_raw")

    def __init__(self, call: _ReserveCall | None, raw: Sequence[int | bytes]) -> None:
        self._call = call
        self._raw = raw  # the script's reply: reserved, distinct, bulk, then 3 per recipient
        self._items: tuple[RecipientResult, ...] | None = None

    @classmethod
    def of(cls, items: Sequence[RecipientResult]) -> RecipientResults:
        """Results already built."""
        found = cls(None, ())
        found._items = tuple(items)
        return found

    def _parsed(self) -> tuple[RecipientResult, ...]:
        items = self._items
        if items is None:
            assert self._call is not None
            items = self._items = self._call.recipient_results(self._raw)
        return items

    @property
    def plain(self) -> bool:
        """Every recipient is ``NEW`` or ``SEEN``: allowed, within the bulk threshold and the
        mail-bomb limit (nothing a reply text or refusal would name)."""
        if self._items is None:
            return max(cast("Sequence[int]", self._raw[3::3])) <= Verdict.SEEN
        return all(r.verdict <= Verdict.SEEN for r in self._items)

    @property
    def mailbomb_max(self) -> int:
        """The highest per-recipient mail-bomb count."""
        if self._items is None:
            return int(max(cast("Sequence[int]", self._raw[5::3])))
        return max(r.mailbomb_count for r in self._items)

    @overload
    def __getitem__(self, index: int) -> RecipientResult: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[RecipientResult, ...]: ...

    def __getitem__(self, index: int | slice) -> RecipientResult | tuple[RecipientResult, ...]:
        return self._parsed()[index]

    def __len__(self) -> int:
        return len(self._parsed()) if self._call is None else len(self._call.recipients)

    def __iter__(self) -> Iterator[RecipientResult]:
        return iter(self._parsed())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecipientResults):
            return self._parsed() == other._parsed()
        if isinstance(other, tuple):
            return self._parsed() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._parsed())

    def __repr__(self) -> str:
        return repr(self._parsed())


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The whole message's decision, with the numbers a reply text needs.

    ``distinct`` counts the campaign's distinct recipients within the bulk window with this
    message's recipients added (a lower bound once the campaign is bulk, see the module
    docstring): the "21" of "one of 21 substantively similar messages to different recipients".
    """

    # set iff every recipient is allowed or refused only by a rule the caller monitors
    reservation: Reservation | None
    recipients: RecipientResults  # one per recipient given, in the order given
    distinct: int
    bulk: bool  # the campaign is past the threshold (with this message)
    params: CountingParams

    @property
    def allowed(self) -> bool:
        """Every recipient is allowed (monitored or not)."""
        return self.recipients.plain or all(r.allowed for r in self.recipients)

    @property
    def refused(self) -> tuple[RecipientResult, ...]:
        return tuple(r for r in self.recipients if not r.allowed)

    @property
    def mailbomb_count(self) -> int:
        """The highest per-recipient mail-bomb count of this message."""
        return self.recipients.mailbomb_max


@dataclass(frozen=True, slots=True)
class CampaignKeys:
    """The keys of one campaign (see the layout in the module docstring)."""

    sent: str
    held: str
    pend: str
    resv: str
    resx: str
    bulk_until: str
    mailbomb_prefix: str  # + recipient_key(...) = that recipient's mail-bomb log

    @classmethod
    def of(cls, store: RedisStore, customer: str, campaign: str) -> CampaignKeys:
        """``ValueError`` if ``customer`` or ``campaign`` is empty."""
        if not campaign:
            raise ValueError("campaign id must not be empty")

        # The parts are fixed names that need no escaping: escape the variable segments once.
        return cls.under(store.keys.customer_key(customer, CAMPAIGN, campaign) + ":")

    @classmethod
    def under(cls, base: str) -> CampaignKeys:
        """The keys under ``base``: a campaign's key name prefix, ending in ``:``."""
        return cls(
            base + "sent",
            base + "held",
            base + "pend",
            base + "resv",
            base + "resx",
            base + "bulk_until",
            base + "mb:",
        )

    def script_keys(self, recipient_keys: Sequence[str]) -> list[str]:
        """KEYS for both scripts: the six campaign keys, then one log per recipient."""
        fixed = [self.sent, self.held, self.pend, self.resv, self.resx, self.bulk_until]
        return fixed + [self.mailbomb_prefix + k for k in recipient_keys]


_PLAIN_ID = re.compile(r"[0-9a-f]{16}")  # a cluster id: no key escaping changes it
_KEY_CACHE = 4096  # customers whose campaign key prefix is kept


class _CampaignPrefixes:
    """``customer_key(customer, CAMPAIGN) + ":"`` per customer (building it costs ~10 us), and
    the ``CampaignKeys`` of recent campaigns with a cluster id (every settle needs them)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._found: dict[str, str] = {}
        self._campaigns: dict[tuple[str, str], CampaignKeys] = {}

    def of(self, customer: str) -> str:
        found = self._found.get(customer)
        if found is None:
            found = self.store.keys.customer_key(customer, CAMPAIGN) + ":"
            if len(self._found) >= _KEY_CACHE:
                self._found.clear()
            self._found[customer] = found
        return found

    def keys(self, customer: str, campaign: str) -> CampaignKeys:
        """``CampaignKeys.of(store, customer, campaign)``, without escaping a cluster id."""
        pair = (customer, campaign)
        found = self._campaigns.get(pair)
        if found is not None:
            return found
        if not _PLAIN_ID.fullmatch(campaign):
            return CampaignKeys.of(self.store, customer, campaign)
        found = CampaignKeys.under(self.of(customer) + campaign + ":")
        if len(self._campaigns) >= _KEY_CACHE:
            self._campaigns.clear()
        self._campaigns[pair] = found
        return found


class _ReserveCall:
    """One reserve call's arguments, and what its result is parsed with (a plain class: it is
    built for every message)."""

    __slots__ = (
        "args",
        "customer",
        "now",
        "params",
        "recipient_keys",
        "recipients",
        "rid",
        "unique",
    )

    def __init__(
        self,
        customer: str,
        recipients: Sequence[str],
        recipient_keys: list[str],  # recipient_key() of each recipient, in the order given
        unique: list[str],  # distinct recipient keys, in the order reserved
        args: list[str],  # campaign_reserve.lua's ARGV
        rid: str,
        now: float,
        params: CountingParams,
    ) -> None:
        self.customer = customer
        self.recipients = recipients
        self.recipient_keys = recipient_keys
        self.unique = unique
        self.args = args
        self.rid = rid
        self.now = now
        self.params = params

    def result(self, campaign: str, raw: Sequence[int | bytes]) -> ReserveResult:
        reservation = None
        if int(raw[0]) == 1:
            reservation = Reservation(
                self.customer,
                campaign,
                self.rid,
                tuple(self.unique),
                float(self.now) + self.params.reservation_ttl,
            )
        recipients = RecipientResults(self, raw)  # parsed when first needed
        return ReserveResult(reservation, recipients, int(raw[1]), int(raw[2]) == 1, self.params)

    def recipient_results(self, raw: Sequence[int | bytes]) -> tuple[RecipientResult, ...]:
        """The per-recipient part of the script's reply ``raw``, one result per recipient."""
        threshold = self.params.bulk_recipients
        verdicts = _VERDICTS
        decided = []
        for at in range(3, 3 + 3 * len(self.unique), 3):
            code, number = int(raw[at]), int(raw[at + 1])
            verdict = verdicts.get(code) or Verdict(code)
            decided.append((verdict, number, int(raw[at + 2]), number > threshold))
        if len(self.unique) == len(self.recipients):  # no recipient twice: the same order
            found = zip(self.recipients, self.unique, decided, strict=True)
            return tuple(RecipientResult(r, rkey, *decision) for r, rkey, decision in found)
        by_key = dict(zip(self.unique, decided, strict=True))
        return tuple(
            RecipientResult(recipient, rkey, *by_key[rkey])
            for recipient, rkey in zip(self.recipients, self.recipient_keys, strict=True)
        )


_VERDICTS = {int(v): v for v in Verdict}  # a dict lookup: calling an enum class costs more
_OUTCOMES = {int(v): v for v in SettleOutcome}


def _new_reservation_id() -> str:
    """``uuid.uuid4().hex`` (the same random version-4 UUID), without building a ``UUID``."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


# id(params) -> (params, its ARGV): looked up by identity (hashing the dataclass costs more);
# the entry keeps ``params`` alive, so its id cannot be reused while it is here.
_PARAMS_ARGS: dict[int, tuple[CountingParams, tuple[str, ...]]] = {}


def _params_args(params: CountingParams) -> tuple[str, ...]:
    """ARGV[3..7] of campaign_reserve.lua for ``params`` (kept: a gate has a few of them)."""
    found = _PARAMS_ARGS.get(id(params))
    if found is not None and found[0] is params:
        return found[1]
    args = (
        str(params.bulk_recipients),
        float_arg("bulk_window", params.bulk_window),
        str(params.mailbomb_messages),
        float_arg("mailbomb_window", params.mailbomb_window),
        float_arg("reservation_ttl", params.reservation_ttl),
    )
    if len(_PARAMS_ARGS) >= 256:
        _PARAMS_ARGS.clear()
    _PARAMS_ARGS[id(params)] = (params, args)
    return args


_MONITORED = {(b, m): str(int(b) + 2 * int(m)) for b in (False, True) for m in (False, True)}


def _reserve_call(
    customer: str,
    recipients: Sequence[str],
    now: float,
    params: CountingParams | None,
    excused: Sequence[bool] | None,
    reservation_id: str | None,
    monitored: tuple[bool, bool] = (False, False),
) -> _ReserveCall:
    """Check and convert the arguments of a reserve (``ValueError`` / ``TypeError``)."""
    params = params or CountingParams()
    if isinstance(recipients, str):
        raise TypeError("recipients must be a sequence of addresses, not one string")
    if not recipients:
        raise ValueError("a message needs at least one recipient")
    flags = None if excused is None else [bool(e) for e in excused]
    if flags is not None and len(flags) != len(recipients):
        raise ValueError("excused must have one flag per recipient")
    rid = _new_reservation_id() if reservation_id is None else reservation_id
    if not rid or len(rid) > MAX_RESERVATION_ID:
        raise ValueError(f"reservation id must be 1..{MAX_RESERVATION_ID} characters")
    if not customer:
        raise ValueError("customer id must not be empty")
    rkeys = [recipient_key(r) for r in recipients]
    args = [float_arg("now", now), rid, *_params_args(params)]
    args.append(_MONITORED.get(monitored) or str(int(monitored[0]) + 2 * int(monitored[1])))
    # One entry per distinct recipient (first copy's place), excused if any of its copies is.
    if flags is None or not any(flags):  # nobody excused (most mail): no per-recipient loop
        unique = list(dict.fromkeys(rkeys))
        pairs: list[str] = [""] * (2 * len(unique))
        pairs[0::2] = unique
        pairs[1::2] = ["0"] * len(unique)
    else:
        order: dict[str, bool] = {}
        for rkey, flag in zip(rkeys, flags, strict=True):
            order[rkey] = order.get(rkey, False) or flag
        unique = list(order)
        pairs = []
        for rkey, flag in order.items():
            pairs += [rkey, "1" if flag else "0"]
    args += pairs
    return _ReserveCall(customer, recipients, rkeys, unique, args, rid, now, params)


class CampaignCounter:
    """Bulk and mail-bomb counting on a ``RedisStore`` (see the module docstring)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._reserve = store.script(lua_script("campaign_reserve"))
        self._settle = store.script(lua_script("campaign_settle"))
        self._prefixes = _CampaignPrefixes(store)

    async def reserve(
        self,
        customer: str,
        campaign: str,
        recipients: Sequence[str],
        now: float,
        *,
        params: CountingParams | None = None,
        excused: Sequence[bool] | None = None,
        reservation_id: str | None = None,
        monitored: tuple[bool, bool] = (False, False),
    ) -> ReserveResult:
        """Decide one message of ``campaign`` to ``recipients``; reserve it iff all are allowed
        (or refused only by a monitored rule).

        ``excused[i]`` says recipient ``i`` may be sent past the bulk threshold (default: none
        is).  ``monitored`` = (bulk, mail bomb): that rule's refusals are only logged, and the
        message will be sent (module docstring).  ``reservation_id`` must be unique per message
        attempt (default: a random one); a repeated call with the same id returns the first
        answer without counting twice.
        ``ValueError`` for bad arguments, ``StoreError`` if the store fails.
        """
        call = _reserve_call(customer, recipients, now, params, excused, reservation_id, monitored)
        script_keys = self._prefixes.keys(customer, campaign).script_keys(call.unique)
        raw = await self.store.run_script("campaign_reserve", self._reserve, script_keys, call.args)
        return call.result(campaign, raw)

    async def settle(self, reservation: Reservation, *, commit: bool, now: float) -> SettleOutcome:
        """Commit (the upstream accepted) or release (it did not) ``reservation``; idempotent."""
        keys = self._prefixes.keys(reservation.customer, reservation.campaign)
        script_keys = keys.script_keys(reservation.recipient_keys)
        args = [float_arg("now", now), reservation.id, "1" if commit else "0"]
        args += reservation.recipient_keys
        raw = await self.store.run_script("campaign_settle", self._settle, script_keys, args)
        outcome = _OUTCOMES.get(int(raw))  # UNKNOWN is 0: no ``or`` here
        return outcome if outcome is not None else SettleOutcome(int(raw))

    async def commit(self, reservation: Reservation, now: float) -> SettleOutcome:
        """The message was sent: its reservation becomes counted sends."""
        return await self.settle(reservation, commit=True, now=now)

    async def release(self, reservation: Reservation, now: float) -> SettleOutcome:
        """The message was not sent: forget the reservation, as if it never happened."""
        return await self.settle(reservation, commit=False, now=now)


@cache
def decide_script() -> str:
    """``lua/campaign_decide.lua`` with the functions it calls: the bodies of
    ``cluster_assign.lua`` and ``campaign_reserve.lua``, each unchanged as a function of its own
    KEYS and ARGV."""
    parts = [
        f"local function {name}(KEYS, ARGV)\n{lua_script(name)}\nend\n"
        for name in ("cluster_assign", "campaign_reserve")
    ]
    return "".join(parts) + lua_script("campaign_decide")


class CampaignDecider:
    """A message's campaign assignment and reservation in ONE atomic script call.

    The same as :meth:`ClusterStore.assign` followed by :meth:`CampaignCounter.reserve` in the
    assigned campaign (both scripts' bodies run unchanged inside ``lua/campaign_decide.lua``),
    with one round trip instead of two.  Every key is the customer's (one hash tag), so the
    script runs on Redis Cluster too.  Settle with ``counter``.
    """

    def __init__(self, clusters: ClusterStore, counter: CampaignCounter) -> None:
        if clusters.store is not counter.store:
            raise ValueError("the cluster store and the counter must share one RedisStore")
        self.clusters = clusters
        self.counter = counter
        self.store = counter.store
        self._decide = self.store.script(decide_script())
        self._prefixes = counter._prefixes

    async def assign_and_reserve(
        self,
        customer: str,
        fp: Fingerprint,
        recipients: Sequence[str],
        now: float,
        *,
        params: CountingParams | None = None,
        excused: Sequence[bool] | None = None,
        reservation_id: str | None = None,
        monitored: tuple[bool, bool] = (False, False),
    ) -> tuple[str, ReserveResult]:
        """The campaign of ``customer``'s message with fingerprint ``fp``, and the result of
        reserving it there (arguments and errors as for the two methods it combines)."""
        call = _reserve_call(customer, recipients, now, params, excused, reservation_id, monitored)
        keys, assign_args = self.clusters.script_call(customer, fp, now)
        args = [*assign_args, self._prefixes.of(customer), *call.args]
        raw = await self.store.run_script("campaign_decide", self._decide, keys, args)
        campaign = decode_id(raw[0])
        return campaign, call.result(campaign, raw[2])
