"""The AUP's e-mail rules as pure decisions: bulk, mail bombing, bulk-mail hygiene.

Responsible for: turning what the store counted for one message of a campaign (a set of
substantively similar messages from one customer) into a typed verdict with the text the
customer reads, naming the rule, its numbers and the AUP clause:

* **Mail bomb** (HopOne 12.2): more than ``mailbomb_messages`` messages of one campaign to the
  same recipient within any ``mailbomb_window``.  Nothing excuses it.
* **Unsolicited bulk** (HopOne 12.1.1, 12.1.4; Hextet 2, 3): past ``bulk_recipients`` distinct
  recipients within ``bulk_window``, every further recipient needs a designated list server
  *and* a confirmed opt-in record.  Envelope senders listed as transactional are exempt.
* **Hygiene** (RFC 2369, RFC 8058): once a campaign is bulk its messages must carry
  ``List-Unsubscribe`` and, when configured, ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``.

Each rule's action is ``reject`` (550 5.7.1), ``defer`` (450 4.7.1) or ``monitor`` (the refusal
is found and logged, the message accepted).  A message gets one reply (SMTP answers DATA once),
so the first rule that refuses, in the order above, decides it; a rule whose action is
``monitor`` refuses nothing, so a later rule that does refuse still decides (the log then shows
that refusal; with every finding monitored, the first one is logged and the message accepted).

**The mail-bomb hold at RCPT** (:func:`hold_verdict`): at RCPT TO the message is not known, so
its campaign is not either, and a mail bomb is about one campaign (HopOne 12.2: "substantively
similar" messages): a different message to the same recipient is never a mail bomb.  So no RCPT
reply can know that end of DATA would refuse the message, and the hold never refuses for good:
after an enforced mail-bomb refusal of a message from envelope sender S to recipient R, a RCPT
TO:<R> in a transaction from S is *deferred* (450 4.7.1, whatever ``mailbomb_action`` is) while
``now < until``, where ``until`` = min(refusal time + ``mailbomb_hold``, the moment a copy of
the refused campaign to R would be accepted again).  A retried copy of the campaign is thus
refused before DATA (it would be refused at end of DATA too); any other message is only delayed,
by at most ``mailbomb_hold`` (plus the client's retry interval), and then decided at end of DATA
as usual.  Only an end-of-DATA refusal starts or renews a hold, so holds cannot renew
themselves.  It does not fire in monitor mode, when the customer's ``mailbomb_action`` is
``monitor``, or when the thresholds changed since the refusal.
Must never: do I/O, read a clock, or count anything itself (the store counts, atomically).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from mailguard.config.schema import CampaignLimits, PolicyConfig, RuleAction
from mailguard.core.verdict import Accept, Defer, Reject, Verdict


@dataclass(frozen=True, slots=True)
class RecipientCount:
    """What the store found for one recipient of the message."""

    recipient: str
    past_bulk: bool  # a new recipient past the bulk threshold that was not excused
    mailbomb_count: int  # messages of the campaign to it within the window, this one included


@dataclass(frozen=True, slots=True)
class CampaignCount:
    """What the store found for the whole message (``distinct``: the campaign's distinct
    recipients within the bulk window with this message's added; ``bulk``: past the threshold).

    ``recipients`` may leave out those with nothing to report (not ``past_bulk``, and not over
    the mail-bomb limit: what the store decided plainly, the common case), as long as
    ``mailbomb_max`` then gives the highest mail-bomb count of all of them (None: the highest
    in ``recipients``)."""

    campaign: str
    distinct: int
    bulk: bool
    recipients: tuple[RecipientCount, ...]
    mailbomb_max: int | None = None


@dataclass(frozen=True, slots=True)
class SenderFacts:
    """What the door knows about the sender and the message headers."""

    designated: bool  # sent from a designated list server (customer or network marked so)
    transactional: bool  # the envelope sender is one of the customer's transactional senders
    optin: tuple[bool, ...]  # per recipient: a confirmed opt-in record is on file
    list_unsubscribe: bool  # the message has a List-Unsubscribe header
    one_click: bool  # ... and List-Unsubscribe-Post: List-Unsubscribe=One-Click


def excused(facts: SenderFacts) -> tuple[bool, ...]:
    """Per recipient: may it be sent past the bulk threshold?  (What the store is told.)"""
    if facts.transactional:
        return (True,) * len(facts.optin)
    if not facts.designated:
        return (False,) * len(facts.optin)
    return tuple(bool(ok) for ok in facts.optin)


@lru_cache(maxsize=256)
def format_window(seconds: float) -> str:
    """``86400`` -> ``"24h"``, ``90`` -> ``"90s"``: the unit an admin would have written."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0 and not (unit == "d" and seconds < 3 * 86400):
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def decide(
    policy: PolicyConfig, limits: CampaignLimits, count: CampaignCount, sender: SenderFacts
) -> tuple[Verdict, RuleAction | None]:
    """The refusal that decides this message (or Accept), and its rule's action.

    The rules are checked in order; the first refusal whose action is not ``monitor`` decides.
    When every refusal found is monitored, the first one is returned with action ``monitor``
    (the caller accepts the message and logs it)."""
    if count.recipients or count.bulk:  # else no rule has anything to find (most mail)
        first_monitored: tuple[Verdict, RuleAction] | None = None
        for finding in _findings(policy, limits, count, sender):
            if finding[1] != "monitor":
                return finding
            if first_monitored is None:
                first_monitored = finding
        if first_monitored is not None:
            return first_monitored
    return Accept(rule="campaign", numbers=_accept_numbers(count, limits)), None


def monitored(policy: PolicyConfig, limits: CampaignLimits) -> tuple[bool, bool]:
    """(bulk, mail bomb): are that rule's refusals only logged, the message sent anyway?  Then
    the store must count the message when it is sent although the rule found it over the limit
    (monitor counts exactly what was sent)."""
    everything = policy.mode == "monitor"
    return (
        everything or limits.bulk_action == "monitor",
        everything or limits.mailbomb_action == "monitor",
    )


def _findings(
    policy: PolicyConfig, limits: CampaignLimits, count: CampaignCount, sender: SenderFacts
) -> Iterator[tuple[Verdict, RuleAction]]:
    """Every rule's refusal of this message, in the rules' order."""
    url = policy.aup_url
    templates = policy.templates
    bombed = [r for r in count.recipients if r.mailbomb_count > limits.mailbomb_messages]
    if bombed:
        worst = max(bombed, key=lambda r: r.mailbomb_count)
        numbers = {
            "campaign": count.campaign,
            "recipient": worst.recipient,
            "count": worst.mailbomb_count,
            "threshold": limits.mailbomb_messages,
            "window": format_window(limits.mailbomb_window),
        }
        text = _fill(
            templates.mailbomb,
            count=worst.mailbomb_count,
            threshold=limits.mailbomb_messages,
            window=numbers["window"],
            recipient=worst.recipient,
            url=url,
        )
        action = limits.mailbomb_action
        yield _refusal("mailbomb", action, text, numbers), action
    window = format_window(limits.bulk_window)
    past = [r for r in count.recipients if r.past_bulk]
    if past and not sender.transactional:
        first = past[0]
        if not sender.designated:
            reason = "this server is not a designated list server"
        else:
            reason = f"<{first.recipient}> has no confirmed opt-in record"
        numbers = {
            "campaign": count.campaign,
            "count": count.distinct,
            "threshold": limits.bulk_recipients,
            "window": window,
            "recipient": first.recipient,
            "refused_recipients": len(past),
        }
        text = _fill(
            templates.bulk,
            count=count.distinct,
            threshold=limits.bulk_recipients,
            window=window,
            recipient=first.recipient,
            reason=reason,
            url=url,
        )
        yield _refusal("unsolicited_bulk", limits.bulk_action, text, numbers), limits.bulk_action
    if count.bulk and not sender.transactional:
        missing = _missing_headers(policy, sender)
        if missing:
            numbers = {
                "campaign": count.campaign,
                "count": count.distinct,
                "threshold": limits.bulk_recipients,
                "window": window,
                "missing": missing,
            }
            text = _fill(
                templates.hygiene,
                count=count.distinct,
                threshold=limits.bulk_recipients,
                window=window,
                missing=missing,
                url=url,
            )
            action = limits.hygiene_action
            yield _refusal("bulk_hygiene", action, text, numbers), action


@dataclass(frozen=True, slots=True)
class MailbombHold:
    """What the store remembers after an enforced mail-bomb refusal, per (customer, envelope
    sender, recipient): the refused message's campaign and number, the limits it was refused
    under, and ``until``, when the hold ends (Unix seconds)."""

    campaign: str
    count: int
    threshold: int
    window: float
    until: float


def hold_verdict(
    policy: PolicyConfig, limits: CampaignLimits, recipient: str, hold: MailbombHold, now: float
) -> Defer | None:
    """The RCPT-time deferral of ``recipient`` under ``hold`` (see the module docstring), or
    None when the hold does not apply: it has ended, the policy only monitors (or is off), the
    customer's mail-bomb action is ``monitor``, or the limits differ from those the message was
    refused under (the config changed: end of DATA decides)."""
    if (
        policy.mode != "enforce"
        or policy.mailbomb_hold <= 0
        or limits.mailbomb_action == "monitor"
        or hold.threshold != limits.mailbomb_messages
        or hold.window != limits.mailbomb_window
        or not now < hold.until
    ):
        return None
    window = format_window(limits.mailbomb_window)
    hold_for = format_window(policy.mailbomb_hold)
    numbers = {
        "campaign": hold.campaign,
        "recipient": recipient,
        "count": hold.count,
        "threshold": hold.threshold,
        "window": window,
        "hold": hold_for,
    }
    text = _fill(
        policy.templates.mailbomb_hold,
        count=hold.count,
        threshold=hold.threshold,
        window=window,
        recipient=recipient,
        hold=hold_for,
        url=policy.aup_url,
    )
    return Defer(450, "4.7.1", text, HOLD_RULE, numbers)


HOLD_RULE = "mailbomb_hold"


def _fill(template: str, **values: object) -> str:
    """``template`` with its placeholders filled; those a rule has no value for are empty."""
    return template.format_map({**_EMPTY_PLACEHOLDERS, **values})


_EMPTY_PLACEHOLDERS = dict.fromkeys(
    ("count", "threshold", "window", "recipient", "reason", "missing", "hold", "url"), ""
)


def _missing_headers(policy: PolicyConfig, sender: SenderFacts) -> str:
    needed: list[str] = []
    if policy.require_list_unsubscribe and not sender.list_unsubscribe:
        needed.append("List-Unsubscribe")
    if policy.require_one_click_unsubscribe and not sender.one_click:
        needed.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    return " and ".join(needed)


def _refusal(rule: str, action: RuleAction, text: str, numbers: dict[str, object]) -> Verdict:
    if action == "defer":
        return Defer(450, "4.7.1", text, rule, numbers)
    return Reject(550, "5.7.1", text, rule, numbers)  # "monitor" is applied by the caller


def _accept_numbers(count: CampaignCount, limits: CampaignLimits) -> dict[str, object]:
    return {
        "campaign": count.campaign,
        "distinct": count.distinct,
        "bulk": count.bulk,
        "threshold": limits.bulk_recipients,
        "mailbomb_max": (
            max((r.mailbomb_count for r in count.recipients), default=0)
            if count.mailbomb_max is None
            else count.mailbomb_max
        ),
    }


def has_one_click(values: Sequence[str]) -> bool:
    """RFC 8058: ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``."""
    return any(v.strip().lower() == "list-unsubscribe=one-click" for v in values)
