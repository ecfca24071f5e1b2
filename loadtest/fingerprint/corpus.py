"""The labelled corpus: RFC 5322 messages built with the email package from real text.

Four parts, every message labelled with its true campaign id:

``a`` campaigns
    Personalized variants of one campaign (greeting with the recipient's name, per-recipient
    unsubscribe/tracking URLs and pixel, coupon codes, order numbers, dates, optional hashbuster
    words), each variant in its own MIME shape.
``b`` hard negatives
    Issues of one newsletter template (same masthead, intro and footer, different articles),
    each issue sent to a few recipients; and receipts from one shop (same template, different
    customer and items).  Every issue and every receipt is its own campaign.
``c`` singletons
    Unrelated messages of every length: one-liners, link-only, short, medium and long.
``d`` adversarial
    Copies of a campaign with hashbusters, invisible text (CSS ``display:none``, zero font size,
    zero opacity), zero-width characters, homoglyphs and reordered paragraphs, on top of the
    personalization of part ``a``.

The same seed and the same text pools give byte-identical messages.
"""

from __future__ import annotations

import base64
import hashlib
import html
import random
import re
import textwrap
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr

from loadtest.fingerprint.sources import TextPools

PARTS = ("a", "b", "c", "d")
PART_NAMES = {
    "a": "campaign variants",
    "b": "hard negatives",
    "c": "singletons",
    "d": "adversarial",
}
TRICKS = ("hashbuster", "invisible", "zero-width", "homoglyph", "reorder")
START = datetime(2026, 3, 2, 8, 0, 0, tzinfo=UTC)

FALLBACK_GIVEN = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Elif",
    "Femi",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kaja",
    "Liam",
    "Mei",
    "Noah",
]
FALLBACK_FAMILY = [
    "Novak",
    "Okafor",
    "Petrov",
    "Quinn",
    "Rossi",
    "Sato",
    "Tanaka",
    "Umar",
    "Varga",
    "Weber",
    "Xu",
    "Young",
]
MAILBOX_DOMAINS = ("mail.example", "post.example.net", "inbox.test", "users.example.org")
HIDE_STYLES = (
    "display:none",
    "display: none !important",
    "DISPLAY:NONE",
    "font-size:0",
    "font-size:0px;line-height:0",
    "opacity:0",
    "opacity: 0.0",
)
ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad")
HOMOGLYPHS = {
    "a": "\u0430",
    "c": "\u0441",
    "e": "\u0435",
    "i": "\u0456",
    "j": "\u0458",
    "o": "\u043e",
    "p": "\u0440",
    "s": "\u0455",
    "x": "\u0445",
    "y": "\u0443",
    "A": "\u0410",
    "B": "\u0412",
    "C": "\u0421",
    "E": "\u0415",
    "H": "\u041d",
    "K": "\u041a",
    "M": "\u041c",
    "O": "\u039f",
    "P": "\u0420",
    "T": "\u0422",
    "X": "\u0425",
}
MONTHS = "January February March April May June July August September October November December"
MONTH_NAMES = MONTHS.split()

# MIME shapes: (name, weight).  "att" shapes add an attachment to the campaign's own bytes.
SHAPES = (
    ("text/7bit", 2),
    ("text/qp", 2),
    ("text/b64", 2),
    ("text/latin1-qp", 1),
    ("html/8bit", 1),
    ("html/qp", 2),
    ("html/b64", 2),
    ("alt/qp", 3),
    ("alt/b64", 2),
    ("alt/8bit", 1),
    ("mixed/text+att", 1),
    ("mixed/alt+att", 2),
)
HTML_SHAPES = tuple(s for s, _ in SHAPES if s.startswith(("html", "alt", "mixed/alt")))


@dataclass(slots=True)
class Labelled:
    """One corpus message and what it truly is."""

    index: int
    part: str  # a | b | c | d
    campaign: str  # true campaign id; unique for singletons, receipts and newsletter issues
    raw: bytes
    recipients: tuple[str, ...]
    shape: str
    kind: str = ""  # e.g. "one-liner", "newsletter", "receipt"
    tricks: tuple[str, ...] = ()
    now: float = 0.0  # seconds since the start of the stream

    @property
    def family(self) -> str:
        """The template a hard negative was made from ("b-news01", "b-shop02"), else campaign."""
        return self.campaign.rsplit("-", 1)[0] if self.part == "b" else self.campaign


@dataclass(slots=True)
class Person:
    name: str
    address: str

    @property
    def given(self) -> str:
        return self.name.split()[0]


@dataclass(slots=True)
class Body:
    """What a message says, before rendering: blocks of text and a few link slots."""

    greeting: str = ""
    blocks: list[str] = field(default_factory=list)  # paragraphs (or headings, marked "# ")
    links: list[tuple[str, str]] = field(default_factory=list)  # (text, url) after the blocks
    footer: list[str] = field(default_factory=list)
    unsubscribe: str = ""
    pixel: str = ""
    preheader: str = ""  # hidden preview text (legitimately hidden in real newsletters)
    hidden: list[tuple[int, str, str]] = field(default_factory=list)  # (block index, style, text)


