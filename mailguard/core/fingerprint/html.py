"""The text a reader sees in an HTML body, for fingerprinting.

Responsible for: reducing HTML to its visible words plus the targets of its links and remote
images (each emitted as a URL where the element stands, so a link-only message still has
content and normalization can reduce the URL to its host and path shape).  Dropped: comments,
declarations and processing instructions; ``script``, ``style``, ``title``, ``template``,
``noembed`` and ``noframes`` elements; elements hidden by the ``hidden`` attribute or by inline
CSS -- ``display:none``, ``visibility:hidden|collapse``, ``opacity`` below 0.1, a font size
below 2px/2pt (0.2em, 20%), ``color:transparent``, zero ``height``/``width``/``max-height``/
``max-width`` with ``overflow:hidden``, ``text-indent`` or an absolute/fixed position 1000px or
more off-screen.  Block-level tags separate words; inline tags do not (``V<b></b>iagra`` is one
word, as a reader sees it).  Character references are decoded last.

How: a fixed sequence of regular-expression passes (C speed; HTML in mail is mostly tables with
inline styles, and ``html.parser`` costs a Python call per tag, more than the whole fingerprint
budget).  Candidates for hiding are found by a cheap search for hiding values (``:none``,
``:0`` ...) and the ``hidden`` attribute; only their tags are examined (style attributes with
character references decoded), and only for a hiding element does a small scan follow it to
its end: the matching end tag, an end tag of an ancestor, or the start of a sibling that
implicitly closes it (``p`` before a block, ``li``/``td``/``tr``/``option``/``dt``/``dd``
before their siblings).  ASCII letters are lower-cased (the normalizer folds case anyway);
whitespace is not collapsed.  CSS in ``<style>`` blocks (class-based hiding) and colour equal
to the background are not evaluated.
Must never: raise on any ``str``, fetch anything, or take more than linear time in the input:
tag patterns stop at the next ``<``, and the Python-level work on hiding elements is bounded
(``MAX_HIDE_CANDIDATES``, ``MAX_HIDDEN_TAGS``).
"""

from __future__ import annotations

import re
from html import unescape
from itertools import repeat

# Input beyond this many characters is ignored.
MAX_HTML_CHARS = 1_000_000
# Bounds on the Python-level work for hiding elements: candidates examined, tags scanned inside
# one hidden element (beyond that it hides the rest, as an unclosed element does), and how far
# back from a hiding value its tag may start.
MAX_HIDE_CANDIDATES = 2000
MAX_HIDDEN_TAGS = 10_000
MAX_TAG_CHARS = 4000

# Patterns start with a literal ("<", "&"), which the regex engine scans for at C speed, and
# branch after it: an alternation or a class first is tried at every position.
# Markup that shows nothing, removed in one pass (leftmost first, as a browser reads it): comments,
# declarations, processing instructions, and the elements script, style, title, template,
# noembed and noframes with their content (factored: fewer branches tried).  Removed without a
# trace: a comment or a script inside a word does not split it on screen either.
_NOTHING_SHOWN_RE = re.compile(
    r"<(?:!--.*?(?:-->|\Z)|![^<>]*>|\?[^<>]*>"
    r"|(s(?:cript|tyle)|t(?:itle|emplate)|no(?:embed|frames))\b[^<>]*>.*?(?:</\1\s*>|\Z))",
    re.S,
)
# Candidates for hiding, found cheaply: a CSS value that can hide (the pattern starts with a
# literal ":", which the regex engine scans for at C speed; alternations of property names cost
# 40 times more), checked against the property name before it, or the word "hidden" standing
# as an attribute.  Each candidate's tag is then examined exactly.
_HIDE_VALUE_RE = re.compile(
    r":\s*(?:none|hidden|collapse|transparent|[0.]|1\s*(?:p[xt]|\d?\s*%)|-\s*\d)"
)
_HIDING_PROPERTIES = (
    "display", "visibility", "font-size", "opacity", "height", "width", "color", "left", "top",
    "indent",
)  # fmt: skip
_HIDDEN_WORD_RE = re.compile(r"hidden(?=[\s=>/])")  # literal first: fast
_START_TAG_RE = re.compile(r"<([a-z][^\s/<>]*)([^<>]*)>")
# Style attributes with character references (``display&#58;none``), decoded before the search.
_ENTITY_STYLE_RE = re.compile(r"style\s*=\s*(?:\"([^\"<>]*&[^\"<>]*)\"|'([^'<>]*&[^'<>]*)')")
_QUOTES_AND_BRACKETS = str.maketrans("", "", "\"'<>")
_QUOTED_RE = re.compile(r"\"[^\"]*\"|'[^']*'")
_HIDDEN_ATTR_RE = re.compile(r"(?:^|\s)hidden(?:\s|=|/|$)")
_STYLE_ATTR_RE = re.compile(r"(?:^|\s)style\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s>]+))")
_DECLARATION_RE = re.compile(r"([a-z\-]+)\s*:\s*([^;]*)")
_LENGTH_RE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*([a-z%]*)")
_TAG_RE = re.compile(r"<(/?)([a-z][^\s/<>]*)[^<>]*>")
# Links (a, area with href) and remote images (img with an http(s) src), in one pass: replaced
# by `` URL `` (the group that took part).
_LINK_OR_IMAGE_RE = re.compile(
    r"<(?:(?:a|area)\b[^<>]*?\shref\s*=\s*[\"']?\s*([^\"'\s<>]+)[^<>]*>"
    r"|img\b[^<>]*?\ssrc\s*=\s*[\"']?\s*(https?://[^\"'\s<>]+)[^<>]*>)"
)
_BLOCK_TAGS = (
    "address|article|aside|blockquote|body|br|button|canvas|caption|center|col|colgroup|dd|"
    "details|dialog|dir|div|dl|dt|embed|fieldset|figcaption|figure|footer|form|frame|frameset|"
    "h[1-6]|head|header|hr|html|iframe|img|input|legend|li|main|menu|nav|object|ol|option|p|pre|"
    "section|select|summary|table|tbody|td|textarea|tfoot|th|thead|tr|ul|video|audio"
)
# Any tag; the group is its name (up to the first non-word character): block-level tags
# separate words, inline ones do not.
_TAG_SPLIT_RE = re.compile(r"</?([a-z]\w*)[^>]*(?:>|\Z)")
# Character references (as html.unescape finds them), decoded through a cache (html.unescape
# calls Python for each one).
_REFERENCE_RE = re.compile(r"(&(?:#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?))")
_REFERENCES: dict[str, str] = {}

