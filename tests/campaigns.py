"""Messages shared by the tests of every door: a personalised marketing campaign and two issues
of a newsletter that share a template (the AUP rules must see one campaign and two)."""

from __future__ import annotations

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]

CAMPAIGN = (
    "Subject: Spring offers for you, {name}\r\n"
    "From: Shop <news@acme.example>\r\n"
    "To: {name} <{rcpt}>\r\n"
    "List-Unsubscribe: <https://acme.example/u/{token}>\r\n"
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    "\r\n"
    "Dear {name},\r\n"
    "our spring collection has arrived and we picked a few things we think you will like.\r\n"
    "Garden chairs made of oak, hand woven baskets, linen table cloths in seven colours and\r\n"
    "the lamp everybody asked about last year are back in stock, with free delivery until\r\n"
    "the end of the month for orders above fifty euros.  Your personal code is {token}.\r\n"
    "Visit https://acme.example/spring?u={token} to see the whole collection.\r\n"
)

ISSUE = (
    "Subject: Acme weekly, issue {n}\r\n"
    "From: Acme <news@acme.example>\r\n"
    "\r\n"
    "Acme weekly -- news from the workshop\r\n"
    "{article}\r\n"
    "You receive this because you subscribed at acme.example. Unsubscribe any time.\r\n"
)

ARTICLES = [
    "This week we rebuilt the kiln in the back yard, which took three days of brick laying and "
    "a surprising amount of clay. The first firing went well and the glazes came out deep blue.",
    "Our apprentice Tomas finished his first chair, a ladder back in ash with a woven seat. It is "
    "sturdier than it looks and already has a buyer in the next village over the river.",
]


def campaign_copy(rcpt: str, i: int) -> bytes:
    name = NAMES[i % len(NAMES)]
    token = f"{i * 7919 + 13:08x}{i:04d}"
    return CAMPAIGN.format(name=name, rcpt=rcpt, token=token).encode()