@dataclass(slots=True)
class Campaign:
    """What every copy of one campaign shares (see Builder.campaign_template)."""

    brand: str
    domain: str
    sender: Person
    subject: str
    blocks: list[str]  # the campaign's paragraphs
    greeting: str  # format string with {given} / {name}, or ""
    name_in_body: bool  # the first paragraph starts with the recipient's given name
    slots: list[str]  # personal lines: order, coupon, date, account
    links: list[tuple[str, str]]  # (text, path) on the campaign's domain
    footer: list[str]
    unsub: bool
    preheader: str
    attachment: tuple[str, bytes] | None
    recommend: int  # per-recipient "Recommended for you" lines


# --------------------------------------------------------------------------- helpers


def _ascii(s: str) -> str:
    return unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode().lower()


def _host(url: str) -> str:
    return url.split("//", 1)[-1].split("/", 1)[0].lower()


class Draw:
    """Draws from the text pools without replacement (reshuffling when a pool runs out)."""

    def __init__(self, pools: TextPools, rng: random.Random) -> None:
        self.pools = pools
        self.rng = rng
        self._bags: dict[str, list[str]] = {}
        self.reused: dict[str, int] = {}
        self._url_first: list[str] = []
        self._url_rest: dict[str, list[str]] = {}
        self._used_hosts: set[str] = set()

    def _take(self, kind: str, source: Sequence[str], reuse: bool = True) -> str | None:
        bag = self._bags.get(kind)
        if not bag:
            if kind in self._bags:  # exhausted once
                if not reuse:
                    return None
                self.reused[kind] = self.reused.get(kind, 0) + 1  # texts will now repeat
            bag = list(source)
            self.rng.shuffle(bag)
            self._bags[kind] = bag
        return bag.pop() if bag else None

    def paragraph(self) -> str:
        return self._take("paragraphs", self.pools.paragraphs) or "(empty)"

    def paragraphs(self, n: int) -> list[str]:
        return [self.paragraph() for _ in range(n)]

    def sentence(self) -> str:
        """A sentence; when they run out, the first sentence of an unused paragraph."""
        got = self._take("sentences", self.pools.sentences, reuse=False)
        if got is None:
            got = re.split(r"(?<=[.!?])\s+", self.paragraph(), maxsplit=1)[0]
        return got

    def short_line(self) -> str:
        """A one-line text (changelog entry, synopsis); when they run out, a sentence."""
        return self._take("short_lines", self.pools.short_lines, reuse=False) or self.sentence()

    def url(self, same_host: bool = False) -> tuple[str, bool]:
        """A homepage URL: one per host while they last; with same_host, one that shares its
        host with a URL drawn before (False in the second item if there is none left)."""
        if not self._url_first and not self._url_rest:
            for u in self.pools.urls:
                self._url_rest.setdefault(_host(u), []).append(u)
            self._url_first = [v.pop(0) for v in self._url_rest.values()]
            self.rng.shuffle(self._url_first)
        if same_host:
            hosts = sorted(h for h in self._used_hosts if self._url_rest.get(h))
            if hosts:
                return self._url_rest[self.rng.choice(hosts)].pop(), True
        if self._url_first:
            u = self._url_first.pop()
            self._used_hosts.add(_host(u))
            return u, False
        for v in self._url_rest.values():
            if v:
                return v.pop(), False
        # No URL left: make one on a new host from the vocabulary (synthetic, counted).
        self.reused["urls (synthesized)"] = self.reused.get("urls (synthesized)", 0) + 1
        while True:
            host = f"www.{self.word()}{self.word()}.org"
            if host not in self._used_hosts:
                self._used_hosts.add(host)
                return f"https://{host}/{self.word()}/", False

    def product(self) -> tuple[str, str]:
        i = self.rng.randrange(len(self.pools.products))
        return self.pools.products[i]

    def word(self) -> str:
        return self.rng.choice(self.pools.words)


def _wrap(text: str, width: int = 76) -> str:
    """Wrap long lines at spaces (URLs and other long words stay whole)."""
    out: list[str] = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
        else:
            out.extend(
                textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False) or [""]
            )
    return "\n".join(out)