_VOID_TAGS = "area base basefont bgsound br col embed frame hr img input keygen link meta param"
_VOID = frozenset(f"{_VOID_TAGS} source track wbr".split())
_BLOCKS = frozenset(_BLOCK_TAGS.replace("h[1-6]", "h1|h2|h3|h4|h5|h6").split("|"))
_TAG_SPACE = dict.fromkeys(_BLOCKS, " ")  # what a tag leaves in the text, by name ("" if inline)
# An open element of the key's kind is closed by the start of any element in the value.
_IMPLIED_END = {
    "p": _BLOCKS,
    "li": frozenset({"li"}),
    "dt": frozenset({"dt", "dd"}),
    "dd": frozenset({"dt", "dd"}),
    "td": frozenset({"td", "th", "tr"}),
    "th": frozenset({"td", "th", "tr"}),
    "tr": frozenset({"tr"}),
    "option": frozenset({"option"}),
}
_ABSOLUTE_UNITS = frozenset({"", "px", "pt", "pc", "q", "mm", "cm", "in"})


def _length(value: str) -> tuple[float, str] | None:
    match = _LENGTH_RE.match(value)
    if match is None:
        return None
    try:
        return float(match.group(1)), match.group(2).lower()
    except ValueError:  # pragma: no cover - the pattern only admits float syntax
        return None


def _is_zero(value: str) -> bool:
    length = _length(value)
    return length is not None and length[0] == 0.0


def _tiny_font(value: str) -> bool:
    length = _length(value)
    if length is None:
        return False
    size, unit = length
    if unit in _ABSOLUTE_UNITS:
        return size < 2.0
    if unit == "%":
        return size < 20.0
    return size < 0.2


def _far_negative(value: str) -> bool:
    length = _length(value)
    return length is not None and length[0] <= -1000.0


def style_hides(style: str) -> bool:
    """Whether an inline ``style`` attribute value hides its element (module docstring)."""
    decl: dict[str, str] = {}
    for name, value in _DECLARATION_RE.findall(style):
        decl[name.lower()] = value.strip().lower()
    first = {k: (v.split() or [""])[0] for k, v in decl.items()}
    if first.get("display") == "none" or first.get("visibility") in ("hidden", "collapse"):
        return True
    if first.get("color") == "transparent":
        return True
    if "opacity" in decl:
        length = _length(decl["opacity"])
        if length is not None and length[0] < (10.0 if length[1] == "%" else 0.1):
            return True
    if "font-size" in decl and _tiny_font(decl["font-size"]):
        return True
    if first.get("overflow") == "hidden" and any(
        k in decl and _is_zero(decl[k]) for k in ("height", "max-height", "width", "max-width")
    ):
        return True
    if "text-indent" in decl and _far_negative(decl["text-indent"]):
        return True
    return first.get("position") in ("absolute", "fixed") and any(
        k in decl and _far_negative(decl[k]) for k in ("left", "top")
    )


