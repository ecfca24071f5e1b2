"""Fingerprints of messages, their similarity and their LSH bucket keys.

Responsible for: the one definition of "substantively similar" that the bulk and mail-bomb
rules rest on.  (The online clusterer built on it is :mod:`.cluster`.)

**Features.**  The message is decoded (:mod:`.mime`) and normalized (:mod:`.normalize`), with
the names and addresses in To/Cc and the envelope recipients removed.  Each word is hashed
once to 64 bits (BLAKE2b; cached).  The features of a message form a set: every run of
``SHINGLE`` (3) consecutive body words inside one sentence (shingles never span a ``.``, ``!``
or ``?``, so reordered sentences and paragraphs change nothing, and a line of inserted words
does not break its neighbours' shingles), each sentence too short for a shingle as a whole;
the subject's 3-word runs (the whole subject when shorter); each distinct link (URL host and
path shape, taken out of the running text so that where a link stands does not matter); and
each attachment (its SHA-256).  Short sentences, subject, links and attachments are salted
apart from body shingles.

**Sketch** (``kind == "sketch"``, bodies of at least ``SHORT_WORDS`` (8) words).  A feature
made of word hashes ``h0, h1, h2`` gets the 30-bit value
``((h0 + 2*h1 + 4*h2 + salt) mod 2**64) >> 34``; for the body all shingles are computed at
once, the word hashes packed into one big integer so that two shifts and additions do the work
of a loop (:func:`shingle_values`).  One permutation hashing into ``LANES`` (128) bins: the
top 7 bits of a value choose its bin, each bin keeps its smallest value (one numpy
``minimum.at`` over the body's values, cached by the body's normalized words; the subject's,
links' and attachments' few values are then added one by one), and the lane stores
bits 7..22 of it (16 bits).  An empty bin borrows the lane of the first non-empty bin in a
fixed pseudo-random sequence of bins ("optimal densification", Shrivastava 2017), so every
lane is an unbiased MinHash sample.  The fraction of equal lanes estimates the Jaccard
similarity of the feature sets, with a standard error of about 0.04 near the threshold.

**Exact** (``kind == "exact"``, shorter bodies).  Too few shingles to sample: the fingerprint
is a 64-bit BLAKE2b digest of the normalized subject words, body words, sorted distinct links
and sorted attachment digests.  One-line messages match only when equal after normalization,
so unrelated one-liners do not collide, while copies still match through names, numbers,
tokens and URLs.

**Similarity.**  Fingerprints of different kinds: 0.  Exact: 1 if the digests are equal, else
0.  Sketches: equal lanes / 128.  Messages are similar when ``similarity >=
SIMILARITY_THRESHOLD`` (0.66, i.e. at least 85 equal lanes).  Personalized copies normalize to
the same features (1.0 but for MIME differences such as an added attachment); what the
threshold trades is robustness to what normalization cannot undo (hash-buster words,
per-recipient product lines: 10-30 % of the words) against hard negatives (issues of one
newsletter; receipts of one shop, which share their template and differ in a few item lines).
On the issue-3 benchmark (``loadtest/fingerprint``, seeds 1-3) 0.66 kept hard negatives merged
under 1 % of pairs (0.3-0.9 %) with adversarial F1 0.88-0.93; 0.6 raised adversarial F1 (to
0.95 and 1.0 on seeds 1 and 2) but merged 1.0 and 2.2 % of hard-negative pairs.

**Bands.**  ``band_keys``: for a sketch, 32 keys, one per band of 4 consecutive lanes (two hex
digits of band number, then the band's 8 bytes in hex: 18 characters); for an exact
fingerprint one key, ``"x"`` and the digest in hex.  Two sketches with Jaccard similarity J
share a band with probability ``1 - (1 - J**4)**32``: 0.87 at 0.5, 0.988 at 0.6, 0.998 at
0.66.

**Serialized form** (``to_bytes``): version byte (1), kind byte (1 sketch, 2 exact), number of
body words (big-endian uint16, capped), then the 256 lane bytes (128 big-endian uint16) or the
8-byte digest: 260 or 12 bytes.

**Long texts.** Only the first 32,000 characters of visible text count (``MAX_CHARS`` in
:mod:`.normalize`; 200,000 before VERSION 3); when they hold 1,000 words or fewer (ordinary
text: about 5,000), the first 32,000 after invisible characters are dropped and white space
squeezed (:func:`.normalize.squeezed`). This bounds the work on long messages (a 50 KB
plain-text message: 0.29 ms instead of 1.5 ms, 0.76 ms instead of 1.95 with every cache cold).
32,000 characters are some 5,000 words, far more shingles than 128 lanes need, and campaign
copies agree on their beginning as much as on their end: on the benchmark's texts of 30-115 KB
(``loadtest/fingerprint``: campaigns of 200-400 paragraphs, newsletter issues that share only
their masthead, intro and footer) the quality figures were the same with caps of 200,000, 32,000
and 16,000 characters. What it gives an evader: text after the cap is not seen, so two messages
that agree on their first 32,000 characters match whatever follows (which can only make a
sender's own long texts count as one campaign), and a hash-buster placed at the top needs about
a fifth of the window (some 6,500 characters of random visible words) to push a copy under the
threshold, where without a cap it needs about a quarter of the whole text; for texts up to about
25,000 characters that is no cheaper than before, and padding that shows nothing does not count:
hidden elements are removed before the cap, and a window emptied by blank lines, runs of spaces,
zero-width characters or ``&nbsp;`` is taken again with them squeezed out (VERSION 5; with
VERSION 3 a 32 KB run of newlines at the top hid the whole body; such padding can still take up
to about four fifths of the window). Texts longer than the old cap of 200,000 characters were
already cut the same way.

**Versions.**  1: the first.  2 (2026-11-23): all text is tokenized by the rules of
:func:`.normalize.reference_unicode_words` (ASCII text had its own byte path, which differed on
hyphen runs, words whose only digit is 0 and a sentence end not followed by white space), the
end of a text ends a sentence, and comments and script/style elements leave no space; most
fingerprints are unchanged bit for bit (1,666 of 2,000 messages of the speed set; the others
keep 124 or more of their 128 lanes).  3 (2026-11-23): the text cap went from 200,000 to
32,000 characters (fingerprints of shorter texts unchanged).  4 (2026-11-23): the 32,000
characters are counted after invisible characters are dropped and white space squeezed
(fingerprints of texts up to 32,000 characters unchanged).  5 (2026-11-23): only a window of
1,000 words or fewer is taken again squeezed (long texts are as in VERSION 3 unless padded;
VERSION 4 squeezed every window more than a third white space, at 0.1-0.15 ms per 50 KB).

Must never: do I/O, read a clock or the environment, or depend on ``hash()`` (randomized per
process): fingerprints are stored and compared across processes and machines, so any change
to how they are computed needs a new ``VERSION`` (the tests pin values).  The caches here
(word hashes, sentence values, masks, bodies' bins, densification orders, repeated contents;
the normalizer's lines, texts and subjects) only save time and are safe under threads.

**Repeated contents.**  Copies of a campaign that is not personalized carry the same body
byte for byte under a header of their own (To, Subject, Message-ID).  From the second time a
content (the body and the header fields that decide its decoding) is met, what its
fingerprint needs is kept (``_REPEATS``): its decoded text and attachments, the body's part
with nothing removed, and the words whose removal could change that part.  A copy then costs
its header (To/Cc names and addresses, subject) and a set test: when none of its recipients'
words is in the body or its links, the kept part serves; otherwise the body's part is computed
with them removed (the text is still not decoded again).  The result is the same value the
full way gives (tests compare them); a 2 KB copy costs about 125k instructions instead of
225k (callgrind).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from mailguard.core.fingerprint.cache import BoundedCache, probed_key
from mailguard.core.fingerprint.mime import (
    Extracted,
    addressees,
    content_of,
    extract,
    parse_message,
    subject_of,
)
from mailguard.core.fingerprint.normalize import (
    BREAK,
    body_words,
    encode_terms,
    exclusion_words,
    recipient_terms,
    subject_tokens,
)

Kind = Literal["sketch", "exact"]

VERSION = 5
LANES = 128
BANDS = 32
ROWS = LANES // BANDS
SHINGLE = 3  # (shingle_values is written for 3)
SHORT_WORDS = 8
SIMILARITY_THRESHOLD = 0.66

_KIND_CODES: dict[Kind, int] = {"sketch": 1, "exact": 2}
_KINDS: dict[int, Kind] = {code: kind for kind, code in _KIND_CODES.items()}
_HEADER = struct.Struct(">BBH")
_LANE_FORMAT = struct.Struct(f">{LANES}H")
_DIGEST_SIZE = 8
_MASK64 = (1 << 64) - 1

# Salts of the subject's and the attachments' features (fixed: changing them, or anything else
# in how values are computed, changes every fingerprint and needs a new VERSION).
_SUBJECT_SALT = 0x27D4EB2F165667C5
_ATTACHMENT_SALT = 0x85EBCA77C2B2AE63
_LINK_SALT = 0x94D049BB133111EB
_SHORT_SENTENCE_SALT = 0x2545F4914F6CDD1D
_VALUE_BITS = 30
_VALUE_SHIFT = 64 - _VALUE_BITS
_BIN_SHIFT = _VALUE_BITS - 7  # top 7 bits: one of 128 bins
_LANE_SHIFT = _BIN_SHIFT - 16  # the 16 bits below them are the lane
_LANE_MASK = 0xFFFF
_VALUE_CHUNK = (2**_VALUE_BITS - 1).to_bytes(8, "little")  # the low 30 bits of a 64-bit lane
_SENTINEL = 1 << _VALUE_BITS  # above every value: marks an empty bin
# Feature values are handled as arrays of little-endian uint32 (cached as their bytes).
_U32 = np.dtype("<u4")
_EMPTY = np.zeros(0, _U32)
_LANE_DTYPE = np.dtype(">u2")

assert LANES == 1 << (_VALUE_BITS - _BIN_SHIFT)
assert (_SENTINEL >> _LANE_SHIFT) & _LANE_MASK == 0  # an empty bin's lane is 0


def _donor_sequences() -> tuple[tuple[int, ...], ...]:
    """For each bin, the fixed pseudo-random order in which an empty bin looks for a donor."""
    sequences = []
    for lane in range(LANES):
        stream = hashlib.shake_128(b"mailguard-densify-%d" % lane).digest(2 * LANES)
        sequences.append(tuple(b % LANES for b in stream if b % LANES != lane))
    return tuple(sequences)


_DONORS = _donor_sequences()

# Word hashes (8 little-endian bytes each) are cached across messages, as vocabularies repeat;
# words longer than _CACHED_WORD bytes are not.  The caches only save time; each is emptied
# when it would pass its limits, so that it stays small in every gate worker whatever the mail.
_WORD_HASHES: dict[bytes, bytes] = {}
_WORD_CACHE_LIMIT = 1 << 16
_CACHED_WORD = 64
# Feature values of sentences (little-endian uint32s), cached: campaigns repeat their sentences;
# at most 32,768 sentences of at most 2,000 bytes, about 8 MB in all (.cache).
_SENTENCES: BoundedCache[bytes, bytes] = BoundedCache(1 << 15, 8 << 20, 2000, len)
# Lane masks for the packed shingle computation, by power-of-two lane count.
_MASKS: dict[int, int] = {}
# The bins of bodies (:class:`_Bins`), by their normalized words (``body_words`` output, the
# recipients' words removed): campaign copies normalize to the same words, so a copy's body
# costs one dict read.  At most 4,096 bodies of at most 64 KB, about 8 MB in all (.cache).
_BODIES: BoundedCache[bytes, _Bins] = BoundedCache(1 << 12, 8 << 20, 1 << 16, lambda _: 900)
# For each set of empty bins met (a bit mask), which bin's lane each lane takes (densified):
# a campaign's copies fill the same bins.  Emptied when it would pass its limit (about 2 MB).
# (Indices as intp: numpy converts narrower index arrays on every use, 3x slower.)
_DENSE_ORDERS: dict[int, NDArray[np.intp]] = {}
_DENSE_ORDER_LIMIT = 2048


def _word_digest(word: bytes) -> bytes:
    return hashlib.blake2b(word, digest_size=8, person=b"mg-word").digest()


def word_hash(word: bytes) -> int:
    """The 64-bit hash of one normalized word."""
    return int.from_bytes(_word_digest(word), "little")


def _packed_hashes(words: list[bytes]) -> bytes:
    """The words' hashes as one byte string, 8 little-endian bytes per word."""
    cache = _WORD_HASHES
    try:
        return b"".join(map(cache.__getitem__, words))  # the usual case: all cached
    except KeyError:
        pass
    parts = list(map(cache.get, words))
    if None in parts:
        new = {word: _word_digest(word) for word in set(words).difference(cache)}
        if len(cache) + len(new) > _WORD_CACHE_LIMIT:
            cache.clear()
        cache.update((word, value) for word, value in new.items() if len(word) <= _CACHED_WORD)
        # (another thread may have cleared the cache meanwhile: never rely on it here)
        parts = [
            part if part is not None else new.get(word) or _word_digest(word)
            for part, word in zip(parts, words, strict=True)
        ]
    return b"".join(parts)  # type: ignore[arg-type]  # no None left


