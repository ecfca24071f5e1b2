"""Test material for the fingerprint tests: human-written paragraphs and message builders.

The paragraphs are ordinary prose on unrelated subjects (written for these tests), so that
messages built from different paragraphs share no more than everyday words.  The builders
render one message body in the MIME shapes real senders use.
"""

from __future__ import annotations

import base64
import html
import quopri
from dataclasses import dataclass, field

PARAGRAPHS = (
    "The community garden on Elm Street opens again this weekend after the long winter. "
    "Volunteers have rebuilt the raised beds, repaired the old tool shed and planted two "
    "rows of apple trees along the fence, and the first seedlings are already in the ground.",
    "Our bakery now sells a sourdough loaf made with rye from a farm just outside town. The "
    "dough rests for a full day before it is shaped, which gives the crust its colour and the "
    "crumb its slightly sour taste that goes so well with butter and honey.",
    "The library will close early on Thursday while the heating system is replaced. Books can "
    "still be returned through the slot by the side door, and the reading room reopens on "
    "Friday morning with longer hours for students preparing for their exams.",
    "A new cycling path now connects the railway station with the university campus. It runs "
    "along the river for most of its length, has its own lights at night and crosses the main "
    "road on a bridge, so riders no longer have to wait at the busy junction.",
    "The choir is looking for tenors and basses for its summer concert in the cathedral. "
    "Rehearsals take place every Tuesday evening in the parish hall, no audition is required, "
    "and anyone who enjoys singing is welcome to come along and try a few pieces.",
    "Last month the museum received a collection of hand-drawn maps from an old shipping "
    "company. They show harbours, lighthouses and sandbanks along the northern coast, and "
    "several of them carry notes written by captains about storms and dangerous currents.",
    "Parents are reminded that the school trip to the science centre leaves at eight sharp. "
    "Children should bring a packed lunch, a rain jacket and comfortable shoes, because most "
    "of the afternoon will be spent outdoors at the weather station and the pond.",
    "The repair café meets on the first Saturday of every month in the old fire station. "
    "Bring a broken lamp, a toaster or a torn jacket, and one of our volunteers will show you "
    "how to fix it yourself instead of throwing it away and buying a new one.",
    "After three years of planning, the town has chosen a design for the new swimming pool. "
    "It will have a shallow area for small children, six lanes for training and a sauna, and "
    "the roof will be covered with solar panels that heat the water in summer.",
    "Our photography club spent a foggy morning at the marshes last week. The light was soft "
    "and grey, herons stood perfectly still in the reeds, and a few members managed to catch "
    "the moment when a flock of geese rose from the water all at once.",
    "The hiking group will walk the coastal trail from the lighthouse to the fishing village "
    "on Sunday. The route is about fourteen kilometres long with a few steep climbs, and we "
    "will stop for soup at the small inn by the harbour before taking the bus back.",
    "The chess tournament drew more players than ever this year, including several children "
    "who learned the game at the after-school club. The final lasted almost four hours and "
    "ended in a draw, so the two finalists agreed to share the trophy.",
    "Beekeepers report that the warm spring has been good for their colonies. Most hives came "
    "through the winter in good health, the lime trees flowered early, and the first honey of "
    "the season is lighter and more fragrant than usual.",
    "The theatre company is rehearsing a comedy about two families who share a holiday house "
    "by mistake. Tickets for the opening night are almost sold out, but extra performances "
    "have been added on the following weekend, including a matinee for families.",
    "Work on the old mill by the river is finally finished. The building now houses a small "
    "café on the ground floor and artists' studios above, and the restored water wheel turns "
    "again, producing enough electricity to light the whole building.",
    "The farmers' market moves to the square in front of the town hall from next week. You "
    "will find the same stalls as before, with vegetables, cheese, fresh fish and flowers, "
    "and a few new ones selling mushrooms, cider and homemade jam.",
    "Our language exchange evenings pair people who want to practise each other's language. "
    "We meet in the back room of the café on Wednesdays, talk for half an hour in one "
    "language and then switch, and nobody minds a few mistakes along the way.",
    "The astronomy society invites everyone to watch the meteor shower from the hill behind "
    "the observatory. Bring warm clothes and a blanket, switch off your torch once you arrive, "
    "and give your eyes twenty minutes to get used to the dark sky.",
    "Residents on the north side of the park have asked for more benches and a drinking "
    "fountain near the playground. The council will discuss the request at its next meeting, "
    "and anyone who wants to speak in support can register in advance.",
    "The sailing school has two new boats for beginners, both small enough to be handled by "
    "one person and stable enough to forgive a clumsy turn. Courses start in May and include "
    "a first lesson on knots, safety and reading the wind on the water.",
)

FIRST_NAMES = ("John", "Anna", "Maria", "Wei", "Olga", "Pierre", "Aisha", "Kenji", "Lucas")
LAST_NAMES = ("Smith", "Müller", "García", "Chen", "Ivanova", "Dubois", "Khan", "Tanaka")

SHAPES = ("text", "text-base64", "text-qp", "html", "html-base64", "alternative", "mixed")


