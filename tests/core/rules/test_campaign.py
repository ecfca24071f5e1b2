"""The AUP mail rules as pure decisions: texts, numbers, order, actions (no I/O)."""

from __future__ import annotations

import dataclasses

import pytest

from mailguard.config.schema import CampaignLimits, PolicyConfig
from mailguard.core.policy import Policy
from mailguard.core.rules.campaign import (
    CampaignCount,
    RecipientCount,
    SenderFacts,
    decide,
    excused,
    format_window,
    has_one_click,
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
    decision = Policy(POLICY).campaign(monitor, c, PLAIN)
    assert not decision.refused and decision.found.rule == "unsolicited_bulk"


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
