"""Real human-written text found on this machine, without network.

Sources, in order of importance (each one optional; the run needs at least the first):

``stdlib``
    Docstrings of the Python standard library's modules, classes and functions, read with
    :mod:`ast` from the interpreter's own ``.py`` files (any CPython install has them; a
    deterministic subset of files is read to keep start-up quick, all of them when there is no
    dpkg database); module synopses double as product names, URLs in them as links.
``dpkg``
    Debian package descriptions, synopses, homepages and maintainer names from
    ``/var/lib/dpkg/status`` (every Debian system).
``licenses``
    ``/usr/share/common-licenses/*`` (Debian's ``base-files``: every Debian system).
``copyright``
    Free-text paragraphs of ``/usr/share/doc/*/copyright`` (kept even by Debian's slim images).
``changelog``
    Entries and signers of ``/usr/share/doc/*/changelog.Debian.gz`` (absent on slim images).
``zen``
    The Zen of Python (``import this``).

Man pages are not used (often excluded from container images; roff is noisy).

Everything is read in sorted order and filtered for near-duplicates (license boilerplate is
repeated in hundreds of copyright files), so the pools only depend on what is installed; the
corpus generator then draws from them with its own seeded RNG.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import gzip
import hashlib
import io
import os
import re
import sysconfig
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DPKG_STATUS = Path("/var/lib/dpkg/status")
COMMON_LICENSES = Path("/usr/share/common-licenses")
DOC_DIR = Path("/usr/share/doc")

# Bounded reading: enough text for a few thousand messages, quick to collect.
MAX_STDLIB_FILES = 450
MAX_DOC_PACKAGES = 1000
MAX_CHANGELOG_BYTES = 12_000

_WORD = re.compile(r"[A-Za-z][a-z]{2,13}")
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_BACKTICKS = re.compile(r"`+([^`]*)`+")
_CODEY = re.compile(r"[/_=]|\w\.\w")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_NAME_RE = re.compile(r"^([^<>@()\"]+?)\s*<[^<>@\s]+@[^<>\s]+>")
_NON_PERSON = re.compile(
    r"team|maintainers|project|debian|ubuntu|list|group|packag|developers|committee|qa|"
    r"foundation|authors|bot|admin|security|the\b",
    re.I,
)


@dataclass(slots=True)
class TextPools:
    """What the corpus is made of; every list is de-duplicated and in deterministic order."""

    paragraphs: list[str] = field(default_factory=list)  # 12..220 words of prose
    sentences: list[str] = field(default_factory=list)  # 4..30 words, one sentence
    short_lines: list[str] = field(default_factory=list)  # changelog entries, synopses
    products: list[tuple[str, str]] = field(default_factory=list)  # (package, synopsis)
    urls: list[str] = field(default_factory=list)  # homepages, distinct hosts first
    names: list[str] = field(default_factory=list)  # person names ("Given Family")
    words: list[str] = field(default_factory=list)  # vocabulary for hashbusters
    stats: Counter[str] = field(default_factory=Counter)  # "source:kind" -> count

    def summary(self) -> str:
        kinds = ("paragraphs", "sentences", "short_lines", "products", "urls", "names", "words")
        sizes = ", ".join(f"{k} {len(getattr(self, k))}" for k in kinds)
        by_source: Counter[str] = Counter()
        for key, n in self.stats.items():
            by_source[key.split(":", 1)[0]] += n
        srcs = ", ".join(f"{s} {n}" for s, n in sorted(by_source.items()))
        return f"text pools: {sizes}; items by source: {srcs}"


def _clean(text: str) -> str:
    text = _RST_ROLE.sub(r"\1", text)
    text = _BACKTICKS.sub(r"\1", text)
    text = text.replace("**", "").replace("::", ":")
    return " ".join(text.split())


def _prose_like(text: str, min_words: int) -> bool:
    words = text.split()
    if len(words) < min_words:
        return False
    letters = sum(c.isalpha() for c in text)
    if letters < 0.72 * len(text.replace(" ", "")):
        return False
    # Code, tables, option lists, copyright statements with addresses.
    if any(tok in text for tok in (">>>", "==", "->", "{", "}", "()", "[]", "\\", "__", "$ ", "@")):
        return False
    # File lists and identifiers: words with a slash, underscore or inner dot.
    if sum(bool(_CODEY.search(w)) for w in words) > 0.1 * len(words):
        return False
    return sum(w[:1].isalpha() for w in words) >= 0.8 * len(words)


class _NearDup:
    """Rejects text sharing too many word 4-shingles with what was already kept."""

    def __init__(self, max_overlap: float = 0.3, k: int = 4) -> None:
        self.seen: set[int] = set()
        self.admitted = 0
        self.max_overlap = max_overlap
        self.k = k

    def admit(self, text: str) -> bool:
        k = self.k
        words = re.findall(r"[^\W\d_]+", text.lower())
        if len(words) < k:
            sh = {hash(" ".join(words))}
        else:
            sh = {hash(" ".join(words[i : i + k])) for i in range(len(words) - k + 1)}
        if not sh or len(sh & self.seen) > self.max_overlap * len(sh):
            return False
        self.seen |= sh
        return True


# --------------------------------------------------------------------------- readers


def _stdlib_files(limit: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "lib2to3",
        "__pycache__",
    }
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    files.sort()
    if len(files) > limit:  # deterministic spread over the whole library
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _split_paragraphs(text: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        # Indented blocks are code samples or tables in docstrings and licenses.
        if lines and sum(line.startswith("    ") for line in lines) > len(lines) / 2:
            continue
        yield _clean(block)


_URL = re.compile(r"https?://[A-Za-z0-9.-]+\.[a-z]{2,}(?:/[\w./%~+-]*)?")


def _read_stdlib(limit: int, pools: TextPools) -> Iterator[tuple[str, str]]:
    """Docstring paragraphs; on the way, module synopses (as products) and URLs into pools."""
    for path in _stdlib_files(limit):
        for k, doc in enumerate(_docstrings(path)):
            if k == 0 and path.stem != "__init__" and not path.stem.startswith("_"):
                first = _clean(doc.split("\n\n", 1)[0])
                if 2 <= len(first.split()) <= 12:
                    pools.products.append((f"python3-{path.stem}", first.rstrip(".")))
                    pools.stats["stdlib:products"] += 1
            for url in _URL.findall(doc):
                pools.urls.append(url.rstrip("."))
            for para in _split_paragraphs(doc):
                yield "stdlib", para


def _dpkg_records() -> Iterator[dict[str, str]]:
    try:
        data = DPKG_STATUS.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    for block in data.split("\n\n"):
        rec: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                rec[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                rec[key] = value.strip()
        if "Package" in rec:
            yield rec


def _dpkg_description(desc: str) -> tuple[str, list[str]]:
    synopsis, _, rest = desc.partition("\n")
    paras: list[str] = []
    cur: list[str] = []
    for line in rest.splitlines():
        s = line.strip()
        if s == ".":
            paras.append(" ".join(cur))
            cur = []
        elif line.startswith("  "):  # preformatted (lists): keep as is, joined
            cur.append(s.lstrip("*-+ "))
        else:
            cur.append(s)
    paras.append(" ".join(cur))
    return synopsis.strip(), [_clean(p) for p in paras if p.strip()]


def _person_name(raw: str) -> str | None:
    m = _NAME_RE.match(raw.strip())
    if not m:
        return None
    name = " ".join(m.group(1).split())
    parts = name.split()
    if not 2 <= len(parts) <= 3 or _NON_PERSON.search(name):
        return None
    if not all(p[:1].isupper() and p.replace("-", "").replace("'", "").isalpha() for p in parts):
        return None
    return name


def _copyright_paragraphs(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    if text.startswith("Format:"):
        # DEP-5: take the continuation lines of Comment/License/Disclaimer fields.
        for m in re.finditer(
            r"^(?:Comment|License|Disclaimer):[^\n]*\n((?:[ \t][^\n]*\n?)+)", text, re.M
        ):
            body = "\n".join("" if ln.strip() == "." else ln for ln in m.group(1).splitlines())
            yield from _split_paragraphs(body)
    else:
        yield from _split_paragraphs(text)


def _changelog(path: Path) -> tuple[list[str], list[str]]:
    """Entries (one-line, human-written) and the names of their signers."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read(MAX_CHANGELOG_BYTES)
    except (OSError, EOFError, gzip.BadGzipFile):
        return [], []
    text = raw.decode("utf-8", errors="replace")
    entries: list[str] = []
    names: list[str] = []
    cur: list[str] = []
    for line in text.splitlines():
        if line.startswith("  * ") or line.startswith("    - "):
            if cur:
                entries.append(" ".join(cur))
            cur = [line.strip()[2:]]
        elif line.startswith("    ") and cur:
            cur.append(line.strip())
        else:
            if cur:
                entries.append(" ".join(cur))
                cur = []
            if line.startswith(" -- "):
                n = _person_name(line[4:])
                if n:
                    names.append(n)
    if cur:
        entries.append(" ".join(cur))
    out = []
    for e in entries:
        e = re.sub(r"\(?Closes:?\s*#\d+(?:,\s*#\d+)*\)?\.?", "", e, flags=re.I)
        e = re.sub(r"\[[^\]]*\]", "", e).strip(" .;")
        if e:
            out.append(e + ".")
    return out, names


