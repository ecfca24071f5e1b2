"""The AUP mail rules as pure decisions: texts, numbers, order, actions (no I/O)."""

from __future__ import annotations

import dataclasses

import pytest

from mailguard.config.schema import CampaignLimits, PolicyConfig
from mailguard.core.policy import Policy
from mailguard.core.rules.campaign import (
    CampaignCount,
    MailbombHold,
    RecipientCount,
    SenderFacts,
    decide,
    excused,
    format_window,
    has_one_click,
    hold_verdict,
    monitored,
)
from mailguard.core.verdict import Accept, Defer, Reject

POLICY = PolicyConfig(aup_url="https://hosting.example/aup")
LIMITS = POLICY.limits
PLAIN = SenderFacts(False, False, (False,), False, False)


def count(distinct: int, bulk: bool, *recipients: RecipientCount) -> CampaignCount:
    return CampaignCount("c1", distinct, bulk, recipients)


def test_under_threshold_accepts() -> None:
    verdict, action = decide(
        POLICY, LIMITS, count(20, False, RecipientCount("a@x", False, 1)), PLAIN
    )
    assert isinstance(verdict, Accept) and action is None
    assert verdict.numbers["distinct"] == 20


def test_unsolicited_bulk_text_names_rule_numbers_and_clause() -> None:
    verdict, action = decide(
        POLICY,
        LIMITS,
        count(21, True, RecipientCount("bob@example.org", True, 1)),
        SenderFacts(True, False, (False,), True, True),
    )
    assert isinstance(verdict, Reject) and action == "reject"
    assert verdict.reply() == (
        "550 5.7.1 Refused: this message is one of 21 substantively similar messages to "
        "different recipients in 24h, and <bob@example.org> has no confirmed opt-in record "
        "(AUP: unsolicited bulk e-mail). See https://hosting.example/aup"
    )
    assert verdict.numbers["count"] == 21 and verdict.numbers["threshold"] == 20


def test_not_a_list_server() -> None:
    verdict, _ = decide(POLICY, LIMITS, count(21, True, RecipientCount("b@x", True, 1)), PLAIN)
    assert "not a designated list server" in verdict.reply()  # type: ignore[union-attr]


def test_mailbomb_wins_and_is_not_excused() -> None:
    verdict, _ = decide(
        POLICY,
        LIMITS,
        count(5, False, RecipientCount("v@example.org", False, 11)),
        SenderFacts(True, True, (True,), True, True),
    )
    assert verdict.rule == "mailbomb"
    assert verdict.reply().startswith("550 5.7.1 Refused: this would be message 11 ")  # type: ignore[union-attr]
    assert "<v@example.org> in 24h; at most 10 are allowed (AUP: mail bombing)" in verdict.reply()  # type: ignore[union-attr]


def test_transactional_sender_exempt_from_bulk_only() -> None:
    sender = SenderFacts(False, True, (False, False), False, False)
    assert excused(sender) == (True, True)
    verdict, _ = decide(POLICY, LIMITS, count(40, True, RecipientCount("b@x", False, 1)), sender)
    assert isinstance(verdict, Accept)


def test_excused_needs_list_server_and_optin() -> None:
    assert excused(SenderFacts(True, False, (True, False), False, False)) == (True, False)
    assert excused(SenderFacts(False, False, (True, True), False, False)) == (False, False)