def _attributes_hide(attributes: str) -> bool:
    if _HIDDEN_ATTR_RE.search(_QUOTED_RE.sub(" ", attributes)):
        return True
    match = _STYLE_ATTR_RE.search(attributes)
    if match is None:
        return False
    return style_hides(match.group(1) or match.group(2) or match.group(3) or "")


def _element_end(html: str, name: str, start: int) -> int:
    """Where the element whose start tag ends at ``start`` ends (see the module docstring)."""
    if name in _VOID:
        return start
    stack = [name]
    for count, match in enumerate(_TAG_RE.finditer(html, start)):
        if count >= MAX_HIDDEN_TAGS:
            break
        tag = match.group(2).lower()
        if match.group(1):  # an end tag
            if tag not in stack:
                if tag in _VOID or tag == "p":  # stray </br>, </p>: no effect here
                    continue
                return match.start()  # closes an ancestor of the hidden element
            del stack[len(stack) - 1 - stack[::-1].index(tag) :]
            if not stack:
                return match.end()
            continue
        closers = _IMPLIED_END.get(stack[-1])
        if closers is not None and tag in closers:
            stack.pop()
            if not stack:
                return match.start()
        if tag not in _VOID:
            stack.append(tag)
    return len(html)


def _decoded_style(match: re.Match[str]) -> str:
    value = unescape(match.group(1) or match.group(2) or "").lower()
    return f'style="{value.translate(_QUOTES_AND_BRACKETS)}"'


def _candidate_tags(html: str) -> list[int]:
    """Offsets of the ``<`` of start tags whose attributes may hide the element."""
    found: set[int] = set()
    for count, match in enumerate(_HIDE_VALUE_RE.finditer(html)):
        if count >= 10 * MAX_HIDE_CANDIDATES:
            break
        colon = match.start()
        if html[max(0, colon - 16) : colon].rstrip().endswith(_HIDING_PROPERTIES):
            found.add(html.rfind("<", max(0, colon - MAX_TAG_CHARS), colon))
            if len(found) > MAX_HIDE_CANDIDATES:
                break
    if "hidden" in html:
        for match in _HIDDEN_WORD_RE.finditer(html, 1):
            start = match.start()
            if html[start - 1].isspace():
                found.add(html.rfind("<", max(0, start - MAX_TAG_CHARS), start))
                if len(found) > 2 * MAX_HIDE_CANDIDATES:
                    break
    found.discard(-1)
    return sorted(found)[:MAX_HIDE_CANDIDATES]


def _drop_hidden(html: str) -> str:
    pieces: list[str] = []
    done = 0
    for start in _candidate_tags(html):
        if start < done:
            continue
        match = _START_TAG_RE.match(html, start)
        if match is None or not _attributes_hide(match.group(2)):
            continue
        pieces.append(html[done:start])
        done = _element_end(html, match.group(1), match.end())
    if not pieces:
        return html
    pieces.append(html[done:])
    return " ".join(pieces)


def visible_text(html: str) -> str:
    """The visible text of ``html`` with link and remote image URLs inline (module docstring)."""
    if len(html) > MAX_HTML_CHARS:
        html = html[:MAX_HTML_CHARS]
    if "<" not in html:
        return _unescape(html) if "&" in html else html
    # ASCII lower case (as bytes: other letters keep their case for the normalizer's homoglyph
    # step), so that the patterns need no IGNORECASE, which costs them 3x.
    if html.isascii():
        html = html.lower()
    else:
        html = html.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")
    html = _NOTHING_SHOWN_RE.sub("", html)
    if "&" in html:
        html = _ENTITY_STYLE_RE.sub(_decoded_style, html)
    html = _drop_hidden(html)
    if "href" in html or "<img" in html:  # split: [text, link, image, text, ...], None unused
        html = " ".join(filter(None, _LINK_OR_IMAGE_RE.split(html)))
    parts = _TAG_SPLIT_RE.split(html)  # [text, tag name, text, ...]
    parts[1::2] = map(_TAG_SPACE.get, parts[1::2], repeat(""))
    html = "".join(parts)
    return _unescape(html) if "&" in html else html


def _unescape(text: str) -> str:
    """``html.unescape``, with the decoding of each distinct reference cached."""
    parts = _REFERENCE_RE.split(text)  # [text, reference, text, ...]
    references = parts[1::2]
    decoded = list(map(_REFERENCES.get, references))
    if None in decoded:
        if len(_REFERENCES) > 4096:
            _REFERENCES.clear()
        decoded = [
            found if found is not None else _REFERENCES.setdefault(reference, unescape(reference))
            for reference, found in zip(references, decoded, strict=True)
        ]
    parts[1::2] = decoded
    return "".join(parts)
