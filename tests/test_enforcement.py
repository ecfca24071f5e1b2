"""``CampaignEnforcer``'s per-customer state: what it keeps must follow the customer it is given."""

from __future__ import annotations

from mailguard.config.schema import Customer, PolicyConfig
from mailguard.core.policy import Policy
from mailguard.enforcement import CampaignEnforcer
from mailguard.store.redis_store import RedisStore

POLICY = PolicyConfig(mode="enforce")


async def test_may_hold_follows_the_customer_object_it_is_given(store: RedisStore) -> None:
    """The limits kept per customer id are those of the customer object asked about: a reload
    that changes a customer's overrides (a new object, same id) is seen at once, both ways."""
    enforcer = CampaignEnforcer(store, POLICY, 86400.0)
    policy = Policy(POLICY)
    plain = Customer("acme")
    watched = Customer("acme", overrides=(("mailbomb_action", "monitor"),))
    assert enforcer.may_hold(policy, plain)
    assert not enforcer.may_hold(policy, watched)
    assert enforcer.may_hold(policy, plain)
    assert not enforcer.may_hold(Policy(PolicyConfig(mode="monitor")), plain)