def _hash_values(words: list[bytes]) -> tuple[int, ...]:
    return struct.unpack(f"<{len(words)}Q", _packed_hashes(words))


def feature_value(hashes: Sequence[int], salt: int = 0) -> int:
    """The 30-bit value of a feature made of word hashes (the scalar reference)."""
    total = salt
    for position, value in enumerate(hashes):
        total += value << position
    return (total & _MASK64) >> _VALUE_SHIFT


def _value_mask(count: int) -> int:
    size = 1 << max(count - 1, 0).bit_length()
    mask = _MASKS.get(size)
    if mask is None:
        mask = _MASKS[size] = int.from_bytes(_VALUE_CHUNK * size, "little")
    return mask


def _shingle_array(packed: bytes) -> NDArray[np.uint32]:
    """The values of every run of ``SHINGLE`` packed word hashes (see :func:`shingle_values`)."""
    count = len(packed) // 8
    if count < SHINGLE:
        return _EMPTY
    whole = int.from_bytes(packed, "little")
    # whole >> 63 is 2*h[i+1] in lane i, plus h[i]'s top bit; whole >> 126 is 4*h[i+2] plus
    # h[i+1]'s top two bits: low-bit crumbs like the carries below (SHINGLE is 3).
    summed = whole + (whole >> 63) + (whole >> 126)
    values = ((summed >> _VALUE_SHIFT) & _value_mask(count)).to_bytes(8 * count, "little")
    return np.frombuffer(values, _U32)[: 2 * (count - SHINGLE + 1) : 2]


