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
so the first rule that refuses, in the order above, decides it.
Must never: do I/O, read a clock, or count anything itself (the store counts, atomically).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    recipients within the bulk window with this message's added; ``bulk``: past the threshold)."""

    campaign: str
    distinct: int
    bulk: bool
    recipients: tuple[RecipientCount, ...]


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
        return tuple(True for _ in facts.optin)
    return tuple(facts.designated and ok for ok in facts.optin)


def format_window(seconds: float) -> str:
    """``86400`` -> ``"24h"``, ``90`` -> ``"90s"``: the unit an admin would have written."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0 and not (unit == "d" and seconds < 3 * 86400):
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def decide(
    policy: PolicyConfig, limits: CampaignLimits, count: CampaignCount, sender: SenderFacts
) -> tuple[Verdict, RuleAction | None]:
    """The first refusal the rules find for this message (or Accept), and its rule's action."""
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
        text = templates.mailbomb.format(
            count=worst.mailbomb_count,
            threshold=limits.mailbomb_messages,
            window=numbers["window"],
            recipient=worst.recipient,
            reason="",
            missing="",
            url=url,
        )
        return _refusal("mailbomb", limits.mailbomb_action, text, numbers), limits.mailbomb_action
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
        text = templates.bulk.format(
            count=count.distinct,
            threshold=limits.bulk_recipients,
            window=window,
            recipient=first.recipient,
            reason=reason,
            missing="",
            url=url,
        )
        return _refusal("unsolicited_bulk", limits.bulk_action, text, numbers), limits.bulk_action
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
            text = templates.hygiene.format(
                count=count.distinct,
                threshold=limits.bulk_recipients,
                window=window,
                recipient="",
                reason="",
                missing=missing,
                url=url,
            )
            return (
                _refusal("bulk_hygiene", limits.hygiene_action, text, numbers),
                limits.hygiene_action,
            )
    return Accept(rule="campaign", numbers=_accept_numbers(count, limits)), None


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
        "mailbomb_max": max((r.mailbomb_count for r in count.recipients), default=0),
    }


def has_one_click(values: Sequence[str]) -> bool:
    """RFC 8058: ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``."""
    return any(v.strip().lower() == "list-unsubscribe=one-click" for v in values)
