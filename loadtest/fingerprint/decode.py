"""A simple shared decoder: a message's visible text, given to every baseline.

Transfer encodings and charsets are decoded; text/plain and text/html parts are taken (HTML to
its visible text: scripts, styles, comments and elements hidden by ``display:none``, zero font
size or zero opacity are dropped); an attachment counts as one line with its content hash.
Nothing else is normalized (that is the fingerprint's business, not the decoder's), except
that whitespace is collapsed.

``--decoder mailguard`` gives the baselines mailguard's own extraction instead (its ``.text``
and attachment digests); it is not the default because that text is already case-folded and
keeps link targets.
"""

from __future__ import annotations

import email
import email.header
import hashlib
import re
from collections.abc import Callable
from email.message import Message
from email.policy import compat32
from html.parser import HTMLParser

HIDDEN_STYLE = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*0(?:\.0*)?(?:px|pt|em|%)?\s*(?:;|$|!)"
    r"|opacity\s*:\s*0(?:\.0*)?\s*(?:;|$|!)",
    re.I,
)
VOID = frozenset(
    [
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "param",
        "source",
        "track",
        "wbr",
    ]
)
SKIP = frozenset(("script", "style", "head", "title", "template", "noscript"))
BLOCK = frozenset(
    [
        "p",
        "div",
        "br",
        "tr",
        "td",
        "th",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "table",
        "blockquote",
        "pre",
        "hr",
        "section",
        "article",
    ]
)


class _Visible(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, hides its content)
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in BLOCK:
            self.out.append("\n")
        if tag in VOID:
            return
        style = " ".join(v or "" for k, v in attrs if k == "style")
        hides = (
            tag in SKIP or bool(HIDDEN_STYLE.search(style)) or any(k == "hidden" for k, _ in attrs)
        )
        self.stack.append((tag, hides))
        self.hidden += hides

    def handle_endtag(self, tag: str) -> None:
        if tag in BLOCK:
            self.out.append("\n")
        # Pop up to the matching open tag (tolerates unclosed elements).
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                for _, hides in self.stack[i:]:
                    self.hidden -= hides
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.out.append(data)


def html_to_text(markup: str) -> str:
    p = _Visible()
    try:
        p.feed(markup)
        p.close()
    except Exception:  # HTMLParser is lenient; be safe anyway
        pass
    return "".join(p.out)


def _payload_text(part: Message) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, errors="replace")
    except LookupError:
        return data.decode("latin-1")


def visible_text(raw: bytes, subject: bool = False) -> str:
    """The visible text of a message's body (text parts, attachment hashes), and its subject
    first if asked for.  The baselines get the body only."""
    msg = email.message_from_bytes(raw, policy=compat32)
    out: list[str] = []
    subj = msg.get("Subject") if subject else None
    if subj:
        try:
            out.append(str(email.header.make_header(email.header.decode_header(str(subj)))))
        except Exception:
            out.append(str(subj))

    def walk(part: Message) -> None:
        ctype = part.get_content_type()
        if part.is_multipart():
            subs = part.get_payload()
            if not isinstance(subs, list):
                return
            children = [s for s in subs if isinstance(s, Message)]
            if ctype == "multipart/alternative" and children:
                # What a mail client shows: the richest alternative it understands.
                texts = [s for s in children if s.get_content_maintype() in ("text", "multipart")]
                if texts:
                    walk(texts[-1])
                return
            for s in children:
                walk(s)
            return
        disp = (part.get("Content-Disposition") or "").lower()
        if ctype in ("text/plain", "text/html") and not disp.startswith("attachment"):
            text = _payload_text(part)
            out.append(html_to_text(text) if ctype == "text/html" else text)
        else:
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                out.append(f"[attachment {hashlib.sha256(data).hexdigest()[:16]}]")

    walk(msg)
    return " ".join(" ".join(out).split())


def choose(name: str) -> tuple[str, Callable[[bytes], str]]:
    """The decoder to use: ``own``, ``mailguard`` or ``auto`` (mailguard when importable)."""
    if name in ("auto", "mailguard"):
        found = _mailguard_decoder()
        if found is not None:
            return found
        if name == "mailguard":
            raise SystemExit("--decoder mailguard: mailguard's MIME extraction is not importable")
    return "loadtest.fingerprint.decode (own)", visible_text


def _mailguard_decoder() -> tuple[str, Callable[[bytes], str]] | None:
    """mailguard's extraction, if the core exposes one (the module name is not fixed yet)."""
    import importlib

    for modname, attr in (
        ("mailguard.core.fingerprint.mime", "extract"),
        ("mailguard.core.mime", "extract"),
        ("mailguard.core.fingerprint.decode", "extract"),
    ):
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        fn = getattr(mod, attr, None)
        if callable(fn):
            return f"{modname}.{attr}", _adapt(fn)
    return None


def _adapt(fn: Callable[..., object]) -> Callable[[bytes], str]:
    """Turn extract()'s result into the body's visible text, as visible_text() gives it:
    ``.text`` (no subject), then one ``[attachment DIGEST]`` per attachment."""

    def run(raw: bytes) -> str:
        res = fn(raw)
        if isinstance(res, str):
            return " ".join(res.split())
        text = getattr(res, "text", None)
        if not isinstance(text, str):
            text = str(res)
        atts = getattr(res, "attachments", ()) or ()
        parts = [text, *(f"[attachment {str(a)[:16]}]" for a in atts)]
        return " ".join(" ".join(parts).split())

    return run