def _packed_shingle_values(packed: bytes) -> list[int]:
    return [int(value) for value in _shingle_array(packed).tolist()]


def shingle_values(hashes: Sequence[int]) -> list[int]:
    """``feature_value`` of every run of ``SHINGLE`` word hashes, computed all at once.

    The hashes are packed into one integer ``x``, 64 bits each; ``x + (x >> 63) + (x >> 126)``
    then holds ``h[i] + 2*h[i+1] + 4*h[i+2]`` in lane ``i``, up to a few units in its lowest
    bits (the neighbouring hashes' top bits, a lane's overflow carried into the next), which
    change the top 30 bits with probability below 2**-30: harmless, and deterministic.
    """
    return _packed_shingle_values(b"".join(h.to_bytes(8, "little") for h in hashes))


def _subject_values(hashes: Sequence[int]) -> list[int]:
    """``feature_value`` of each run of ``SHINGLE`` subject word hashes (of all of them when
    fewer), with the subject's salt: the scalar definition, unrolled for 3."""
    if len(hashes) < SHINGLE:
        return [feature_value(hashes, _SUBJECT_SALT)] if hashes else []
    salt = _SUBJECT_SALT
    return [
        ((salt + first + (second << 1) + (third << 2)) & _MASK64) >> _VALUE_SHIFT
        for first, second, third in zip(hashes, hashes[1:], hashes[2:], strict=False)
    ]