class Builder:
    """Builds the corpus; one instance per run."""

    def __init__(self, pools: TextPools, seed: int) -> None:
        self.pools = pools
        self.rng = random.Random(seed)
        self.draw = Draw(pools, self.rng)
        names = pools.names if len(pools.names) >= 20 else []
        self.given = sorted({n.split()[0] for n in names}) or FALLBACK_GIVEN
        self.family = sorted({n.split()[-1] for n in names}) or FALLBACK_FAMILY
        self._addresses: set[str] = set()
        self._brands: set[str] = set()
        self._msgno = 0

    # ----------------------------------------------------------------- small things

    def person(self) -> Person:
        while True:
            name = f"{self.rng.choice(self.given)} {self.rng.choice(self.family)}"
            local = ".".join(_ascii(p) for p in name.split()).replace("'", "")
            if self.rng.random() < 0.3:
                local += str(self.rng.randrange(1, 99))
            addr = f"{local}@{self.rng.choice(MAILBOX_DOMAINS)}"
            if addr not in self._addresses:
                self._addresses.add(addr)
                return Person(name, addr)

    def brand(self) -> tuple[str, str]:
        while True:
            w1, w2 = self.draw.word(), self.draw.word()
            name = f"{w1.capitalize()} {w2.capitalize()}"
            domain = f"{w1}{w2}.example"
            if domain not in self._brands:
                self._brands.add(domain)
                return name, domain

    def token(self, n: int = 16) -> str:
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def date_text(self) -> str:
        d = START + timedelta(days=self.rng.randrange(-60, 60))
        style = self.rng.randrange(3)
        if style == 0:
            return f"{MONTH_NAMES[d.month - 1]} {d.day}, {d.year}"
        if style == 1:
            return d.strftime("%d.%m.%Y")
        return d.strftime("%Y-%m-%d")

    def hashbuster(self, lo: int, hi: int) -> str:
        return " ".join(self.draw.word() for _ in range(self.rng.randint(lo, hi)))

    def street(self) -> str:
        return f"{self.rng.randint(1, 240)} {self.draw.word().capitalize()} Street"

    def shape(self, choices: Sequence[str] | None = None) -> str:
        pool = [(s, w) for s, w in SHAPES if choices is None or s in choices]
        return self.rng.choices([s for s, _ in pool], weights=[w for _, w in pool])[0]

    # ----------------------------------------------------------------- rendering

    def render_text(self, body: Body) -> str:
        out: list[str] = []
        if body.greeting:
            out += [body.greeting, ""]
        for b in body.blocks:
            out += [b[2:].upper() if b.startswith("# ") else b, ""]
        for text, url in body.links:
            out += [f"{text}: {url}" if text else url, ""]
        if body.footer or body.unsubscribe:
            out.append("--")
            out += body.footer
            if body.unsubscribe:
                out.append(f"Unsubscribe: {body.unsubscribe}")
        return "\n".join(out).rstrip() + "\n"

    def render_html(self, body: Body, title: str) -> str:
        h: list[str] = [
            "<!DOCTYPE html>",
            "<html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:Arial,sans-serif} .pre{display:none}"
            " p{margin:0 0 12px}</style>",
            "<script>window.dataLayer=window.dataLayer||[];</script>",
            "</head><body>",
            f"<!-- build {self.token(8)} -->",
        ]
        if body.preheader:
            h.append(f'<span class="pre" style="display:none">{html.escape(body.preheader)}</span>')
        h.append("<table width='100%' cellpadding='0' cellspacing='0'><tr><td>")
        if body.greeting:
            h.append(f"<p>{html.escape(body.greeting)}</p>")
        hidden: dict[int, list[tuple[str, str]]] = {}
        for i, style, text in body.hidden:
            hidden.setdefault(i, []).append((style, text))
        for i, b in enumerate(body.blocks):
            for style, text in hidden.get(i, []):
                h.append(f'<div style="{style}">{html.escape(text)}</div>')
            if b.startswith("# "):
                h.append(f"<h2>{html.escape(b[2:])}</h2>")
            else:
                h.append(f"<p>{html.escape(b)}</p>")
        for style, text in hidden.get(len(body.blocks), []):
            h.append(f'<p><span style="{style}">{html.escape(text)}</span></p>')
        for text, url in body.links:
            label = html.escape(text or url)
            h.append(f'<p><a href="{html.escape(url)}" style="color:#06c">{label}</a></p>')
        if body.footer or body.unsubscribe:
            h.append("<hr><div style='font-size:11px;color:#777'>")
            h += [f"<p>{html.escape(f)}</p>" for f in body.footer]
            if body.unsubscribe:
                h.append(f'<p><a href="{html.escape(body.unsubscribe)}">Unsubscribe</a></p>')
            h.append("</div>")
        if body.pixel:
            h.append(f'<img src="{html.escape(body.pixel)}" width="1" height="1" alt="">')
        h.append("</td></tr></table></body></html>")
        return "\n".join(h) + "\n"

    def build(
        self,
        *,
        sender: Person,
        to: Person,
        subject: str,
        body: Body,
        shape: str,
        attachment: tuple[str, bytes] | None = None,
        text_override: str | None = None,
        html_override: str | None = None,
    ) -> bytes:
        self._msgno += 1
        msg = EmailMessage(policy=SMTP)
        msg["From"] = formataddr((sender.name, sender.address))
        msg["To"] = formataddr((to.name, to.address))
        msg["Subject"] = subject
        msg["Date"] = format_datetime(START + timedelta(seconds=self._msgno * 7))
        domain = sender.address.split("@", 1)[1]
        msg["Message-ID"] = f"<{self.token(20)}.{self._msgno}@{domain}>"
        if body.unsubscribe:
            msg["List-Unsubscribe"] = f"<{body.unsubscribe}>"
        text = text_override if text_override is not None else self.render_text(body)
        markup = html_override if html_override is not None else self.render_html(body, subject)
        kind, _, enc = shape.partition("/")
        charset = "utf-8"
        if enc == "latin1-qp":
            try:
                text.encode("iso-8859-1")
                charset = "iso-8859-1"
            except UnicodeEncodeError:
                pass
            enc = "qp"

        def cte(value: str, e: str) -> str:
            if e in ("7bit", "8bit"):
                return "7bit" if value.isascii() else "8bit"
            return "quoted-printable" if e == "qp" else "base64"

        def put(value: str, e: str, subtype: str = "plain", alternative: bool = False) -> None:
            c = cte(value, e)
            if c in ("7bit", "8bit"):  # keep lines under RFC 5322's limit, as mailers do
                value = _wrap(value)
            add = msg.add_alternative if alternative else msg.set_content
            add(value, subtype=subtype, charset=charset, cte=c)

        sub_enc = self.rng.choice(("qp", "b64", "8bit"))
        if kind == "text":
            put(text, enc)
        elif kind == "html":
            put(markup, enc, "html")
        elif kind == "alt" or enc == "alt+att":
            e = enc if kind == "alt" else sub_enc
            put(text, e)
            put(markup, e, "html", alternative=True)
        else:  # mixed/text+att
            put(text, sub_enc)
        if kind == "mixed":
            name, data = attachment or ("document.pdf", self.pdf_bytes(self.draw.sentence()))
            maintype, subtype = ("application", "pdf") if name.endswith(".pdf") else ("text", "csv")
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
        for part in msg.walk():  # seeded boundaries (the generator's own are random)
            if part.is_multipart() and part.get_boundary() is None:
                part.set_boundary(f"=_{self.token(24)}")
        return msg.as_bytes(policy=SMTP)

    def pdf_bytes(self, text: str) -> bytes:
        """A small (fake but plausible) PDF whose content depends on text."""
        stream = base64.b85encode(hashlib.sha512(text.encode()).digest() * 24)
        return (
            b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\n2 0 obj<</Length "
            + str(len(stream)).encode()
            + b">>stream\n"
            + stream
            + b"\nendstream endobj\n%%EOF\n"
        )

    # ----------------------------------------------------------------- personalization

    def personalized_body(self, tpl: Campaign, to: Person, busters: bool) -> Body:
        """A campaign template (see campaign_template) filled in for one recipient."""
        domain = tpl.domain
        greet = tpl.greeting
        greeting = greet.format(given=to.given, name=to.name) if greet else ""
        blocks = list(tpl.blocks)
        if tpl.name_in_body and blocks:
            blocks[0] = f"{to.given}, {blocks[0][0].lower()}{blocks[0][1:]}"
        extra: list[str] = []
        for slot in tpl.slots:
            if slot == "order":
                extra.append(f"Your order number is {self.rng.randint(100000, 99999999)}.")
            elif slot == "coupon":
                code = f"{self.token(4).upper()}-{self.token(4).upper()}"
                extra.append(f"Use code {code} at checkout.")
            elif slot == "date":
                extra.append(f"Sent to {to.address} on {self.date_text()}.")
            elif slot == "account":
                extra.append(f"Customer ID: {self.rng.randint(10**5, 10**9)}")
        blocks += extra
        for _ in range(tpl.recommend):
            pkg, desc = self.draw.product()
            blocks.append(f"Recommended for you: {pkg}, {desc}")
        uid = self.token(self.rng.choice((12, 16, 24, 32)))
        links = [(str(t), f"https://{domain}/{p}?uid={uid}&utm_source=mail") for t, p in tpl.links]
        footer = list(tpl.footer)
        if busters:
            # 3-8 random words, but no more than a quarter of the campaign's own words.
            words = sum(len(b.split()) for b in tpl.blocks)
            n = min(self.rng.randint(3, 8), max(2, words // 4))
            footer.append(self.hashbuster(n, n))
        return Body(
            greeting=greeting,
            blocks=blocks,
            links=links,
            footer=footer,
            unsubscribe=f"https://{domain}/u/{self.token(24)}" if tpl.unsub else "",
            pixel=f"https://t.{domain}/o/{self.token(20)}.gif",
            preheader=tpl.preheader,
        )

    def campaign_template(self, length: str) -> Campaign:
        brand, domain = self.brand()
        if length == "one-line":
            blocks = [self.draw.sentence()]
        elif length == "short":
            blocks = self.draw.paragraphs(1)
        elif length == "medium":
            blocks = self.draw.paragraphs(self.rng.randint(2, 4))
        else:
            blocks = self.draw.paragraphs(self.rng.randint(5, 10))
        greetings = ("Dear {given},", "Hi {given}!", "Hello {name},", "{given},", "")
        slot_names = ("order", "coupon", "date", "account")
        slots = self.rng.sample(slot_names, self.rng.randint(0, 3))
        link_word = self.draw.word()
        links = [(self.rng.choice(("Read more", "Shop now", "See the offer", "")), link_word)]
        footer = [f"{brand}, {self.street()}", self.draw.sentence()] if length != "one-line" else []
        att = None
        if self.rng.random() < 0.5:
            att = (f"{link_word}.pdf", self.pdf_bytes(brand + domain))
        return Campaign(
            brand=brand,
            domain=domain,
            sender=Person(f"{brand}", f"news@{domain}"),
            subject=self.draw.sentence() if self.rng.random() < 0.5 else self.draw.short_line(),
            blocks=blocks,
            greeting=self.rng.choice(greetings),
            name_in_body=self.rng.random() < 0.25,
            slots=slots,
            links=links,
            footer=footer,
            unsub=length != "one-line" or self.rng.random() < 0.5,
            preheader=self.draw.sentence() if self.rng.random() < 0.3 else "",
            attachment=att,
            # Long campaigns only: per-recipient product lines stay a small share of the text.
            recommend=self.rng.choice((2, 3))
            if length == "long" and self.rng.random() < 0.4
            else 0,
        )

    # ----------------------------------------------------------------- parts

    def part_a(self, n_campaigns: int) -> list[Labelled]:
        out: list[Labelled] = []
        lengths = ("one-line", "short", "medium", "long")
        for c in range(n_campaigns):
            length = self.rng.choices(lengths, weights=(1, 3, 5, 2))[0]
            tpl = self.campaign_template(length)
            busters = self.rng.random() < 0.4
            n = self.rng.randint(3, 25)
            subj = tpl.subject
            for _ in range(n):
                to = self.person()
                body = self.personalized_body(tpl, to, busters)
                shape = self.shape()
                if shape.startswith("mixed") and tpl.attachment is None:
                    shape = self.shape([s for s, _ in SHAPES if not s.startswith("mixed")])
                subject = (
                    subj if self.rng.random() < 0.7 else f"{to.given}, {subj[0].lower()}{subj[1:]}"
                )
                raw = self.build(
                    sender=tpl.sender,
                    to=to,
                    subject=subject,
                    body=body,
                    shape=shape,
                    attachment=tpl.attachment,
                )
                out.append(Labelled(0, "a", f"a{c:03d}", raw, (to.address,), shape, length))
        return out

    def part_b(self, n_newsletters: int, n_shops: int) -> list[Labelled]:
        out: list[Labelled] = []
        for t in range(n_newsletters):
            brand, domain = self.brand()
            sender = Person(f"{brand} Weekly", f"newsletter@{domain}")
            masthead = f"The {brand} Weekly"
            intro = self.draw.sentence()
            footer = [
                f"{brand}, {self.street()}",
                self.draw.sentence(),
                self.draw.sentence(),
            ]
            heads = ("This week", "From the community", "In depth", "Short notes")
            subscribers = [self.person() for _ in range(5)]
            shape_pref = self.rng.choice(("alt/qp", "alt/b64", "html/qp", "alt/8bit"))
            for issue in range(1, self.rng.randint(4, 6) + 1):
                n_articles = self.rng.randint(2, 4)
                blocks = [f"# {masthead}: issue {issue}", intro]
                links: list[tuple[str, str]] = []
                for k in range(n_articles):
                    blocks.append(f"# {heads[k]}: {self.draw.short_line()}")
                    blocks.append(self.draw.paragraph())
                    if self.rng.random() < 0.5:
                        blocks.append(self.draw.paragraph())
                    links.append(
                        ("Read the article", f"https://{domain}/{issue}/{self.draw.word()}")
                    )
                subject = f"{masthead} #{issue}: {self.draw.short_line()}"
                for to in self.rng.sample(subscribers, self.rng.randint(2, 4)):
                    body = Body(
                        greeting=f"Hello {to.given},",
                        blocks=blocks,
                        links=[(t_, f"{u}?r={self.token(12)}") for t_, u in links],
                        footer=footer,
                        unsubscribe=f"https://{domain}/unsubscribe/{self.token(24)}",
                        pixel=f"https://{domain}/px/{self.token(16)}.png",
                    )
                    shape = shape_pref if self.rng.random() < 0.8 else self.shape(HTML_SHAPES)
                    raw = self.build(sender=sender, to=to, subject=subject, body=body, shape=shape)
                    camp = f"b-news{t:02d}-{issue}"
                    out.append(Labelled(0, "b", camp, raw, (to.address,), shape, "newsletter"))
        for s in range(n_shops):
            brand, domain = self.brand()
            sender = Person(f"{brand} Shop", f"orders@{domain}")
            thanks = self.draw.sentence()
            help_line = self.draw.sentence()
            legal = self.draw.sentence()
            shop_address = f"{brand} Shop, {self.street()}"
            shape_pref = self.rng.choice(("alt/qp", "text/qp", "html/b64"))
            for r in range(self.rng.randint(5, 8)):
                to = self.person()
                order = self.rng.randint(10**6, 10**8)
                items: list[str] = []
                total = 0
                for _ in range(self.rng.randint(2, 5)):
                    pkg, desc = self.draw.product()
                    qty, price = self.rng.randint(1, 3), self.rng.randint(200, 9000)
                    total += qty * price
                    items.append(f"{qty} x {pkg}: {desc}, {price // 100}.{price % 100:02d} EUR")
                blocks = [
                    f"Thank you for your order, {to.given}!",
                    thanks,
                    f"Order {order}, placed on {self.date_text()}.",
                    "# Items",
                    *items,
                    f"Total: {total // 100}.{total % 100:02d} EUR",
                    f"Shipping to: {to.name}, {self.street()}",
                    help_line,
                ]
                body = Body(
                    blocks=blocks,
                    links=[("Track your parcel", f"https://{domain}/track/{self.token(18)}")],
                    footer=[shop_address, legal],
                )
                shape = shape_pref if self.rng.random() < 0.8 else self.shape()
                if shape.startswith("mixed"):
                    shape = "alt/qp"
                raw = self.build(
                    sender=sender,
                    to=to,
                    subject=f"Your {brand} order {order}",
                    body=body,
                    shape=shape,
                )
                camp = f"b-shop{s:02d}-{r}"
                out.append(Labelled(0, "b", camp, raw, (to.address,), shape, "receipt"))
        return out

    def part_c(self, n: int) -> list[Labelled]:
        out: list[Labelled] = []
        kinds = ("one-liner", "link-only", "short", "medium", "long")
        for i in range(n):
            kind = self.rng.choices(kinds, weights=(25, 12, 28, 20, 15))[0]
            sender, to = self.person(), self.person()
            body = Body()
            subject = self.draw.short_line() if self.rng.random() < 0.6 else self.draw.sentence()
            if kind == "one-liner":
                body.blocks = [
                    self.draw.sentence() if self.rng.random() < 0.5 else self.draw.short_line()
                ]
            elif kind == "link-only":
                url, same = self.draw.url(same_host=self.rng.random() < 0.25)
                body.links = [("", url)]
                kind += "/same-host" if same else ""
                if self.rng.random() < 0.3:
                    subject = ""
            else:
                if self.rng.random() < 0.6:
                    body.greeting = self.rng.choice(
                        ("Hi {0},", "Dear {0},", "{0},", "Hello {0}")
                    ).format(to.given)
                n_par = {"short": 1, "medium": self.rng.randint(2, 4)}.get(
                    kind
                ) or self.rng.randint(6, 25)
                body.blocks = self.draw.paragraphs(n_par)
                if self.rng.random() < 0.5:
                    bye = self.rng.choice(("Best", "Thanks", "Cheers", "Regards"))
                    body.blocks.append(f"{bye}, {sender.given}")
                if self.rng.random() < 0.2:
                    body.links = [("", self.draw.url()[0])]
            shape = self.shape()
            att = (
                (f"{self.draw.word()}.pdf", self.pdf_bytes(self.token(30)))
                if shape.startswith("mixed")
                else None
            )
            raw = self.build(
                sender=sender, to=to, subject=subject, body=body, shape=shape, attachment=att
            )
            out.append(Labelled(0, "c", f"c{i:04d}", raw, (to.address,), shape, kind))
        return out

    def part_d(self, n_campaigns: int) -> list[Labelled]:
        out: list[Labelled] = []
        for c in range(n_campaigns):
            length = self.rng.choices(("short", "medium", "long"), weights=(2, 5, 2))[0]
            tpl = self.campaign_template(length)
            busters = self.rng.random() < 0.5
            for _ in range(self.rng.randint(4, 12)):
                to = self.person()
                body = self.personalized_body(tpl, to, busters)
                tricks = tuple(sorted(self.rng.sample(TRICKS, self.rng.randint(1, 3))))
                shape = self.shape(HTML_SHAPES if "invisible" in tricks else None)
                if shape.startswith("mixed") and tpl.attachment is None:
                    shape = "alt/qp"
                text, markup = self.apply_tricks(body, tricks, tpl.subject)
                raw = self.build(
                    sender=tpl.sender,
                    to=to,
                    subject=tpl.subject,
                    body=body,
                    shape=shape,
                    attachment=tpl.attachment,
                    text_override=text,
                    html_override=markup,
                )
                out.append(Labelled(0, "d", f"d{c:03d}", raw, (to.address,), shape, length, tricks))
        return out

    def part_long(self, n_campaigns: int, n_newsletters: int) -> list[Labelled]:
        """Texts longer than the fingerprint's text cap (about 40-90 K characters each).

        Campaigns (part a, kind "very-long") of 3-6 personalized copies of 200-400
        paragraphs, and newsletters (part b, kind "newsletter-long") whose 3 issues share a
        masthead, intro and footer but differ in 100-200 article paragraphs, each sent to 2-3
        subscribers.  Without them no benchmark text reaches the cap.
        """
        out: list[Labelled] = []
        for c in range(n_campaigns):
            tpl = self.campaign_template("long")
            tpl.blocks = self.draw.paragraphs(self.rng.randint(200, 400))
            for _ in range(self.rng.randint(3, 6)):
                to = self.person()
                body = self.personalized_body(tpl, to, busters=False)
                shape = self.shape([s for s, _ in SHAPES if not s.startswith("mixed")])
                raw = self.build(
                    sender=tpl.sender, to=to, subject=tpl.subject, body=body, shape=shape
                )
                out.append(
                    Labelled(0, "a", f"a-long{c:02d}", raw, (to.address,), shape, "very-long")
                )
        for t in range(n_newsletters):
            brand, domain = self.brand()
            sender = Person(f"{brand} Digest", f"digest@{domain}")
            intro = [self.draw.sentence(), self.draw.paragraph()]
            footer = [f"{brand}, {self.street()}", self.draw.sentence()]
            subscribers = [self.person() for _ in range(4)]
            for issue in range(1, 4):
                blocks = [f"# The {brand} Digest: issue {issue}", *intro]
                blocks += self.draw.paragraphs(self.rng.randint(100, 200))
                subject = f"The {brand} Digest #{issue}"
                for to in self.rng.sample(subscribers, self.rng.randint(2, 3)):
                    body = Body(
                        greeting=f"Hello {to.given},",
                        blocks=blocks,
                        links=[("Read online", f"https://{domain}/{issue}?r={self.token(12)}")],
                        footer=footer,
                        unsubscribe=f"https://{domain}/unsubscribe/{self.token(24)}",
                    )
                    shape = self.shape(HTML_SHAPES)
                    if shape.startswith("mixed"):
                        shape = "alt/qp"
                    raw = self.build(sender=sender, to=to, subject=subject, body=body, shape=shape)
                    camp = f"b-long{t:02d}-{issue}"
                    out.append(Labelled(0, "b", camp, raw, (to.address,), shape, "newsletter-long"))
        return out

    # ----------------------------------------------------------------- adversarial tricks

    def apply_tricks(self, body: Body, tricks: Sequence[str], subject: str) -> tuple[str, str]:
        """Mutate body (and its rendered forms) with the given tricks."""
        rng = self.rng
        n = len(body.blocks)
        if "reorder" in tricks and n > 1:
            # Keep the personalized lines in place; shuffle the campaign paragraphs.
            head = [b for b in body.blocks if len(b.split()) >= 8]
            order = head[:]
            while order == head and len(set(head)) > 1:
                rng.shuffle(order)
            it = iter(order)
            body.blocks = [next(it) if len(b.split()) >= 8 else b for b in body.blocks]
        if "hashbuster" in tricks:
            # Random words worth 10-30 % of the visible text (at least 4): 1-3 inserted lines
            # and a few words appended to one paragraph.
            words = sum(len(b.split()) for b in body.blocks)
            budget = max(4, round(words * rng.uniform(0.1, 0.3)))
            tail = min(budget // 4 + 1, 6)
            lines = rng.randint(1, 3)
            for _ in range(lines):
                n_words = max(1, (budget - tail) // lines)
                pos = rng.randint(0, len(body.blocks))
                body.blocks.insert(pos, self.hashbuster(n_words, n_words))
            if body.blocks:
                i = rng.randrange(len(body.blocks))
                body.blocks[i] = f"{body.blocks[i]} {self.hashbuster(tail, tail)}"
        if "invisible" in tricks:
            for _ in range(rng.randint(1, 4)):
                style = rng.choice(HIDE_STYLES)
                text = self.draw.paragraph() if rng.random() < 0.6 else self.hashbuster(10, 40)
                body.hidden.append((rng.randint(0, len(body.blocks)), style, text))
        mutate: list[Callable[[str], str]] = []
        if "zero-width" in tricks:
            rate = rng.uniform(0.2, 0.7)
            mutate.append(lambda s: self._zero_width(s, rate))
        if "homoglyph" in tricks:
            rate = rng.uniform(0.1, 0.4)
            mutate.append(lambda s: self._homoglyphs(s, rate))
        for f in mutate:
            body.greeting = f(body.greeting)
            body.blocks = [f(b) for b in body.blocks]
            body.footer = [f(x) for x in body.footer]
            body.links = [(f(t), u) for t, u in body.links]
        return self.render_text(body), self.render_html(body, subject)

    def _zero_width(self, s: str, rate: float) -> str:
        words = s.split(" ")
        out = []
        for w in words:
            if len(w) > 2 and "://" not in w and "@" not in w and self.rng.random() < rate:
                k = self.rng.randint(1, len(w) - 1)
                w = w[:k] + self.rng.choice(ZERO_WIDTH) + w[k:]
            out.append(w)
        return " ".join(out)

    def _homoglyphs(self, s: str, rate: float) -> str:
        fullwidth = self.rng.random() < 0.2
        out = []
        for word in s.split(" "):
            if "://" in word or "@" in word:
                out.append(word)
                continue
            chars = []
            for ch in word:
                if self.rng.random() < rate:
                    if fullwidth and ch.isascii() and ch.isalnum():
                        ch = chr(ord(ch) + 0xFEE0)
                    else:
                        ch = HOMOGLYPHS.get(ch, ch)
                chars.append(ch)
            out.append("".join(chars))
        return " ".join(out)


# --------------------------------------------------------------------------- the corpus


@dataclass(slots=True)
class Corpus:
    messages: list[Labelled]
    seed: int
    size: float
    reused: dict[str, int]

    def by_part(self, part: str) -> list[Labelled]:
        return [m for m in self.messages if m.part == part]

    def digest(self) -> str:
        """A short hash of every message and label: equal digests, equal corpora."""
        h = hashlib.sha256()
        for m in self.messages:
            h.update(f"{m.part}\0{m.campaign}\0{len(m.raw)}\0".encode())
            h.update(m.raw)
        return h.hexdigest()[:12]

    def counts(self) -> dict[str, tuple[int, int]]:
        """part -> (messages, campaigns)."""
        out = {}
        for p in PARTS:
            ms = self.by_part(p)
            out[p] = (len(ms), len({m.campaign for m in ms}))
        return out


def build_corpus(pools: TextPools, seed: int = 1, size: float = 1.0) -> Corpus:
    """The benchmark corpus, in stream order (parts interleaved, seeded shuffle)."""
    b = Builder(pools, seed)

    def scaled(n: int) -> int:
        return max(1, round(n * size))

    msgs = (
        b.part_a(scaled(40))
        + b.part_b(scaled(6), scaled(6))
        + b.part_c(scaled(360))
        + b.part_d(scaled(16))
    )
    b.rng.shuffle(msgs)
    # Texts over the fingerprint's cap, from a builder of their own and put into the stream at
    # positions of their own, so that the rest of the corpus and its order stay as they were.
    extra = Builder(pools, seed + 104_729)
    extra._addresses = b._addresses  # new people, and texts no other message has
    extra.draw._bags, extra.draw.reused = b.draw._bags, b.draw.reused
    for m in extra.part_long(scaled(3), scaled(2)):
        msgs.insert(extra.rng.randrange(len(msgs) + 1), m)
    now = 0.0
    for i, m in enumerate(msgs):
        now += b.rng.expovariate(0.5)  # one message every 2 s on average
        m.index, m.now = i, now
    return Corpus(msgs, seed, size, dict(b.draw.reused))


def build_speed_set(
    pools: TextPools, seed: int, n: int, target_bytes: int = 10_240
) -> list[Labelled]:
    """~10 KB multipart messages: half variants of a few campaigns, half one-off messages."""
    b = Builder(pools, seed + 7919)
    rng = b.rng
    shapes = ("alt/qp", "alt/b64", "alt/8bit", "mixed/alt+att")

    def make(tpl: Campaign, to: Person, shape: str, fit: bool) -> bytes:
        """Build one message; with fit, first grow or shrink tpl's paragraphs to the target."""
        for _ in range(5):
            body = b.personalized_body(tpl, to, busters=False)
            raw = b.build(
                sender=tpl.sender,
                to=to,
                subject=tpl.subject,
                body=body,
                shape=shape,
                attachment=tpl.attachment,
            )
            blocks: list[str] = tpl.blocks
            if not fit:
                break
            if abs(len(raw) - target_bytes) < target_bytes * 0.05:
                break
            # Bytes per character of text, overhead included: a pessimistic step size.
            per_char = len(raw) / max(1, sum(len(x) + 2 for x in blocks))
            need = (target_bytes - len(raw)) / per_char
            while need > 0:
                blocks.insert(1, rng.choice(pools.paragraphs))
                need -= len(blocks[1]) + 2
            while need < 0 and len(blocks) > 1:
                need += len(blocks.pop(1)) + 2
        return raw

    def template() -> Campaign:
        tpl = b.campaign_template("medium")
        tpl.attachment = ("note.pdf", b.pdf_bytes(tpl.domain)[:600])
        tpl.recommend = 0
        tpl.name_in_body = False
        blocks = list(tpl.blocks)
        while sum(len(x) + 2 for x in blocks) < (target_bytes - 2000) / 2.6:
            blocks.append(rng.choice(pools.paragraphs))
        tpl.blocks = blocks
        return tpl

    campaigns = [template() for _ in range(max(1, n // 50))]
    for tpl in campaigns:
        make(tpl, b.person(), "alt/qp", fit=True)
    out: list[Labelled] = []
    for i in range(n):
        to = b.person()
        shape = rng.choice(shapes)
        if i % 2 == 0:
            k = rng.randrange(len(campaigns))
            raw = make(campaigns[k], to, shape, fit=False)
            camp = f"s-a{k}"
        else:
            raw = make(template(), to, shape, fit=True)
            camp = f"s-c{i}"
        out.append(Labelled(i, "s", camp, raw, (to.address,), shape, "10k", now=float(i)))
    return out