# --------------------------------------------------------------------------- collection


def _add_paragraph(pools: TextPools, nd: _NearDup, ns: set[str], src: str, para: str) -> None:
    para = unicodedata.normalize("NFC", para)
    n_words = len(para.split())
    if n_words > 220:
        # Long license sections: keep them, in pieces that end at a sentence.
        sents = [s for s in _SENT_SPLIT.split(para) if len(s.split()) <= 150]
        chunk: list[str] = []
        for s in sents:
            chunk.append(s)
            if sum(len(c.split()) for c in chunk) >= 90:
                _add_paragraph(pools, nd, ns, src, " ".join(chunk))
                chunk = []
        if chunk:
            _add_paragraph(pools, nd, ns, src, " ".join(chunk))
        return
    if not _prose_like(para, 12) or not nd.admit(para):
        return
    # One paragraph in four is cut into the sentence pool instead, so that no one-liner is a
    # sentence of a paragraph used elsewhere.
    nd.admitted += 1
    if nd.admitted % 4:
        pools.paragraphs.append(para)
        pools.stats[f"{src}:paragraphs"] += 1
        return
    for s in _SENT_SPLIT.split(para):
        s = s.strip()
        key = s.lower()
        if 4 <= len(s.split()) <= 30 and s[-1:] in ".!?" and key not in ns and _prose_like(s, 4):
            ns.add(key)
            pools.sentences.append(s)
            pools.stats[f"{src}:sentences"] += 1