def _link_values(hashes: Iterable[int]) -> list[int]:
    """``feature_value([h], _LINK_SALT)`` of each link's word hash."""
    return [((value + _LINK_SALT) & _MASK64) >> _VALUE_SHIFT for value in hashes]


def _attachment_values(digests: Iterable[str]) -> list[int]:
    values = []
    for digest in digests:
        try:
            head = int(digest[:16], 16)
        except ValueError:
            head = word_hash(digest.encode("utf-8", "surrogatepass"))
        values.append(feature_value([head], _ATTACHMENT_SALT))
    return values


@dataclass(frozen=True, slots=True, eq=False)
class _Bins:
    """Feature values hashed into the ``LANES`` bins (one permutation hashing), not densified.

    ``smallest``: each bin's smallest value (``_SENTINEL`` when the bin is empty); ``lanes``:
    each bin's lane (bits 7..22 of its smallest value; 0 for an empty bin), big-endian as
    serialized, read-only; ``empty``: bit ``b`` set when bin ``b`` is empty; ``words``: the
    body's word count (``Fingerprint.words``, uncapped).  Shared through ``_BODIES``: never
    mutated.
    """

    smallest: array[int]  # typecode "I" (unsigned 32-bit)
    lanes: NDArray[np.uint16]
    empty: int
    words: int = 0


