"""Visible text of HTML: what a reader sees, plus link targets; hidden text dropped."""

from __future__ import annotations

import html

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.core.fingerprint.html import _unescape, style_hides, visible_text


def seen(html: str) -> list[str]:
    return visible_text(html).split()


def test_plain_structure() -> None:
    html = (
        "<!DOCTYPE html><html><head><title>Title words</title>"
        "<style>p { color: red }</style><script>var hidden = 1;</script></head>"
        "<body><!-- a comment --><h1>Big</h1><p>Some <b>bold</b> text</p>"
        "<table><tr><td>cell one</td><td>cell two</td></tr></table></body></html>"
    )
    assert seen(html) == ["big", "some", "bold", "text", "cell", "one", "cell", "two"]


def test_inline_tags_and_comments_do_not_split_words() -> None:
    assert seen("V<b></b>i<span>a</span>g<!-- x -->ra") == ["viagra"]
    assert seen("one<br>two<div>three</div>four") == ["one", "two", "three", "four"]


def test_entities_are_decoded_last() -> None:
    assert seen("caf&eacute; &lt;b&gt;not a tag&lt;/b&gt; &#x41;&#66;") == [
        "café",
        "<b>not",
        "a",
        "tag</b>",
        "AB",
    ]


def test_links_and_remote_images_become_urls() -> None:
    html = (
        "<p><a href='https://Shop.Example/offer?u=1'>Click</a>"
        '<img src="https://img.example/logo.png" alt="logo"><img src="cid:part1">'
        "<a name='anchor'>no href</a></p>"
    )
    assert seen(html) == [
        "https://shop.example/offer?u=1",
        "click",
        "https://img.example/logo.png",
        "no",
        "href",
    ]


@pytest.mark.parametrize(
    "style",
    [
        "display:none",
        "DISPLAY : NONE !important",
        "visibility: hidden",
        "visibility:collapse",
        "font-size:0",
        "font-size: 0px",
        "font-size:1px",
        "font-size:0.1em",
        "font-size:10%",
        "opacity:0",
        "opacity: 0.05",
        "color: transparent",
        "max-height:0; overflow:hidden",
        "height:0px;overflow:hidden;",
        "width: 0; overflow: hidden",
        "position:absolute; left:-9999px",
        "text-indent:-5000px",
        "color:red; display: none",
    ],
)
def test_hiding_styles(style: str) -> None:
    assert style_hides(style.lower()), style
    html = f"<p>before</p><div style='{style}'>secret <b>words</b></div><p>after</p>"
    assert seen(html) == ["before", "after"]


@pytest.mark.parametrize(
    "style",
    [
        "display:block",
        "font-size:14px",
        "font-size: small",
        "opacity: 0.9",
        "max-height:0",  # without overflow:hidden the content still shows
        "overflow:hidden",
        "height:10px; overflow:hidden",
        "margin:0; padding:0; border:0",
        "left:-9999px",  # not positioned
        "line-height:0",
        "color:#000000",
    ],
)
def test_visible_styles(style: str) -> None:
    assert not style_hides(style), style
    assert seen(f"<div style='{style}'>shown</div>") == ["shown"]


def test_hidden_attribute_and_entity_encoded_style() -> None:
    assert seen("<p hidden>no</p><p>yes</p>") == ["yes"]
    assert seen("<input type=hidden value=x><p data-x='hidden'>yes</p>") == ["yes"]
    assert seen("<p style='display&#58;none'>no</p>ok") == ["ok"]
    assert seen('<p style="visibility:&#104;idden">no</p>ok') == ["ok"]
    assert seen('<p style="color:&quot;red&quot;">yes</p>') == ["yes"]


def test_hidden_element_ends_where_a_browser_ends_it() -> None:
    # nested same-name elements
    assert seen("<div style='display:none'><div>a</div>b</div>c") == ["c"]
    # an unclosed hidden span is closed by its parent's end tag
    assert seen("<td><span style='display:none'>a</td><td>b</td>") == ["b"]
    # a hidden p is closed by the next block
    assert seen("<p style='display:none'>a<div>b</div>") == ["b"]
    # a hidden cell is closed by the next cell
    assert seen("<tr><td style='display:none'>a<td>b</tr>") == ["b"]
    # void elements hide nothing after them
    assert seen("<img style='display:none' src='x.png'>after") == ["after"]
    # a hidden element left open hides to the end, as in a browser
    assert seen("before<div style='display:none'>a<div>b") == ["before"]


def test_preheader_trick() -> None:
    html = (
        "<div style='display:none;max-height:0;overflow:hidden;mso-hide:all'>"
        "Preview text 8f3k2j hashbuster</div><p>Real content here</p>"
    )
    assert seen(html) == ["real", "content", "here"]