def _add_short(pools: TextPools, nd: _NearDup, src: str, line: str) -> None:
    line = " ".join(line.split())
    if 3 <= len(line.split()) <= 25 and _prose_like(line, 3) and nd.admit(line):
        pools.short_lines.append(line)
        pools.stats[f"{src}:short_lines"] += 1


def _url_host(url: str) -> str:
    return url.split("//", 1)[-1].split("/", 1)[0].lower()


def collect(
    max_stdlib_files: int = MAX_STDLIB_FILES, max_doc_packages: int = MAX_DOC_PACKAGES
) -> TextPools:
    """Read every available source (bounded); raise RuntimeError if there is too little."""
    pools = TextPools()
    nd = _NearDup()
    seen_sent: set[str] = set()
    seen_short = _NearDup(0.25, k=2)
    seen_names: set[str] = set()
    seen_urls: set[str] = set()
    words: Counter[str] = Counter()

    def add_name(src: str, name: str | None) -> None:
        if name and name not in seen_names:
            seen_names.add(name)
            pools.names.append(name)
            pools.stats[f"{src}:names"] += 1

    # Zen of Python: rot13 in the module's source; decode it ourselves (importing prints it).
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import this
    except Exception:  # exotic interpreters
        pass
    else:
        zen = codecs.decode(this.s, "rot13")
        for line in zen.splitlines()[2:]:
            _add_short(pools, seen_short, "zen", line)

    # Without Debian's texts, read the whole standard library instead of a subset.
    limit = max_stdlib_files if DPKG_STATUS.is_file() else 100_000
    for src, para in _read_stdlib(limit, pools):
        _add_paragraph(pools, nd, seen_sent, src, para)
    stdlib_urls = list(dict.fromkeys(pools.urls))
    pools.urls = []

    for rec in _dpkg_records():
        if "Description" in rec:
            synopsis, paras = _dpkg_description(rec["Description"])
            if synopsis:
                pools.products.append((rec["Package"], synopsis))
                pools.stats["dpkg:products"] += 1
                _add_short(pools, seen_short, "dpkg", synopsis)
            for p in paras:
                _add_paragraph(pools, nd, seen_sent, "dpkg", p)
        home = rec.get("Homepage", "")
        if home.startswith(("http://", "https://")) and home not in seen_urls:
            seen_urls.add(home)
            pools.urls.append(home)
            pools.stats["dpkg:urls"] += 1
        for who in [rec.get("Maintainer", ""), *rec.get("Uploaders", "").split(">,")]:
            add_name("dpkg", _person_name(who if who.endswith(">") else who + ">"))

    if COMMON_LICENSES.is_dir():
        done: set[Path] = set()
        for path in sorted(COMMON_LICENSES.iterdir()):
            real = path.resolve()
            if real in done or not real.is_file():
                continue
            done.add(real)
            text = real.read_text(encoding="utf-8", errors="replace")
            for para in _split_paragraphs(text):
                _add_paragraph(pools, nd, seen_sent, "licenses", para)

    if DOC_DIR.is_dir():
        pkgs = sorted(p for p in DOC_DIR.iterdir() if p.is_dir())[:max_doc_packages]
        for pkg in pkgs:
            for para in _copyright_paragraphs(pkg / "copyright"):
                _add_paragraph(pools, nd, seen_sent, "copyright", para)
            cl = pkg / "changelog.Debian.gz"
            if cl.is_file():
                entries, names = _changelog(cl)
                for e in entries:
                    _add_short(pools, seen_short, "changelog", e)
                for n in names:
                    add_name("changelog", n)

    for u in stdlib_urls:
        if u not in seen_urls:
            seen_urls.add(u)
            pools.urls.append(u)
            pools.stats["stdlib:urls"] += 1
    # Homepages: one per host first, then the rest (link-only messages prefer distinct hosts).
    by_host: dict[str, list[str]] = {}
    for u in pools.urls:
        by_host.setdefault(_url_host(u), []).append(u)
    pools.urls = [v[0] for v in by_host.values()] + [u for v in by_host.values() for u in v[1:]]

    for text in pools.paragraphs:
        words.update(w.lower() for w in _WORD.findall(text))
    pools.words = sorted(w for w, n in words.items() if n >= 2 and len(w) >= 4)
    pools.stats["all:words"] = len(pools.words)

    if min(len(pools.paragraphs), len(pools.sentences)) < 200 or not pools.products:
        raise RuntimeError(
            f"not enough text found on this machine ({len(pools.paragraphs)} paragraphs, "
            f"{len(pools.sentences)} sentences); see loadtest/fingerprint/README.md"
        )
    return pools


def digest(pools: TextPools) -> str:
    """A short hash of the pools: equal digests mean the same corpus for the same seed."""
    h = hashlib.sha256()
    for part in (pools.paragraphs, pools.sentences, pools.short_lines, pools.urls, pools.names):
        for item in part:
            h.update(item.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
    return h.hexdigest()[:12]


def iter_words(pools: TextPools) -> Iterable[str]:
    return pools.words