def _bins(values: NDArray[np.uint32] | Sequence[int], words: int = 0) -> _Bins:
    """The bins of feature values (each bin's smallest value: one numpy ``minimum.at``)."""
    values = np.asarray(values, _U32)
    smallest = np.full(LANES, _SENTINEL, _U32)
    np.minimum.at(smallest, values >> _BIN_SHIFT, values)  # each bin's smallest value
    lanes = ((smallest >> _LANE_SHIFT) & _LANE_MASK).astype(_LANE_DTYPE)
    lanes.flags.writeable = False
    empty = np.packbits(smallest == _SENTINEL, bitorder="little").tobytes()
    return _Bins(array("I", smallest.tobytes()), lanes, int.from_bytes(empty, "little"), words)


def _with_extra(bins: _Bins, extra: Sequence[int]) -> tuple[NDArray[np.uint16], int]:
    """The lanes and empty-bin mask of ``bins`` with the feature values ``extra`` added."""
    if not extra:
        return bins.lanes, bins.empty
    smallest = bins.smallest
    lanes = bins.lanes.copy()  # bins is shared
    empty = bins.empty
    taken: dict[int, int] = {}  # bins the extra values have lowered so far
    for value in extra:
        bin_ = value >> _BIN_SHIFT
        if value < taken.get(bin_, smallest[bin_]):
            taken[bin_] = value
            lanes[bin_] = (value >> _LANE_SHIFT) & _LANE_MASK
    for bin_ in taken:
        empty &= ~(1 << bin_)
    return lanes, empty


def _densified(lanes: NDArray[np.uint16], empty: int) -> bytes:
    """The 128 lanes (big-endian) in their serialized form, each empty bin taking a donor's
    lane."""
    if not empty:  # the usual case for bodies of a few hundred words or more
        return lanes.tobytes()
    order = _DENSE_ORDERS.get(empty)
    if order is None:
        if len(_DENSE_ORDERS) >= _DENSE_ORDER_LIMIT:
            _DENSE_ORDERS.clear()
        order = _DENSE_ORDERS[empty] = np.array(_dense_order(empty), np.intp)
    return lanes[order].tobytes()


def _dense_order(empty: int) -> list[int]:
    """For each bin, the bin whose lane it takes: itself when filled, else its first filled
    donor ("optimal densification", module docstring), else the next filled bin after it, else
    itself (no bin is filled: every lane is 0)."""
    have = [bit == "0" for bit in f"{empty:0{LANES}b}"[::-1]]  # bit b of empty: bin b
    order = list(range(LANES))
    for lane in [bin_ for bin_ in order if not have[bin_]]:
        for donor in _DONORS[lane]:
            if have[donor]:
                order[lane] = donor
                break
        else:  # the pseudo-random sequence missed every filled bin: take the next one
            ring = [*range(lane, LANES), *range(lane)]
            order[lane] = next((bin_ for bin_ in ring if have[bin_]), lane)
    return order