@pytest.mark.parametrize(
    ("lu", "one_click", "missing"),
    [
        (False, False, "List-Unsubscribe and List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
        (True, False, "List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
        (True, True, None),
    ],
)
def test_hygiene(lu: bool, one_click: bool, missing: str | None) -> None:
    sender = SenderFacts(True, False, (True,), lu, one_click)
    verdict, _ = decide(POLICY, LIMITS, count(30, True, RecipientCount("b@x", False, 1)), sender)
    if missing is None:
        assert isinstance(verdict, Accept)
    else:
        assert verdict.rule == "bulk_hygiene"
        assert f"must carry {missing} (RFC 2369, RFC 8058" in verdict.reply()  # type: ignore[union-attr]


def test_actions_defer_and_monitor() -> None:
    limits = dataclasses.replace(LIMITS, bulk_action="defer")
    c = count(21, True, RecipientCount("b@x", True, 1))
    verdict, _ = decide(POLICY, limits, c, PLAIN)
    assert isinstance(verdict, Defer) and verdict.reply().startswith("450 4.7.1 Refused")
    monitor = dataclasses.replace(LIMITS, bulk_action="monitor")
    headers = SenderFacts(False, False, (False,), True, True)
    decision = Policy(POLICY).campaign(monitor, c, headers)
    assert not decision.refused and decision.found.rule == "unsolicited_bulk"


def test_a_monitored_rule_never_hides_a_later_refusal() -> None:
    """The first rule that refuses decides; a monitored rule refuses nothing, so the next rule
    that finds something still refuses (one message to a bombed recipient and to a recipient
    past the bulk threshold must not get past the bulk rule because bombs are only watched)."""
    both = count(21, True, RecipientCount("v@x", False, 11), RecipientCount("new@x", True, 1))
    headers = SenderFacts(False, False, (False, False), True, True)
    watch_bombs = dataclasses.replace(LIMITS, mailbomb_action="monitor")
    verdict, action = decide(POLICY, watch_bombs, both, headers)
    assert verdict.rule == "unsolicited_bulk" and action == "reject"
    # Every finding monitored: the first is logged, the message accepted.
    watch_all = dataclasses.replace(watch_bombs, bulk_action="monitor")
    verdict, action = decide(POLICY, watch_all, both, headers)
    assert verdict.rule == "mailbomb" and action == "monitor"
    decision = Policy(POLICY).campaign(watch_all, both, headers)
    assert not decision.refused and decision.found.rule == "mailbomb"
    # Hygiene has its own action: a monitored bulk rule does not excuse missing headers.
    verdict, action = decide(POLICY, watch_all, both, PLAIN)
    assert verdict.rule == "bulk_hygiene" and action == "reject"


def test_monitored_flags_for_the_store() -> None:
    assert monitored(POLICY, LIMITS) == (False, False)
    assert monitored(dataclasses.replace(POLICY, mode="monitor"), LIMITS) == (True, True)
    assert monitored(POLICY, dataclasses.replace(LIMITS, mailbomb_action="monitor")) == (
        False,
        True,
    )
    assert monitored(POLICY, dataclasses.replace(LIMITS, bulk_action="monitor")) == (True, False)


def test_global_soft_bounce_applies() -> None:
    decision = Policy(PolicyConfig(soft_bounce=True)).campaign(
        LIMITS, count(21, True, RecipientCount("b@x", True, 1)), PLAIN
    )
    assert decision.verdict.reply().startswith("450 4.7.1")  # type: ignore[union-attr]


def test_custom_limits_in_text() -> None:
    limits = CampaignLimits(bulk_recipients=5, bulk_window=3600.0)
    verdict, _ = decide(POLICY, limits, count(6, True, RecipientCount("b@x", True, 1)), PLAIN)
    assert "one of 6 substantively similar messages to different recipients in 1h" in (
        verdict.reply()  # type: ignore[union-attr]
    )


def test_helpers() -> None:
    assert format_window(86400) == "24h"
    assert format_window(45 * 86400) == "45d"
    assert format_window(90) == "90s"
    assert format_window(900) == "15m"
    assert has_one_click([" List-Unsubscribe=One-Click "])
    assert not has_one_click(["yes"])


# -- the mail-bomb hold at RCPT ----------------------------------------------------------------

HOLD = MailbombHold(campaign="c1", count=11, threshold=10, window=86400.0, until=1000.0)


def test_hold_defers_with_its_own_text_and_numbers() -> None:
    verdict = hold_verdict(POLICY, LIMITS, "v@example.org", HOLD, 999.5)
    assert isinstance(verdict, Defer) and verdict.rule == "mailbomb_hold"
    assert verdict.reply() == (
        "450 4.7.1 Deferred: mail from this sender to <v@example.org> is held for up to 10m "
        "after message 11 of substantively similar messages to it in 24h was refused; at most "
        "10 are allowed (AUP: mail bombing). See https://hosting.example/aup"
    )
    assert dict(verdict.numbers) == {
        "campaign": "c1",
        "recipient": "v@example.org",
        "count": 11,
        "threshold": 10,
        "window": "24h",
        "hold": "10m",
    }


def test_hold_is_always_a_deferral() -> None:
    """Whatever the mail-bomb action: at RCPT the message is unknown, so never a 5xx."""
    for action in ("reject", "defer"):
        limits = dataclasses.replace(LIMITS, mailbomb_action=action)
        verdict = hold_verdict(POLICY, limits, "v@x", HOLD, 0.0)
        assert isinstance(verdict, Defer) and verdict.code == 450
    soft = dataclasses.replace(POLICY, soft_bounce=True)
    decision = Policy(soft).mailbomb_hold(LIMITS, "v@x", HOLD, 0.0)
    assert decision is not None and decision.refused and decision.verdict.code == 450  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("policy", "limits", "now"),
    [
        (POLICY, LIMITS, 1000.0),  # the hold has ended (exactly at until)
        (POLICY, LIMITS, 5000.0),
        (dataclasses.replace(POLICY, mode="monitor"), LIMITS, 0.0),
        (dataclasses.replace(POLICY, mode="off"), LIMITS, 0.0),
        (dataclasses.replace(POLICY, mailbomb_hold=0.0), LIMITS, 0.0),
        (POLICY, dataclasses.replace(LIMITS, mailbomb_action="monitor"), 0.0),
        (POLICY, dataclasses.replace(LIMITS, mailbomb_messages=11), 0.0),  # config changed
        (POLICY, dataclasses.replace(LIMITS, mailbomb_window=3600.0), 0.0),
    ],
)
def test_hold_does_not_apply(policy: PolicyConfig, limits: CampaignLimits, now: float) -> None:
    assert hold_verdict(policy, limits, "v@x", HOLD, now) is None
    assert Policy(policy).mailbomb_hold(limits, "v@x", HOLD, now) is None


def test_checks_holds_only_when_a_hold_can_defer() -> None:
    assert Policy(POLICY).checks_holds(LIMITS)
    assert Policy(POLICY).mailbomb_hold(LIMITS, "v@x", None, 0.0) is None
    assert not Policy(dataclasses.replace(POLICY, mode="monitor")).checks_holds(LIMITS)
    assert not Policy(dataclasses.replace(POLICY, mailbomb_hold=0.0)).checks_holds(LIMITS)
    watch = dataclasses.replace(LIMITS, mailbomb_action="monitor")
    assert not Policy(POLICY).checks_holds(watch)


def test_custom_hold_template() -> None:
    templates = dataclasses.replace(POLICY.templates, mailbomb_hold="Wait {hold} for <{recipient}>")
    policy = dataclasses.replace(POLICY, templates=templates, mailbomb_hold=90.0)
    verdict = hold_verdict(policy, LIMITS, "v@x", HOLD, 0.0)
    assert verdict is not None and verdict.text == "Wait 90s for <v@x>"


def test_plain_recipients_may_be_left_out_with_mailbomb_max() -> None:
    """The store's plain case: no recipient listed, the highest mail-bomb count given."""
    full = count(5, False, RecipientCount("a@x", False, 3), RecipientCount("b@x", False, 1))
    short = dataclasses.replace(full, recipients=(), mailbomb_max=3)
    for sender in (PLAIN, SenderFacts(True, False, (True, True), True, True)):
        assert decide(POLICY, LIMITS, full, sender) == decide(POLICY, LIMITS, short, sender)
    verdict, _ = decide(POLICY, LIMITS, short, PLAIN)
    assert isinstance(verdict, Accept) and verdict.numbers["mailbomb_max"] == 3
    bulk = dataclasses.replace(full, bulk=True)
    bulk_short = dataclasses.replace(short, bulk=True)
    assert decide(POLICY, LIMITS, bulk, PLAIN) == decide(POLICY, LIMITS, bulk_short, PLAIN)