def test_malformed_html() -> None:
    assert seen("a < b and c > d") == ["a", "<", "b", "and", "c", ">", "d"]
    assert seen("text <div class='unterminated") == ["text"]
    assert seen("<script>never closed") == []
    assert seen("x <!-- never closed") == ["x"]
    assert seen("") == []
    assert seen("no tags at all &amp; entity") == ["no", "tags", "at", "all", "&", "entity"]


_WORDS = st.sampled_from(["alpha", "beta", "gamma", "delta", "epsilon"])
_HIDERS = st.sampled_from(
    [
        ("div", "style='display:none'"),
        ("span", 'style="font-size:0px"'),
        ("p", "style='visibility:hidden'"),
        ("td", "style='opacity:0'"),
        ("div", "hidden"),
        ("span", "style='max-height:0;overflow:hidden'"),
    ]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_WORDS, st.booleans(), _HIDERS), max_size=12))
def test_hidden_words_never_show(items: list[tuple[str, bool, tuple[str, str]]]) -> None:
    html, shown = "", []
    for word, hide, (tag, attributes) in items:
        if hide:
            html += f"<{tag} {attributes}>hidden{word}</{tag}>"
        else:
            html += f"<div>{word}</div>"
            shown.append(word)
    assert seen(f"<table><tr><td>{html}</td></tr></table>") == shown


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("<>/!-='\"ab pdivstyle:none&#;x\n"), max_size=200))
def test_never_raises_on_tag_soup(html: str) -> None:
    assert isinstance(visible_text(html), str)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_arbitrary_text(html: str) -> None:
    assert isinstance(visible_text(html), str)


_REFERENCE_SOUP = st.lists(
    st.sampled_from(["&", "#", "x", "X", ";", "amp", "lt", "not", "eacute", "3", "9", "A", " "]),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_REFERENCE_SOUP, st.text(max_size=100)))
def test_cached_unescape_is_html_unescape(text: str) -> None:
    assert _unescape(text) == html.unescape(text)


_TAGS = st.lists(
    st.sampled_from(
        [
            *("<p>", "</p>", "<pre>", "<br/>", "<br2>", "<td>", "<h1>", "<h7>", "<colgroup>"),
            *("<col>", "<span>", "<b>", "</b>", "<p\n>", "<x-y>", "<p-x>", "<p\u00e9>", "<td"),
            *("<!-- c -->", "<!--", "-->", "<!doctype html>", "<?xml?>", "<style>a</style>"),
            *("<script>x<y</script>", "<styles>", "<title>t</title>", "<templates>", "<s>"),
            *("<noembed>", "</noframes>", "&amp;", "&lt;", "&#38;", "word", " ", "\u00e9", "<"),
            *("<a href=x>", "<a name=a>", "<area href='y'>", "<img src=http://i>", "<img src=cid>"),
            *("<img src=", "<a href=", "</a>", "<abbr href=z>"),
        ]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(_TAGS)
def test_tag_patterns_equal_their_unfactored_forms(text: str) -> None:
    # The patterns are written to start with their literal and branch late (speed); these are
    # the forms they replace, spelled out.
    import re

    from mailguard.core.fingerprint import html as h

    blocks = h._BLOCK_TAGS
    nothing = re.compile(
        r"<!--.*?(?:-->|\Z)|<![^<>]*>|<\?[^<>]*>"
        r"|<(script|style|title|template|noembed|noframes)\b[^<>]*>.*?(?:</\1\s*>|\Z)",
        re.S,
    )
    link = re.compile(r"<(?:a|area)\b[^<>]*?\shref\s*=\s*[\"']?\s*([^\"'\s<>]+)[^<>]*>")
    image = re.compile(r"<img\b[^<>]*?\ssrc\s*=\s*[\"']?\s*(https?://[^\"'\s<>]+)[^<>]*>")
    split = re.compile(rf"</?(?:({blocks})\b|[a-z])[^>]*(?:>|\Z)")
    assert h._NOTHING_SHOWN_RE.sub("", text) == nothing.sub("", text)
    links = " ".join(image.split(" ".join(link.split(text))))  # links, then images
    assert h._LINK_OR_IMAGE_RE.sub(r" \1\2 ", text) == links
    parts = split.split(text)
    parts[1::2] = [" " if block else "" for block in parts[1::2]]
    new = h._TAG_SPLIT_RE.split(text)
    new[1::2] = [" " if name in h._BLOCKS else "" for name in new[1::2]]
    assert "".join(new) == "".join(parts)