def _lanes(values: NDArray[np.uint32] | Sequence[int]) -> bytes:
    """One permutation hashing of feature values into LANES lanes, densified."""
    bins = _bins(values)
    return _densified(bins.lanes, bins.empty)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A message's fingerprint (module docstring): a sketch of 128 lanes or an exact digest."""

    kind: Kind
    data: bytes
    words: int = 0

    def __post_init__(self) -> None:
        expected = LANES * 2 if self.kind == "sketch" else _DIGEST_SIZE
        if self.kind not in _KIND_CODES or len(self.data) != expected:
            raise ValueError(f"invalid {self.kind!r} fingerprint of {len(self.data)} bytes")
        if not 0 <= self.words <= 0xFFFF:
            raise ValueError(f"word count out of range: {self.words}")

    def to_bytes(self) -> bytes:
        return _HEADER.pack(VERSION, _KIND_CODES[self.kind], self.words) + self.data

    @classmethod
    def from_bytes(cls, raw: bytes) -> Fingerprint:
        """Parse ``to_bytes`` output; ``ValueError`` for anything else."""
        if len(raw) < _HEADER.size:
            raise ValueError("fingerprint too short")
        version, code, words = _HEADER.unpack_from(raw)
        if version != VERSION:
            raise ValueError(f"unknown fingerprint version {version}")
        kind = _KINDS.get(code)
        if kind is None:
            raise ValueError(f"unknown fingerprint kind {code}")
        return cls(kind, bytes(raw[_HEADER.size :]), words)

    @property
    def lanes(self) -> tuple[int, ...]:
        """The 128 lane values of a sketch; empty for an exact fingerprint."""
        return _LANE_FORMAT.unpack(self.data) if self.kind == "sketch" else ()


def _sentence_values(sentences: list[bytes]) -> list[bytes]:
    """The feature values of each sentence (words joined by single spaces), as uint32 bytes.

    A sentence of ``SHINGLE`` words or more has its shingles; a shorter one is one feature.
    The sentences are hashed and shingled together, each followed by ``BREAK``.
    """
    words = b" \x01 ".join(sentences).split()
    packed = _packed_hashes(words)
    values = _shingle_array(packed).tobytes()
    out: list[bytes] = []
    start = 0
    for sentence in sentences:
        stop = start + sentence.count(b" ") + 1
        if stop - start >= SHINGLE:
            out.append(values[4 * start : 4 * (stop - SHINGLE + 1)])
        else:
            hashes = [
                int.from_bytes(packed[8 * i : 8 * i + 8], "little") for i in range(start, stop)
            ]
            value = feature_value(hashes, _SHORT_SENTENCE_SALT)
            out.append(value.to_bytes(4, "little"))
        start = stop + 1
    return out


def _body_values(spaced: bytes) -> NDArray[np.uint32]:
    """Feature values of the body: shingles inside sentences, and whole short sentences.

    ``spaced`` is :func:`.normalize.body_words` output.  Campaign copies repeat their
    sentences, so each sentence's values are cached (the cache only saves time: a sentence's
    values depend on nothing else, up to the carries of :func:`shingle_values`).
    """
    sentences = list(filter(None, map(bytes.strip, spaced.split(BREAK))))
    return np.frombuffer(b"".join(_SENTENCES.values_of(sentences, _sentence_values)), _U32)


@dataclass(frozen=True, slots=True)
class _Body:
    """What the body gives a fingerprint, its recipients' words removed: the bins of its
    features when it has ``SHORT_WORDS`` words or more (``bins``), else its words (``words``,
    for the exact digest); its word count and its sorted distinct links."""

    bins: _Bins | None
    count: int
    links: list[bytes]
    words: list[bytes]