@dataclass(frozen=True)
class Letter:
    """One rendered body: a greeting, paragraphs, closing lines and links."""

    subject: str
    paragraphs: tuple[str, ...]
    greeting: str = ""
    closing: tuple[str, ...] = ()
    links: tuple[tuple[str, str], ...] = ()  # (label, url)
    to: str = "reader@example.org"
    attachment: bytes | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)

    def plain(self) -> str:
        lines = [self.greeting, ""] if self.greeting else []
        for paragraph in self.paragraphs:
            lines += [paragraph, ""]
        lines += list(self.closing)
        lines += [f"{label}: {url}" for label, url in self.links]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>",
            html.escape(self.subject),
            "</title><style>p { margin: 0 0 12px 0; }</style></head><body>",
            "<table width='100%' cellpadding='0' cellspacing='0'><tr><td style='padding:0'>",
        ]
        if self.greeting:
            parts.append(f"<p style='font-size:14px'>{html.escape(self.greeting)}</p>")
        for paragraph in self.paragraphs:
            parts.append(f"<p style='font-size:14px;color:#333333'>{html.escape(paragraph)}</p>")
        for line in self.closing:
            parts.append(f"<p>{html.escape(line)}</p>")
        for label, url in self.links:
            parts.append(f"<p><a href='{html.escape(url)}'>{html.escape(label)}</a></p>")
        parts.append("</td></tr></table></body></html>")
        return "".join(parts)


def _headers(letter: Letter, content_type: str, encoding: str | None = None) -> list[str]:
    headers = [
        "From: News <news@sender.example>",
        f"To: {letter.to}",
        f"Subject: {letter.subject}",
        "MIME-Version: 1.0",
        f"Content-Type: {content_type}",
    ]
    if encoding:
        headers.append(f"Content-Transfer-Encoding: {encoding}")
    headers += [f"{name}: {value}" for name, value in letter.extra_headers.items()]
    return headers


def _leaf(text: str, subtype: str, encoding: str) -> tuple[str, str]:
    """(Content-Type value, encoded body) of one text part."""
    data = text.encode("utf-8")
    if encoding == "base64":
        body = base64.encodebytes(data).decode("ascii")
    elif encoding == "quoted-printable":
        body = quopri.encodestring(data).decode("ascii")
    else:
        body = text
    return f"text/{subtype}; charset=utf-8", body


def _part(text: str, subtype: str, encoding: str) -> str:
    ctype, body = _leaf(text, subtype, encoding)
    return f"Content-Type: {ctype}\nContent-Transfer-Encoding: {encoding}\n\n{body}"


def render(letter: Letter, shape: str) -> bytes:
    """The letter as an RFC 5322 message in one of ``SHAPES`` (CRLF line ends)."""
    if shape in ("text", "text-base64", "text-qp", "html", "html-base64"):
        subtype = "html" if shape.startswith("html") else "plain"
        text = letter.html() if subtype == "html" else letter.plain()
        encoding = {"base64": "base64", "qp": "quoted-printable"}.get(
            shape.partition("-")[2], "8bit"
        )
        ctype, body = _leaf(text, subtype, encoding)
        lines = [*_headers(letter, ctype, encoding), "", body]
    elif shape == "alternative":
        boundary = "=_alt_7f3a9"
        lines = [
            *_headers(letter, f'multipart/alternative; boundary="{boundary}"'),
            "",
            "This is a multi-part message in MIME format.",
            f"--{boundary}",
            _part(letter.plain(), "plain", "quoted-printable"),
            f"--{boundary}",
            _part(letter.html(), "html", "base64"),
            f"--{boundary}--",
            "",
        ]
    elif shape == "mixed":
        outer, inner = "=_mix_1b2c", "=_alt_9d8e"
        attachment = letter.attachment or b"%PDF-1.4 a small attachment\n"
        lines = [
            *_headers(letter, f"multipart/mixed; boundary={outer}"),
            "",
            f"--{outer}",
            f"Content-Type: multipart/alternative; boundary={inner}",
            "",
            f"--{inner}",
            _part(letter.plain(), "plain", "8bit"),
            f"--{inner}",
            _part(letter.html(), "html", "quoted-printable"),
            f"--{inner}--",
            f"--{outer}",
            "Content-Type: application/pdf; name=terms.pdf",
            "Content-Disposition: attachment; filename=terms.pdf",
            "Content-Transfer-Encoding: base64",
            "",
            base64.encodebytes(attachment).decode("ascii"),
            f"--{outer}--",
            "",
        ]
    else:
        raise ValueError(shape)
    return "\r\n".join("\n".join(lines).split("\n")).encode("utf-8")


def campaign_letter(
    paragraphs: tuple[str, ...],
    first: str,
    last: str,
    token: str,
    number: int,
    subject: str = "Spring news from the town",
) -> Letter:
    """One personalized copy of a campaign: name, per-recipient URLs, numbers vary."""
    return Letter(
        subject=subject,
        paragraphs=paragraphs,
        greeting=f"Dear {first} {last},",
        closing=(
            f"Your member number is {number} and your card is valid until {1 + number % 28}."
            f"{1 + number % 12}.2026.",
            "Best regards, the town newsletter team",
        ),
        links=(
            ("Read this online", f"https://news.town.example/view/{token}?utm_source=mail"),
            ("Unsubscribe", f"https://news.town.example/unsubscribe/{token}{number}"),
        ),
        to=f"{first} {last} <{first.lower()}.{last.lower()}@mail.example>",
    )