def _body(text: str, exclude: frozenset[bytes]) -> _Body:
    """The :class:`_Body` of a message's text without the words of ``exclude``."""
    spaced, link_list = body_words(text, exclude)
    links = sorted(set(link_list))
    bins = _BODIES.get(spaced)  # only bodies of SHORT_WORDS words or more are kept
    if bins is None:
        words = spaced.count(b" ") - 1 - spaced.count(BREAK)
        if words < SHORT_WORDS:
            return _Body(None, words, links, [w for w in spaced.split() if w != BREAK])
        bins = _bins(_body_values(spaced), words)
        _BODIES.keep_one(spaced, bins)
    return _Body(bins, bins.words, links, [])


def _assembled(body: _Body, subject: list[bytes], attachments: tuple[str, ...]) -> Fingerprint:
    """The fingerprint of a body, the subject's words and the attachments' digests."""
    bins = body.bins
    if bins is None:
        blob = b"\x00".join(subject) + b"\x01" + b"\x00".join(body.words)
        blob += b"\x01" + b"\x00".join(body.links) + b"\x01"
        blob += ",".join(sorted(attachments)).encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(blob, digest_size=_DIGEST_SIZE, person=b"mg-exact").digest()
        return Fingerprint("exact", digest, body.count)
    extra = _subject_values(_hash_values(subject)) if subject else []
    if body.links:
        extra += _link_values(_hash_values(body.links))
    if attachments:
        extra += _attachment_values(attachments)
    return Fingerprint("sketch", _densified(*_with_extra(bins, extra)), min(bins.words, 0xFFFF))


def _exclude(
    names: Sequence[str], addresses: Sequence[str], recipients: Sequence[str]
) -> frozenset[bytes]:
    """The recipients' words removed from a message (``normalize.recipient_terms``, encoded)."""
    return encode_terms(recipient_terms((*names, *addresses, *recipients)))


def fingerprint_of(extracted: Extracted, recipients: Sequence[str] = ()) -> Fingerprint:
    """The fingerprint of an already decoded message (see :func:`fingerprint`)."""
    exclude = _exclude(extracted.names, extracted.addresses, recipients)
    body = _body(extracted.text, exclude)
    return _assembled(body, subject_tokens(extracted.subject, exclude), extracted.attachments)


@dataclass(slots=True)
class _Repeat:
    """What is kept of a message content met more than once (``_REPEATS``): the raw body
    (compared whole on every hit), the text and attachments decoded from it, the words whose
    removal could change its body's part (``normalize.exclusion_words``), that part with
    nothing removed, and the last fingerprint assembled from it with its subject's words
    (set again by any thread: each value is a whole tuple)."""

    raw: bytes
    text: str
    attachments: tuple[str, ...]
    words: frozenset[bytes]
    plain: _Body
    size: int
    last: tuple[list[bytes], Fingerprint] | None = None


def _repeat(raw: bytes, text: str, attachments: tuple[str, ...]) -> _Repeat:
    plain = _body(text, frozenset())  # first: it keeps the text's words for exclusion_words
    words = exclusion_words(text)
    size = len(raw) + sys.getsizeof(text) + sys.getsizeof(words) + sum(map(sys.getsizeof, words))
    size += 2048 + sum(map(len, plain.links)) + sum(map(len, plain.words))  # bins, fingerprint
    return _Repeat(raw, text, attachments, words, plain, size)


# Message contents met more than once, by the fields of the header that decide how the body
# is decoded and the body itself (only its length and first and last _REPEAT_PROBE bytes in the
# key; the whole body is compared on a hit).  A content is kept from the second time it is met
# (_SEEN holds the hashes of those met once, so a personalized message, whose content is its
# own every time, costs a key and evicts nothing).  At most 1,024 contents of at most
# MAX_REPEATED_BODY bytes, about 16 MB in all (raw body, text, words), and 65,536 hashes.
_REPEAT_PROBE = 1024
MAX_REPEATED_BODY = 1 << 20
_REPEATS: BoundedCache[bytes, _Repeat] = BoundedCache(
    1 << 10, 16 << 20, 4 * _REPEAT_PROBE + 4096, lambda value: value.size
)
_SEEN: set[int] = set()
_SEEN_LIMIT = 1 << 16
_PER_COPY = (b"subject", b"to", b"cc")  # fields that do not decide how the body is decoded


def _repeat_of(head: list[tuple[bytes, bytes]], raw: bytes) -> _Repeat | None:
    """What is kept of the content of a message with ``head`` and body ``raw``; None when it
    is met for the first time (or is too long to keep)."""
    if len(raw) > MAX_REPEATED_BODY:
        return None
    about = b"\n".join(name + b":" + value for name, value in head if name not in _PER_COPY)
    key = probed_key(about, raw, _REPEAT_PROBE)
    entry = _REPEATS.get(key)
    if entry is not None:
        return entry if entry.raw == raw else None
    seen = hash(key)  # (a collision only keeps a content from its first time)
    if seen not in _SEEN:
        if len(_SEEN) >= _SEEN_LIMIT:
            _SEEN.clear()
        _SEEN.add(seen)
        return None
    entry = _repeat(raw, *content_of(head, raw))
    _REPEATS.keep_one(key, entry)
    return entry


def _fingerprint(message: bytes, recipients: Sequence[str]) -> Fingerprint:
    """``fingerprint_of(extract(message), recipients)`` (the same value; it may raise where
    ``extract`` falls back), the body's part taken from what was kept of a repeated content:
    the text and attachments depend only on the content (``mime.content_of``), and the body's
    part only on the text and on which of the recipients' words it holds
    (``normalize.exclusion_words``); names, addresses and subject are read from each copy."""
    head, raw = parse_message(message)
    exclude = _exclude(*addressees(head), recipients)
    subject = subject_tokens(subject_of(head), exclude)
    entry = _repeat_of(head, raw)
    if entry is None:
        text, attachments = content_of(head, raw)
        return _assembled(_body(text, exclude), subject, attachments)
    if not exclude.isdisjoint(entry.words):
        return _assembled(_body(entry.text, exclude), subject, entry.attachments)
    last = entry.last
    if last is not None and last[0] == subject:
        return last[1]
    found = _assembled(entry.plain, subject, entry.attachments)
    entry.last = (subject, found)
    return found


def fingerprint(message: bytes, recipients: Sequence[str] = ()) -> Fingerprint:
    """The fingerprint of a raw RFC 5322 message; ``recipients`` are envelope addresses."""
    data = bytes(message)
    try:
        return _fingerprint(data, recipients)
    except Exception:  # extract falls back on what it cannot decode; so does this, through it
        return fingerprint_of(extract(data), recipients)


# Per 16-bit lane: the low byte of each lane, and bit 0 of each lane.
_LOW_BYTES = int.from_bytes(b"\x00\xff" * LANES, "big")
_LOW_BITS = int.from_bytes(b"\x00\x01" * LANES, "big")


def similarity(a: Fingerprint, b: Fingerprint) -> float:
    """Estimated similarity in [0, 1] (module docstring)."""
    if a.kind != b.kind:
        return 0.0
    if a.kind == "exact":
        return 1.0 if a.data == b.data else 0.0
    diff = int.from_bytes(a.data, "big") ^ int.from_bytes(b.data, "big")
    folded = (diff | (diff >> 8)) & _LOW_BYTES  # a lane's low byte is non-zero iff lanes differ
    folded |= folded >> 4
    folded |= folded >> 2
    folded |= folded >> 1
    unequal = (folded & _LOW_BITS).bit_count()
    return (LANES - unequal) / LANES


_BAND_PREFIXES = [f"{band:02x}" for band in range(BANDS)]
_BAND_SLICES = [slice(band * ROWS * 4, (band + 1) * ROWS * 4) for band in range(BANDS)]


def band_keys(fp: Fingerprint) -> list[str]:
    """The LSH bucket keys of a fingerprint (module docstring); short, stable strings."""
    hexed = fp.data.hex()
    if fp.kind == "exact":
        return ["x" + hexed]
    return list(map(str.__add__, _BAND_PREFIXES, map(hexed.__getitem__, _BAND_SLICES)))


def new_cluster_id(fp: Fingerprint, now: float) -> str:
    """The id of a cluster founded by ``fp`` at ``now``: 16 hex digits."""
    blob = fp.to_bytes() + struct.pack(">d", now)
    return hashlib.blake2b(blob, digest_size=8, person=b"mg-cluster").hexdigest()
